import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from stages.experiment_params import Cnn, ConvAutoencoder, ResidualAutoencoder, ResNet
from stages.models import (
    build, build_autoencoder, build_classifier, build_residual_autoencoder, build_resnet, encoder_pools,
    init_linear_path, latent_shape,
)

REPO = Path(__file__).resolve().parents[1]


# the params objects the builders take (stages.experiment_params), as params.yaml would give them
def conv_ae(filters, poolings, activation="relu", output_activation="sigmoid"):
    return ConvAutoencoder(kind="conv_autoencoder", filters=filters, poolings=poolings, activation=activation,
                           output_activation=output_activation)


def residual_ae(filters, blocks, latent_channels, output_activation="sigmoid", **options):
    return ResidualAutoencoder(kind="residual_autoencoder", filters=filters, blocks=blocks,
                               latent_channels=latent_channels, output_activation=output_activation, **options)


def conv_block(filters, kernel_size=3, activation="relu", padding="same", pool=True):
    return dict(filters=filters, kernel_size=kernel_size, activation=activation, padding=padding, pool=pool)


def cnn(conv, **options):
    return Cnn(kind="cnn", conv=conv, **options)


def res_stage(filters, blocks=0, pool=True):
    return dict(filters=filters, blocks=blocks, pool=pool)


def resnet(stem, stages, dropout=0.0, logit_scale=1.0, flip=False, translate=0.0, bn_momentum=0.99):
    return ResNet(kind="resnet", stem=stem, stages=stages, dropout=dropout, logit_scale=logit_scale,
                  augment={"flip": flip, "translate": translate}, bn_momentum=bn_momentum)


def test_mnist_cae_matches_the_seed_model():
    spec = conv_ae(filters=(16, 8), poolings=2)
    model, encoder = build_autoencoder(spec, (28, 28, 1))
    assert encoder.output.shape[1:] == (7, 7, 8)
    assert model.output.shape[1:] == (28, 28, 1)
    # 3x3 convs: 1->16, 16->8 | 8->8, 8->16, 16->1, each with biases
    assert model.count_params() == (9 * 1 * 16 + 16) + (9 * 16 * 8 + 8) + (9 * 8 * 8 + 8) + (9 * 8 * 16 + 16) + (9 * 16 + 1)


@pytest.mark.parametrize("poolings, pools, latent", [
    (4, [True, True, True, True], (2, 2, 8)),
    (3, [True, True, False, True], (4, 4, 8)),  # the asker removed the third pooling
])
def test_cifar_cae_poolings(poolings, pools, latent):
    spec = conv_ae(filters=(64, 32, 16, 8), poolings=poolings, output_activation="linear")
    assert encoder_pools(spec) == pools
    model, encoder = build_autoencoder(spec, (32, 32, 3))
    assert encoder.output.shape[1:] == latent
    assert model.output.shape[1:] == (32, 32, 3)
    ups = [layer.name for layer in model.layers if layer.name.startswith("dec_up")]
    assert len(ups) == poolings
    assert model.get_layer("reconstruction").get_config()["activation"] == "linear"


def test_latent_size_must_divide_the_image():
    spec = conv_ae(filters=(16, 8, 8), poolings=3)
    with pytest.raises(ValueError, match="3 poolings need image sides divisible by 8, got 28x28"):
        latent_shape(spec, (28, 28, 1))
    with pytest.raises(ValueError, match="poolings=4 exceeds the 3 conv levels"):
        conv_ae(filters=(16, 8, 8), poolings=4)


def test_sigmoid_output_is_in_unit_range():
    model, _ = build_autoencoder(conv_ae(filters=(4,), poolings=1), (8, 8, 1))
    out = np.asarray(model.predict(np.random.default_rng(0).random((5, 8, 8, 1), dtype=np.float32) * 10, verbose=0))
    assert out.shape == (5, 8, 8, 1) and out.min() >= 0.0 and out.max() <= 1.0


def test_cifar_cnn_matches_the_seed_model():
    spec = cnn(
        conv=(conv_block(64, 3, "relu", "valid"), conv_block(256, 2, "relu", "valid")),
        initializer="he_normal", dense=(1024,), dropout=0.4,
    )
    model = build_classifier(spec, (32, 32, 3), 10)
    # conv 3x3x3x64, conv 2x2x64x256, 7x7x256 -> 1024, 1024 -> 10
    expected = (27 * 64 + 64) + (4 * 64 * 256 + 256) + (7 * 7 * 256 * 1024 + 1024) + (1024 * 10 + 10)
    assert model.count_params() == expected
    assert model.get_layer("conv0").get_config()["kernel_initializer"]["class_name"] == "HeNormal"
    assert model.get_layer("dense0").get_config()["kernel_initializer"]["class_name"] == "GlorotUniform"
    assert model.get_layer("dropout0").get_config()["rate"] == 0.4


