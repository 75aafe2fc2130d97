"""What users look at, checked in a real headless Chromium: the MLflow UI and the HTML report.

Playwright (the Python package, which drives a browser over the DevTools
protocol) runs the system's Chromium (Debian's ``chromium``, installed by
``make test``; ``CHROMIUM`` names another binary); no browser is downloaded.
Each check visits pages as a user would, waits for what should appear,
returns the problems it found as one-line messages (an empty list when all is
well) and, given a folder, saves a screenshot of each page.

Used by ``tests/test_ui.py`` (a store filled by a small ``dvc repro``) and by
the CI smoke (``.ci/smoke.py``, the store of the real pipeline; its
screenshots are the ones in ``docs/`` and the README).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

# Flags for a headless Chromium on a machine without a display or an outside
# network: no sandbox (root in CI), and none of the background connections
# that a closed network refuses.
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1400, "height": 900}
WAIT_MS = 60_000  # the UI's first page load compiles a large bundle; generous on a 2-core machine

# The MLflow UI's own preferences (its local storage), set before each page
# loads: the "Model training" side of the UI rather than the GenAI one, and its
# assistant panel closed, as a user who chose them would have it.
MLFLOW_UI_PREFS = """
localStorage.setItem('mlflow.workflowType_v1', '"machine_learning"');
localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');
localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');
"""


def chromium_path() -> str | None:
    """The Chromium to drive: ``CHROMIUM``, else ``chromium`` on the PATH."""
    return os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@dataclass
class Visit:
    """A browser page and what went wrong on it: server errors, failed requests, script errors."""

    page: object
    shots: Path | None
    problems: list[str] = field(default_factory=list)
    screenshots: list[Path] = field(default_factory=list)

    def open(self, url: str) -> None:
        self.page.goto(url, wait_until="load", timeout=WAIT_MS)

    @staticmethod
    def poll(probe, done):
        """Call ``probe`` every 0.25 s until ``done(result)`` or WAIT_MS pass; the last result."""
        deadline = time.monotonic() + WAIT_MS / 1000
        result = probe()
        while not done(result) and time.monotonic() < deadline:
            time.sleep(0.25)
            result = probe()
        return result

    def wait_for_text(self, *texts: str, what: str) -> bool:
        """Wait until every text is on the page; record one problem naming those missing."""
        def missing_texts():
            body = self.page.inner_text("body")
            return [t for t in texts if t not in body]

        missing = self.poll(missing_texts, lambda found: not found)
        if not missing:
            return True
        self.problems.append(f"{what}: {', '.join(repr(t) for t in missing)} not on the page ({self.page.url})")
        return False

    def images(self, selector: str = "img") -> list[dict]:
        """Each image's source, natural size and whether it finished loading."""
        return self.page.eval_on_selector_all(
            selector, "els => els.map(e => ({src: e.currentSrc || e.src, width: e.naturalWidth,"
                      " height: e.naturalHeight, complete: e.complete}))")

    def screenshot(self, name: str, full_page: bool = False) -> None:
        if self.shots is None:
            return
        self.shots.mkdir(parents=True, exist_ok=True)
        time.sleep(0.5)  # let charts finish their entry animation
        path = self.shots / name
        self.page.screenshot(path=str(path), full_page=full_page)
        self.screenshots.append(path)


@contextmanager
def browser(shots: Path | None = None, server_url: str | None = None) -> Iterator[Visit]:
    """A fresh headless Chromium (empty profile) with one page, closed afterwards.

    Responses of ``server_url`` with a 5xx status, requests to it that fail,
    and uncaught script errors are recorded as problems.
    """
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    if executable is None:
        raise RuntimeError("no Chromium found: install Debian's 'chromium' (make test does) or set CHROMIUM")
    with sync_playwright() as playwright:
        chrome = playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_FLAGS)
        try:
            context = chrome.new_context(viewport=VIEWPORT, device_scale_factor=1)
            context.add_init_script(MLFLOW_UI_PREFS)
            page = context.new_page()
            visit = Visit(page, shots)
            if server_url:
                def on_response(response):
                    if response.url.startswith(server_url) and response.status >= 500:
                        visit.problems.append(f"server answered {response.status} to {response.url}")

                def on_failed(request):  # a navigation aborts what the last page still loaded: not a fault
                    if request.url.startswith(server_url) and "ERR_ABORTED" not in (request.failure or ""):
                        visit.problems.append(f"request failed: {request.url} ({request.failure})")

                page.on("response", on_response)
                page.on("requestfailed", on_failed)
            page.on("pageerror", lambda error: visit.problems.append(f"script error on {page.url}: {error}"))
            yield visit
        finally:
            chrome.close()


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's header."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    return struct.unpack(">II", data[16:24])


