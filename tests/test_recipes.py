"""Learning-rate schedules and the label-smoothed loss, against their formulas."""

import numpy as np
import pytest

import keras
from stages import recipes


def _rates(schedule, steps):
    return np.array([float(schedule(step)) for step in steps])


def test_one_cycle_rises_to_the_peak_then_falls():
    schedule = recipes.OneCycle(peak=0.4, total_steps=100, warmup=0.25, div=20.0, final_div=1000.0)
    rates = _rates(schedule, [0, 12.5, 25, 62.5, 100, 150])
    np.testing.assert_allclose(rates, [0.02, 0.21, 0.4, 0.2002, 0.0004, 0.0004], rtol=1e-4)  # float32


def test_warmup_cosine():
    schedule = recipes.WarmupCosine(peak=1.0, total_steps=110, warmup=10 / 110)
    rates = _rates(schedule, [0, 9, 10, 60, 110])
    np.testing.assert_allclose(rates, [0.1, 1.0, 1.0, 0.5, 0.0], atol=1e-6)


def test_constant_is_a_plain_number_and_unknown_kinds_fail():
    assert recipes.schedule("constant", 0.01, 100, None) == 0.01
    assert isinstance(recipes.schedule("one_cycle", 0.01, 100, None), recipes.OneCycle)
    with pytest.raises(ValueError, match="unknown schedule 'step'"):
        recipes.schedule("step", 0.01, 100, None)


def test_smoothed_loss_matches_the_formula_and_is_plain_crossentropy_at_zero():
    probabilities = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], np.float32)
    labels = np.array([0, 2])
    smoothing = 0.3
    target = np.full((2, 3), smoothing / 3) + (1 - smoothing) * np.eye(3)[labels]
    expected = -(target * np.log(probabilities)).sum(axis=1).mean()
    loss = recipes.SmoothedSparseCrossentropy(smoothing, 3)
    assert float(loss(labels, probabilities)) == pytest.approx(expected, rel=1e-5)
    plain = keras.losses.SparseCategoricalCrossentropy()(labels, probabilities)
    assert float(recipes.SmoothedSparseCrossentropy(0.0, 3)(labels, probabilities)) == pytest.approx(float(plain),
                                                                                                       rel=1e-5)


def test_a_model_with_schedule_and_loss_saves_and_loads(tmp_path):
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(inputs))
    model.compile(keras.optimizers.SGD(recipes.OneCycle(0.1, 10)), recipes.SmoothedSparseCrossentropy(0.2, 3))
    model.fit(np.ones((8, 4), np.float32), np.arange(8) % 3, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert isinstance(loaded.loss, recipes.SmoothedSparseCrossentropy) and loaded.loss.smoothing == 0.2
    assert float(loaded.optimizer.learning_rate) == pytest.approx(float(model.optimizer.learning_rate))
