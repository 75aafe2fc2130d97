"""The CI smoke's judgement (.ci/smoke.py): sanity floors and regressions against the baseline."""

import importlib.util
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import yaml

SPEC = importlib.util.spec_from_file_location("smoke", Path(__file__).resolve().parents[1] / ".ci" / "smoke.py")
smoke = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(smoke)


def _diff(**changes):
    return {f"metrics/{name}.json": {key: {"old": old, "new": new, "diff": new - old}
                                     for key, (old, new) in metrics.items()}
            for name, metrics in changes.items()}


def test_regressions_beyond_the_thresholds_fail_and_small_or_upward_changes_pass():
    diff = _diff(mnist_cae={"test.psnr": (16.7, 16.0), "test.ssim": (0.9, 0.1)},
                 fashion_mnist_cae={"test.psnr": (15.5, 15.2)},
                 cifar10_cnn={"test.accuracy": (0.41, 0.38)},
                 fashion_mnist_cnn={"test.accuracy": (0.82, 0.805)},
                 colored_mnist_cnn={"test.accuracy": (0.90, 0.97)},
                 colored_mnist_cnn_broken={"test.accuracy": (0.66, 0.20)})
    problems = smoke.regressions(diff, psnr_db=0.5, accuracy=0.02)
    assert len(problems) == 2
    assert problems[0].startswith("cifar10_cnn: test.accuracy fell from 0.4100 to 0.3800")
    assert problems[1].startswith("mnist_cae: test.psnr fell from 16.7000 to 16.0000 dB, more than the allowed 0.5 dB")
    assert smoke.regressions(diff, psnr_db=1.0, accuracy=0.05) == []
    assert smoke.regressions({}, 0.5, 0.02) == []


def test_the_regression_limits_are_read_through_the_params_validator(tmp_path):
    import pytest

    from stages.params import ParamsError

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"promotion": {"psnr_db": 0.3}}))
    limits = smoke.regression_limits(path)
    assert (limits.psnr_db, limits.accuracy) == (0.3, 0.02)  # the validator's default for what is not set
    path.write_text(yaml.safe_dump({"limits": {"max_epochs": 1}}))
    assert (smoke.regression_limits(path).psnr_db, smoke.regression_limits(path).accuracy) == (0.5, 0.02)
    path.write_text(yaml.safe_dump({"promotion": {"accuracy": 2.0}}))
    with pytest.raises(ParamsError, match="promotion.accuracy"):
        smoke.regression_limits(path)
    path.write_text(yaml.safe_dump({"promotion": {"acuracy": 0.1}}))
    with pytest.raises(ParamsError, match="did you mean 'accuracy'"):
        smoke.regression_limits(path)
    repo = smoke.regression_limits(Path(__file__).resolve().parents[1] / "params.yaml")
    assert repo.psnr_db > 0 and 0 < repo.accuracy < 1


def test_the_residual_autoencoders_and_resnets_are_left_out_on_the_cpu():
    params = {"experiments": {"small": {"model": {"kind": "cnn"}}, "res": {"model": {"kind": "resnet"}},
                              "res_ae": {"model": {"kind": "residual_autoencoder"}},
                              "colored_mnist_red_only": {"model": {"kind": "cnn"}}}}
    assert smoke.skipped_in_ci(params) == ["res", "res_ae", "colored_mnist_red_only"]


def test_new_experiments_without_a_baseline_are_not_regressions():
    diff = {"metrics/new_one.json": {"test.psnr": {"old": None, "new": 12.0}}}
    assert smoke.regressions(diff, 0.5, 0.02) == []


