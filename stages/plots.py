"""PNG figures for reports and MLflow: image grids, loss curves, confusion matrices.

Every function takes plain arrays and a path, writes one PNG (creating the
parent folders) and returns the path. Figures are closed even when saving
fails, so a long evaluation run that draws hundreds of plots does not leak
memory, and the Agg backend is selected at import so plotting works on
headless machines (CI, DVC runs over SSH) without a display.

Images are float NHWC in [0, 1]; uint8 arrays are accepted too and scaled
by :func:`stages.images.to_unit_float`, the project's single scaling.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402 (the backend must be chosen first)
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from stages.images import as_unit  # noqa: E402

logger = logging.getLogger(__name__)

DPI = 100


def _save(fig: plt.Figure, path: Path | str) -> Path:
    """Write ``fig`` to ``path`` and close it, whatever happens."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=DPI, format="png", bbox_inches="tight", pad_inches=0.1)
    finally:
        plt.close(fig)
    logger.info("wrote %s", path)
    return path


def _show(ax: plt.Axes, image: np.ndarray) -> None:
    """Draw one HWC (or HW) image: grey with a fixed 0..1 scale, RGB clipped to [0, 1]."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        ax.imshow(image, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    else:
        ax.imshow(np.clip(image[..., :3], 0.0, 1.0), interpolation="nearest")
    _bare(ax)


def _bare(ax: plt.Axes) -> None:
    """No ticks or frame, but keep the y label (used as a row title)."""
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def reconstruction_grid(rows: Mapping[str, np.ndarray], path: Path | str, max_images: int = 10) -> Path:
    """One row of images per entry, e.g. original / noisy input / reconstruction.

    Rows are titled with their keys and show the same first ``max_images``
    images, so columns line up for comparison.
    """
    if not rows:
        raise ValueError("reconstruction_grid needs at least one row")
    arrays = {name: as_unit(images) for name, images in rows.items()}
    count = min(max_images, *(len(images) for images in arrays.values()))
    if count < 1:
        raise ValueError("reconstruction_grid got no images")
    fig, axes = plt.subplots(
        len(arrays), count, figsize=(1.2 * count + 1.2, 1.3 * len(arrays)), squeeze=False
    )
    for r, (name, images) in enumerate(arrays.items()):
        for c in range(count):
            _show(axes[r, c], images[c])
        axes[r, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def _log_scale_wanted(values: np.ndarray) -> bool:
    """Log y-axis when every (finite) value is positive and they span more than 20x."""
    values = values[np.isfinite(values)]
    return bool(values.size and values.min() > 0 and values.max() / values.min() > 20)


def loss_curves(history: Mapping[str, Sequence[float]], path: Path | str) -> Path:
    """Each history key as a line over epochs 1..N; validation (``val_``) keys dashed."""
    series = {key: np.asarray(values, np.float64) for key, values in history.items() if len(values)}
    if not series:
        raise ValueError("loss_curves got an empty history")
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, values in series.items():
        ax.plot(np.arange(1, len(values) + 1), values, "--" if "val_" in key else "-", marker=".", label=key)
    if _log_scale_wanted(np.concatenate(list(series.values()))):
        ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("value")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def confusion_matrix_plot(cm: np.ndarray, class_names: Sequence[str], path: Path | str) -> Path:
    """Heatmap coloured by row share (recall), with the raw counts written in the cells."""
    cm = np.asarray(cm)
    n = len(class_names)
    if cm.shape != (n, n):
        raise ValueError(f"confusion matrix {cm.shape} does not match {n} class names")
    totals = cm.sum(axis=1, keepdims=True).astype(np.float64)
    shares = np.divide(cm, totals, out=np.zeros(cm.shape, np.float64), where=totals > 0)
    size = max(4.0, 0.6 * n + 2.0)
    fig, ax = plt.subplots(figsize=(size + 1.0, size), layout="constrained")
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    fontsize = 8 if n <= 12 else 6
    for i in range(n):
        for j in range(n):
            colour = "white" if shares[i, j] > 0.5 else "black"
            ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", color=colour, fontsize=fontsize)
    ax.set_xticks(range(n), labels=[str(c) for c in class_names], rotation=45, ha="right")
    ax.set_yticks(range(n), labels=[str(c) for c in class_names])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    return _save(fig, path)


def misclassified_grid(
    images: np.ndarray,
    labels: np.ndarray,
    predictions: np.ndarray,
    class_names: Sequence[str],
    path: Path | str,
    max_images: int = 25,
) -> Path:
    """The first ``max_images`` wrongly classified images, each titled "true → pred"."""
    labels, predictions = np.asarray(labels).ravel(), np.asarray(predictions).ravel()
    if not len(images) == len(labels) == len(predictions):
        raise ValueError(f"{len(images)} images, {len(labels)} labels, {len(predictions)} predictions")
    wrong = np.flatnonzero(labels != predictions)
    shown = wrong[:max_images]
    if shown.size == 0:
        fig, ax = plt.subplots(figsize=(4, 2))
        ax.text(0.5, 0.5, "no misclassified examples", ha="center", va="center", fontsize=12)
        ax.set_axis_off()
        return _save(fig, path)
    images = as_unit(np.asarray(images)[shown])  # only the shown ones (uint8 test sets stay uint8)
    cols = math.ceil(math.sqrt(shown.size))
    rows = math.ceil(shown.size / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.7 * cols, 1.8 * rows + 0.4), squeeze=False)
    for ax in axes.flat[shown.size:]:
        ax.set_axis_off()
    for ax, image, index in zip(axes.flat, images, shown):
        _show(ax, image)
        ax.set_title(f"{class_names[labels[index]]} → {class_names[predictions[index]]}", fontsize=8)
    fig.suptitle(f"{wrong.size} of {len(labels)} misclassified (showing {shown.size})", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
