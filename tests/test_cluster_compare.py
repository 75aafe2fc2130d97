"""python -m cluster.compare: the table from parsed ``dvc exp show --json``
output, and the command on a real DVC project whose stage is a small script
(the Keras pipeline's sweep is tests/test_sweeps.py)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cluster.compare import CompareError, flatten, parse_exp_show, render, sections, varied_params
from dvc_helpers import REPO, dvc_env, git_commit, run_dvc


def _entry(rev: str, params: dict, metrics: dict, name: str | None = None) -> dict:
    """One revision as dvc exp show --json gives it (params.yaml data, metrics files' data)."""
    return {"rev": rev, "name": name, "error": None, "data": {
        "rev": rev, "params": {"params.yaml": {"data": params}},
        "metrics": {f"metrics/{exp}.json": {"data": data} for exp, data in metrics.items()}}}


def _experiment(name: str, rev: str, params: dict, metrics: dict, state: str | None = "success") -> dict:
    revision = _entry(rev, params, metrics, name)
    if state == "failed":
        revision["error"] = {"msg": "Experiment run failed", "type": ""}
    return {"name": name, "executor": state and {"state": state, "name": "dvc-task"}, "revs": [revision]}


def _params(batch_size: int, epochs: int = 1, other_batch: int = 4) -> dict:
    return {"limits": {"max_epochs": None}, "experiments": {
        "ae": {"task": "autoencoder", "model": {"filters": [16, 8]},
               "training": {"batch_size": batch_size, "epochs": epochs}},
        "clf": {"task": "classifier", "training": {"batch_size": other_batch}}}}


def _ae(psnr: float | None, ssim: float) -> dict:
    test = {"ssim": ssim} if psnr is None else {"psnr": psnr, "ssim": ssim}
    return {"task": "autoencoder", "test": test}


CLF = {"task": "classifier", "test": {"accuracy": 0.5, "loss": 0.7}}


def _show(*experiments: dict, baseline: dict | None = None) -> list[dict]:
    base = baseline or _entry("a" * 40, _params(4), {"ae": _ae(20.0, 0.80), "clf": CLF}, "main")
    workspace = _entry("workspace", _params(4), {"ae": _ae(20.0, 0.80), "clf": CLF})
    return [workspace, {**base, "experiments": list(experiments)}]


SWEEP = _show(
    _experiment("bs-1", "b" * 40, _params(2), {"ae": _ae(21.5, 0.85), "clf": CLF}),
    _experiment("bs-2", "c" * 40, _params(8), {"ae": _ae(19.0, 0.70), "clf": CLF}),
    _experiment("bs-3", "d" * 40, _params(16), {"ae": _ae(21.5, 0.90), "clf": CLF}),
    _experiment("waiting", "e" * 40, _params(32), {}, state="queued"),
    # DVC shows a failed experiment with its baseline's metrics files
    _experiment("broken", "f" * 40, _params(0), {"ae": _ae(20.0, 0.80), "clf": CLF}, state="failed"),
)


def _rows(text: str) -> list[list[str]]:
    """The table rows after the header, as lists of cells."""
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines[1:]]


def test_parse_keeps_baseline_and_experiments_with_their_state_and_metrics_files():
    runs = parse_exp_show(SWEEP)
    assert [(r.name, r.state) for r in runs] == [
        ("main (baseline)", "baseline"), ("bs-1", "success"), ("bs-2", "success"), ("bs-3", "success"),
        ("waiting", "queued"), ("broken", "failed")]
    assert runs[1].params["experiments.ae.training.batch_size"] == 2
    assert runs[1].metrics["ae"]["test"]["psnr"] == 21.5 and set(runs[1].metrics) == {"ae", "clf"}


def test_an_experiment_run_without_the_queue_has_no_executor_and_counts_as_finished():
    runs = parse_exp_show(_show(_experiment("direct", "b" * 40, _params(2), {"ae": _ae(21.0, 0.8)}, state=None)))
    assert runs[1].state == "success"


def test_varied_params_are_those_that_differ_or_that_some_runs_lack():
    runs = parse_exp_show(SWEEP)
    runs[2].params["experiments.ae.training.seed"] = 1  # added with dvc exp run -S +...seed=1
    runs[3].params["experiments.ae.model.filters"] = [32, 8]
    assert varied_params(runs) == ["experiments.ae.model.filters", "experiments.ae.training.batch_size",
                                   "experiments.ae.training.seed"]
    assert varied_params(runs[:1]) == []