def _project(tmp_path, mnist_psnr, cnn_accuracy, denoise=(18.0, 9.4), epochs=2):
    from mlflow.tracking import MlflowClient

    experiments = {
        "mnist_cae": {"task": "autoencoder", "data": {"target": "prepared/mnist"}, "training": {"epochs": 10}},
        "mnist_denoise": {"task": "autoencoder", "data": {"target": "prepared/mnist"}, "training": {"epochs": 100}},
        "cnn": {"task": "classifier", "data": {"target": "prepared/mnist"}, "training": {"epochs": 5}},
        "cnn_broken": {"task": "classifier", "data": {"target": "prepared/mnist"}, "training": {"epochs": 5}},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"experiments": experiments}))
    tests = {"mnist_cae": {"psnr": mnist_psnr}, "mnist_denoise": {"psnr": denoise[0], "psnr_input": denoise[1]},
             "cnn": {"accuracy": cnn_accuracy}, "cnn_broken": {"accuracy": 0.05}}
    (tmp_path / "metrics").mkdir()
    for name, test in tests.items():
        (tmp_path / "metrics" / f"{name}.json").write_text(json.dumps({"epochs": epochs, "test": test}))
    (tmp_path / "reports").mkdir()
    for page in ("index.html", "summary.md"):
        (tmp_path / "reports" / page).write_text("x")
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("runs")
    for name in [*experiments, "report"]:
        run = client.create_run(experiment, run_name=name)
        client.set_terminated(run.info.run_id)
    return tmp_path


def test_a_sane_smoke_run_passes(tmp_path):
    assert smoke.check(_project(tmp_path, mnist_psnr=16.7, cnn_accuracy=0.8), max_epochs=2) == []


def test_floors_chance_the_denoiser_gain_and_epochs_are_checked(tmp_path):
    project = _project(tmp_path, mnist_psnr=9.0, cnn_accuracy=0.11, denoise=(10.0, 9.4), epochs=1)
    problems = smoke.check(project, max_epochs=2)
    assert "mnist_cae: test PSNR 9.00 dB not above the floor 12.0" in problems
    assert "cnn: test accuracy 0.110 not above 0.25" in problems
    assert any(p.startswith("mnist_denoise: test PSNR 10.00 dB not 3.0 dB above") for p in problems)
    assert "mnist_cae: trained 1 epochs, expected 2" in problems
    assert not any(p.startswith("cnn_broken: test accuracy") for p in problems)  # broken on purpose


def test_missing_outputs_and_unfinished_runs_are_reported(tmp_path):
    from mlflow.tracking import MlflowClient

    project = _project(tmp_path, mnist_psnr=16.7, cnn_accuracy=0.8)
    (project / "metrics" / "cnn.json").unlink()
    (project / "reports" / "index.html").unlink()
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    client.create_run(client.get_experiment_by_name("runs").experiment_id, run_name="stuck")
    problems = smoke.check(project, max_epochs=2)
    assert "cnn.json: missing" in problems
    assert "reports/index.html: missing" in problems
    assert "MLflow: run stuck is RUNNING" in problems


def test_the_red_only_robustness_check_is_judged_on_red_digits(tmp_path):
    project = _project(tmp_path, mnist_psnr=16.7, cnn_accuracy=0.8)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["experiments"]["digits_red_only"] = params["experiments"]["cnn"]
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    test = {"accuracy": 0.2, "colour_accuracy.red": 0.2, "colour_accuracy.green": 0.2}
    (project / "metrics" / "digits_red_only.json").write_text(json.dumps({"epochs": 2, "test": test}))
    assert "digits_red_only: test accuracy 0.200 not above 0.25" in smoke.check(project, max_epochs=2)
    test["colour_accuracy.red"] = 0.9
    (project / "metrics" / "digits_red_only.json").write_text(json.dumps({"epochs": 2, "test": test}))
    assert not any(p.startswith("digits_red_only") for p in smoke.check(project, max_epochs=2))
    diff = _diff(digits_red_only={"test.accuracy": (0.5, 0.3)})
    assert smoke.regressions(diff, psnr_db=0.5, accuracy=0.02) == []


