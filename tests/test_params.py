from pathlib import Path

import pytest
import yaml

from stages import params
from stages.params import ParamsError

REPO_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"

GOOD = {
    "datasets": {"mnist": {"source": {"builtin": "mnist"}}},
    "corruptions": {"noisy": {"dataset": "mnist", "kind": "gaussian", "factor": 0.5}},
}


def _with(path: str, value, base=GOOD):
    import copy
    raw = copy.deepcopy(base)
    node = raw
    keys = path.split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value
    return raw


def test_repo_params_yaml_is_valid():
    loaded = params.load(REPO_PARAMS)
    assert loaded.datasets["cifar10"].source.builtin in ("cifar10", "cifar10_jpeg")
    for corruption in loaded.corruptions.values():
        assert corruption.dataset in loaded.datasets


@pytest.mark.parametrize(
    "path, value, message",
    [
        ("limitz", {}, "unknown key 'limitz' (did you mean 'limits'?)"),
        ("download.mirrror", "x", "unknown key 'download.mirrror' (did you mean 'mirror'?)"),
        ("datasets.mnist.split.val_fracton", 0.1, "unknown key 'datasets.mnist.split.val_fracton' (did you mean 'val_fraction'?)"),
        ("corruptions.noisy.factor", -0.5, "'corruptions.noisy.factor' = -0.5: Input should be greater than or equal to 0"),
        ("corruptions.noisy.factor", "loud", "'corruptions.noisy.factor' = 'loud'"),
        ("corruptions.noisy.kind", "blur", "'corruptions.noisy.kind' = 'blur'"),
        ("corruptions.noisy.dataset", "mnsit", "unknown dataset 'mnsit' (did you mean 'mnist'?)"),
        ("limits.max_samples", 0, "'limits.max_samples' = 0: Input should be greater than or equal to 1"),
        ("limits.max_samples", "many", "'limits.max_samples' = 'many'"),
        ("limits.max_samples", {"tran": 8}, "unknown key 'limits.max_samples.tran' (did you mean 'train'?)"),
        ("limits.max_samples", {"train": 8, "test": 0}, "'limits.max_samples.test' = 0"),
        ("datasets.mnist.split.val_fraction", 1.5, "'datasets.mnist.split.val_fraction' = 1.5"),
        ("datasets.mnist.source", {"builtin": "mnist", "path": "x.zip"}, "exactly one of 'builtin' or 'path'"),
        ("datasets.mnist.source", {"builtin": "imagenet"}, "'datasets.mnist.source.builtin' = 'imagenet'"),
        ("datasets.mnist.source", {"path": "x.zip", "sha256": "abc"}, "'datasets.mnist.source.sha256' = 'abc'"),
        ("promotion.psnr", 1.0, "unknown key 'promotion.psnr' (did you mean 'psnr_db'?)"),
        ("promotion.accuracy", 2, "'promotion.accuracy' = 2"),
        ("promotion.psnr_db", -1, "'promotion.psnr_db' = -1"),
    ],
)
def test_bad_values_name_key_and_value(path, value, message):
    with pytest.raises(ParamsError) as err:
        params.parse(_with(path, value))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


AE = {"task": "autoencoder", "data": {"input": "corrupted/noisy", "target": "prepared/mnist"},
      "model": {"kind": "conv_autoencoder", "filters": [8, 8, 8], "poolings": 2},
      "training": {"loss": "bce", "epochs": 1, "batch_size": 4}}


