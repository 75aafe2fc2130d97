"""params.yaml -> typed, validated sections.

Every stage loads only the sections it uses through :func:`load`, which
validates them before any work starts. A typo never passes silently: unknown
keys, wrong types and out-of-range values raise :class:`ParamsError` naming
the key path and the value, with the nearest valid key suggested.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator

from stages.errors import PipelineError
from stages.experiment_params import AUTOENCODERS, CLASSIFIERS, Experiment, Positive, kinds
from stages.sources import SOURCES

PARAMS_FILE = Path("params.yaml")

BUILTIN_SOURCES = tuple(SOURCES)


class ParamsError(PipelineError):
    """params.yaml is missing, unreadable or invalid."""

    next_step = ("fix the key named above in params.yaml (or in dvc exp run -S); the README's params section "
                 "lists every key")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SampleCaps(_Strict):
    """``limits.max_samples`` per split: e.g. train on 8,000 images but score
    on 2,000 (a split left out is not capped)."""

    train: Positive | None = None
    val: Positive | None = None
    test: Positive | None = None


# one number caps every split; a mapping caps each split it names
EVERY_SPLIT, PER_SPLIT = "every_split", "per_split"
SampleCap = Annotated[
    Union[Annotated[Positive, Tag(EVERY_SPLIT)], Annotated[SampleCaps, Tag(PER_SPLIT)]],
    Discriminator(lambda value: PER_SPLIT if isinstance(value, (dict, SampleCaps)) else EVERY_SPLIT),
]


class Limits(_Strict):
    max_samples: SampleCap | None = None
    max_epochs: Positive | None = None

    def max_samples_of(self, split: str) -> int | None:
        """The cap on ``split`` (None: the whole split)."""
        if isinstance(self.max_samples, SampleCaps):
            return getattr(self.max_samples, split)
        return self.max_samples


class Download(_Strict):
    mirror: str | None = None
    retries: Annotated[int, Field(ge=0, le=20)] = 4
    timeout_s: Annotated[float, Field(gt=0)] = 60.0
    backoff_s: Annotated[float, Field(ge=0)] = 1.0  # first retry wait, doubling each time
    cache_dir: str = "data/cache"


class Source(_Strict):
    """Where a dataset comes from: a built-in source, or any image folder."""

    builtin: Literal[BUILTIN_SOURCES] | None = None  # type: ignore[valid-type]
    path: str | None = None  # image folder: directory, .tar.gz/.tgz/.zip, or URL
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None

    @model_validator(mode="after")
    def _one_of(self) -> "Source":
        if (self.builtin is None) == (self.path is None):
            raise ValueError("set exactly one of 'builtin' or 'path'")
        if self.builtin is not None and self.sha256 is not None:
            raise ValueError("'sha256' applies to 'path' sources; built-in sources pin their own")
        return self

    @property
    def name(self) -> str:
        return self.builtin or "image_folder"


class Split(_Strict):
    val_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    seed: int = 0


class Dataset(_Strict):
    source: Source
    split: Split = Split()


class Gaussian(_Strict):
    dataset: str
    kind: Literal["gaussian"]
    factor: Annotated[float, Field(ge=0.0)] = 0.5
    seed: int = 0


class SaltPepper(_Strict):
    dataset: str
    kind: Literal["salt_pepper"]
    amount: Annotated[float, Field(ge=0.0, le=1.0)] = 0.1
    salt_vs_pepper: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5
    seed: int = 0


Channel = Literal["red", "green", "blue"]


class Colorize(_Strict):
    dataset: str
    kind: Literal["colorize"]
    mode: Literal["channel", "tint"] = "channel"
    # mode channel: the channels the train and val digits may take (the test
    # split always takes all three: a colour robustness check)
    train_channels: Annotated[tuple[Channel, ...], Field(min_length=1)] = ("red", "green", "blue")
    seed: int = 0

    @model_validator(mode="after")
    def _channels_fit(self) -> "Colorize":
        if self.mode == "tint" and len(self.train_channels) != 3:
            raise ValueError("train_channels applies to mode 'channel'")
        if len(set(self.train_channels)) != len(self.train_channels):
            raise ValueError(f"train_channels {list(self.train_channels)} names a channel twice")
        return self


class Grayscale(_Strict):
    """Colour images to grey (ITU-R BT.601 luma), kept as three equal channels:
    the input of a colorization autoencoder."""

    dataset: str
    kind: Literal["grayscale"]
    seed: int = 0  # unused (grey is deterministic); kept so every corruption has one


CORRUPTIONS = (Gaussian, SaltPepper, Colorize, Grayscale)
Corruption = Annotated[Union[CORRUPTIONS], Field(discriminator="kind")]


class Promotion(_Strict):
    """The smallest change in a test metric that counts: a new model becomes
    `@champion` only when it beats the champion by more (the evaluate stage's
    gate), and the CI smoke fails only when a metric falls further below its
    baseline."""

    psnr_db: Annotated[float, Field(ge=0)] = 0.5
    accuracy: Annotated[float, Field(ge=0, le=1)] = 0.02


class Params(_Strict):
    """The whole of params.yaml. Sections other stages own are kept as raw data."""

    model_config = ConfigDict(extra="allow", frozen=True)

    limits: Limits = Limits()
    download: Download = Download()
    datasets: dict[str, Dataset] = {}
    corruptions: dict[str, Corruption] = {}
    experiments: dict[str, Experiment] = {}
    promotion: Promotion = Promotion()

    @model_validator(mode="after")
    def _names_resolve(self) -> "Params":
        for name, corruption in self.corruptions.items():
            if corruption.dataset not in self.datasets:
                raise ValueError(
                    f"corruptions.{name}.dataset: unknown dataset {corruption.dataset!r}"
                    f"{_suggest(corruption.dataset, self.datasets)}"
                )
        known = {"prepared": self.datasets, "corrupted": self.corruptions}
        for name, experiment in self.experiments.items():
            for field in ("input", "target"):
                ref = getattr(experiment.data, field)
                kind, stem = ref.split("/", 1)
                if stem not in known[kind]:
                    raise ValueError(
                        f"experiments.{name}.data.{field}: {ref!r} names no entry of "
                        f"'{'datasets' if kind == 'prepared' else 'corruptions'}'{_suggest(stem, known[kind])}"
                    )
            self._poolings_fit(name, experiment)
            seed = experiment.improves_on
            if seed is not None and (seed == name or seed not in self.experiments):
                raise ValueError(f"experiments.{name}.improves_on: {seed!r} names no other experiment"
                                 f"{_suggest(seed, [n for n in self.experiments if n != name])}")
            if seed is not None and self.experiments[seed].task != experiment.task:
                raise ValueError(f"experiments.{name}.improves_on: {seed!r} is a {self.experiments[seed].task}, "
                                 f"{name} a {experiment.task}")
        return self

    def _poolings_fit(self, name: str, experiment: Experiment) -> None:
        """An autoencoder's poolings must divide the image side, where it is known before prepare."""
        poolings = getattr(experiment.model, "poolings", 0)
        kind, stem = experiment.data.input.split("/", 1)
        dataset = self.corruptions[stem].dataset if kind == "corrupted" else stem
        builtin = self.datasets[dataset].source.builtin
        side = SOURCES[builtin].image_side if builtin else None
        if side and side % 2 ** poolings:
            raise ValueError(
                f"experiments.{name}.model.poolings = {poolings}: {poolings} poolings need image sides "
                f"divisible by {2 ** poolings}, but {experiment.data.input} images are {side}x{side}"
            )


