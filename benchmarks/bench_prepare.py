"""Benchmark: the prepare stage on the 60,000-image cifar10-jpeg archive.

Runs, in one process tree on one machine:
  * ``python -m stages.prepare`` as DVC runs it (a fresh process each time),
  * a plain baseline: one loop of tarfile + PIL decoding the same archive,
and prints wall time (median of ``--repeats``), peak resident memory of the
stage process, and the ratio baseline/ours, with the machine, versions and date.

Needs the archive: DATA_MIRROR (default ../shared/datasets) must hold
cifar10-jpeg/cifar10-jpeg.tar.gz. Results also go to
benchmarks/results/prepare-<date>.json.

    DATA_MIRROR=../shared/datasets python -m benchmarks.bench_prepare
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from benchmarks.harness import ROOT, data_mirror, machine, on_mirror, write_results

log = logging.getLogger("bench_prepare")


def baseline(archive: Path) -> tuple[float, int]:
    """What a plain script does: read the tar, decode every JPEG in one loop."""
    start = time.perf_counter()
    images = []
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".jpg"):
                with Image.open(io.BytesIO(tar.extractfile(member).read())) as image:
                    images.append(np.asarray(image.convert("RGB")))
    np.stack(images)
    return time.perf_counter() - start, len(images)


def stage_run(work: Path) -> tuple[float, int]:
    """One run of the prepare stage in a fresh process: (seconds, peak RSS bytes)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "stages.prepare", "cifar10", "--params", str(work / "params.yaml"),
                    "--raw", str(work / "raw"), "--out", str(work / "cifar10.npz")],
                   cwd=ROOT, check=True, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return seconds, max(peak, before) * 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        params = on_mirror({"download": {"mirror": data_mirror(), "cache_dir": str(work / "cache")},
                            "datasets": {"cifar10": {"source": {"builtin": "cifar10"}}}})
        (work / "params.yaml").write_text(yaml.safe_dump(params))
        subprocess.run([sys.executable, "-m", "stages.download", "cifar10", "--params", str(work / "params.yaml"),
                        "--out", str(work / "raw")], cwd=ROOT, check=True, stderr=subprocess.DEVNULL)
        archive = next((work / "raw").glob("*.tar.gz"))
        ours = [stage_run(work) for _ in range(args.repeats)]
        base = [baseline(archive) for _ in range(args.repeats)]
    ours_s = statistics.median(s for s, _ in ours)
    base_s = statistics.median(s for s, _ in base)
    result = {
        "benchmark": "prepare cifar10_jpeg (60,000 JPEG, 32x32)", "machine": machine("numpy", "pillow", keras=False),
        "ours_s": round(ours_s, 2), "ours_runs_s": [round(s, 2) for s, _ in ours],
        "ours_peak_rss_mib": round(max(r for _, r in ours) / 2**20),
        "baseline_s": round(base_s, 2), "baseline_images": base[0][1],
        "speedup_vs_baseline": round(base_s / ours_s, 2),
    }
    write_results(result, f"prepare-{result['machine']['date']}")
    log.info(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
