"""Whole-or-nothing outputs, and the sweep of what a killed writer left."""

import os
import signal
import subprocess
import sys
import time

import pytest

from stages import atomic


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_replacing_writes_whole_or_not_at_all(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic.replacing(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]
    with atomic.replacing(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_replacing_a_folder(tmp_path):
    target = tmp_path / "folder"
    target.mkdir()
    (target / "stale").write_text("x")
    with atomic.replacing(target, directory=True) as tmp:
        (tmp / "fresh").write_text("y")
    assert [p.name for p in target.iterdir()] == ["fresh"]
    assert [p.name for p in tmp_path.iterdir()] == ["folder"]


def test_partials_of_dead_processes_are_swept_and_live_ones_kept(tmp_path):
    target = tmp_path / "data.npz"
    dead = tmp_path / f".data.npz.partial-{_dead_pid()}"
    dead.write_text("left by kill -9")
    dead_dir = tmp_path / f".data.npz.partial-{_dead_pid()}"
    dead_dir.mkdir()
    (dead_dir / "x").write_text("x")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".data.npz.partial-{sleeper.pid}"
        live.write_text("being written")
        other = tmp_path / ".other.npz.partial-1"
        other.write_text("another output's")
        assert set(atomic.sweep_partials(target)) == {dead, dead_dir}
        assert live.exists() and other.exists()
    finally:
        sleeper.send_signal(signal.SIGKILL)
        sleeper.wait()


def test_write_text_sweeps_first(tmp_path):
    target = tmp_path / "report.md"
    (tmp_path / f".report.md.partial-{_dead_pid()}").write_text("junk")
    atomic.write_text(target, "hello")
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]
    assert os.stat(target).st_size == 5


def test_a_zombie_writer_counts_as_dead(tmp_path):
    """A writer killed together with its parent may stay a zombie until reaped."""
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while open(f"/proc/{zombie.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline
    partial = tmp_path / f".x.partial-{zombie.pid}"
    partial.write_text("junk")
    try:
        assert atomic.sweep_partials(tmp_path / "x") == [partial]
    finally:
        zombie.wait()