def test_colored_mnist_broken_head_is_reproduced():
    broken = cnn(conv=(conv_block(64, 3, None), conv_block(64, 3, None)), logits_activation="relu")
    model = build_classifier(broken, (28, 28, 3), 10)
    assert model.get_layer("conv0").get_config()["activation"] == "linear"
    assert model.get_layer("logits").get_config()["activation"] == "relu"
    probabilities = np.asarray(model.predict(np.random.default_rng(0).random((4, 28, 28, 3), dtype=np.float32), verbose=0))
    assert probabilities.shape == (4, 10) and np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("filters, blocks, latent_channels, image, latent", [
    ((32, 64, 128, 256, 256), (0, 1, 1, 1, 1), 8, (32, 32, 3), (2, 2, 8)),  # cifar10_cae_4pool's latent
    ((32, 64, 128, 256), (0, 1, 1, 1), 8, (32, 32, 3), (4, 4, 8)),  # cifar10_cae_3pool's
    ((32, 64, 128), (0, 1, 1), 32, (28, 28, 1), (7, 7, 32)),  # mnist_denoise's
])
def test_residual_autoencoder_keeps_the_seed_latent(filters, blocks, latent_channels, image, latent):
    spec = residual_ae(filters, blocks, latent_channels)
    assert latent_shape(spec, image) == latent
    model, encoder = build_residual_autoencoder(spec, image)
    assert encoder.output.shape[1:] == latent and model.output.shape[1:] == image
    # the latent is the only path from encoder to decoder: no skip connection crosses it
    assert model.get_layer("dec_stem_conv").input is encoder.output or \
        model.get_layer("dec_stem_conv").input.shape[1:] == latent
    adds = [layer.name for layer in model.layers if layer.name.endswith("_add")]
    assert len(adds) == 2 * sum(blocks)


def test_residual_autoencoder_refuses_mismatched_levels():
    with pytest.raises(ValueError, match="blocks has 2 entries, filters 3"):
        residual_ae((8, 8, 8), (0, 1), 4)
    with pytest.raises(ValueError, match="3 poolings need image sides divisible by 8, got 28x28"):
        latent_shape(residual_ae((8, 8, 8, 8), (0, 0, 0, 0), 4), (28, 28, 1))


def _low_rank_images(n, shape=(8, 8, 1), rank=6, seed=0):
    rng = np.random.default_rng(seed)
    flat = rng.random((n, rank)) @ rng.random((rank, int(np.prod(shape)))) / rank
    return np.clip(flat + 0.05 * rng.standard_normal(flat.shape), 0, 1).reshape(n, *shape).astype(np.float32)


def test_linear_path_starts_at_pca_and_stays_frozen():
    from stages import metrics

    train, test = _low_rank_images(300), _low_rank_images(50, seed=1)
    spec = residual_ae((4, 8), (0, 1), 2, "linear", linear_path=True)
    model, encoder = build_residual_autoencoder(spec, (8, 8, 1))
    mean, vectors = metrics.pca_fit(train, 4 * 4 * 2)
    init_linear_path(model, mean, vectors)
    flat = test.reshape(50, -1).astype(np.float64)
    codes = (flat - mean) @ vectors
    np.testing.assert_allclose(encoder.predict(test, verbose=0).reshape(50, -1), codes, atol=1e-5)
    np.testing.assert_allclose(model.predict(test, verbose=0).reshape(50, -1), codes @ vectors.T + mean, atol=1e-5)
    frozen = [w.copy() for w in model.get_layer("linear_decoder").get_weights()]
    model.compile("adam", "mse")
    start = model.evaluate(train, train, verbose=0)
    model.fit(train, train, batch_size=30, epochs=3, verbose=0)
    for before, after in zip(frozen, model.get_layer("linear_decoder").get_weights()):
        np.testing.assert_array_equal(before, after)
    assert any(np.abs(w).max() > 0 for w in model.get_layer("correction").get_weights())  # the conv part learned
    assert np.isfinite(start) and start > 0


