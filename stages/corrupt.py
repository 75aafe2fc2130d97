"""DVC stage ``corrupt@<name>``: a prepared dataset -> a corrupted copy.

Reads ``data/prepared/<dataset>.npz`` and writes ``data/corrupted/<name>.npz``
in the same format (labels and class names kept), with each split's images
corrupted by a generator seeded from ``(seed, split)``: the same params give
byte-identical output, and one split's noise does not depend on another's size.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from stages import cli, corruptions, params as params_mod
from stages.errors import PipelineError
from stages.images import SPLITS, DatasetFile, Split, load, save

log = logging.getLogger("stages.corrupt")
CHANNELS = ("red", "green", "blue")


def corrupt(data: DatasetFile, cfg) -> tuple[DatasetFile, dict]:
    """Apply one corruption config to every split; return (dataset, summary)."""
    splits, summary = {}, {}
    for index, name in enumerate(SPLITS):
        split = data.splits[name]
        rng = np.random.default_rng([cfg.seed, index])
        if cfg.kind == "gaussian":
            images = corruptions.gaussian(split.images, cfg.factor, rng)
        elif cfg.kind == "salt_pepper":
            images = corruptions.salt_pepper(split.images, cfg.amount, cfg.salt_vs_pepper, rng)
        elif cfg.kind == "grayscale":
            if data.image_shape[2] != 3:
                raise PipelineError(f"corruptions: grayscale needs a colour dataset, but '{cfg.dataset}' has "
                                    f"{data.image_shape[2]} channel(s)")
            images = corruptions.grayscale(split.images)
        else:
            if data.image_shape[2] != 1:
                raise PipelineError(
                    f"corruptions: colorize needs a grey dataset, but '{cfg.dataset}' has "
                    f"{data.image_shape[2]} channels"
                )
            if cfg.mode == "channel":
                allowed = (0, 1, 2) if name == "test" else tuple(CHANNELS.index(c) for c in cfg.train_channels)
                images, channels = corruptions.colorize_channel(split.images, rng, allowed)
            else:
                images, channels = corruptions.colorize_tint(split.images, rng)
            balance = np.bincount(channels, minlength=3) / max(len(channels), 1)
            summary[f"{name}_channel_share_rgb"] = [round(float(b), 4) for b in balance]
        splits[name] = Split(images, split.labels)
    meta = {**data.meta, "corruption": cfg.model_dump(), **summary}
    return DatasetFile(splits, data.class_names, meta), summary


def main(argv=None) -> int:
    def configure(parser):
        parser.add_argument("name", help="a corruption named under 'corruptions' in params.yaml")
        parser.add_argument("--data", type=Path, help="input (default: data/prepared/<dataset>.npz)")
        parser.add_argument("--out", type=Path, help="output (default: data/corrupted/<name>.npz)")

    def body(args):
        params = params_mod.load(args.params)
        cfg = params_mod.corruption(params, args.name)
        source = args.data or Path("data/prepared") / f"{cfg.dataset}.npz"
        out = args.out or Path("data/corrupted") / f"{args.name}.npz"
        data = load(source)
        log.info("corrupt %s: %s on %s %s", args.name, cfg.kind, source,
                 {k: len(v) for k, v in data.splits.items()})
        result, summary = corrupt(data, cfg)
        for key, value in summary.items():
            log.info("corrupt %s: %s = %s", args.name, key, value)
        save(out, result)
        log.info("corrupt %s: wrote %s, images %s", args.name, out, result.image_shape)
        return [out]

    return cli.run("corrupt", __doc__, body, configure, argv)


if __name__ == "__main__":
    raise SystemExit(main())
