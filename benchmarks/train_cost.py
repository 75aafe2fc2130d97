"""What one training step of an experiment costs: FLOPs and bytes moved.

Two independent counts, so that a measured throughput can be turned into
achieved FLOP/s and memory bandwidth and set against a device's ceilings:

* ``analytic``: the multiply-adds of every convolution, transposed
  convolution and dense layer, from the layers' shapes (2 FLOPs each; a
  training step taken as 3x the forward pass: the forward product, then the
  gradients with respect to the inputs and to the weights). Everything
  else (activations, pooling, normalisation, the optimizer) is left out: it
  moves bytes rather than doing arithmetic.
* ``xla`` (JAX backend only): XLA's own cost analysis of the compiled train
  step (``flops`` and ``bytes accessed``), one batch at the experiment's
  batch size. On a GPU, convolutions run as cuDNN calls, which XLA may count
  differently from its own kernels; the two counts side by side show it.

    KERAS_BACKEND=jax python -m benchmarks.train_cost mnist_cae cifar10_cnn

prints one JSON object per experiment (per image and per step). Builds the
model as the train stage does (``stages.training.compiled_model``), from params.yaml.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from benchmarks.harness import PARAMS_FILE, write_results

log = logging.getLogger("train_cost")


def _shape(tensor) -> tuple[int, ...]:
    return tuple(int(d) for d in tensor.shape[1:])


def layer_macs(layer) -> int:
    """Multiply-adds of one image through ``layer``'s forward pass (0 for
    layers that do no products; nested models are counted layer by layer)."""
    import keras

    if isinstance(layer, keras.Model):
        return sum(layer_macs(inner) for inner in layer.layers)
    if isinstance(layer, keras.layers.Conv2DTranspose):
        h, w, c_in = _shape(layer.input)
        kh, kw = layer.kernel_size
        return h * w * c_in * kh * kw * layer.filters
    if isinstance(layer, keras.layers.Conv2D):
        h, w, c_out = _shape(layer.output)
        kh, kw = layer.kernel_size
        c_in = _shape(layer.input)[-1]
        return h * w * c_out * kh * kw * c_in // layer.groups
    if isinstance(layer, keras.layers.Dense):
        shape = _shape(layer.input)
        return int(np.prod(shape[:-1], dtype=np.int64)) * shape[-1] * layer.units
    return 0


def analytic(model) -> dict:
    """Forward and training FLOPs of one image (see the module's note)."""
    forward = 2 * sum(layer_macs(layer) for layer in model.layers)
    return {"forward_flops_per_image": forward, "train_flops_per_image": 3 * forward}


def xla_step_cost(model, x: np.ndarray, y: np.ndarray) -> dict:
    """XLA's cost analysis of the model's compiled train step on one batch
    (JAX backend): ``flops`` and ``bytes accessed`` for the whole batch."""
    import jax

    model.train_on_batch(x, y)  # builds the optimizer and metric variables the step takes
    state = tuple([v.value for v in variables] for variables in (
        model.trainable_variables, model.non_trainable_variables, model.optimizer.variables,
        model.metrics_variables))
    lowered = jax.jit(model.train_step).lower(state, (x, y))
    cost = lowered.compile().cost_analysis()
    if isinstance(cost, list):  # older JAX: one dict per computation
        cost = cost[0]
    return {"flops": float(cost.get("flops", float("nan"))),
            "bytes_accessed": float(cost.get("bytes accessed", float("nan")))}


def batch_for(exp, image_shape: tuple[int, ...], num_classes: int, rng: np.random.Generator):
    """A batch of random float images at the experiment's batch size, with
    targets of the right kind (images or labels)."""
    size = exp.training.batch_size
    x = rng.random((size, *image_shape), dtype=np.float32)
    if exp.task == "autoencoder":
        return x, x
    return x, rng.integers(0, num_classes, size)


def data_shape(exp) -> tuple[tuple[int, ...], int]:
    """The image shape and class count of the experiment's input file
    (``data/prepared/`` or ``data/corrupted/``, made by the data stages)."""
    from stages.experiment_data import data_path
    from stages.images import load

    data = load(data_path(exp.data.input))
    return tuple(int(d) for d in data.image_shape), len(data.class_names)


def experiment_cost(name: str, params_path: Path) -> dict:
    import keras

    from stages import params as params_mod
    from stages.training import compiled_model, configure_backend

    params = params_mod.load(params_path)
    exp = params_mod.experiment(params, name)
    image_shape, num_classes = data_shape(exp)
    configure_backend(exp.training.seed, exp.training.mixed_precision)
    targets = np.zeros((16, *image_shape), np.uint8)  # a linear path's PCA start needs images
    model = compiled_model(name, exp, image_shape, num_classes, 1, 1, targets)
    result = {"experiment": name, "batch_size": exp.training.batch_size, "image_shape": list(image_shape),
              "parameters": int(model.count_params()), **analytic(model)}
    if keras.backend.backend() == "jax":
        x, y = batch_for(exp, image_shape, num_classes, np.random.default_rng(0))
        step = xla_step_cost(model, x, y)
        result["xla_step"] = step
        result["xla_train_flops_per_image"] = step["flops"] / exp.training.batch_size
        result["xla_bytes_per_image"] = step["bytes_accessed"] / exp.training.batch_size
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiments", nargs="+")
    parser.add_argument("--params", type=Path, default=PARAMS_FILE)
    parser.add_argument("--out", type=Path, help="also write the results here as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    results = [experiment_cost(name, args.params) for name in args.experiments]
    for result in results:
        print(json.dumps(result))
    if args.out:
        write_results(results, out=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
