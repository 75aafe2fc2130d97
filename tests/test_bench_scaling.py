"""benchmarks/bench_scaling.py: the line it fits through epoch times (its runs need the real data)."""

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("bench_scaling", REPO / "benchmarks" / "bench_scaling.py")


def test_fitted_line_recovers_fixed_and_per_image_cost():
    bench = importlib.util.module_from_spec(SPEC)
    SPEC.loader.exec_module(bench)
    fixed, per_image = bench.fitted_line([1000, 2000, 4000], [1.5 + 0.002 * n for n in (1000, 2000, 4000)])
    assert fixed == pytest.approx(1.5) and per_image == pytest.approx(0.002)
