"""benchmarks/train_cost.py: FLOPs of a training step, counted from the layers
and by XLA; the two counts must agree where both apply."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import bench_module

REPO = Path(__file__).resolve().parents[1]


def _module():
    return bench_module.load("train_cost")


def _toy_model():
    import keras

    inputs = keras.Input((8, 8, 2))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)  # 8*8*4 outputs x 3*3*2
    x = keras.layers.Conv2D(6, 3, strides=2, padding="valid")(x)  # 3*3*6 outputs x 3*3*4
    x = keras.layers.Conv2DTranspose(3, 2, strides=2)(x)  # 3*3*6 inputs x 2*2*3
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Dense(5)(x)  # per position: 3*3 positions x 3 -> 5
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(2)(x)  # 45 -> 2
    return keras.Model(inputs, outputs)


def test_layer_counts_are_the_products_of_their_shapes():
    cost = _module()
    model = _toy_model()
    macs = [cost.layer_macs(layer) for layer in model.layers]
    assert macs == [0, 8 * 8 * 4 * 9 * 2, 3 * 3 * 6 * 9 * 4, 3 * 3 * 6 * 4 * 3, 0, 3 * 3 * 3 * 5, 0, 45 * 2]
    counted = cost.analytic(model)
    assert counted["forward_flops_per_image"] == 2 * sum(macs)
    assert counted["train_flops_per_image"] == 3 * counted["forward_flops_per_image"]


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax is not installed")
def test_xla_counts_the_train_step_as_the_layers_do(tmp_path):
    """XLA's cost analysis of the compiled step (JAX) against the layer count:
    within 10% (XLA also counts the element-wise work, and skips the first
    layer's input gradient, which the 3x rule includes)."""
    script = tmp_path / "probe.py"
    script.write_text(
        "import json\n"
        "import numpy as np, keras\n"
        "from benchmarks import train_cost as cost\n"
        "inputs = keras.Input((16, 16, 3))\n"
        "x = keras.layers.Conv2D(32, 3, padding='same', activation='relu')(inputs)\n"
        "x = keras.layers.Conv2D(32, 3, padding='same', activation='relu')(x)\n"
        "x = keras.layers.Flatten()(x)\n"
        "model = keras.Model(inputs, keras.layers.Dense(10, activation='softmax')(x))\n"
        "model.compile(optimizer='adam', loss='sparse_categorical_crossentropy')\n"
        "rng = np.random.default_rng(0)\n"
        "x, y = rng.random((64, 16, 16, 3), dtype=np.float32), rng.integers(0, 10, 64)\n"
        "print(json.dumps({**cost.analytic(model), **cost.xla_step_cost(model, x, y)}))\n")
    env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    counts = json.loads(result.stdout.strip().splitlines()[-1])
    per_image = counts["flops"] / 64
    assert per_image == pytest.approx(counts["train_flops_per_image"], rel=0.10)
    assert counts["bytes_accessed"] > 64 * 16 * 16 * 3 * 4  # at least the batch itself is read
