"""The stages' shared command line: --help, the end-of-stage line, and what an error says to do."""

from __future__ import annotations

import importlib
import logging

import pytest

from stages import cli
from stages.archives import ArchiveError
from stages.errors import PipelineError
from stages.fetch import ChecksumError
from stages.params import ParamsError
from stages.mlflow_store import TrackingError

STAGES = ["download", "prepare", "corrupt", "train", "evaluate", "report"]


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_has_help_with_its_description_and_options(stage, capsys):
    module = importlib.import_module(f"stages.{stage}")
    with pytest.raises(SystemExit) as exited:
        module.main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m stages.{stage}")
    assert module.__doc__.strip().splitlines()[0] in out  # the module's docstring is the description
    assert "--params" in out and f"DVC runs it as the {stage} stage(s)" in out


def _stage(body, argv=()):
    return cli.run("demo", "A demo stage.", body, lambda parser: None, list(argv))


def test_the_last_line_names_the_outputs_with_their_sizes(tmp_path, caplog):
    (tmp_path / "out.bin").write_bytes(b"x" * 2500)
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "a").write_bytes(b"y" * 1000)
    caplog.set_level(logging.INFO, "stages")
    assert _stage(lambda args: [tmp_path / "out.bin", tmp_path / "folder"]) == 0
    last = caplog.records[-1].getMessage()
    assert last.startswith("demo done in ")
    assert last.endswith(f"s: {tmp_path / 'out.bin'} (2.5 kB), {tmp_path / 'folder'}/ (1.0 kB)")


@pytest.mark.parametrize("error, advice", [
    (ChecksumError("x.gz: checksum mismatch"), ChecksumError.next_step),
    (ParamsError("experiments.a.training.epochs: must be > 0"), ParamsError.next_step),
    (ArchiveError("a.tar.gz: member '../x' escapes the archive folder ('..'); refusing"), ArchiveError.next_step),
    # the message's own advice is enough
    (TrackingError("MLflow store x unusable: refused; check that it is running"), None),
    (PipelineError("something with no class advice"), None),
])
def test_a_failure_exits_1_and_says_what_to_do(error, advice, caplog):
    def body(args):
        raise error

    assert _stage(body) == 1
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert lines[0] == f"demo failed: {error}"
    assert lines[1:] == ([f"demo: what to do: {advice}"] if advice else [])
    assert all(cls.next_step for cls in (ChecksumError, ParamsError, ArchiveError, TrackingError))
