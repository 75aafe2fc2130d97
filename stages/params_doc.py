"""docs/params.md, generated from the params schema.

``python -m stages.params_doc --out docs/params.md`` (or without ``--out``, to
stdout) walks the pydantic models that validate params.yaml
(:class:`stages.params.Params` and the models under it) and writes one table
per section: every key with its type, constraints, default and what it does.
The descriptions are the class docstrings and the ``#`` comments beside each
field in the two modules (read from their source, since pydantic does not
keep comments), else a line from :data:`NOTES`. ``tests/test_params_doc.py``
regenerates the page and fails when the committed one differs, so a key added,
renamed or re-typed without regenerating is caught.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import io
import sys
import textwrap
import tokenize
import types
import typing
from functools import cache
from pathlib import Path

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from stages.params import Params

# What a field does, for the fields whose source has no comment beside them
# ("Class.field"; a comment in the source wins). tests/test_params_doc.py checks
# that every entry still names a field.
NOTES = {
    "Params.limits": "caps for quick runs, applied to every experiment",
    "Params.download": "how the download stage fetches files",
    "Params.datasets": "one entry per dataset: its source and validation split",
    "Params.corruptions": "one entry per corrupted copy of a prepared dataset",
    "Params.experiments": "one entry per experiment: its data, model, training and evaluation",
    "Params.promotion": "the promotion gate's margins (evaluate), also the CI smoke's regression thresholds",
    "Limits.max_samples": "cap on every split (a seeded random subset), or a mapping capping the splits it names; "
                          "null: whole splits",
    "Limits.max_epochs": "cap on every experiment's epochs (a schedule then spans the capped epochs); null: off",
    "SampleCaps.train": "cap on the train split; null: whole",
    "SampleCaps.val": "cap on the validation split; null: whole",
    "SampleCaps.test": "cap on the test split; null: whole",
    "Download.mirror": "base folder or URL laid out `<mirror>/<dataset>/<file>`; the `DATA_MIRROR` environment "
                       "variable wins",
    "Download.retries": "retries on network errors, 5xx and 429, with exponential back-off",
    "Download.timeout_s": "seconds to wait for a connection or data",
    "Download.cache_dir": "verified downloads, reused while they still verify",
    "Source.builtin": "a built-in dataset (checksums pinned)",
    "Source.sha256": "the image folder's sha256, checked before use (without it the stage logs the value to pin)",
    "Split.val_fraction": "share of the train split carved out as validation when the source has none",
    "Split.seed": "seed of that split",
    "Dataset.source": "where the images come from",
    "Dataset.split": "how the validation split is carved",
    "Gaussian.dataset": "the dataset (a `datasets` entry) to corrupt",
    "Gaussian.factor": "noise `x + factor * N(0, 1)` on [0, 1] pixels, clipped to [0, 1]",
    "Gaussian.seed": "seed of the noise (each split draws from `(seed, split)`)",
    "SaltPepper.dataset": "the dataset (a `datasets` entry) to corrupt",
    "SaltPepper.amount": "share of the pixels set to black or white",
    "SaltPepper.salt_vs_pepper": "share of those set to white",
    "SaltPepper.seed": "seed of the noise (each split draws from `(seed, split)`)",
    "Colorize.dataset": "the (grey) dataset to colour",
    "Colorize.mode": "`channel`: each digit in one pure red, green or blue channel; `tint`: a random colour",
    "Colorize.seed": "seed of the colours (each split draws from `(seed, split)`)",
    "Grayscale.dataset": "the (colour) dataset to turn grey",
    "Promotion.psnr_db": "test PSNR (dB) an autoencoder must gain over the champion to replace it; the largest "
                         "fall below the smoke baseline CI accepts",
    "Promotion.accuracy": "test accuracy (0.02 = 2 points) a classifier must gain over the champion to replace it; "
                          "the largest fall below the smoke baseline CI accepts",
    "Data.input": "what the model reads: `prepared/<dataset>` or `corrupted/<corruption>`",
    "Data.train_on": "`train+val` trains on both (the seed questions' protocol)",
    "Training.optimizer": "the Keras optimizer",
    "Training.epochs": "epochs to train (capped by `limits.max_epochs`)",
    "Training.batch_size": "images per step (the global batch under `data_parallel`)",
    "Training.seed": "seeds weights, shuffling, dropout and augmentation",
    "ConvAutoencoder.filters": "3x3 conv filters per encoder level; the decoder mirrors them",
    "ConvAutoencoder.poolings": "2x2 poolings in the encoder (the latent side is the image side / 2^poolings)",
    "ConvAutoencoder.activation": "activation of the convs",
    "ConvAutoencoder.output_activation": "`sigmoid` for pixels in [0, 1], `linear` for an unbounded output",
    "ResidualAutoencoder.filters": "width of each resolution level (`filters[i]` after `i` halvings)",
    "ResidualAutoencoder.latent_channels": "channels of the latent (a linear 1x1 conv)",
    "ResidualAutoencoder.output_activation": "`sigmoid`, or `linear` (needed by `linear_path` and `input_skip`)",
    "ResidualAutoencoder.bn_momentum": "share of the batch-norm moving statistics kept per step",
    "Cnn.conv": "the conv blocks, in order",
    "Cnn.initializer": "initializer of the convs",
    "Cnn.dense": "widths of the dense layers before the logits",
    "Cnn.dense_activation": "activation of those dense layers",
    "Cnn.dropout": "dropout before each dense layer and the logits",
    "Block.filters": "conv filters",
    "Block.kernel_size": "conv kernel side",
    "Block.activation": "conv activation (null: none)",
    "Block.padding": "conv padding",
    "Block.pool": "a 2x2 max pooling after the conv",
    "ResNet.stem": "filters of the first conv",
    "ResNet.stages": "the stages, in order",
    "ResNet.dropout": "dropout before the logits",
    "ResNet.logit_scale": "the logits are multiplied by it",
    "ResNet.augment": "augmentation layers, active in training only",
    "ResNet.bn_momentum": "share of the batch-norm moving statistics kept per step",
    "Stage.filters": "filters of the stage's conv-BN-ReLU",
    "Stage.blocks": "residual blocks after it",
    "Stage.pool": "a 2x2 max pooling after the conv",
    "Experiment.task": "must match the model kind",
    "Experiment.description": "one line, shown in the report",
    "Experiment.data": "the dataset files it reads and the splits it trains and validates on",
    "Experiment.model": "the network; `kind` selects one of the tables below",
    "Experiment.training": "loss, optimizer, schedule and run settings",
    "Experiment.evaluation": "options of the evaluate stage",
}

# Rules across a model's keys (its validators), for the models whose docstring
# does not say them. tests/test_params_doc.py checks that every entry names a model.
CLASS_NOTES = {
    "Training": "A `schedule` other than `constant` needs `learning_rate` (its peak), and `warmup` needs such a "
                "schedule; `momentum` and `nesterov` apply to `sgd`, `weight_decay` to `adamw` and `sgd`; "
                "`gradient_accumulation_steps` and `data_on_device` need `distribution: none`.",
    "Experiment": "`task: autoencoder` takes a `conv_autoencoder` or `residual_autoencoder` model and loss "
                  "`mse`, `bce` or `psnr`; `task: classifier` takes a `cnn` or `resnet` model, loss "
                  "`sparse_categorical_crossentropy`, and `data.target` equal to `data.input`.",
}

HEADER = """\
# params.yaml reference