def test_the_sweep_is_compared_on_the_experiment_its_params_belong_to():
    runs = parse_exp_show(SWEEP)
    assert sections(runs, ["experiments.ae.training.batch_size"]) == ["ae"]
    assert sections(runs, ["experiments.ae.training.batch_size", "limits.max_epochs"]) == ["ae", "clf"]
    assert sections(runs, []) == ["ae", "clf"]
    assert sections(runs, ["experiments.ae.training.batch_size"], only=("clf",)) == ["clf"]
    with pytest.raises(CompareError, match=r"--only 'nope': no metrics file.*with metrics are: ae, clf"):
        sections(runs, [], only=("nope",))


def test_table_is_sorted_by_psnr_with_ssim_breaking_the_tie_and_the_best_marked():
    text = render(parse_exp_show(SWEEP))
    assert text.startswith("# Sweep: 3 experiments of main (aaaaaaa)")
    assert "Varied: `experiments.ae.training.batch_size`" in text
    assert "## ae (autoencoder), sorted by test.psnr then test.ssim" in text and "## clf" not in text
    assert "| experiment | training.batch_size | test.psnr | test.ssim |" in text
    assert _rows(text) == [["**bs-3** (best)", "16", "21.50", "0.9000"], ["bs-1", "2", "21.50", "0.8500"],
                           ["main (baseline)", "4", "20.00", "0.8000"], ["bs-2", "8", "19.00", "0.7000"]]
    assert "Not compared (not finished): waiting (queued), broken (failed)." in text


def test_classifier_ties_on_accuracy_are_broken_by_the_lower_loss_and_equal_rows_share_best():
    def clf(accuracy, loss):
        return {"task": "classifier", "test": {"accuracy": accuracy, "loss": loss}}

    text = render(parse_exp_show(_show(
        _experiment("lr-1", "b" * 40, _params(4, other_batch=2), {"clf": clf(0.75, 0.60)}),
        _experiment("lr-2", "c" * 40, _params(4, other_batch=8), {"clf": clf(0.75, 0.50)}),
        _experiment("lr-3", "d" * 40, _params(4, other_batch=16), {"clf": clf(0.75, 0.50)}),
        baseline=_entry("a" * 40, _params(4), {"clf": clf(0.5, 0.7)}, "main"))))
    assert "## clf (classifier), sorted by test.accuracy then test.loss" in text
    assert [row[0] for row in _rows(text)] == ["**lr-2** (best)", "**lr-3** (best)", "lr-1", "main (baseline)"]


def test_a_run_without_the_primary_metric_sorts_last_and_is_never_best():
    text = render(parse_exp_show(_show(
        _experiment("old", "b" * 40, _params(2), {"ae": _ae(None, 0.99)}),
        _experiment("new", "c" * 40, _params(8), {"ae": _ae(18.0, 0.5)}))))
    assert [row[0] for row in _rows(text)] == ["**main (baseline)** (best)", "new", "old"]
    assert _rows(text)[-1][2:] == ["-", "0.9900"]


def test_selected_experiments_and_their_baseline_only():
    runs = parse_exp_show(SWEEP, names=("bs-2", "bs-1"))
    assert [r.name for r in runs] == ["main (baseline)", "bs-1", "bs-2"]


@pytest.mark.parametrize("doc, names, message", [
    (_show(), (), "no experiments found; queue a sweep with dvc exp run --queue"),
    (SWEEP, ("bs-1", "bs-9"), "no experiment named 'bs-9'; the experiments there are: broken, bs-1, bs-2"),
    (_show(_experiment("waiting", "e" * 40, _params(32), {}, state="queued")), (),
     r"none of the experiments has finished: waiting \(queued\)"),
])
def test_nothing_to_compare_is_an_error_that_says_why(doc, names, message):
    with pytest.raises(CompareError, match=message):
        parse_exp_show(doc, names)


def test_flatten_keeps_lists_and_empty_sections_as_values():
    assert flatten({"a": {"b": [1, 2], "c": {}}, "d": None}) == {"a.b": [1, 2], "a.c": {}, "d": None}


