"""offline_gpu/report.py: markdown tables of what on_node.sh measured on a GPU node."""

from __future__ import annotations

import json
import tarfile

from benchmarks.harness import load_params, seed_experiments
from offline_gpu import report as gpu_report


def _ours(images_per_s: float, epoch_s: float, device_peak=None, history=None) -> dict:
    return {"epoch_s": [9.0, epoch_s, epoch_s], "stage_s": 30.0, "peak_rss_mib": 2000, "evaluate_s": None,
            "evaluate_peak_rss_mib": None, "device_peak_mib": device_peak, "median_epoch_s": epoch_s,
            "images_per_s": images_per_s, "fastest_epoch_s": epoch_s, "fastest_images_per_s": images_per_s,
            **({"history": history} if history is not None else {})}


def _result(ours: dict, overrides=(), seed=None, batch=256) -> dict:
    return {"machine": {"gpus": ["NVIDIA H200, 580.159.04, 143771 MiB"], "backend": "jax"},
            "ours_overrides": list(overrides), "experiments": {"mnist_cae": {
                "training_images": 70000, "batch_size": batch, "epochs": 3, "seed": seed, "ours": ours,
                "ratio_images_per_s": seed and ours["images_per_s"] / seed["images_per_s"],
                "ratio_fastest": seed and ours["fastest_images_per_s"] / seed["fastest_images_per_s"]}}}


COST = {"experiment": "mnist_cae", "xla_train_flops_per_image": 4.0e6, "xla_bytes_per_image": 2.0e6}


def test_achieved_rates_are_throughput_times_the_step_cost():
    assert gpu_report.achieved(100_000, COST) == "0.40 TFLOP/s, 200 GB/s"
    assert gpu_report.achieved(100_000, None) == "n/a"


def test_options_are_compared_with_ours_without_them():
    bench = _result(_ours(100_000, 0.7))
    last = {"loss": [0.09, 0.0712], "val_loss": [0.08, 0.07034567], "val_accuracy": [0.75, 0.8125]}
    rows = gpu_report.options_section([_result(_ours(140_000, 0.5, 812, last), ["training.data_on_device=true"]),
                                       _result(_ours(90_000, 0.78), [], batch=2048)], bench,
                                      {"mnist_cae": COST}).splitlines()
    assert rows[2] == ("| `mnist_cae` | training.data_on_device=true | 256 | 3 | 140,000 | 0.50 s | 1.40x | 812 MiB | "
                       "0.56 TFLOP/s, 280 GB/s | val_accuracy 0.8125, val_loss 0.07035 |")
    assert rows[3].startswith("| `mnist_cae` | none | 2048 | 3 | 90,000 | 0.78 s | 0.90x | n/a |")
    assert rows[3].endswith("| n/a |")  # a result from before the stage's history was recorded


def test_seed_runs_are_totalled_against_five_minutes():
    seeds = {"data_s": 12.0, "wall_s": 250.0, "overrides": [], "experiments": {
        "cifar10_cnn": {"epochs": 5, "train_s": 40.0, "evaluate_s": 10.0,
                        "test": {"accuracy": 0.678, "loss": 0.9}},
        "cifar10_cae_3pool": {"epochs": 25, "train_s": 136.0, "evaluate_s": 60.0,
                              "test": {"psnr": 22.24, "keras_accuracy": 0.747}}}}
    text = gpu_report.seeds_section(seeds)
    assert "| `cifar10_cae_3pool` | 25 | 136 s | 60 s | PSNR 22.24 dB, Keras accuracy 74.7% |" in text
    assert "| `cifar10_cnn` | 5 | 40 s | 10 s | test accuracy 67.80% |" in text
    assert "262 s in all against the 300 s target (met)" in text
    late = gpu_report.seeds_section({**seeds, "wall_s": 295.0})
    assert "307 s in all against the 300 s target (not met)" in late
    failed = gpu_report.seeds_section({**seeds, "failed": ["experiment cifar10_cnn: exit 1"]})
    assert "(not met); failed: experiment cifar10_cnn: exit 1" in failed
    rehearsal = gpu_report.seeds_section({**seeds, "overrides": ["limits.max_epochs=1"]})
    assert "(no verdict: not at seed settings)" in rehearsal and "With overrides limits.max_epochs=1" in rehearsal


def test_an_out_folder_becomes_one_report(tmp_path):
    timed = {**_ours(100_000, 0.7), "checkpoint_s": [0.3, 0.25, 0.4], "tracking_s": [0.02, 0.03, 0.01]}
    (tmp_path / "bench.json").write_text(json.dumps(_result(timed, seed=_ours(80_000, 0.875))))
    (tmp_path / "cost.json").write_text(json.dumps([COST]))
    option = tmp_path / "gpu_options" / "option1.json"
    option.parent.mkdir()
    option.write_text(json.dumps(_result(_ours(120_000, 0.58), ["training.mixed_precision=true"])))
    with tarfile.open(tmp_path / "options.tar.gz", "w:gz") as tar:
        tar.add(option.parent, arcname="gpu_options")
    text = gpu_report.report(tmp_path)
    assert "NVIDIA H200" in text and "## Ours against the seed's script" in text and "1.25x" in text
    assert "| `mnist_cae` | 0.40 TFLOP/s, 200 GB/s | 0.32 TFLOP/s, 160 GB/s | 0.30 / 0.40 s | 0.02 / 0.03 s |" in text
    assert "training.mixed_precision=true | 256 | 3 | 120,000 | 0.58 s | 1.20x" in text
    assert "## Seed experiments" not in text  # that part did not run


def _run(accuracy=None, psnr=None, train_s=30.0, ended_s=100.0):
    test = {"accuracy": accuracy} if accuracy is not None else {"psnr": psnr}
    return {"epochs": 5, "train_s": train_s, "evaluate_s": 9.0, "ended_s": ended_s, "test": test,
            "trained": {"fit_seconds": 20.0}}


def test_every_experiment_is_listed_and_the_two_targets_judged():
    seeds = {name: _run(psnr=20.0, ended_s=150.0 + i) for i, name in enumerate(seed_experiments(load_params()))}
    runs = {"data_s": 17.0, "overrides": [], "experiments": {**seeds, "mnist_cae_plus": _run(psnr=40.0, train_s=None)}}
    fast = {"overrides": [], "experiments": {"cifar10_fast": _run(accuracy=0.9312, train_s=55.0)}}
    text = gpu_report.runs_section(runs, fast)
    assert "| `mnist_cae_plus` | 5 | an earlier run | 20 s | 9 s | 100 s | PSNR 40.00 dB |" in text
    assert "test accuracy 93.12% (target 93% on the JPEG copy), train stage 55 s (target 60 s): met" in text
    assert ("The 6 seed experiments, side by side with the others: the last ended 155 s after they began, 172 s with "
            "the data stages, against the 300 s target (met)") in text
    slow = {"overrides": [], "experiments": {"cifar10_fast": _run(accuracy=0.95, train_s=61.0)}}
    assert "train stage 61 s (target 60 s): not met" in gpu_report.runs_section(runs, slow)
    partial = {**runs, "experiments": {"mnist_cae": seeds["mnist_cae"]}, "failed": ["experiment x: stopped"]}
    text = gpu_report.runs_section(partial, None)
    assert "Seed experiments finished in this run: 1 of 6" in text and "Not finished in this run: experiment x" in text
    rehearsal = gpu_report.runs_section({**runs, "overrides": ["limits.max_epochs=1"]}, fast)
    assert "no verdicts" in rehearsal and "met" not in rehearsal.split("no verdicts")[1]