<!-- Generated by `python -m stages.params_doc --out docs/params.md` from the
pydantic models in stages/params.py and stages/experiment_params.py; do not
edit by hand. tests/test_params_doc.py fails when this page is out of date. -->

Every stage validates `params.yaml` against these models before it does any
work: an unknown key, a wrong type or a value out of range is a one-line error
naming the key and the value (with the nearest valid key suggested), exit
code 1. "required" keys have no default. `<name>` is a name you choose (a
dataset, corruption or experiment). A key can be changed for one run with
`dvc exp run -S <key>=<value>`; a key not yet written in `params.yaml` needs
a `+` (`-S +experiments.mnist_cae.training.seed=1`).
"""


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _yaml(value) -> str:
    """A default as it would be written in params.yaml."""
    if value is None:
        return "null"
    if value == "":
        return '""'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, BaseModel):
        return "(defaults below)"
    return str(value)


def _constraints(metadata) -> list[str]:
    """``>= 1``, ``< 1``, ``at least 1 item``, ``matches ...`` from pydantic/annotated-types metadata."""
    out = []
    for item in metadata:
        if isinstance(item, FieldInfo):
            out += _constraints(item.metadata)
            continue
        for attr, symbol in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(item, attr, None) is not None:
                out.append(f"{symbol} {getattr(item, attr)}")
        if getattr(item, "min_length", None) is not None:
            out.append(f"at least {item.min_length} item" + ("s" if item.min_length != 1 else ""))
        if getattr(item, "max_length", None) is not None:
            out.append(f"at most {item.max_length} items")
        if getattr(item, "pattern", None) is not None:
            out.append(f"matching `{item.pattern}`")
    return out


def _is_model(tp) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _describe(tp, path: str, nested: list) -> str:
    """Words for a type; the models inside it are appended to ``nested`` as (path, model)."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        inner, *meta = typing.get_args(tp)
        text = _describe(inner, path, nested)
        limits = _constraints(meta)
        return f"{text} ({', '.join(limits)})" if limits else text
    if tp is type(None):
        return "null"
    if tp in (bool, int, float, str):
        return {bool: "bool", int: "int", float: "number", str: "string"}[tp]
    if origin is typing.Literal:
        values = [f"`{_yaml(v)}`" for v in typing.get_args(tp)]
        return values[0] if len(values) == 1 else "one of " + ", ".join(values)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        models = [a for a in args if _is_model(a)]
        if models and len(models) == len(args) and all("kind" in m.model_fields for m in models):
            for model in models:
                nested.append((path, model))
            kinds = [typing.get_args(m.model_fields["kind"].annotation)[0] for m in models]
            return "mapping, by `kind`: " + ", ".join(f"`{k}`" for k in kinds)
        return " or ".join(_describe(a, path, nested) for a in args)
    if origin is tuple:
        return "list of " + _describe(typing.get_args(tp)[0], path + "[]", nested)
    if origin is dict:
        return "mapping of names to " + _describe(typing.get_args(tp)[1], path + ".<name>", nested)
    if _is_model(tp):
        nested.append((path, tp))
        return f"mapping (`{path}`, below)"
    raise TypeError(f"params_doc: no words for the type {tp!r} at {path}")


