"""Progress: log lines at most every few seconds off a terminal, and one line at the end."""

from __future__ import annotations

import logging

import pytest

from stages.progress import Progress, amount, status


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_amounts_and_status_lines():
    assert amount(999, "B") == "999 B" and amount(11_400_000, "B") == "11.4 MB" and amount(2e9, "B") == "2.0 GB"
    assert amount(60000, "images") == "60,000 images"
    assert status("mnist.gz", 5.1e6, 11.4e6, "B", 2.0) == "mnist.gz: 45% (5.1 MB of 11.4 MB) in 2.0 s, 2.5 MB/s"
    assert status("decode", 2048, None, "images", 0.0) == "decode: 2,048 images in 0.0 s"


def test_off_a_terminal_it_logs_lines_not_a_bar(caplog, capsys):
    caplog.set_level(logging.INFO, "stages.progress")
    clock = Clock()
    with Progress("file.gz", total=4000, every_s=10, terminal=False, clock=clock) as bar:
        for _ in range(4):
            clock.now += 4  # an update every 4 s: a line at 12 s, none at 4, 8 or 16
            bar.update(1000)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["file.gz: 75% (3.0 kB of 4.0 kB) in 12.0 s, 250 B/s",
                     "file.gz: 4.0 kB in 16.0 s, 250 B/s"]
    assert capsys.readouterr().err == ""  # no bar, no control characters


def test_on_a_terminal_it_draws_a_bar_and_still_logs_the_end(caplog, capsys):
    caplog.set_level(logging.INFO, "stages.progress")
    with Progress("decode", unit="images", terminal=True) as bar:
        bar.update(10)
    assert "\r" in capsys.readouterr().err  # tqdm's bar, redrawn in place
    assert [r.getMessage() for r in caplog.records][-1].startswith("decode: 10 images in ")


def test_no_end_line_when_the_work_failed(caplog):
    caplog.set_level(logging.INFO, "stages.progress")
    with pytest.raises(OSError):
        with Progress("file.gz", total=10, terminal=False) as bar:
            bar.update(5)
            raise OSError("disk full")
    assert caplog.records == []
