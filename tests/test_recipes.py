"""Learning-rate schedules and the losses, against their formulas."""

import numpy as np
import pytest

import keras
from stages import metrics, recipes


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

    model.compile("adam", recipes.NegativePsnr(1e-8))
    model.fit(np.ones((8, 4), np.float32), np.full((8, 3), 0.5, np.float32), verbose=0)
    model.save(tmp_path / "psnr.keras")
    loaded = keras.models.load_model(tmp_path / "psnr.keras")
    assert isinstance(loaded.loss, recipes.NegativePsnr) and loaded.loss.floor == 1e-8


def test_negative_psnr_is_minus_the_mean_per_image_psnr_evaluate_reports():
    rng = np.random.default_rng(0)
    target = rng.random((5, 6, 6, 3)).astype(np.float32)
    pred = np.clip(target + rng.normal(0, [[[[0.01]]], [[[0.03]]], [[[0.1]]], [[[0.3]]], [[[0.0]]]],
                                       target.shape), 0, 1).astype(np.float32)
    expected = -np.mean(metrics.psnr_per_image(target, pred))  # image 5 exact: floored at 100 dB
    assert float(recipes.NegativePsnr(metrics.MSE_FLOOR)(target, pred)) == pytest.approx(expected, rel=1e-5)
    pooled = -10 * np.log10(np.mean(np.square(pred - target)))
    assert float(recipes.NegativePsnr()(target, pred)) != pytest.approx(pooled, rel=1e-2)


def test_negative_psnr_weighs_every_image_alike_where_mse_favours_the_worst():
    # the gradient on one weight scaling each of two images that are off by 0.01
    # and 0.1: MSE's grows with the squared error (100x for the second image),
    # minus-PSNR's is scale-free (the same for both)
    target = np.zeros((2, 1, 1, 1), np.float32)
    start = np.array([0.01, 0.1], np.float32).reshape(2, 1, 1, 1)
    moves = {}
    for name, loss, rate in (("mse", keras.losses.MeanSquaredError(), 1.0), ("psnr", recipes.NegativePsnr(), 1e-3)):
        inputs = keras.Input((1, 1, 1))
        scale = keras.layers.Dense(1, use_bias=False, kernel_initializer="ones")
        model = keras.Model(inputs, scale(inputs))
        model.compile(keras.optimizers.SGD(rate), loss)
        grads = []
        for i in range(2):  # each image's own gradient on the shared weight, from 1.0
            model.train_on_batch(start[i:i + 1], target[i:i + 1])
            grads.append((1.0 - float(scale.kernel.numpy().ravel()[0])) / rate)
            scale.kernel.assign(np.ones((1, 1), np.float32))
        moves[name] = grads
    assert moves["mse"] == pytest.approx([2e-4, 2e-2], rel=1e-2)  # d/dw (w x)^2 = 2 x^2
    assert moves["psnr"] == pytest.approx([20 / np.log(10)] * 2, rel=1e-2)  # d/dw 10 log10((w x)^2) = 20 / (w ln 10)


def _shifted(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``image`` moved down ``dy`` and right ``dx`` pixels, the uncovered border zero."""
    out = np.zeros_like(image)
    h, w = image.shape[:2]
    src = image[max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)]
    out[max(0, dy):max(0, dy) + src.shape[0], max(0, dx):max(0, dx) + src.shape[1]] = src
    return out


def test_random_shift_moves_each_image_by_whole_pixels_only_in_training():
    from stages.recipes import RandomShift

    layer = RandomShift(3, seed=4)
    images = np.random.default_rng(0).random((40, 12, 10, 3)).astype("float32")
    assert np.array_equal(np.asarray(layer(images, training=False)), images)
    out = np.asarray(layer(images, training=True))
    shifts = set()
    for image, moved in zip(images, out):
        found = [(dy, dx) for dy in range(-3, 4) for dx in range(-3, 4) if np.array_equal(_shifted(image, dy, dx), moved)]
        assert found, "not a whole-pixel shift of its image"
        shifts.add(found[0])
    assert len(shifts) > 10  # each image its own shift


def test_random_shift_keeps_the_train_step_compiled_and_survives_saving(tmp_path):
    from stages.recipes import RandomShift

    inputs = keras.Input((8, 8, 1))
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(RandomShift(2, name="shift")(inputs))))
    # keras' RandomTranslation here would make the whole step run op by op (Keras compiles a step only when
    # every layer supports_jit; its model_supports_jit also says no once TensorFlow's op determinism is on,
    # which any stage run earlier in the same test process turns on)
    assert all(layer.supports_jit for layer in model._flatten_layers())
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert loaded.get_layer("shift").max_shift == 2
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        assert RandomShift(1).compute_dtype == "float32"  # pixels move exactly under bf16 too
    finally:
        keras.mixed_precision.set_global_policy("float32")
