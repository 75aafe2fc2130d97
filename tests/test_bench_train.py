"""benchmarks/bench_train.py: its seed scripts build the experiments' models,
and --interleave's turn taking runs one process at a time in the stated
order and times each turn (its real runs need the prepared data)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import bench_module

REPO = Path(__file__).resolve().parents[1]
BENCH = [sys.executable, "-m", "benchmarks.bench_train"]


@pytest.fixture(scope="module")
def bench():
    return bench_module.load("bench_train")


def _layers(model):
    """(kind, output shape, weights) of every layer but the input and activations."""
    return [(type(layer).__name__, tuple(layer.output.shape[1:]), layer.count_params())
            for layer in model.layers if type(layer).__name__ not in ("InputLayer", "Softmax")]


SCRIPTED = ["mnist_cae", "fashion_mnist_cae", "mnist_denoise", "cifar10_cae_4pool", "cifar10_cae_3pool",
            "cifar10_cnn", "colored_mnist_cnn", "colored_mnist_cnn_broken"]


def test_the_seed_scripts_are_the_seed_figures_experiments_and_their_models_twins(bench):
    from benchmarks.harness import load_params

    scripts = bench.seed_scripts(load_params())
    assert sorted(scripts) == sorted(SCRIPTED)  # not colored_mnist_red_only: its model, but Adam for RMSprop
    assert scripts["fashion_mnist_cae"] == "mnist_cae"
    assert all(scripts[name] == name for name in SCRIPTED if name != "fashion_mnist_cae")


@pytest.mark.parametrize("name", SCRIPTED)
def test_seed_script_builds_the_experiments_model(bench, name):
    """The benchmark compares like with like: the seed script's model has the
    stage's layers, shapes and weight counts, and the same output activation."""
    from benchmarks.harness import load_params
    from stages import params as params_mod
    from stages.models import build

    exp = params_mod.experiment(params_mod.load(REPO / "params.yaml"), name)
    shape = {"cifar10": (32, 32, 3), "colored": (28, 28, 3)}.get(name.split("_")[0], (28, 28, 1))
    seed = bench.seed_model(bench.seed_scripts(load_params())[name], shape)
    ours = build(exp.model, shape, 10)
    assert _layers(seed) == _layers(ours)
    assert seed.count_params() == ours.count_params()
    assert _head(seed) == _head(ours)


def _head(model):
    """The output's activation: a softmax Dense layer counts as a linear one and a Softmax layer."""
    last = [layer for layer in model.layers if hasattr(layer, "activation")][-1]
    activation = last.activation.__name__
    softmax = activation == "softmax" or type(model.layers[-1]).__name__ == "Softmax"
    return ("linear" if activation == "softmax" else activation), softmax