# --- the command, on a real DVC project -------------------------------------------------------

SCORE = '''\
"""A stand-in for evaluate: metrics/<name>.json from the experiment's params, no model."""
import json, sys, yaml
name = sys.argv[1]
training = yaml.safe_load(open("params.yaml"))["experiments"][name]["training"]
psnr = 30.0 - abs(training["batch_size"] - 8) / 2 + training["epochs"]
json.dump({"task": "autoencoder", "test": {"psnr": psnr, "ssim": psnr / 40}}, open(f"metrics/{name}.json", "w"))
'''

DVC_YAML = {"stages": {"evaluate": {"foreach": "${experiments}", "do": {
    "cmd": "python score.py ${key}", "deps": ["score.py"], "params": ["experiments.${key}"],
    "metrics": [{"metrics/${key}.json": {"cache": False}}]}}}}


def _compare(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.compare", "--repo", str(project), *args], cwd=REPO,
                          env=dvc_env(), capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> Path:
    """A project with one experiment ``toy``, committed and run, then a batch-size sweep run by DVC."""
    project = tmp_path_factory.mktemp("compare") / "proj"
    (project / "metrics").mkdir(parents=True)
    (project / "score.py").write_text(SCORE)
    (project / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML, sort_keys=False))
    (project / "params.yaml").write_text(yaml.safe_dump(
        {"experiments": {"toy": {"task": "autoencoder", "training": {"batch_size": 4, "epochs": 1}}}}))
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    run_dvc(project, "init", "-q")
    run_dvc(project, "repro")
    git_commit(project, "baseline")
    run_dvc(project, "exp", "run", "--queue", "-n", "bs", "-S", "experiments.toy.training.batch_size=8,16")
    run_dvc(project, "exp", "run", "--run-all")
    return project


def test_the_command_compares_a_real_sweep(swept):
    result = _compare(swept)
    assert result.returncode == 0, result.stderr
    branch = subprocess.run(["git", "rev-parse", "--abbrev-ref", "HEAD"], cwd=swept, capture_output=True,
                            text=True, check=True).stdout.strip()
    # psnr = 30 - |batch_size - 8| / 2 + epochs: batch 8 is best, then 4 (the baseline), then 16
    assert _rows(result.stdout) == [["**bs-1** (best)", "8", "31.00", "0.7750"],
                                    [f"{branch} (baseline)", "4", "29.00", "0.7250"],
                                    ["bs-2", "16", "27.00", "0.6750"]], result.stdout
    assert "Varied: `experiments.toy.training.batch_size`" in result.stdout

    out = swept / "reports" / "sweep.md"
    written = _compare(swept, "--exp", "bs-2", "--out", str(out))
    assert written.returncode == 0, written.stderr
    assert [row[0] for row in _rows(out.read_text())] == [f"**{branch} (baseline)** (best)", "bs-2"]
    assert not [p for p in out.parent.iterdir() if p.name != "sweep.md"]  # no temporary left


def test_the_command_names_an_unknown_experiment_and_exits_1(swept):
    result = _compare(swept, "--exp", "bs-9")
    assert result.returncode == 1
    assert "no experiment named 'bs-9'; the experiments there are: bs-1, bs-2" in result.stderr
    assert result.stdout == ""


def test_the_command_on_a_commit_without_experiments_exits_1(swept, tmp_path):
    project = shutil.copytree(swept, tmp_path / "proj", symlinks=True)  # the other tests keep their HEAD
    (project / "notes.txt").write_text("a commit of its own\n")
    subprocess.run(["git", "add", "notes.txt"], cwd=project, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@localhost", "commit", "-qm", "notes"],
                   cwd=project, check=True)
    result = _compare(project)
    assert result.returncode == 1
    assert "no experiments found; queue a sweep" in result.stderr
    older = _compare(project, "--rev", "HEAD~1")
    assert older.returncode == 0 and "bs-1" in older.stdout, older.stderr
    everything = _compare(project, "--all-commits")
    assert everything.returncode == 0 and "bs-2" in everything.stdout, everything.stderr


def test_the_command_starts_without_the_heavy_libraries():
    heavy = ("tensorflow", "keras", "jax", "mlflow", "torch")
    code = f"import sys, cluster.compare\nprint(','.join(m for m in {heavy!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""