KNOWN_SECTIONS = ("limits", "download", "datasets", "corruptions", "experiments", "promotion")


def _suggest(word: str, options) -> str:
    match = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _lookup(data: Any, loc: tuple) -> Any:
    for part in loc:
        if isinstance(data, dict) and part in data:
            data = data[part]
        elif isinstance(data, list) and isinstance(part, int) and part < len(data):
            data = data[part]
        else:
            return None
    return data


def _model_of(annotation: Any) -> Any:
    """The pydantic model (or dict value type) an annotation stands for."""
    if getattr(annotation, "__origin__", None) is dict:
        return ("dict", annotation.__args__[1])
    if getattr(annotation, "__metadata__", None) is not None:  # Annotated[...]
        annotation = annotation.__origin__
    if isinstance(annotation, type):
        return annotation if issubclass(annotation, BaseModel) else None
    for arg in getattr(annotation, "__args__", ()):  # a union: its first model (Annotated ones included)
        if (model := _model_of(arg)) is not None:
            return model
    return None


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that holds the field at ``loc`` (for key suggestions)."""
    model: Any = Params
    for part in loc:
        if isinstance(model, tuple):  # inside a dict: ``part`` is a free-form name
            model = _model_of(model[1])
            continue
        if model is None or part not in getattr(model, "model_fields", {}):
            return None
        model = _model_of(model.model_fields[part].annotation)
    return model if isinstance(model, type) else None


# the tags pydantic puts in an error's location inside a discriminated union (not keys of the file)
UNION_TAGS = (*kinds(*CORRUPTIONS, *AUTOENCODERS, *CLASSIFIERS), EVERY_SPLIT, PER_SPLIT)


def _format(error: dict, raw: dict) -> str:
    loc = tuple(p for p in error["loc"] if p not in UNION_TAGS)
    key = ".".join(str(p) for p in loc)
    kind = error["type"]
    if kind == "extra_forbidden":
        parent = _model_at(loc[:-1]) if loc[:-1] else Params
        options = list(parent.model_fields) if parent else []
        return f"{PARAMS_FILE}: unknown key '{key}'{_suggest(loc[-1], options)}"
    if kind == "union_tag_invalid":
        value = _lookup(raw, loc + ("kind",))
        return f"{PARAMS_FILE}: '{key}.kind' = {value!r}: expected one of {error['ctx']['expected_tags']}"
    if kind == "missing":
        return f"{PARAMS_FILE}: missing key '{key}'"
    message = error["msg"].removeprefix("Value error, ")
    if not key:  # a check across sections; its message names the keys
        return f"{PARAMS_FILE}: {message}"
    value = _lookup(raw, loc)
    if isinstance(value, dict):  # a check across one section's keys: not the whole section again
        return f"{PARAMS_FILE}: '{key}': {message}"
    return f"{PARAMS_FILE}: '{key}' = {value!r}: {message}"


def parse(raw: Any) -> Params:
    """Validate a params mapping; raise :class:`ParamsError` naming every bad key."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{PARAMS_FILE}: expected a mapping at top level, got {type(raw).__name__}")
    unknown = [k for k in raw if k not in KNOWN_SECTIONS]
    if unknown:
        raise ParamsError(
            f"{PARAMS_FILE}: unknown key '{unknown[0]}'{_suggest(unknown[0], KNOWN_SECTIONS)}"
        )
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ParamsError("; ".join(_format(e, raw) for e in exc.errors())) from None


def load(path: Path | str = PARAMS_FILE) -> Params:
    """Read and validate params.yaml."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ParamsError(f"{path}: cannot read params file: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    return parse(raw)


def _entry(params: Params, section: str, name: str):
    """``params.<section>[name]``, or an error suggesting the nearest name."""
    entries = getattr(params, section)
    try:
        return entries[name]
    except KeyError:
        raise ParamsError(f"{PARAMS_FILE}: no {section.rstrip('s')} '{section}.{name}'{_suggest(name, entries)}") \
            from None


def dataset(params: Params, name: str) -> Dataset:
    return _entry(params, "datasets", name)


def experiment(params: Params, name: str) -> Experiment:
    return _entry(params, "experiments", name)


def corruption(params: Params, name: str):
    return _entry(params, "corruptions", name)
