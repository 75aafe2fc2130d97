"""stages/provenance.py: the commit, data hashes, machine and versions a result records."""



import yaml

from stages import provenance


def test_data_hashes_come_from_the_stage_that_wrote_the_file(tmp_path):
    lock = tmp_path / "dvc.lock"
    lock.write_text(yaml.safe_dump({"schema": "2.0", "stages": {
        "prepare@mnist": {"cmd": "x", "outs": [{"path": "data/prepared/mnist.npz", "md5": "aa11"}]},
        "corrupt@noisy": {"cmd": "y", "deps": [{"path": "data/prepared/mnist.npz", "md5": "stale"}],
                          "outs": [{"path": "data/corrupted/noisy.npz", "md5": "bb22"}]},
    }}))
    found = provenance.data_hashes(["data/prepared/mnist.npz", "data/corrupted/noisy.npz", "data/none.npz"], lock)
    assert found == {"data/prepared/mnist.npz": "aa11", "data/corrupted/noisy.npz": "bb22"}
    assert provenance.data_hashes(["data/prepared/mnist.npz"], tmp_path / "missing.lock") == {}


def test_a_copied_tree_names_its_source_commit_over_any_git_it_holds(tmp_path, monkeypatch):
    import subprocess

    monkeypatch.delenv(provenance.SOURCE_COMMIT, raising=False)
    assert provenance.git_state(tmp_path) == {"git_commit": "unknown", "git_dirty": "unknown"}  # no .git at all
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q",
                    "--allow-empty", "-m", "old"], check=True)
    old = provenance.git_state(tmp_path)["git_commit"]
    assert len(old) == 40
    monkeypatch.setenv(provenance.SOURCE_COMMIT, "0123abcd")
    assert provenance.git_state(tmp_path) == {"git_commit": "0123abcd", "git_dirty": "unknown"}


def test_environment_names_the_machine_backend_and_versions():
    env = provenance.environment()
    assert env["cpu"] and env["cpu"] != "unknown"
    assert env["accelerator"]  # "none" without one
    assert env["keras_backend"] in env and env["numpy"]
