"""stages.keras_start: Keras imported without the optional integrations no
stage uses, which import as usual right after."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stages import keras_start

REPO = Path(__file__).resolve().parents[1]
SKIPPED = ("jax", "sklearn", "pandas", "pyarrow", "matplotlib.pyplot")


def _in_a_fresh_process(code: str, **env: str) -> str:
    base = {k: v for k, v in os.environ.items() if k not in ("KERAS_BACKEND", "KERAS_HOME")}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**base, "CUDA_VISIBLE_DEVICES": "", **env})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def test_the_train_stage_starts_on_tensorflow_without_them_and_they_import_afterwards():
    code = ("import sys, stages.train\n"
            f"before = [m for m in {SKIPPED!r} if m in sys.modules]\n"
            "import jax, sklearn.metrics, pandas, matplotlib.pyplot\n"
            "import keras\n"
            "print(before, keras.backend.backend(), float(keras.ops.sum(keras.ops.ones((2, 3)))),"
            " pandas.DataFrame({'a': [1]}).shape)")
    assert _in_a_fresh_process(code, KERAS_BACKEND="tensorflow") == "[] tensorflow 6.0 (1, 1)"


def test_keras_on_jax_gets_jax():
    code = ("import sys, stages.train, keras\n"
            "print('jax' in sys.modules, 'tensorflow' in sys.modules, keras.backend.backend())")
    assert _in_a_fresh_process(code, KERAS_BACKEND="jax") == "True False jax"


def test_keras_json_naming_jax_is_read_as_keras_reads_it(tmp_path):
    (tmp_path / "keras.json").write_text(json.dumps({"backend": "jax", "floatx": "float32"}))
    code = "import sys, stages.keras_start as k\nprint(k.backend_named(), k.keras.backend.backend())"
    assert _in_a_fresh_process(code, KERAS_HOME=str(tmp_path)) == "jax jax"


@pytest.mark.parametrize("config, env, expected", [
    (None, {}, "tensorflow"),
    ({"backend": "jax"}, {}, "jax"),
    ({"backend": "jax"}, {"KERAS_BACKEND": "tensorflow"}, "tensorflow"),  # the variable wins, as in Keras
    ({"floatx": "float32"}, {}, "tensorflow"),
    ("{not json", {}, None),  # unknown: JAX is not left out
])
def test_backend_named_and_what_is_left_out(tmp_path, monkeypatch, config, env, expected):
    monkeypatch.delenv("KERAS_BACKEND", raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if config is not None:
        (tmp_path / "keras.json").write_text(config if isinstance(config, str) else json.dumps(config))
    assert keras_start.backend_named() == expected
    assert ("jax" in keras_start.left_out()) == (expected == "tensorflow")
    assert set(keras_start.LEFT_OUT) <= set(keras_start.left_out())


def test_unimportable_only_within_the_block_and_only_what_was_not_imported(tmp_path, monkeypatch):
    (tmp_path / "probe_absent.py").write_text("VALUE = 1\n")
    (tmp_path / "probe_present.py").write_text("VALUE = 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("probe_absent", "probe_present"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    importlib.import_module("probe_present")
    with keras_start.unimportable(("probe_absent", "probe_present")):
        with pytest.raises(ImportError):
            importlib.import_module("probe_absent")
        assert importlib.import_module("probe_present").VALUE == 2
    assert importlib.import_module("probe_absent").VALUE == 1
    monkeypatch.delitem(sys.modules, "probe_absent")
    monkeypatch.delitem(sys.modules, "probe_present")


@pytest.mark.parametrize("env, expected", [
    ({}, "pooled True"),  # TensorFlow's pool counts what it holds: the 4 MB tensor
    ({"TF_CPU_ALLOCATOR_USE_BFC": "false"}, "malloc"),  # the environment's choice wins
])
def test_the_train_stage_pools_tensorflows_host_memory_unless_told_otherwise(env, expected):
    code = ("import stages.train, tensorflow as tf\n"
            "x = tf.ones((1000, 1000))\n"
            "try:\n"
            "    print('pooled', tf.config.experimental.get_memory_info('CPU:0')['current'] >= 4_000_000)\n"
            "except ValueError:  # 'Allocator stats not available': TensorFlow's default, plain malloc\n"
            "    print('malloc')")
    assert _in_a_fresh_process(code, KERAS_BACKEND="tensorflow", **env) == expected