def test_refiner_starts_at_pca_and_learns_what_a_linear_decoder_cannot():
    """Images clipped to [0, 1] are not a linear function of their PCA codes:
    the refiner, reading the PCA image, gets below PCA's error; the frozen
    path and the zero start make its first prediction PCA's exactly."""
    from stages import metrics

    rng = np.random.default_rng(3)
    basis = rng.standard_normal((3, 64))

    def saturated(n):  # three patterns at full intensity on a black background: mostly 0 and 1
        flat = rng.random((n, 3)) @ basis
        return np.clip(2.0 * flat, 0.0, 1.0).reshape(n, 8, 8, 1).astype(np.float32)

    train, test = saturated(600), saturated(200)
    spec = residual_ae((4, 8, 8), (0, 0, 0), 1, "linear", linear_path=True, refiner=(16, 16))
    keras.utils.set_random_seed(0)
    model, _ = build_residual_autoencoder(spec, (8, 8, 1))
    assert [layer.name for layer in model.layers if layer.name.startswith("refine")] == \
        ["refiner_input", "refine0", "refine1", "refine_out"]
    mean, vectors = metrics.pca_fit(train, 2 * 2 * 1)
    init_linear_path(model, mean, vectors)
    pca = ((test.reshape(200, -1) - mean) @ vectors @ vectors.T + mean).reshape(test.shape)
    np.testing.assert_allclose(model.predict(test, verbose=0), pca, atol=1e-5)
    pca_mse = float(np.mean((np.clip(pca, 0, 1) - test) ** 2))
    model.compile(keras.optimizers.Adam(3e-3), "mse")
    model.fit(train, train, batch_size=30, epochs=15, verbose=0)
    mse = float(np.mean((np.clip(model.predict(test, verbose=0), 0, 1) - test) ** 2))
    assert mse < 0.6 * pca_mse, (mse, pca_mse)  # 0.37-0.48 seen; the linear path without it: 0.69-0.72


def test_input_skip_starts_as_the_identity():
    x = _low_rank_images(4, (8, 8, 3))
    model, _ = build_residual_autoencoder(residual_ae((4, 8), (1, 0), 2, "linear", input_skip=True),
                                          (8, 8, 3))
    np.testing.assert_array_equal(model.predict(x, verbose=0), x)


@pytest.mark.parametrize("options, message", [
    (dict(linear_path=True), "they need output_activation: linear"),
    (dict(output_activation="linear", linear_path=True, input_skip=True), "choose one"),
    (dict(output_activation="linear", refiner=(4,)), "refiner refines a base image"),
])
def test_correcting_autoencoders_refuse_what_cannot_work(options, message):
    with pytest.raises(ValueError, match=message):
        residual_ae((4, 8), (0, 0), 2, **options)
    with pytest.raises(ValueError, match="linear_path needs a latent of at most the image's 64 values, got 8x8x2"):
        build_residual_autoencoder(residual_ae((4,), (0,), 2, "linear", linear_path=True), (8, 8, 1))
    with pytest.raises(ValueError):
        init_linear_path(build_residual_autoencoder(residual_ae((4, 8), (0, 0), 2, "linear",
                                                                            linear_path=True), (8, 8, 1))[0],
                         np.zeros(64), np.zeros((64, 3)))


def test_resnet_augments_only_in_training():
    spec = resnet(8, (res_stage(16, 1), res_stage(32, 0, pool=False)), logit_scale=0.125,
                      flip=True, translate=0.25)
    model = build_resnet(spec, (8, 8, 3), 3)
    assert model.output.shape[1:] == (3,)
    assert model.get_layer("logit_scale").get_config()["scale"] == 0.125
    x = np.random.default_rng(0).random((4, 8, 8, 3), dtype=np.float32)
    augment = keras.Model(model.input, model.get_layer("augment_translate").output)
    assert np.array_equal(np.asarray(augment(x, training=False)), x)
    assert not np.array_equal(np.asarray(augment(x, training=True)), x)
    np.testing.assert_allclose(np.asarray(model(x, training=False)), np.asarray(model(x, training=False)))


@pytest.mark.parametrize("momentum", [0.9, 0.99])
def test_bn_momentum_is_every_batch_norm_layers_and_sets_how_fast_they_forget(momentum):
    """Short runs need moving statistics that forget their start (mean 0): after
    30 training steps the stem's moving mean holds momentum**30 of it (4% at
    0.9, 74% at Keras' 0.99), the rest the batches' mean."""
    x = np.random.default_rng(0).random((16, 8, 8, 3), dtype=np.float32) + 2.0
    net = build_resnet(resnet(4, (res_stage(8, 1),), bn_momentum=momentum), (8, 8, 3), 3)
    res, _ = build_residual_autoencoder(residual_ae((4, 8), (1, 1), 2, bn_momentum=momentum), (8, 8, 3))
    for model in (net, res):
        norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
        assert len(norms) >= 4 and {layer.momentum for layer in norms} == {momentum}
    stem = net.get_layer("stem_bn")
    batch_mean = np.asarray(keras.Model(net.input, net.get_layer("stem_conv").output)(x)).mean(axis=(0, 1, 2))
    for _ in range(30):
        net(x, training=True)
    np.testing.assert_allclose(np.asarray(stem.moving_mean), (1 - momentum**30) * batch_mean, rtol=1e-3, atol=1e-5)


