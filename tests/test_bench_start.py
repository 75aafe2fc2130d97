"""benchmarks.bench_start: a model stage's start, ours against Keras imported
plainly first, in fresh processes (the docs' start-up figures come from it)."""

import json
import subprocess
import sys
from pathlib import Path

from bench_module import load

REPO = Path(__file__).resolve().parents[1]


def test_one_round_measures_both_ways_and_ours_leaves_the_integrations_out(tmp_path):
    out = tmp_path / "start.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.bench_start", "--rounds", "1", "--stages", "train",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["machine"]["backend"] == "tensorflow" and result["machine"]["cores"]
    (stage,) = result["stages"]
    assert stage["stage"] == "train" and stage["rounds"] == 1
    for way in ("ours", "plain"):
        (only,) = stage["turns"][way]
        assert only == stage[way] and only["wall_s"] > 0 and only["cpu_s"] > 0
    # JAX, scikit-learn and pandas not loaded: well over 50 MiB less (about 240 measured)
    assert stage["memory_saved_mib"] > 50, stage
    assert stage["ratio_cpu"] == round(stage["plain"]["cpu_s"] / stage["ours"]["cpu_s"], 3)
    assert "| `train` | 1 |" in done.stdout


def test_summary_takes_medians_and_the_table_shows_them():
    bench = load("bench_start")
    turns = [{"wall_s": w, "cpu_s": c, "peak_mib": m}
             for w, c, m in [(5.0, 4.0, 500), (7.0, 6.5, 800), (6.0, 5.0, 520)]]
    assert bench.summary(turns) == {"wall_s": 6.0, "cpu_s": 5.0, "peak_mib": 520}
    row = {"stage": "evaluate", "rounds": 3, "plain": {"wall_s": 6.5, "cpu_s": 6.25, "peak_mib": 1776},
           "ours": {"wall_s": 4.6, "cpu_s": 4.5, "peak_mib": 1530}, "ratio_wall": 1.413, "ratio_cpu": 1.389}
    assert bench.table([row]).splitlines()[-1] == \
        "| `evaluate` | 3 | 6.50 / 4.60 | 6.25 / 4.50 | 1.41x, 1.39x | 1,776 / 1,530 MiB |"