def shown_value(value: float) -> str:
    """A metric value as the MLflow UI prints it (JavaScript's shortest form)."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def check_mlflow_ui(visit: Visit, server, expected: dict[str, Sequence[str]], focus: tuple[str, str],
                    image: str = "evaluation/reconstructions.png") -> list[str]:
    """The MLflow UI served by ``server`` (a tests.mlflow_server.MlflowServer).

    ``expected`` maps experiment names to the run names each must list;
    ``focus`` is (experiment, run name) of a run with the image artifact
    ``image`` and at least one other run beside it, opened on its own page,
    its metric charts, its artifact view and the compare view with the other.
    What the pages must show is read from the server's REST API: a page
    agrees with the store, not with numbers written here.
    """
    base = server.url + "/"
    start = len(visit.problems)

    visit.open(base + "#/experiments")
    visit.wait_for_text(*expected, what="experiments list")
    visit.screenshot("mlflow-experiments.png")

    ids = server.experiments()
    runs_by_experiment = {}
    for experiment, names in expected.items():
        if experiment not in ids:
            visit.problems.append(f"the store has no experiment {experiment!r}")
            continue
        runs_by_experiment[experiment] = server.runs(experiment)
        visit.open(f"{base}#/experiments/{ids[experiment]}/runs")
        visit.wait_for_text(*names, f"{len(runs_by_experiment[experiment])} matching run",
                            what=f"runs of experiment {experiment!r}")
        if experiment == focus[0]:
            visit.screenshot("mlflow-runs.png")

    experiment, name = focus
    runs = [r for r in runs_by_experiment.get(experiment, []) if r["info"]["run_name"] == name]
    others = [r for r in runs_by_experiment.get(experiment, []) if r["info"]["run_name"] != name]
    if not runs or not others:
        visit.problems.append(f"experiment {experiment!r} needs a run {name!r} and another run to compare")
        return visit.problems[start:]
    run, other = runs[0], others[0]
    run_id, other_id = run["info"]["run_id"], other["info"]["run_id"]
    run_page = f"{base}#/experiments/{ids[experiment]}/runs/{run_id}"
    metrics = {m["key"]: m["value"] for m in run["data"].get("metrics", [])}

    # The run's page: every metric of the run with the value the store holds.
    visit.open(run_page)
    visit.wait_for_text(name, f"Metrics ({len(metrics)})", *metrics,
                        *(shown_value(v) for v in metrics.values()), what=f"run page of {name}")
    visit.screenshot("mlflow-run.png")

    # Its per-epoch curves: one chart per metric, drawn.
    visit.open(run_page + "/model-metrics")
    if visit.wait_for_text("Model metrics", f"({len(metrics)})", "loss", "Step", what=f"metric charts of {name}"):
        drawn = visit.page.eval_on_selector_all("svg, canvas", "els => els.length")
        if drawn < 2:
            visit.problems.append(f"metric charts of {name}: nothing drawn ({drawn} svg/canvas elements)")

    # The runs table's chart view: the experiment's runs' curves side by side.
    visit.open(f"{base}#/experiments/{ids[experiment]}/runs?compareRunsMode=CHART")
    visit.wait_for_text("loss", name, other["info"]["run_name"], what=f"chart view of experiment {experiment!r}")
    visit.screenshot("mlflow-charts.png")

    # The image artifact, as the browser received it from the server.
    want = png_size(server.artifact(run_id, image))
    visit.open(f"{run_page}/artifacts/{image}")
    visit.wait_for_text(image, what=f"artifact view of {name}")
    shown = visit.poll(lambda: [i for i in visit.images() if i["src"].startswith("blob:") and i["complete"]
                                and i["width"]], bool)
    if not shown:
        visit.problems.append(f"artifact view of {name}: {image} not displayed")
    elif (shown[0]["width"], shown[0]["height"]) != want:
        visit.problems.append(f"artifact view of {name}: image is {shown[0]['width']}x{shown[0]['height']}, "
                              f"the artifact {want[0]}x{want[1]}")
    visit.screenshot("mlflow-artifact.png")

    # The compare view of the two runs: both named, a metric of each with its value.
    other_metrics = {m["key"]: m["value"] for m in other["data"].get("metrics", [])}
    shared = sorted(set(metrics) & set(other_metrics))
    query = f"runs={json.dumps([run_id, other_id])}&experiments={json.dumps([ids[experiment]])}"
    visit.open(f"{base}#/compare-runs?{query}")
    visit.wait_for_text("Comparing 2 Runs", name, other["info"]["run_name"], run_id, other_id, *shared,
                        what=f"compare view of {name} and {other['info']['run_name']}")
    visit.screenshot("mlflow-compare.png")
    return visit.problems[start:]


def check_report(visit: Visit, index: Path, experiments: Sequence[str]) -> list[str]:
    """The pipeline's HTML report opened from disk: its table lists every
    experiment, and every image on the page loaded."""
    start = len(visit.problems)
    visit.open(index.resolve().as_uri())
    rows = visit.page.eval_on_selector_all("table tr", "els => els.map(e => e.innerText)")
    if not rows:
        visit.problems.append(f"report {index}: no table")
    for name in experiments:
        if not any(name in row for row in rows):
            visit.problems.append(f"report {index}: no table row for {name}")
    images = visit.images()
    if not images:
        visit.problems.append(f"report {index}: no images")
    broken = [i["src"][:60] for i in images if not (i["complete"] and i["width"])]
    if broken:
        visit.problems.append(f"report {index}: {len(broken)} of {len(images)} images did not load: {broken[:3]}")
    visit.screenshot("report.png")
    return visit.problems[start:]