BACKEND_PROBE = """
import json, numpy as np, keras
from stages.experiment_params import Cnn, ConvAutoencoder, ResidualAutoencoder, ResNet
from stages.models import build, build_autoencoder, build_classifier
keras.utils.set_random_seed(0)
x = np.random.default_rng(0).random((32, 8, 8, 3), dtype=np.float32)
ae, _ = build_autoencoder(ConvAutoencoder(kind="conv_autoencoder", filters=(4, 4), poolings=2), (8, 8, 3))
ae.compile("adam", "binary_crossentropy")
ae_loss = ae.fit(x, x, batch_size=8, epochs=1, verbose=0).history["loss"][-1]
cnn = build_classifier(Cnn(kind="cnn", conv=[{"filters": 4}], dense=(8,), dropout=0.2), (8, 8, 3), 3)
cnn.compile("rmsprop", "sparse_categorical_crossentropy")
cnn_loss = cnn.fit(x, np.arange(32) % 3, batch_size=8, epochs=1, verbose=0).history["loss"][-1]
from stages import recipes
res = build(ResidualAutoencoder(kind="residual_autoencoder", filters=(4, 8), blocks=(1, 1), latent_channels=2),
            (8, 8, 3), 0)
res.compile(keras.optimizers.AdamW(recipes.WarmupCosine(1e-3, 8)), "binary_crossentropy")
res_loss = res.fit(x, x, batch_size=8, epochs=2, verbose=0).history["loss"][-1]
from stages import metrics
from stages.models import init_linear_path
lin = build(ResidualAutoencoder(kind="residual_autoencoder", filters=(4, 8), blocks=(0, 1), latent_channels=2,
                                output_activation="linear", linear_path=True), (8, 8, 3), 0)
init_linear_path(lin, *metrics.pca_fit(x, 32))
lin.compile("adam", "mse")
res_loss = max(res_loss, lin.fit(x, x, batch_size=8, epochs=1, verbose=0).history["loss"][-1])
net = build(ResNet(kind="resnet", stem=4, stages=[{"filters": 8, "blocks": 1}], dropout=0.1, logit_scale=0.125,
                   augment={"flip": True, "translate": 0.25}), (8, 8, 3), 3)
net.compile(keras.optimizers.SGD(recipes.OneCycle(0.1, 8), momentum=0.9, nesterov=True, weight_decay=5e-4),
            recipes.SmoothedSparseCrossentropy(0.1, 3))
net_loss = net.fit(x, np.arange(32) % 3, batch_size=8, epochs=2, verbose=0).history["loss"][-1]
cnn_loss = max(cnn_loss, res_loss, net_loss) if all(np.isfinite([res_loss, net_loss])) else float("nan")
print(json.dumps({"backend": keras.backend.backend(), "ae": float(ae_loss), "cnn": float(cnn_loss),
                  "out": list(ae.predict(x[:2], verbose=0).shape)}))
"""


@pytest.mark.parametrize("backend", ["tensorflow", "jax", "torch"])
def test_tiny_models_train_on_each_installed_backend(backend):
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run([sys.executable, "-c", BACKEND_PROBE], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["backend"] == backend
    assert np.isfinite(report["ae"]) and np.isfinite(report["cnn"]) and report["out"] == [2, 8, 8, 3]


def test_every_experiments_model_trains_as_one_compiled_step():
    """A layer Keras cannot compile (its RandomTranslation, say) turns XLA off
    for the whole train step: on a GPU every step then runs op by op, 40 times
    slower (a ResNet-9 CIFAR-10 epoch on an H200: 33-43 s instead of about 1)."""
    from stages import params as params_mod

    params = params_mod.load(Path(__file__).resolve().parents[1] / "params.yaml")
    shapes = {"mnist": (28, 28, 1), "fashion_mnist": (28, 28, 1), "cifar10": (32, 32, 3)}
    for name, exp in params.experiments.items():
        dataset = exp.data.input.split("/")[1]
        if exp.data.input.startswith("corrupted/"):
            dataset = params.corruptions[dataset].dataset
        shape = shapes[dataset]
        if "colored" in name or "colorize" in exp.description:
            shape = (*shape[:2], 3)
        model = build(exp.model, shape, 10)
        unjittable = [layer.name for layer in model._flatten_layers() if not getattr(layer, "supports_jit", True)]
        assert not unjittable, f"{name}: {unjittable}"