@cache
def _comments(cls: type) -> dict[str, str]:
    """The ``#`` comments beside each field of ``cls`` in its source: the lines
    right above it and the one at its end."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            text = token.string.lstrip("#").strip()
            if not text.startswith("type: ignore"):
                comments[token.start[0]] = text
    lines = source.splitlines()
    found = {}
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, row = [], node.lineno - 1
        while row >= 1 and lines[row - 1].strip().startswith("#") and row in comments:
            above.insert(0, comments[row])
            row -= 1
        beside = [comments[r] for r in range(node.lineno, node.end_lineno + 1) if r in comments
                  and not lines[r - 1].strip().startswith("#")]
        text = " ".join(above + beside).strip()
        if text:
            found[node.target.id] = text
    return found


def _doc(cls: type) -> str:
    doc = cls.__dict__.get("__doc__")  # its own docstring, not one inherited
    doc = " ".join(inspect.cleandoc(doc).split()) if doc else ""
    return " ".join(part for part in (doc, CLASS_NOTES.get(cls.__name__, "")) if part)


def _section(path: str, cls: type, seen: set) -> list[str]:
    kind = cls.model_fields.get("kind")
    title = f"`{path}`"
    if kind is not None:
        title += f", `kind: {typing.get_args(kind.annotation)[0]}`"
    out = ["### " + title, ""]
    if doc := _doc(cls):
        out += [doc, ""]
    out += ["| key | type | default | what it does |", "| --- | --- | --- | --- |"]
    nested: list = []
    comments = _comments(cls)
    for name, field in cls.model_fields.items():
        text = _describe(field.annotation, f"{path}.{name}", nested)
        if limits := _constraints(field.metadata):
            text += f" ({', '.join(limits)})"
        if field.discriminator and not text.startswith("mapping, by"):
            text += f", by `{field.discriminator}`"
        default = "required" if field.default is PydanticUndefined else f"`{_yaml(field.default)}`"
        if field.default is not PydanticUndefined and isinstance(field.default, BaseModel):
            default = "(defaults below)"
        what = comments.get(name) or NOTES.get(f"{cls.__name__}.{name}", "")
        out.append(f"| `{name}` | {_escape(text)} | {_escape(default)} | {_escape(what)} |")
    out.append("")
    for sub_path, model in nested:
        if (sub_path, model) in seen:
            continue
        seen.add((sub_path, model))
        out += _section(sub_path, model, seen)
    return out


def render() -> str:
    """The whole page."""
    lines = HEADER.splitlines() + [""]
    seen: set = set()
    comments = _comments(Params)
    for name, field in Params.model_fields.items():
        what = comments.get(name) or NOTES.get(f"Params.{name}", "")
        lines += [f"## `{name}`", "", what[0].upper() + what[1:] + ".", ""]
        if _is_model(field.annotation):  # a section of its own: its table right here
            seen.add((name, field.annotation))
            lines += _section(name, field.annotation, seen)[2:]
            continue
        nested: list = []
        _describe(field.annotation, name, nested)  # a mapping of names to entries: their tables
        for sub_path, model in nested:
            if (sub_path, model) not in seen:
                seen.add((sub_path, model))
                lines += _section(sub_path, model, seen)
    while lines[-1] == "":
        lines.pop()
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.params_doc", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the page here (default: stdout)")
    args = parser.parse_args(argv)
    text = render()
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
