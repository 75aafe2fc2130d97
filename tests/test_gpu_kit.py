"""offline_gpu/kit.py and on_node.sh: what the kit for a GPU node without
internet holds, and how on_node.sh fails without one. (A whole run, with the
wheels downloaded here and installed into an environment holding only a GPU
node's packages, needs the package index and is not a test.)"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from benchmarks.harness import apply_overrides, seed_experiments
from offline_gpu import kit

ROOT = Path(__file__).resolve().parents[1]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


def test_the_kit_selects_the_mirrors_cifar10_copy_and_any_set():
    settings = kit.settings(PARAMS, ["limits.max_epochs=1"])
    assert settings == ["datasets.cifar10.source.builtin=cifar10_jpeg", "limits.max_epochs=1"]
    without_cifar10 = {**PARAMS, "datasets": {"mnist": PARAMS["datasets"]["mnist"]}}
    assert kit.settings(without_cifar10, []) == []


def test_the_seed_experiments_need_two_mirror_folders():
    params = apply_overrides(yaml.safe_load((ROOT / "params.yaml").read_text()), kit.settings(PARAMS, []))
    seeds = seed_experiments(params)
    assert kit.mirror_dirs(params, seeds) == ["cifar10-jpeg", "mnist"]
    assert kit.mirror_dirs(params, ["mnist_denoise"]) == ["mnist"]
    assert kit.mirror_dirs(PARAMS, ["cifar10_cnn"]) == ["cifar10"]  # params.yaml's own: the official archive


def test_a_dataset_from_a_url_or_folder_is_named():
    params = {**PARAMS, "datasets": {**PARAMS["datasets"], "mnist": {"source": {"path": "digits.zip"}}}}
    with pytest.raises(SystemExit, match="datasets.mnist is not a builtin source"):
        kit.mirror_dirs(params, ["mnist_cae"])


def test_wheels_are_pinned_to_what_is_installed_here():
    pins = kit.pinned(("keras", "pydantic"))
    assert pins == [f"keras=={importlib.metadata.version('keras')}",
                    f"pydantic=={importlib.metadata.version('pydantic')}"]
    with pytest.raises(SystemExit, match="no-such-package is not installed here"):
        kit.pinned(("no-such-package",))


def test_a_kit_over_max_mib_is_refused_and_nothing_is_left(tmp_path, monkeypatch):
    """The size check, with pip's download of the wheels left out: a kit of a
    1.5 MiB mnist folder and the project's files is over a 1 MiB limit, and
    within none."""
    mirror = tmp_path / "mirror"
    (mirror / "mnist").mkdir(parents=True)
    (mirror / "mnist" / "train-images-idx3-ubyte.gz").write_bytes(os.urandom(3 * 2**20 // 2))
    run = subprocess.run
    monkeypatch.setattr(kit.subprocess, "run", lambda cmd, **kwargs: None if "pip" in cmd else run(cmd, **kwargs))
    args = ["--mirror", str(mirror), "--experiments", "mnist_cae", "--dest", str(tmp_path / "kit")]
    with pytest.raises(SystemExit, match=r"over the 1 MiB of --max-mib"):
        kit.main([*args, "--max-mib", "1"])
    assert not (tmp_path / "kit").exists() and not (tmp_path / "kit.partial").exists()
    assert kit.main([*args, "--max-mib", "0"]) == 0
    assert (tmp_path / "kit" / "experiments.txt").read_text() == "mnist_cae\n"
    assert (tmp_path / "kit" / "settings.txt").read_text() == "datasets.cifar10.source.builtin=cifar10_jpeg\n"
    assert (tmp_path / "kit" / "mirror" / "mnist" / "train-images-idx3-ubyte.gz").is_file()


def test_on_node_refuses_to_start_without_a_kit(tmp_path):
    env = {**os.environ, "GPU_KIT": str(tmp_path / "nothing"), "OUT": str(tmp_path / "out")}
    result = subprocess.run(["bash", str(ROOT / "offline_gpu/on_node.sh"), "data"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f"on_node: no kit in {tmp_path / 'nothing'}" in result.stdout
    assert "no kit" in (tmp_path / "out/on_node.log").read_text()
