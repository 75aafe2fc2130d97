"""stages/callbacks.py: which epochs the MLflow images are logged at (the
callbacks themselves run in the real fits of tests/test_train.py)."""

import pytest

from stages.callbacks import image_epochs


@pytest.mark.parametrize("epochs, expected", [
    (1, {1}), (3, {1, 2, 3}), (5, {1, 2, 3, 4, 5}), (9, {1, 3, 5, 7, 9}), (100, {1, 26, 51, 75, 100}),
])
def test_images_at_the_first_and_last_epoch_and_evenly_between(epochs, expected):
    assert image_epochs(epochs) == expected
    assert len(image_epochs(epochs, count=3)) == min(epochs, 3)
