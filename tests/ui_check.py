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

import decimal
import json
import os
import re
import shutil
import struct
import time
import urllib.error
import urllib.parse
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
# loads: the "Model training" side of the UI rather than the GenAI one, its
# assistant panel closed and the model registry's "new UI" promotion (a modal
# over the registry's first page) dismissed, as a user who chose them would have it.
MLFLOW_UI_PREFS = """
localStorage.setItem('mlflow.workflowType_v1', '"machine_learning"');
localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');
localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');
localStorage.setItem('_mlflow_model_registry_promo_modal_dismissed_v1', 'true');
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

    def wait_for_text(self, *texts: str, what: str, scroll: bool = False) -> bool:
        """Wait until every text is on the page; record one problem naming those
        missing. ``scroll``: the page draws long lists only where they are in
        view; scroll down step by step, and count what each step showed."""
        seen = []

        def missing_texts():
            seen.append(self.page.inner_text("body"))
            if scroll:
                self.page.mouse.move(VIEWPORT["width"] // 2, VIEWPORT["height"] * 2 // 3)
                self.page.mouse.wheel(0, VIEWPORT["height"] // 3)
            return [t for t in texts if not any(t in body for body in seen)]

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

    def scroll_to(self, selector: str, what: str) -> bool:
        """Scroll the page's charts (drawn only once in view) down until an
        element ``selector`` exists, and bring it into view; record a problem if none does."""
        def found():
            if self.page.locator(selector).count():
                return True
            self.page.mouse.move(VIEWPORT["width"] // 2, VIEWPORT["height"] * 2 // 3)
            self.page.mouse.wheel(0, VIEWPORT["height"] // 2)
            return False

        if self.poll(found, bool):
            self.page.locator(selector).first.scroll_into_view_if_needed()
            return True
        self.problems.append(f"{what} not on the page ({self.page.url})")
        return False

    def texts(self, selector: str) -> list[str]:
        """The text of each element matching ``selector``, white space (no-break too) as single spaces."""
        return self.page.eval_on_selector_all(
            selector, "els => els.map(e => e.innerText.replace(/\\s+/g, ' ').trim())")

    def links(self) -> dict[str, str]:
        """{href as written in the page: link text} of every link on the page."""
        found = self.page.eval_on_selector_all("a[href]", "els => els.map(e => [e.getAttribute('href'), e.innerText])")
        return {href: " ".join(text.split()) for href, text in found}

    def screenshot(self, name: str, full_page: bool = False) -> None:
        if self.shots is None:
            return
        self.shots.mkdir(parents=True, exist_ok=True)
        # no hover or focus tooltip (a slider moved by keys keeps the focus) over what the picture shows
        self.page.mouse.move(1, VIEWPORT["height"] - 1)
        self.page.evaluate("document.activeElement && document.activeElement.blur()")
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
    """A metric value as the MLflow UI prints it: JavaScript's ``String(number)``,
    the shortest digits that read back (as Python's ``repr``), in fixed notation
    from 1e-6 up to 1e21 (``0.000052``, where ``repr`` writes ``5.2e-05``) and
    otherwise as ``5.2e-7``."""
    value = float(value)
    if value.is_integer() and abs(value) < 1e21:
        return str(int(value))
    text = repr(value)
    if 1e-6 <= abs(value) < 1e21:
        return format(decimal.Decimal(text), "f")
    mantissa, _, exponent = text.partition("e")
    return f"{mantissa}e{'-' if exponent.startswith('-') else '+'}{int(exponent.lstrip('+-'))}"


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
    # (the system metrics, system/..., have a tab of their own; each logged image key has a chart here)
    visit.open(run_page + "/model-metrics")
    charts = [key for key in metrics if not key.startswith("system/")] + image_keys(server, run_id)
    if visit.wait_for_text("Model metrics", f"({len(charts)})", "loss", "Step", what=f"metric charts of {name}"):
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
                        what=f"compare view of {name} and {other['info']['run_name']}", scroll=True)
    visit.page.reload(wait_until="load", timeout=WAIT_MS)  # the picture from the top of the page
    visit.wait_for_text("Comparing 2 Runs", what=f"compare view of {name} and {other['info']['run_name']}")
    visit.screenshot("mlflow-compare.png")
    return visit.problems[start:]


def image_keys(server, run_id: str) -> list[str]:
    """The keys a run logged images under (``mlflow.log_image(..., key=...)``)."""
    paths = server.artifacts(run_id, "images")
    return sorted({p[len("images/"):].split("+step+")[0] for p in paths if "+step+" in p})


def check_logged_models(visit: Visit, server, experiment: str, models: Sequence[str]) -> list[str]:
    """MLflow 3's logged models of ``experiment``: its Models tab links each
    logged model named in ``models`` (the ``name`` given to ``log_model``)
    to the model's page, which shows every metric the store holds for that
    model with its value. Models, ids and metrics are read from the server's
    REST API; a name the store lacks is reported as such, not looked for."""
    base = server.url + "/"
    start = len(visit.problems)
    ids = server.experiments()
    if experiment not in ids:
        visit.problems.append(f"the store has no experiment {experiment!r}")
        return visit.problems[start:]
    found = server.post("logged-models/search", {"experiment_ids": [ids[experiment]], "max_results": 1000})
    logged = [m for m in found.get("models", []) if m["info"]["name"] in models]
    absent = [n for n in models if n not in {m["info"]["name"] for m in logged}]
    if absent:
        visit.problems.append(f"the store has no logged model {', '.join(map(repr, absent))} in {experiment!r}")
    pages = {f"#/experiments/{ids[experiment]}/models/{m['info']['model_id']}": m for m in logged}

    # The Models tab: one link per logged model, to its page, named as logged.
    visit.open(f"{base}#/experiments/{ids[experiment]}/models")
    def unlisted():
        links = visit.links()
        return [m["info"]["name"] for href, m in pages.items() if links.get(href) != m["info"]["name"]]
    missing = visit.poll(unlisted, lambda names: not names)
    if missing:
        visit.problems.append(f"models of experiment {experiment!r}: no link to logged model "
                              f"{', '.join(map(repr, missing))} ({visit.page.url})")
    visit.screenshot("mlflow-models.png")

    # Each model's page: its metrics, as many as the store has, with their values.
    for href, model in pages.items():
        metrics = {m["key"]: m["value"] for m in model.get("data", {}).get("metrics", [])}
        visit.open(base + href)
        visit.wait_for_text(model["info"]["name"], f"Metrics ({len(metrics)})", *metrics,
                            *(shown_value(v) for v in metrics.values()),
                            what=f"page of logged model {model['info']['name']} ({model['info']['model_id']})")
    return visit.problems[start:]


def check_registered_models(visit: Visit, server, names: Sequence[str], alias: str = "champion") -> list[str]:
    """The model registry: its list shows each of ``names`` with its latest
    version and ``@ alias : Version N``; each model's page lists all its
    versions, ``@ alias`` on version N alone. Versions and the aliased one
    as the server's REST API has them."""
    base = server.url + "/"
    start = len(visit.problems)
    store = {}
    for name in names:
        try:
            aliased = int(server.get("registered-models/alias", name=name, alias=alias)["model_version"]["version"])
        except urllib.error.HTTPError as error:
            reason = json.loads(error.read() or b"{}").get("message", error.code)
            visit.problems.append(f"the store has no version of {name!r} aliased {alias!r}: {reason}")
            continue
        found = server.get("model-versions/search", filter=f"name='{name}'", max_results=1000)
        store[name] = (sorted(int(v["version"]) for v in found.get("model_versions", [])), aliased)
    tag = f"@ {alias} "  # the UI writes "@" and the alias with a no-break space between

    visit.open(base + "#/models")
    def unlisted():
        rows = visit.texts("[role=row]")
        return [n for n, (versions, aliased) in store.items()
                if not any(r.startswith(f"{n} Version {versions[-1]} ") and f"{tag}: Version {aliased} " in r + " "
                           for r in rows)]
    for name in visit.poll(unlisted, lambda missing: not missing):
        versions, aliased = store[name]
        visit.problems.append(f"model registry: no row '{name} | Version {versions[-1]} | {tag}: Version {aliased}' "
                              f"({visit.page.url})")
    visit.screenshot("mlflow-registry.png")

    # Each model's page, reached from the list as a user goes there (3.17 keeps the first model's
    # versions, none, on a page opened straight from another model's page).
    for name, (versions, aliased) in store.items():
        visit.open(base + "#/models")
        href = f"#/models/{urllib.parse.quote(name)}"
        if not visit.poll(lambda: href in visit.links(), bool):
            visit.problems.append(f"model registry: no link to {href} ({visit.page.url})")
            continue
        visit.page.click(f'a[href="{href}"]')
        def shown():  # {version: whether its row shows the alias}
            rows = [(re.match(r"Version (\d+) ", r), r + " ") for r in visit.texts("[role=row]")]
            return {int(m[1]): tag in r for m, r in rows if m}
        wanted = {v: v == aliased for v in versions}
        rows = visit.poll(shown, lambda got: got == wanted)
        if set(rows) != set(wanted):
            visit.problems.append(f"page of registered model {name}: lists versions {sorted(rows)}, "
                                  f"the store {versions} ({visit.page.url})")
        elif rows != wanted:
            visit.problems.append(f"page of registered model {name}: {tag.strip()!r} on versions "
                                  f"{[v for v, a in rows.items() if a]}, the store on {aliased} ({visit.page.url})")
    return visit.problems[start:]


def check_image_steps(visit: Visit, server, experiment: str, run_name: str, key: str,
                      min_steps: int = 2) -> list[str]:
    """An image logged with ``mlflow.log_image(..., key=key, step=...)`` in
    run ``run_name``: the run's "Model metrics" tab has a card ``key`` whose
    step slider spans the steps the store has (its ``images/`` artifacts),
    and moving it shows, at each of them, that step's image, loaded; at least
    ``min_steps`` steps."""
    base = server.url + "/"
    start = len(visit.problems)
    ids = server.experiments()
    runs = [r for r in (server.runs(experiment) if experiment in ids else []) if r["info"]["run_name"] == run_name]
    if not runs:
        visit.problems.append(f"the store has no run {run_name!r} in experiment {experiment!r}")
        return visit.problems[start:]
    run_id = runs[0]["info"]["run_id"]
    prefix = f"images/{key.replace('/', '~')}+step+"  # how mlflow.log_image names the files of a step
    steps = sorted({int(p[len(prefix):].split("+")[0]) for p in server.artifacts(run_id, "images")
                    if p.startswith(prefix)})
    if len(steps) < min_steps:
        visit.problems.append(f"the store has image {key!r} of run {run_name} at steps {steps}: fewer than {min_steps}")
        return visit.problems[start:]

    visit.open(f"{base}#/experiments/{ids[experiment]}/runs/{run_id}/model-metrics")
    title = f"h4[title={json.dumps(key)}]"
    if not visit.scroll_to(title, what=f"image charts of {run_name}: a chart {key!r}"):
        return visit.problems[start:]
    card = visit.page.locator("[data-testid=experiment-view-compare-runs-card]").filter(has=visit.page.locator(title))
    thumb = card.locator("[role=slider]")
    if card.count() != 1 or thumb.count() != 1:
        visit.problems.append(f"image chart {key!r} of {run_name}: {card.count()} cards, {thumb.count()} step sliders")
        return visit.problems[start:]
    span = [int(thumb.get_attribute(f"aria-value{end}")) for end in ("min", "max")]
    if span != [steps[0], steps[-1]]:
        visit.problems.append(f"image chart {key!r} of {run_name}: slider spans steps {span}, the store {steps}")

    shown = _steps_shown(visit, card, prefix, steps, span)
    if shown != steps:
        visit.problems.append(f"image chart {key!r} of {run_name}: images shown at steps {shown}, "
                              f"the store has {steps} ({visit.page.url})")
    visit.screenshot("mlflow-images.png")
    return visit.problems[start:]


def _steps_shown(visit: Visit, card, prefix: str, steps: list[int], span: list[int]) -> list[int]:
    """Move the step slider of an image chart ``card`` (a locator) to its
    first step, then step by step to the last: the steps at which the card
    shows that step's image (an artifact named ``prefix`` + step + "+..."),
    loaded. With marks, an arrow key moves the slider to the next logged step
    ("Infinity" past the last); the slider starts where it was left (at 0)."""
    thumb = card.locator("[role=slider]")

    def value():
        return float(thumb.get_attribute("aria-valuenow"))

    def press(arrow):
        before = value()
        thumb.press(arrow)
        return visit.poll(value, lambda now: now != before)

    def step_image(step):
        for image in card.locator("img").evaluate_all("els => els.map(e => ({src: e.currentSrc || e.src, "
                                                      "width: e.naturalWidth, complete: e.complete}))"):
            path = urllib.parse.parse_qs(urllib.parse.urlsplit(image["src"]).query).get("path", [""])[0]
            if path.startswith(f"{prefix}{step}+") and image["complete"] and image["width"]:
                return path
        return None

    for _ in range(len(steps)):
        if value() <= span[0] or press("ArrowLeft") <= span[0]:
            break
    shown = []
    for _ in range(len(steps) + 1):
        now = value()
        if now in steps and visit.poll(lambda: step_image(int(now)), bool):
            shown.append(int(now))
        if now >= min(steps[-1], span[1]):
            break
        press("ArrowRight")
    return shown


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