@pytest.mark.parametrize(
    "path, value, message",
    [
        ("experiments.ae.model.poolings", 3,
         "params.yaml: experiments.ae.model.poolings = 3: 3 poolings need image sides divisible by 8, "
         "but corrupted/noisy images are 28x28"),
        ("experiments.ae.training.epochs", 0, "'experiments.ae.training.epochs' = 0: Input should be greater than or equal to 1"),
        ("experiments.ae.training.batch_size", -4, "'experiments.ae.training.batch_size' = -4"),
        ("experiments.ae.model.kind", "vae", "'experiments.ae.model.kind' = 'vae': expected one of"),
        ("experiments.ae.task", "classifier",
         "params.yaml: 'experiments.ae': task 'classifier' does not match model kind 'conv_autoencoder'"),
        ("experiments.ae.data.input", "prepared/mnsit",
         "params.yaml: experiments.ae.data.input: 'prepared/mnsit' names no entry of 'datasets' (did you mean 'mnist'?)"),
        ("experiments.ae.training.lerning_rate", 0.1,
         "unknown key 'experiments.ae.training.lerning_rate' (did you mean 'learning_rate'?)"),
        ("experiments.ae.training.schedule", "one_cycle",
         "'experiments.ae.training': schedule 'one_cycle' needs learning_rate (its peak)"),
        ("experiments.ae.training.momentum", 0.9,
         "'experiments.ae.training': momentum and nesterov apply to optimizer sgd, not 'adam'"),
        ("experiments.ae.training.weight_decay", 0.01,
         "'experiments.ae.training': weight_decay applies to optimizer adamw or sgd, not 'adam'"),
        ("experiments.ae.training.gradient_accumulation_steps", 1,
         "'experiments.ae.training.gradient_accumulation_steps' = 1: Input should be greater than or equal to 2"),
        ("experiments.ae.training", {"loss": "mse", "epochs": 1, "batch_size": 8, "gradient_accumulation_steps": 2,
                                     "distribution": "data_parallel"},
         "'experiments.ae.training': gradient_accumulation_steps is not supported with distribution 'data_parallel'"),
        ("experiments.ae.training", {"loss": "mse", "epochs": 1, "batch_size": 8, "data_on_device": True,
                                     "distribution": "data_parallel"},
         "'experiments.ae.training': data_on_device is not supported with distribution 'data_parallel'"),
        ("experiments.ae.training.data_on_device", "gpu",
         "'experiments.ae.training.data_on_device' = 'gpu': Input should be a valid boolean"),
        ("experiments.ae.training.loss", "sparse_categorical_crossentropy",
         "'experiments.ae': an autoencoder needs loss mse, bce or psnr, not 'sparse_categorical_crossentropy'"),
        ("experiments.ae.training.label_smoothing", 0.1,
         "'experiments.ae': training.label_smoothing applies to classifiers"),
        ("experiments.ae.evaluation", {"flip_tta": True}, "'experiments.ae': evaluation.flip_tta applies to classifiers"),
        ("experiments.ae.model", {"kind": "residual_autoencoder", "filters": [8, 8], "blocks": [1],
                                  "latent_channels": 4},
         "'experiments.ae.model': blocks has 1 entries, filters 2: give one block count per level"),
        ("experiments.ae.model", {"kind": "residual_autoencoder", "filters": [8, 8, 8, 8], "blocks": [0, 0, 0, 0],
                                  "latent_channels": 4},
         "experiments.ae.model.poolings = 3: 3 poolings need image sides divisible by 8"),
        ("experiments.ae.model", {"kind": "residual_autoencoder", "filters": [8, 8], "blocks": [0, 0],
                                  "latent_channels": 4, "linear_path": True},
         "'experiments.ae.model': linear_path and input_skip add a correction to an image: "
         "they need output_activation: linear"),
        ("experiments.ae.model", {"kind": "residual_autoencoder", "filters": [8, 8], "blocks": [0, 0],
                                  "latent_channels": 4, "linear_path": True, "output_activation": "linear"},
         "'experiments.ae': model.linear_path and model.input_skip have an unbounded (linear) output: "
         "they need training.loss mse or psnr, not 'bce'"),
        ("experiments.ae.model", {"kind": "residual_autoencoder", "filters": [8, 8], "blocks": [0, 0],
                                  "latent_channels": 4, "output_activation": "linear", "refiner": [8]},
         "'experiments.ae.model': refiner refines a base image: it needs linear_path or input_skip"),
        ("experiments.ae.model", {"kind": "residual_autoencoder", "filters": [8, 8], "blocks": [0, 0],
                                  "latent_channels": 4, "linear_path": True, "refiner": [8, 0]},
         "'experiments.ae.model.refiner.1' = 0"),
        ("experiments.ae.model", {"kind": "residual_autoencoder", "filters": [8, 8], "blocks": [0, 0],
                                  "latent_channels": 4, "bn_momentum": 1.0},
         "'experiments.ae.model.bn_momentum' = 1.0: Input should be less than 1"),
        ("experiments.ae.model", {"kind": "resnet", "stem": 8, "stages": [{"filters": 8}]},
         "task 'autoencoder' does not match model kind 'resnet'"),
        ("corruptions.noisy", {"dataset": "mnist", "kind": "colorize", "train_channels": ["red", "red"]},
         "'corruptions.noisy': train_channels ['red', 'red'] names a channel twice"),
        ("corruptions.noisy", {"dataset": "mnist", "kind": "colorize", "train_channels": ["purple"]},
         "'corruptions.noisy.train_channels.0' = 'purple'"),
    ],
)
def test_bad_experiment_values_name_key_and_value(path, value, message):
    with pytest.raises(ParamsError) as err:
        params.parse(_with(path, value, {**GOOD, "experiments": {"ae": AE}}))
    assert message in str(err.value)
    assert "\n" not in str(err.value) and len(str(err.value)) < 300, str(err.value)


