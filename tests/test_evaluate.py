"""stages/evaluate.py: the DVC plots data it writes beside its metrics (the
stage end to end is in tests/test_train.py, with the train stage)."""

import csv
import io
from collections import Counter

import numpy as np
import pytest

from stages import metrics
from stages.evaluate import confusion_csv, psnr_percentiles_csv


def test_confusion_rows_count_each_test_image_once():
    text = confusion_csv(["cat", "dog, big"], [[2, 1], [0, 3]])
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == ["actual", "predicted"]
    assert Counter(map(tuple, rows[1:])) == {("cat", "cat"): 2, ("cat", "dog, big"): 1, ("dog, big", "dog, big"): 3}
    with pytest.raises(ValueError, match="2-class confusion matrix must be 2x2"):
        confusion_csv(["cat", "dog"], [[1, 2, 3], [4, 5, 6]])


def test_psnr_percentiles_run_from_the_worst_image_to_the_best():
    mse = np.array([1e-2, 1e-3, 1e-4, 0.0])  # the perfect image is floored like evaluate's PSNR
    rows = list(csv.DictReader(io.StringIO(psnr_percentiles_csv(mse))))
    assert [int(r["percentile"]) for r in rows] == list(range(101))
    values = [float(r["psnr_db"]) for r in rows]
    assert values[0] == pytest.approx(20.0) and values[-1] == pytest.approx(100.0)
    assert values == sorted(values)
    assert values[50] == pytest.approx(np.median(metrics.psnr_of_mse(mse)), abs=1e-4)
