"""Shared entry-point plumbing: argument parsing, logging, clean failures."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence

from stages.errors import PipelineError

log = logging.getLogger("stages")


def setup_logging() -> None:
    level = os.environ.get("LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def run(
    stage: str,
    description: str,
    body: Callable[[argparse.Namespace], None],
    configure: Callable[[argparse.ArgumentParser], None],
    argv: Sequence[str] | None = None,
) -> int:
    """Parse arguments, run ``body``, and turn a PipelineError into exit code 1."""
    parser = argparse.ArgumentParser(prog=f"python -m stages.{stage}", description=description)
    parser.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    configure(parser)
    args = parser.parse_args(argv)
    setup_logging()
    started = time.perf_counter()
    try:
        body(args)
    except PipelineError as exc:
        log.error("%s failed: %s", stage, exc)
        return 1
    except KeyboardInterrupt:
        log.error("%s interrupted", stage)
        return 130
    log.info("%s done in %.1f s", stage, time.perf_counter() - started)
    return 0
