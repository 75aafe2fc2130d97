"""benchmarks/bench_scaling.py: the line it fits through epoch times (its runs need the real data)."""

import pytest

import bench_module


def test_fitted_line_recovers_fixed_and_per_image_cost():
    bench = bench_module.load("bench_scaling")
    fixed, per_image = bench.fitted_line([1000, 2000, 4000], [1.5 + 0.002 * n for n in (1000, 2000, 4000)])
    assert fixed == pytest.approx(1.5) and per_image == pytest.approx(0.002)
