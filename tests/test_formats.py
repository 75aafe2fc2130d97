import pickle

import numpy as np
import pytest
from PIL import Image

from builders import idx_bytes
from stages import formats
from stages.formats import FormatError, cifar_batch, decode_image, idx_split, parse_idx


def test_parse_idx_round_trip():
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(parse_idx(idx_bytes(images), "x", ndim=3), images)


def test_parse_idx_wrong_magic_names_file():
    payload = bytearray(idx_bytes(np.zeros((2, 3, 4), np.uint8)))
    payload[2] = 0x0D  # float, not ubyte
    with pytest.raises(FormatError, match=r"train-images: bad IDX magic number 0x00000d03, expected 0x00000803"):
        parse_idx(bytes(payload), "train-images", ndim=3)


def test_parse_idx_labels_file_given_as_images():
    with pytest.raises(FormatError, match="bad IDX magic"):
        parse_idx(idx_bytes(np.zeros(5, np.uint8)), "labels", ndim=3)


def test_parse_idx_dimension_mismatch():
    payload = idx_bytes(np.zeros((2, 3, 4), np.uint8))[:-1]
    with pytest.raises(FormatError, match=r"x: IDX dimensions \(2, 3, 4\) need 40 bytes, file has 39"):
        parse_idx(payload, "x", ndim=3)


def test_idx_split_checks_counts_and_label_range():
    images = np.zeros((3, 2, 2), np.uint8)
    with pytest.raises(FormatError, match="imgs has 3 images but lbls has 2 labels"):
        idx_split(images, np.zeros(2, np.uint8), ("imgs", "lbls"), 10)
    with pytest.raises(FormatError, match=r"lbls: label 12 out of range 0..9 \(first at index 1\)"):
        idx_split(images, np.array([0, 12, 3], np.uint8), ("imgs", "lbls"), 10)
    x, y = idx_split(images, np.array([0, 1, 9], np.uint8), ("imgs", "lbls"), 10)
    assert x.shape == (3, 2, 2, 1) and y.dtype == np.int64


def _batch(n=3, overrides=None):
    data = np.arange(n * 3072, dtype=np.uint64).astype(np.uint8).reshape(n, 3072)
    batch = {b"data": data, b"labels": list(range(n))}
    batch.update(overrides or {})
    return pickle.dumps(batch, protocol=2), data


def test_cifar_batch_is_channel_last():
    blob, data = _batch()
    images, labels = cifar_batch(blob, "data_batch_1")
    assert images.shape == (3, 32, 32, 3)
    # pixel (row 0, col 1) of image 0: red at offset 1, green at 1024 + 1, blue at 2048 + 1
    assert images[0, 0, 1].tolist() == [data[0, 1], data[0, 1025], data[0, 2049]]
    assert labels.tolist() == [0, 1, 2]


def test_cifar_batch_bad_labels_and_shapes():
    blob, _ = _batch(overrides={b"labels": [0, 1, 10]})
    with pytest.raises(FormatError, match="labels outside 0..9"):
        cifar_batch(blob, "b")
    blob, _ = _batch(overrides={b"data": np.zeros((3, 100), np.uint8)})
    with pytest.raises(FormatError, match=r"'data' is uint8 \(3, 100\)"):
        cifar_batch(blob, "b")


class _Exploit:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_restricted_unpickler_refuses_code(tmp_path):
    target = tmp_path / "pwned"
    blob = pickle.dumps({b"data": _Exploit(str(target)), b"labels": []}, protocol=2)
    with pytest.raises(FormatError, match=r"evil_batch: not a valid CIFAR-10 batch .*open.* is not allowed"):
        cifar_batch(blob, "evil_batch")
    assert not target.exists()


def _encode(array, fmt, mode=None):
    import io
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format=fmt)
    return buffer.getvalue()


def test_decode_grey_rgb_and_palette():
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert np.array_equal(decode_image(_encode(grey, "PNG"), "g.png"), grey[..., None])
    rgb = np.random.default_rng(0).integers(0, 256, (3, 4, 3), dtype=np.uint8)
    assert np.array_equal(decode_image(_encode(rgb, "PNG"), "c.png"), rgb)
    palette = Image.fromarray(rgb).convert("P")
    import io
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG")
    assert decode_image(buffer.getvalue(), "p.png").shape == (3, 4, 3)


def test_decode_corrupt_jpeg_names_file():
    blob = _encode(np.zeros((8, 8, 3), np.uint8), "JPEG")
    with pytest.raises(FormatError, match="train/cat/001.jpg: cannot decode image"):
        decode_image(blob[: len(blob) // 3] + b"garbage", "train/cat/001.jpg")


def test_decode_refuses_pixel_bomb(monkeypatch):
    monkeypatch.setattr(formats.Image, "MAX_IMAGE_PIXELS", 100)
    blob = _encode(np.zeros((20, 20), np.uint8), "PNG")
    with pytest.raises(FormatError, match="big.png: image too large, refused as a decompression bomb"):
        decode_image(blob, "big.png")
