"""docs/reliability.md names the test behind every row: those tests must exist."""

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _tests_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


def test_every_test_named_in_the_reliability_table_exists():
    text = (REPO / "docs/reliability.md").read_text()
    named = re.findall(r"`(tests/test_\w+\.py)::(test_\w+)`", text)
    assert len(named) > 50
    missing = [f"{f}::{t}" for f, t in named if not (REPO / f).is_file() or t not in _tests_in(REPO / f)]
    assert not missing, missing


def test_every_row_names_a_test():
    """Every row of every table with a Test column names at least one test."""
    rows, header = [], None
    for line in (REPO / "docs/reliability.md").read_text().splitlines():
        if not line.startswith("|"):
            header = None
        elif header is None:
            header = [cell.strip() for cell in line.strip("|").split("|")]
        elif not line.startswith("|---") and header[-1] == "Test":
            rows.append(line)
    assert len(rows) > 30
    assert all("`tests/test_" in row for row in rows), [r[:80] for r in rows if "`tests/test_" not in r]
