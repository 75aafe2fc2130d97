"""Outputs that appear whole or not at all, and what a killed writer leaves.

A stage writes an output under a temporary sibling name,
``.<name>.partial-<pid>``, and renames it over the output only when it is
complete; any failure removes the temporary. A ``kill -9`` gives no chance to
remove it, so before writing, temporaries of the same output whose process
is gone are swept away. Temporaries of a live process (another stage writing
the same file right now) are left alone.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from stages.errors import PipelineError

log = logging.getLogger(__name__)


def partial_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.partial-{os.getpid()}")


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    try:  # a zombie (killed, not yet reaped: its parent was killed too) writes nothing more
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2:].split()[0] != "Z"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def sweep_partials(target: Path) -> list[Path]:
    """Remove temporaries of ``target`` left by processes that no longer exist."""
    prefix = f".{target.name}.partial-"
    removed = []
    try:
        siblings = list(target.parent.iterdir())
    except FileNotFoundError:
        return removed
    for path in siblings:
        pid = path.name[len(prefix):] if path.name.startswith(prefix) else ""
        if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
            _remove(path)
            removed.append(path)
    if removed:
        log.info("removed %d partial file(s) of %s left by a killed run", len(removed), target)
    return removed


@contextmanager
def replacing(target: Path, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``target``.

    With ``directory`` the temporary is an empty folder, and an existing
    ``target`` folder is removed just before the rename.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_partials(target)
    tmp = partial_path(target)
    _remove(tmp)
    if directory:
        tmp.mkdir()
    try:
        yield tmp
        if directory and target.exists():
            _remove(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists() or tmp.is_symlink():
            _remove(tmp)


def write_text(target: Path, text: str) -> None:
    with replacing(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def read_json(path: Path, written_by: str, error: type[Exception] = PipelineError) -> dict:
    """A JSON file another stage wrote (``written_by``, e.g. ``evaluate@x``),
    or ``error`` naming the file and what to run."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise error(f"{path}: not found; run {written_by} first") from None
    except json.JSONDecodeError as exc:
        raise error(f"{path}: not valid JSON ({exc})") from None
