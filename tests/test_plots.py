import matplotlib.pyplot as plt
import numpy as np
import pytest
from PIL import Image

from stages import plots
from stages.plots import confusion_matrix_plot, loss_curves, misclassified_grid, reconstruction_grid

CLASSES = ["plane", "car", "bird"]


@pytest.fixture
def closed_figures(monkeypatch):
    """Record each figure the module closes, so its content can be inspected."""
    seen = []
    real_close = plt.close

    def spy(fig=None):
        seen.append(fig)
        real_close(fig)

    monkeypatch.setattr(plots.plt, "close", spy)
    return seen


@pytest.fixture(autouse=True)
def no_open_figures():
    plt.close("all")
    yield
    assert plt.get_fignums() == []  # every function closed its figure


def _images(n, c, seed=0, h=12, w=12):
    return np.random.default_rng(seed).random((n, h, w, c), dtype=np.float32)


def _png(path, min_side=100):
    assert path.is_file()
    with Image.open(path) as image:
        assert image.format == "PNG"
        pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    assert min(pixels.shape[:2]) >= min_side and max(pixels.shape[:2]) < 5000
    assert np.std(pixels) > 0  # not a single flat colour
    return pixels


@pytest.mark.parametrize("channels", [1, 3])
def test_reconstruction_grid_grey_and_rgb(tmp_path, closed_figures, channels):
    x = _images(12, channels)
    noisy = np.clip(x + 0.2, 0, 1.5)  # values above 1 are clipped / saturated, not an error
    path = tmp_path / "deep" / "folder" / "grid.png"
    out = reconstruction_grid({"original": x, "noisy input": noisy, "reconstruction": x * 0.5}, path, max_images=6)
    assert out == path
    pixels = _png(path)
    assert pixels.shape[1] > pixels.shape[0]  # 6 columns, 3 rows
    (fig,) = closed_figures
    assert len(fig.axes) == 3 * 6
    labels = [ax.get_ylabel() for ax in fig.axes if ax.get_ylabel()]
    assert labels == ["original", "noisy input", "reconstruction"]
    if channels == 1:
        shown = fig.axes[0].images[0]
        assert shown.get_cmap().name == "gray" and shown.get_clim() == (0.0, 1.0)
    else:
        assert fig.axes[6].images[0].get_array().max() <= 1.0


def test_reconstruction_grid_uses_the_shortest_row(tmp_path, closed_figures):
    reconstruction_grid({"a": _images(3, 1), "b": _images(5, 1)}, tmp_path / "g.png")
    assert len(closed_figures[0].axes) == 2 * 3


def test_reconstruction_grid_accepts_uint8(tmp_path):
    x = (np.arange(4 * 8 * 8 * 3) % 256).astype(np.uint8).reshape(4, 8, 8, 3)
    _png(reconstruction_grid({"uint8": x}, tmp_path / "u.png"), min_side=50)


def test_loss_curves(tmp_path, closed_figures):
    history = {"loss": [0.5, 0.3, 0.25], "val_loss": [0.6, 0.4, 0.35]}
    _png(loss_curves(history, tmp_path / "loss.png"))
    (fig,) = closed_figures
    ax = fig.axes[0]
    styles = {line.get_label(): line.get_linestyle() for line in ax.get_lines()}
    assert styles == {"loss": "-", "val_loss": "--"}
    assert list(ax.get_lines()[0].get_xdata()) == [1, 2, 3]  # epochs are 1-based
    assert ax.get_yscale() == "linear"  # 0.6 / 0.25 < 20


def test_loss_curves_log_scale_only_for_wide_positive_ranges(tmp_path, closed_figures):
    loss_curves({"loss": [10.0, 1.0, 0.1], "val_loss": [12.0, 2.0, 0.2]}, tmp_path / "a.png")
    loss_curves({"loss": [10.0, 1.0, 0.0]}, tmp_path / "b.png")  # a zero: log impossible
    loss_curves({"loss": [30.0, 2.0], "delta": [-1.0, 1.0]}, tmp_path / "c.png")
    assert [fig.axes[0].get_yscale() for fig in closed_figures] == ["log", "linear", "linear"]
    with pytest.raises(ValueError, match="empty"):
        loss_curves({"loss": []}, tmp_path / "d.png")


def test_confusion_matrix_plot(tmp_path, closed_figures):
    cm = np.array([[50, 3, 0], [7, 40, 3], [0, 0, 0]])  # last class has no examples
    _png(confusion_matrix_plot(cm, CLASSES, tmp_path / "cm.png"))
    ax = closed_figures[0].axes[0]
    assert ax.get_xlabel() == "predicted" and ax.get_ylabel() == "true"
    assert [t.get_text() for t in ax.texts] == [str(v) for v in cm.ravel()]
    shares = ax.images[0].get_array()
    assert shares[0, 0] == pytest.approx(50 / 53) and shares[2].sum() == 0  # coloured per row
    with pytest.raises(ValueError, match="class names"):
        confusion_matrix_plot(cm, CLASSES[:2], tmp_path / "bad.png")


@pytest.mark.parametrize("channels", [1, 3])
def test_misclassified_grid(tmp_path, closed_figures, channels):
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    predictions = np.array([0, 2, 2, 1, 1, 0, 0, 0])  # wrong at 1, 3, 5, 7
    _png(misclassified_grid(_images(8, channels), labels, predictions, CLASSES, tmp_path / "m.png", max_images=3))
    titles = [ax.get_title() for ax in closed_figures[0].axes if ax.get_title()]
    assert titles == ["car → bird", "plane → car", "bird → plane"]


def test_misclassified_grid_scales_only_the_uint8_images_it_shows(tmp_path, closed_figures):
    images = np.random.default_rng(1).integers(0, 256, (8, 12, 12, 3), dtype=np.uint8)
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    predictions = np.array([0, 2, 2, 1, 1, 0, 0, 0])
    misclassified_grid(images, labels, predictions, CLASSES, tmp_path / "m.png", max_images=3)
    shown = [ax.get_images()[0].get_array() for ax in closed_figures[0].axes if ax.get_images()]
    assert len(shown) == 3
    for got, index in zip(shown, [1, 3, 5]):
        np.testing.assert_allclose(got, images[index] / 255.0, atol=1e-6)


def test_misclassified_grid_without_mistakes_still_writes(tmp_path, closed_figures):
    labels = np.array([0, 1, 2])
    path = misclassified_grid(_images(3, 3), labels, labels.copy(), CLASSES, tmp_path / "none.png")
    _png(path)
    texts = [t.get_text() for t in closed_figures[0].axes[0].texts]
    assert texts == ["no misclassified examples"]


def test_figure_is_closed_even_when_saving_fails(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError):
        loss_curves({"loss": [1.0, 0.5]}, blocker / "loss.png")
    assert plt.get_fignums() == []