def test_a_linear_output_trains_on_mse_or_psnr():
    model = {"kind": "residual_autoencoder", "filters": [8, 8], "blocks": [0, 0], "latent_channels": 4,
             "linear_path": True, "output_activation": "linear"}
    for loss in ("mse", "psnr"):
        exp = {**AE, "model": model, "training": {**AE["training"], "loss": loss}}
        assert params.parse({**GOOD, "experiments": {"ae": exp}}).experiments["ae"].training.loss == loss


def test_input_skip_needs_a_corrupted_input():
    skip = {**AE, "data": {"input": "prepared/mnist", "target": "prepared/mnist"},
            "model": {"kind": "residual_autoencoder", "filters": [8, 8], "blocks": [0, 0], "latent_channels": 4,
                      "output_activation": "linear", "input_skip": True},
            "training": {**AE["training"], "loss": "mse"}}
    with pytest.raises(ParamsError, match="model.input_skip would copy the input past the bottleneck: it needs a "
                                          "corrupted data.input, but input and target are both prepared/mnist"):
        params.parse({**GOOD, "experiments": {"ae": skip}})
    params.parse({**GOOD, "experiments": {"ae": {**skip, "data": AE["data"]}}})


def test_poolings_of_an_image_folder_are_checked_when_its_size_is_known():
    raw = {"datasets": {"pets": {"source": {"path": "pets.tar.gz"}}},
           "experiments": {"ae": {**AE, "data": {"input": "prepared/pets", "target": "prepared/pets"},
                                  "model": {**AE["model"], "poolings": 3}}}}
    assert params.parse(raw).experiments["ae"].model.poolings == 3  # the train stage checks it


def test_unknown_names_suggest(tmp_path):
    loaded = params.parse(GOOD)
    with pytest.raises(ParamsError, match=r"no dataset 'datasets.mnsit' \(did you mean 'mnist'\?\)"):
        params.dataset(loaded, "mnsit")
    with pytest.raises(ParamsError, match=r"no corruption 'corruptions.nosy' \(did you mean 'noisy'\?\)"):
        params.corruption(loaded, "nosy")


def test_file_errors(tmp_path):
    with pytest.raises(ParamsError, match=r"nope.yaml: cannot read params file"):
        params.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("datasets: [unclosed\n")
    with pytest.raises(ParamsError, match=r"bad.yaml: not valid YAML"):
        params.load(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(ParamsError, match="expected a mapping"):
        params.load(listy)


def test_defaults():
    loaded = params.parse(GOOD)
    assert loaded.limits.max_samples is None and loaded.limits.max_epochs is None
    assert loaded.datasets["mnist"].split.val_fraction == 0.1
    assert loaded.download.retries == 4

