"""Shared entry-point plumbing: argument parsing, logging, clean failures."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from stages.errors import PipelineError

log = logging.getLogger("stages")


class Terminated(KeyboardInterrupt):
    """SIGTERM (``dvc`` stopping a stage, a CI job cancelled): unwound like
    Ctrl-C, so outputs being written are removed and an open MLflow run ends KILLED."""


def _terminate(signum, frame):
    raise Terminated()


def setup_logging() -> None:
    level = os.environ.get("LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def size(path: Path) -> int:
    """Bytes in a file, or in every file under a folder."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size if path.exists() else 0


def describe_outputs(paths: Sequence[Path]) -> str:
    """'data/prepared/mnist.npz (52.3 MB), ...' for the end-of-stage line."""
    from stages.progress import amount

    return ", ".join(f"{p}{'/' if p.is_dir() else ''} ({amount(size(p), 'B')})" for p in map(Path, paths))


ADVICE = ("run ", "check ", "lower ", "fix ", "set ", "delete ", "use ", "rebuild ", "start ", "install ")


def next_step(exc: PipelineError) -> str | None:
    """The error class's advice, unless the message already ends with its own."""
    last_clause = str(exc).rsplit("; ", 1)[-1]
    if not exc.next_step or "; " in str(exc) and last_clause.startswith(ADVICE):
        return None
    return exc.next_step


def run(
    stage: str,
    description: str,
    body: Callable[[argparse.Namespace], Sequence[Path] | None],
    configure: Callable[[argparse.ArgumentParser], None],
    argv: Sequence[str] | None = None,
) -> int:
    """Parse arguments, run ``body``, and turn a PipelineError into exit code 1.

    ``body`` returns the outputs it wrote; the stage's last line names them,
    with their sizes and the stage's time. A failure's line says what failed
    and, in the message or on the line after it, what to do. ``description``
    (the stage module's docstring) is what ``--help`` shows.
    """
    parser = argparse.ArgumentParser(
        prog=f"python -m stages.{stage}", description=description.strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=textwrap.fill(
            f"DVC runs it as the {stage} stage(s) of dvc.yaml (dvc repro, dvc exp run). It reads its own "
            "section of params.yaml, logs a line when it starts and one when it ends (LOG_LEVEL=DEBUG for "
            "more), and on bad input exits 1 with a message naming the file, key or value at fault and "
            "what to do.", 79))
    parser.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    configure(parser)
    args = parser.parse_args(argv)
    setup_logging()
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    started = time.perf_counter()
    try:
        outputs = body(args)
    except PipelineError as exc:
        log.error("%s failed: %s", stage, exc)
        if advice := next_step(exc):
            log.error("%s: what to do: %s", stage, advice)
        return 1
    except KeyboardInterrupt as exc:
        log.error("%s %s", stage, "terminated" if isinstance(exc, Terminated) else "interrupted")
        return 143 if isinstance(exc, Terminated) else 130
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    elapsed = time.perf_counter() - started
    if outputs:
        log.info("%s done in %.1f s: %s", stage, elapsed, describe_outputs(outputs))
    else:
        log.info("%s done in %.1f s", stage, elapsed)
    return 0
