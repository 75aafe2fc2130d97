"""Run the pipeline on a GPU node without internet (common on clusters).

Such a node often has a GPU, Python and JAX with CUDA, but neither this
project's other Python dependencies nor a way to download them or the
datasets. The kit carries both with a copy of the project:

1. Where there is internet or the offline dataset mirror, build the kit (an
   ignored folder, default ``.gpu/``): wheels of the packages the node lacks,
   pinned to the versions installed here, and the mirror folders the chosen
   experiments read, checked against a size limit (``--max-mib``)::

       DATA_MIRROR=../shared/datasets python -m offline_gpu.kit --dvc --experiments all --datasets mnist cifar10

2. Copy the project with its kit to the node and run the parts wanted there,
   from the project's root (results in ``$OUT``)::

       IMAGEPIPE_SOURCE_COMMIT=<commit> OUT=/tmp/out offline_gpu/on_node.sh data runs commit report

   ``offline_gpu.runs`` trains and evaluates the experiments side by side on
   the one GPU with exactly the commands of ``dvc.yaml``, and ``dvc commit``
   there records them in ``dvc.lock``.

3. Bring ``$OUT`` back: ``dvc.lock``, the small outputs (metrics, plots,
   reports) and ``report.md``, the markdown tables ``python -m
   offline_gpu.report OUT`` makes of what the parts measured.

The kit's mirror holds CIFAR-10 as its JPEG copy only: the kit selects it
(``datasets.cifar10.source.builtin=cifar10_jpeg``), and ``on_node.sh`` sets
that in the copy's params.yaml, so that the stages and ``dvc commit`` agree.
"""
