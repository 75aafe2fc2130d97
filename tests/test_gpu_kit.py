"""benchmarks/gpu_kit.py and gpu_session.sh: what a GPU session carries and
how its one command fails without a kit. (The full session was rehearsed on a
CPU with KERAS_BACKEND=jax in an environment holding only the GPU image's
packages and the kit's wheels; that needs PyPI and is not a test.)"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("gpu_kit", ROOT / "benchmarks" / "gpu_kit.py")
gpu_kit = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(gpu_kit)

PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


def test_the_seed_experiments_need_two_mirror_folders():
    assert gpu_kit.mirror_dirs(PARAMS, list(gpu_kit.SEEDS)) == ["cifar10-jpeg", "mnist"]
    assert gpu_kit.mirror_dirs(PARAMS, ["mnist_denoise"]) == ["mnist"]
    assert set(gpu_kit.SEEDS) <= set(PARAMS["experiments"])


def test_a_dataset_from_a_url_or_folder_is_named():
    params = {**PARAMS, "datasets": {**PARAMS["datasets"], "mnist": {"source": {"path": "digits.zip"}}}}
    with pytest.raises(SystemExit, match="datasets.mnist is not a builtin source"):
        gpu_kit.mirror_dirs(params, ["mnist_cae"])


def test_wheels_are_pinned_to_what_is_installed_here():
    pins = gpu_kit.pinned(("keras", "pydantic"))
    assert pins == [f"keras=={importlib.metadata.version('keras')}",
                    f"pydantic=={importlib.metadata.version('pydantic')}"]
    with pytest.raises(SystemExit, match="no-such-package is not installed here"):
        gpu_kit.pinned(("no-such-package",))


def test_the_session_refuses_to_start_without_a_kit(tmp_path):
    env = {**os.environ, "GPU_KIT": str(tmp_path / "nothing"), "OUT": str(tmp_path / "out")}
    result = subprocess.run(["bash", str(ROOT / "benchmarks/gpu_session.sh"), "data"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f"gpu_session: no kit in {tmp_path / 'nothing'}" in result.stdout
    assert "no kit" in (tmp_path / "out/session.log").read_text()
