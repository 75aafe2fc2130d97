"""Progress of long loops (bytes downloaded, images decoded).

On a terminal: tqdm's bar, which disappears when done. Anywhere else (CI,
``dvc queue logs``, a file): no bar control codes, only log lines, at most one
every ``every_s`` seconds while it runs. Either way one line at the end says
how much was done in how long. Training shows Keras' own bar on a terminal
and one log line per epoch (``stages.train``).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable

from tqdm import tqdm

log = logging.getLogger("stages.progress")


def amount(count: float, unit: str) -> str:
    """``count`` with its unit: bytes as kB/MB/GB (powers of 1000, as tqdm shows them), others as integers."""
    if unit == "B":
        for scale, prefix in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
            if count >= scale:
                return f"{count / scale:.1f} {prefix}"
        return f"{int(count)} B"
    return f"{int(count):,} {unit}"


def status(desc: str, done: float, total: float | None, unit: str, elapsed: float) -> str:
    """One progress line: 'desc: 45% (5.1 MB of 11.4 MB) in 2.0 s, 2.6 MB/s'."""
    rate = f", {amount(done / elapsed, unit)}/s" if elapsed > 0 and done else ""
    if total:
        return f"{desc}: {100 * done / total:.0f}% ({amount(done, unit)} of {amount(total, unit)}) " \
               f"in {elapsed:.1f} s{rate}"
    return f"{desc}: {amount(done, unit)} in {elapsed:.1f} s{rate}"


class Progress:
    """``update(n)`` as work gets done; use as a context manager."""

    def __init__(self, desc: str, total: float | None = None, unit: str = "B", every_s: float = 10.0,
                 terminal: bool | None = None, clock: Callable[[], float] = time.monotonic):
        self.desc, self.total, self.unit, self.every_s, self.clock = desc, total, unit, every_s, clock
        self.done = 0.0
        self.started = self.last = clock()
        terminal = sys.stderr.isatty() if terminal is None else terminal
        self.bar = tqdm(total=total, unit=unit, unit_scale=unit == "B", desc=desc, leave=False) if terminal else None

    def update(self, n: float) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = self.clock()
        if now - self.last >= self.every_s:
            self.last = now
            log.info("%s", status(self.desc, self.done, self.total, self.unit, now - self.started))

    def close(self, finished: bool = True) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if finished:
            log.info("%s", status(self.desc, self.done, None, self.unit, self.clock() - self.started))

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, kind, *_) -> None:
        self.close(finished=kind is None)
