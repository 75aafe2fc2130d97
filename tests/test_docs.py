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


README = REPO / "README.md"


def _section(text: str, heading: str) -> list[str]:
    """The lines under a ``## heading`` of a markdown page, up to the next one."""
    lines = text.splitlines()
    start = lines.index(f"## {heading}") + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("## ")), len(lines))
    return lines[start:end]


def test_the_readme_is_at_most_300_lines():
    assert len(README.read_text().splitlines()) <= 300


def test_every_docs_page_is_linked_from_the_readme():
    text = README.read_text()
    pages = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("*.md"))
    assert pages
    unlinked = [page for page in pages if f"]({page})" not in text and f"]({page}#" not in text]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


def test_the_readme_results_table_is_copied_from_the_report_summary():
    """Every table row of the README's results section appears verbatim in
    reports/summary.md (the report stage's output), so the README cannot
    drift from the committed results: copy the rows again after a re-run."""
    rows = [line for line in _section(README.read_text(), "Results") if line.startswith("|")]
    assert len(rows) >= 3, "the README's results section has no table"
    summary = set((REPO / "reports/summary.md").read_text().splitlines())
    drifted = [row for row in rows if row not in summary]
    assert not drifted, f"README results rows not in reports/summary.md: {drifted}"
