"""Benchmarks of the pipeline's stages, each a module run from the project's
root: ``python -m benchmarks.<name>`` (``python -m benchmarks.bench_prepare``).
What they share (the machine, the results files, the experiment lists) is in
:mod:`benchmarks.harness`; results go to ``benchmarks/results/``."""