def test_skipped_experiments_and_their_improvements_leave_the_copy(tmp_path):
    params = {"limits": {"max_epochs": None},
              "corruptions": {"grey": {"kind": "grayscale"}, "noisy": {"kind": "gaussian"}},
              "experiments": {
                  "seed": {"task": "classifier"}, "seed_plus": {"task": "classifier", "improves_on": "seed"},
                  "slow": {"task": "autoencoder", "data": {"input": "corrupted/grey", "target": "prepared/x"}},
                  "other": {"task": "autoencoder", "data": {"input": "corrupted/noisy", "target": "prepared/x"}}}}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    assert smoke.drop_experiments(path, {"seed", "slow"}) == ["seed", "seed_plus", "slow", "corruptions.grey"]
    kept = yaml.safe_load(path.read_text())
    assert list(kept["experiments"]) == ["other"] and kept["limits"] == {"max_epochs": None}
    assert list(kept["corruptions"]) == ["noisy"]


# .ci/run itself, driven by real bash and make over a stand-in Makefile whose
# test and smoke targets are shell commands: the exit codes it combines, and
# that leaving early stops both background jobs and their children.

CI_RUN = Path(__file__).resolve().parents[1] / ".ci" / "run"


def _ci_copy(tmp_path, test_cmd, smoke_cmd):
    (tmp_path / ".ci").mkdir(parents=True)
    (tmp_path / ".ci" / "run").write_text(CI_RUN.read_text())
    (tmp_path / "Makefile").write_text(f"setup:\nbrowser:\npostgres:\ntest:\n\t{test_cmd}\nsmoke:\n\t{smoke_cmd}\n")
    return tmp_path


def _run_ci(folder):
    def default_signals():  # a CI runner's process: SIGINT/SIGTERM not ignored, whatever pytest inherited
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)

    return subprocess.Popen(["bash", ".ci/run"], cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, preexec_fn=default_signals)


def test_ci_run_fails_when_either_the_tests_or_the_smoke_fail(tmp_path):
    for test_rc, smoke_rc, ok in ((0, 0, True), (3, 0, False), (0, 4, False)):
        folder = _ci_copy(tmp_path / f"{test_rc}{smoke_rc}", f"echo tests-ran; exit {test_rc}",
                          f"echo smoke-ran; exit {smoke_rc}")
        proc = _run_ci(folder)
        out, _ = proc.communicate(timeout=60)
        assert (proc.returncode == 0) is ok, out
        assert "tests-ran" in out and "smoke-ran" in out
        assert f"make test: exit {2 if test_rc else 0}; make smoke: exit {2 if smoke_rc else 0}" in out


def _pids(marker: str) -> list[int]:
    """Processes whose command line holds ``marker`` (read from /proc: no procps needed)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if marker in cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                found.append(int(cmdline.parent.name))
        except OSError:  # the process ended meanwhile
            pass
    return found


def _alive(marker: str) -> bool:
    return bool(_pids(marker))


def test_ci_run_stops_the_tests_and_the_smoke_when_interrupted_or_cancelled(tmp_path):
    for how in ("ctrl-c", "sigterm"):
        tag = random.randrange(10**8, 10**9)
        # the sleeps' durations carry a unique tag, so only this test's processes are found
        t_marker, s_marker = f"sleep 300.{tag}1", f"sleep 300.{tag}2"
        folder = _ci_copy(tmp_path / how, t_marker, s_marker)
        proc = _run_ci(folder)
        try:
            deadline = time.monotonic() + 30
            while not (_alive(t_marker) and _alive(s_marker)):
                assert time.monotonic() < deadline and proc.poll() is None, "the stand-in jobs never started"
                time.sleep(0.1)
            if how == "ctrl-c":
                os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the script's foreground group
            else:
                os.kill(proc.pid, signal.SIGTERM)  # a runner cancelling the job signals its main process
            proc.communicate(timeout=30)
            assert proc.returncode == (130 if how == "ctrl-c" else 143)
            deadline = time.monotonic() + 10
            while _alive(t_marker) or _alive(s_marker):
                assert time.monotonic() < deadline, f"{how}: a job of .ci/run was left running"
                time.sleep(0.1)
        finally:  # a failing run leaves nothing behind either
            for pid in _pids(f"sleep 300.{tag}"):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.kill()
            proc.communicate()