def test_unknown_experiment_is_refused_by_name():
    result = subprocess.run([*BENCH, "--experiments", "mnist_cae_plus"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "no seed script for mnist_cae_plus" in result.stderr


def test_set_changes_each_named_experiment_for_ours(bench):
    import yaml
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    changed = bench.with_overrides(params, ["mnist_cae", "cifar10_cnn"],
                                   ["training.mixed_precision=true", "training.steps_per_execution=4"])
    for name in ("mnist_cae", "cifar10_cnn"):
        assert changed["experiments"][name]["training"]["mixed_precision"] is True
        assert changed["experiments"][name]["training"]["steps_per_execution"] == 4
    assert "mixed_precision" not in changed["experiments"]["mnist_denoise"]["training"]
    assert "mixed_precision" not in params["experiments"]["mnist_cae"]["training"]  # a copy
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        bench.with_overrides(params, ["mnist_cae"], ["training.mixed_precision"])


def test_a_bad_set_is_refused_naming_the_key():
    result = subprocess.run([*BENCH, "--experiments", "mnist_cae", "--set", "training.mixed_precison=true"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "unknown key 'experiments.mnist_cae.training.mixed_precison' (did you mean 'mixed_precision'?)" \
        in result.stderr, result.stderr


CHILD = textwrap.dedent("""
    import sys, time
    from benchmarks.bench_train import Turns
    name, log, sleeps, fail_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    turns = Turns.from_env()
    for i, seconds in enumerate(map(float, sleeps.split(","))):
        turns.next()
        if i == fail_at:
            sys.exit(3)
        with open(log, "a") as f:
            f.write(f"{{name}}{{i}} start {{time.perf_counter()}}\\n")
        time.sleep(seconds)
        with open(log, "a") as f:
            f.write(f"{{name}}{{i}} end {{time.perf_counter()}}\\n")
""")


def _children(bench, tmp_path, specs):
    script = tmp_path / "child.py"
    script.write_text(CHILD.format())
    log = tmp_path / "turns.log"
    processes, children = [], {}
    for name, sleeps, fail_at in specs:
        process, go, done = bench.spawn_with_turns(
            [sys.executable, str(script), name, str(log), sleeps, str(fail_at)], tmp_path, {"PYTHONPATH": str(REPO)},
            subprocess.DEVNULL)
        processes.append(process)
        children[name] = (go, done, process.pid)
    return processes, children, log


def _close(children):
    for go, done, _ in children.values():
        os.close(go)
        os.close(done)


def test_turns_alternate_never_overlap_and_are_timed(bench, tmp_path):
    processes, children, log = _children(bench, tmp_path, [("A", "0.05,0.3,0.05", -1), ("B", "0.25,0.05,0.2", -1)])
    turns = bench.take_turns(children, rounds=3)
    _close(children)
    times = {name: turn["wall"] for name, turn in turns.items()}
    for process in processes:
        assert process.wait(timeout=30) == 0
    events = [line.split() for line in log.read_text().splitlines()]
    starts = [turn for turn, kind, _ in events if kind == "start"]
    assert starts == ["A0", "B0", "B1", "A1", "A2", "B2"]  # the order flips every round
    moments = [float(t) for _, _, t in events]
    assert moments == sorted(moments)  # every turn ended before the next began
    assert [kind for _, kind, _ in events] == ["start", "end"] * 6
    # a turn lasts at least the work done in it
    assert all(t >= s for t, s in zip(times["A"], (0.05, 0.3, 0.05)))
    assert all(t >= s for t, s in zip(times["B"], (0.25, 0.05, 0.2)))
    # its CPU time is the process's: sleeping is not CPU time (the first turns also hold start-up)
    cpu = turns["A"]["cpu"][1:] + turns["B"]["cpu"][1:]
    assert all(c is not None and 0 <= c < 0.25 for c in cpu)


def test_cpu_seconds_counts_this_process_work(bench):
    import time
    before, own = bench.cpu_seconds(os.getpid()), time.process_time()
    while time.process_time() - own < 0.3:  # 0.3 s on a CPU, however long that takes on a busy machine
        pass
    assert bench.cpu_seconds(os.getpid()) - before >= 0.25  # /proc counts in 10 ms ticks


def test_thread_cpu_names_the_thread_that_worked_and_the_median_keeps_the_middle_rounds(bench):
    """A named thread's busy loop shows under its name (the trailing number
    dropped), not under the main thread's; the median is taken over the
    rounds paired() keeps, 0 where a kind did not run."""
    import threading
    import time

    read = threading.Event()

    def spin():
        own = time.thread_time()
        while time.thread_time() - own < 0.3:
            pass
        read.wait(10)  # alive until it is read: a thread gone is not counted

    before = bench.thread_cpu(os.getpid())
    worker = threading.Thread(target=spin)
    worker.start()
    while worker.native_id is None:
        time.sleep(0.001)
    Path(f"/proc/self/task/{worker.native_id}/comm").write_text("spinner_7")
    deadline = time.monotonic() + 10
    while bench.thread_cpu(os.getpid()).get("spinner", 0) < 0.25 and time.monotonic() < deadline:
        time.sleep(0.01)
    used = bench.thread_use(before, bench.thread_cpu(os.getpid()))
    read.set()
    worker.join()
    assert used["spinner"] >= 0.25, used  # /proc counts in 10 ms ticks
    assert used.get("python", 0) < used["spinner"], used  # the main thread mostly slept
    rounds = [{"a": 9.0}, {"a": 1.0, "b": 2.0}, {"a": 3.0}, {"a": 2.0, "b": 4.0}, {"a": 9.0, "b": 9.0}]
    assert bench.threads_median(rounds) == {"a": 2.0, "b": 2.0}  # rounds 2-4; b: 2, 0, 4


def test_a_child_that_dies_gets_no_more_turns_and_nothing_hangs(bench, tmp_path):
    processes, children, log = _children(bench, tmp_path, [("A", "0.01,0.01,0.01,0.01", 1),
                                                          ("B", "0.01,0.01,0.01,0.01", -1)])
    times = {name: turn["wall"] for name, turn in bench.take_turns(children, rounds=4).items()}
    _close(children)
    assert [process.wait(timeout=30) for process in processes] == [3, 0]
    assert len(times["A"]) == 2 and len(times["B"]) == 4  # its first turn, then the one it died in
    assert "A1" not in log.read_text() and "B3 end" in log.read_text()


def test_paired_ratio_leaves_out_the_first_and_last_rounds(bench):
    result = bench.paired([10.0, 2.0, 4.0, 3.0, 9.0], [20.0, 1.0, 4.0, 6.0, 1.0])
    assert result["ratios"] == [2.0, 1.0, 0.5] and result["median_ratio"] == 1.0
    assert result["total_ratio"] == pytest.approx(9 / 11, abs=1e-3) and result["rounds_used"] == 3
    with pytest.raises(SystemExit, match="at least 3"):
        bench.paired([1.0, 1.0], [1.0, 1.0])


def test_table_without_the_seed_or_evaluate_says_n_a(bench):
    ours = bench.summarise({"epoch_s": [3.0, 1.0, 1.2], "stage_s": 9.5, "peak_rss_mib": 1200, "evaluate_s": None,
                            "evaluate_peak_rss_mib": None, "device_peak_mib": 812}, 70000)
    assert ours["images_per_s"] == pytest.approx(70000 / 1.1)
    row = bench.table({"experiments": {"mnist_cae": {
        "training_images": 70000, "batch_size": 256, "epochs": 3, "seed": None, "ours": ours,
        "ratio_images_per_s": None, "ratio_fastest": None}}}).splitlines()[-1]
    assert row.startswith("| `mnist_cae` | 70,000 | 256 | n/a | 63,636 | n/a | n/a | n/a | 1.10 s | 9.5 s | n/a |")
    assert row.endswith("| 1,200 / n/a | n/a / 812 MiB |")
