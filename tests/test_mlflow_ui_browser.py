"""The MLflow UI as a person sees it (issues 10 and 22), in headless Chromium: ``mlflow server`` on a
store with the four designs trained and evaluated and their popularity baseline run. A new user
(a fresh browser) filters the runs to the trained ones and reads each design's held-out recall@100
beside its name, in the chart view and in the runs table, in at most :data:`MAX_CLICKS` clicks and
without hovering; a run's page, its artifacts and the compare page are read for what a user should
find there.

Needs the ``browser`` extra (playwright, driving the system Chromium) and Debian's Chromium:
``apt-get install -y chromium`` then ``make browser-test``. Screenshots go to a temporary folder, or
to ``$CONVCG_UI_SCREENSHOTS`` when set (``make browser-test SCREENSHOTS=docs/mlflow-ui`` refreshes
the ones the docs show).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from convcg_cli.serve.http import free_port
from tests.server_wait import wait_until_up

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM}: apt-get install chromium"),
]
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is missing: pip install -e '.[browser]' (make browser-test)"
)

# The machine's closed network refuses Chromium's background connections; these flags stop them.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
UI_TIMEOUT_MS = 60_000  # the UI's first load compiles a large bundle; a busy 2-core box is slow
SCREENSHOT_SIZE = {"width": 1280, "height": 800}
HEADLINE = "heldout/conversion/recall_at_100"
SHORT_HEADLINE = "r100_conversion_heldout"  # the same value under the name the UI does not cut
DATA_NAME = "tiny"
DESIGNS = ("unified_parallel", "unified_sequential", "multihead_parallel", "multihead_sequential")
# The filter for the designs alone, as docs/reference/mlflow-runs.md tells a user to type it.
TRAINED_FILTER = "tags.kind = 'trained'"
MAX_CLICKS = 5  # issue 22: opening the UI to reading which design is best


@pytest.fixture(scope="module")
def ui_store(tmp_path_factory, tiny_data, empty_mlflow_store) -> dict:
    """A convcg home holding the four designs, each trained and evaluated, and the popularity baseline
    run they share: the run ids under ``trained`` (unified_parallel), ``other``
    (multihead_sequential) and ``baseline``, ``designs`` (design -> run id), ``runs`` (run id -> name,
    colour tag and headline value), the experiment id, the store's URI and the home."""
    from mlflow.tracking import MlflowClient

    from convcg_cli import tracking
    from convcg_cli.config import compose
    from convcg_cli.evaluate import evaluate
    from convcg_cli.train import train
    from tests.conftest import TINY_TRAIN

    assert tracking.headline_name("heldout", "conversion", 100) == SHORT_HEADLINE
    home = tmp_path_factory.mktemp("ui-home")
    data = shutil.copytree(tiny_data, home / DATA_NAME)  # the dataset and run names read "tiny"
    shutil.copyfile(empty_mlflow_store, home / "mlflow.db")
    overrides = [f"data.dir={data}", *TINY_TRAIN]
    designs = {}
    baselines: dict = {}  # the popularity ranking, scored once for the four evaluations
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CONVCG_HOME", str(home))
        for design in DESIGNS:
            designs[design] = train(compose("train", [f"+experiment={design}", "seed=0", *overrides])).run_id
            evaluate(
                compose("eval", ["baselines=[popularity]", "bootstrap.n_boot=20"]), designs[design], baselines
            )
    uri = f"sqlite:///{home}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("convcg").experiment_id
    runs = client.search_runs([experiment])
    (baseline,) = [r for r in runs if r.data.tags.get(tracking.KIND_TAG) == tracking.BASELINE_KIND]
    return {
        "trained": designs["unified_parallel"],
        "other": designs["multihead_sequential"],
        "baseline": baseline.info.run_id,
        "designs": designs,
        "runs": {
            r.info.run_id: {
                "name": r.info.run_name,
                "colour": r.data.tags[tracking.RUN_COLOR_TAG],
                "headline": r.data.metrics[HEADLINE],
            }
            for r in runs
        },
        "experiment": experiment,
        "uri": uri,
        "home": str(home),
    }


@pytest.fixture(scope="module")
def ui_url(ui_store) -> Iterator[str]:
    """``mlflow server`` on the store, on a free local port; its process group is stopped after."""
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", ui_store["uri"]]
    process = subprocess.Popen(
        [*command, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=ui_store["home"],  # the server's default artifact folder lands there, not in the checkout
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(process, url, poll_s=0.5)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:  # uvicorn's graceful shutdown, slow on a busy box: not needed
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


@pytest.fixture(scope="module")
def chromium(ui_url) -> Iterator:
    """The system Chromium, headless, driven by playwright (which downloads no browser of its own);
    closed before the server (``ui_url``) is stopped, so no page is left talking to it."""
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def page(chromium, ui_url) -> Iterator:
    """A page of the browser, 1280x800, in the UI's "Model training" mode, shared by the tests that
    read one page each."""
    context = chromium.new_context(viewport=SCREENSHOT_SIZE)
    page = context.new_page()
    page.set_default_timeout(UI_TIMEOUT_MS)
    page.goto(ui_url)
    page.get_by_text("Model training", exact=True).click()  # the UI opens in its GenAI mode
    try:
        yield page
    finally:
        context.close()


class NewUser:
    """A person opening the UI for the first time: a fresh browser context (none of the UI's saved
    state), 1280x800, who counts their clicks; typing and scrolling are not clicks."""

    def __init__(self, page) -> None:
        self.page = page
        self.clicks: list[str] = []

    def click(self, what: str, target) -> None:
        """Click ``target`` (a locator), noting ``what`` was clicked."""
        target.click()
        self.clicks.append(what)

    def type(self, what: str, box, text: str) -> None:
        """Click the text box ``box`` and type ``text`` into it, then Enter."""
        self.click(what, box)
        self.page.keyboard.type(text)
        self.page.keyboard.press("Enter")


@pytest.fixture
def new_user(chromium) -> Iterator[NewUser]:
    """A :class:`NewUser` of the browser; their context is closed after the test."""
    context = chromium.new_context(viewport=SCREENSHOT_SIZE)
    page = context.new_page()
    page.set_default_timeout(UI_TIMEOUT_MS)
    try:
        yield NewUser(page)
    finally:
        context.close()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    """Where the screenshots go: ``$CONVCG_UI_SCREENSHOTS``, else a temporary folder."""
    folder = Path(os.environ.get("CONVCG_UI_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _visible(page, text: str, exact: bool = False) -> None:
    """Wait until ``text`` is shown on the page (text, not CSS: the UI's markup changes between
    releases, what a user reads does not)."""
    page.get_by_text(text, exact=exact).first.wait_for(state="visible")


# What a person sees of an element's text: the characters that lie inside the window and inside every
# box around them that clips (overflow not visible), less the room of the "…" such a box draws where
# it cuts; "…" is appended when some were cut.
_SHOWN_JS = """el => {
  const ellipsis = font => {
    const context = document.createElement("canvas").getContext("2d");
    context.font = font;
    return context.measureText("\\u2026").width;
  };
  const clipOf = element => {
    const clip = {left: 0, right: window.innerWidth, top: 0, bottom: window.innerHeight};
    for (let box = element; box && box !== document.body; box = box.parentElement) {
      const style = getComputedStyle(box);
      if (style.overflowX === "visible" && style.overflowY === "visible") continue;
      const rect = box.getBoundingClientRect();
      const cut = style.textOverflow === "ellipsis" && box.scrollWidth > box.clientWidth;
      clip.left = Math.max(clip.left, rect.left);
      clip.right = Math.min(clip.right, rect.right - (cut ? ellipsis(style.font) : 0));
      clip.top = Math.max(clip.top, rect.top);
      clip.bottom = Math.min(clip.bottom, rect.bottom);
    }
    return clip;
  };
  const walker = document.createTreeWalker(el, NodeFilter.SHOW_TEXT);
  const range = document.createRange();
  let shown = "", all = "";
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    const clip = clipOf(node.parentElement);
    for (let i = 0; i < node.length; i++) {
      range.setStart(node, i);
      range.setEnd(node, i + 1);
      const r = range.getBoundingClientRect();
      const inside = r.left >= clip.left - 0.5 && r.right <= clip.right + 0.5
        && r.top >= clip.top - 0.5 && r.bottom <= clip.bottom + 0.5;
      if (inside) shown += node.data[i];
      all += node.data[i];
    }
  }
  return shown === all ? shown : shown + "\\u2026";
}"""


def _shown(locator) -> str:
    """The text of ``locator`` as a person sees it: cut where the page cuts it, "…" marking a cut
    (:data:`_SHOWN_JS`)."""
    return locator.evaluate(_SHOWN_JS)


def _rgb(colour: str) -> str:
    """A ``#rrggbb`` colour as the browser writes it.

    Example:
        >>> _rgb("#1f77b4")
        'rgb(31, 119, 180)'
    """
    red, green, blue = (int(colour[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgb({red}, {green}, {blue})"


def _close_assistant(page) -> None:
    """Close the MLflow Assistant side panel when it is open: it takes a third of the width."""
    close = page.get_by_role("button", name="Close")
    if close.count():
        close.first.click()


def test_runs_table_shows_names_datasets_baselines_and_the_headline(page, ui_url, ui_store):
    """The runs table: design seed · data names, the Dataset column with the data set (not "-"),
    the baseline run beside the trained ones, and the headline metric added as a column."""
    page.goto(f"{ui_url}/#/experiments/{ui_store['experiment']}/runs")
    for design in DESIGNS:
        _visible(page, f"{design} s0 · tiny", exact=True)
    _visible(page, "baseline_popularity · tiny")
    _close_assistant(page)
    dataset_cells = page.get_by_role("button", name=f"{DATA_NAME} (")
    assert dataset_cells.count() == len(DESIGNS) + 1, "every run's Dataset cell names the data set"
    _visible(page, "Training")
    _visible(page, "Evaluation")
    page.get_by_role("button", name="Columns").click()
    page.get_by_placeholder("Search columns").fill(HEADLINE)
    page.get_by_text(HEADLINE, exact=True).first.click()
    page.keyboard.press("Escape")
    header = page.get_by_role("columnheader").filter(has_text=HEADLINE.rsplit("/", 1)[-1])
    header.first.scroll_into_view_if_needed()
    for run in ("trained", "baseline"):  # the values as logged, in full
        _visible(page, str(ui_store["runs"][ui_store[run]]["headline"]), exact=True)


def test_run_page_shows_readable_params_the_headline_and_the_figure(page, ui_url, ui_store, screenshots):
    """A trained run's page: chosen options as params (``head``, ``cross``), no ``_target_`` key, the
    headline metric; its artifacts list the recall figure."""
    run_url = f"{ui_url}/#/experiments/{ui_store['experiment']}/runs/{ui_store['trained']}"
    page.goto(run_url)
    _visible(page, "unified_parallel s0 · tiny", exact=True)
    _visible(page, HEADLINE, exact=True)
    _visible(page, "loss.task_weights.conversion", exact=True)
    for param, value in (("head", "unified"), ("cross", "parallel"), ("experiment", "unified_parallel")):
        _visible(page, param, exact=True)
        _visible(page, value, exact=True)
    assert "_target_" not in page.inner_text("body") and "_partial_" not in page.inner_text("body")
    _close_assistant(page)
    page.screenshot(path=screenshots / "run.png")

    page.goto(f"{run_url}/artifacts/eval/heldout_recall.png")
    _visible(page, "heldout_recall.png", exact=True)
    _visible(page, "figures", exact=True)
    figure = page.locator("img[src^='blob:']").first  # the preview, read from the artifact's bytes
    figure.wait_for(state="attached")
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=figure.element_handle())
    page.screenshot(path=screenshots / "artifacts.png")


def test_compare_page_and_chart_view_lead_with_the_designs(page, ui_url, ui_store, screenshots):
    """The compare page of the four designs: the parallel-coordinates plot picks the options that
    differ (head, cross, experiment; not ``_target_``), the headline is a row; the chart view (all
    runs) has a heldout/conversion section with the baseline beside the models."""
    runs = json.dumps([ui_store["designs"][design] for design in DESIGNS])
    page.goto(f"{ui_url}/#/compare-runs?runs={runs}&experiments={json.dumps([ui_store['experiment']])}")
    _visible(page, f"Comparing {len(DESIGNS)} Runs")
    _visible(page, "Parallel Coordinates Plot")
    for design in DESIGNS:
        _visible(page, f"{design} s0 · tiny", exact=True)
    _visible(page, HEADLINE, exact=True)
    parameters = page.get_by_text("Parameters:").locator("xpath=..").inner_text()
    assert parameters.split("\n")[1:4] == ["cross", "experiment", "head"], parameters
    page.locator(".parcoords").first.wait_for()  # the plot itself (plotly), not its loading skeleton
    _close_assistant(page)
    page.screenshot(path=screenshots / "compare.png")

    page.goto(f"{ui_url}/#/experiments/{ui_store['experiment']}/runs?compareRunsMode=CHART")
    _visible(page, "heldout/conversion", exact=True)
    _visible(page, "baseline_popularity · tiny")


def _open_trained_runs(user: NewUser, ui_url: str, ui_store: dict) -> None:
    """What every answer starts with, three clicks: the UI's home, **Model training**, the experiment,
    then the documented filter typed into the search box; asserts that the four trained runs, and
    only they, are listed."""
    page = user.page
    page.goto(ui_url)
    user.click("Model training", page.get_by_text("Model training", exact=True))  # it opens in GenAI
    user.click("the experiment", page.get_by_role("link", name="convcg", exact=True))
    user.type("the search box", page.get_by_test_id("search-box"), TRAINED_FILTER)
    matching = page.get_by_text("matching runs")  # the count below the table, once the filter applies
    sync_api.expect(matching).to_have_text(f"{len(DESIGNS)} matching runs", timeout=UI_TIMEOUT_MS)
    listed = page.locator("[row-id]").evaluate_all(
        "rows => [...new Set(rows.map(r => r.getAttribute('row-id')))]"
    )
    assert sorted(listed) == sorted(ui_store["designs"].values()), "the filter lists the designs, no baseline"
    assert not page.get_by_text("baseline_popularity").count()


def _name_shown(page, ui_store: dict, design: str) -> str:
    """The name of ``design``'s run as its row shows it, after checking the row's colour dot is the
    run's colour (the one its bars have)."""
    run = ui_store["designs"][design]
    row = page.locator(f"[row-id='{run}']")
    dot = row.get_by_test_id("experiment-view-table-run-color")
    assert dot.evaluate("el => getComputedStyle(el).backgroundColor") == _rgb(ui_store["runs"][run]["colour"])
    return _shown(row.locator(f"a[href$='/runs/{run}']"))


def test_a_new_user_reads_the_best_design_off_the_chart_view(new_user, ui_url, ui_store, screenshots):
    """Which design has the best held-out recall@100, in the chart view: 5 clicks, no hovering. The
    filtered runs, the chart view, the metric typed into the chart search: one bar chart with a bar
    per design in its run's colour showing the value (2 decimals), and the run list beside it showing
    each design's name beside a dot of that colour."""
    documented = Path(__file__).parents[1] / "docs" / "reference" / "mlflow-runs.md"
    assert TRAINED_FILTER in documented.read_text(encoding="utf-8"), "the test types what the docs say"
    page = new_user.page
    _open_trained_runs(new_user, ui_url, ui_store)
    # the view-mode buttons are icons: list, chart (this one), artifacts
    new_user.click("the chart view", page.locator("label:has(input[name='runs-view-mode'][value='CHART'])"))
    new_user.type("the chart search", page.get_by_placeholder("Search metric charts"), SHORT_HEADLINE)
    charts = page.locator("g.trace.bars")  # the charts shown before the search applies go, one stays
    sync_api.expect(charts).to_have_count(1, timeout=UI_TIMEOUT_MS)
    bars = charts.locator("g.point")
    assert bars.count() == len(DESIGNS), "a bar a design, no baseline"
    shown_bars = {
        bar.locator("path").evaluate("el => getComputedStyle(el).fill"): _shown(bar.locator("text"))
        for bar in bars.all()
    }
    assert len(shown_bars) == len(DESIGNS), f"every design has a colour of its own: {shown_bars}"
    for design in DESIGNS:
        run = ui_store["runs"][ui_store["designs"][design]]
        assert shown_bars[_rgb(run["colour"])] == f"{run['headline']:.2f}", (design, shown_bars)
        name = _name_shown(page, ui_store, design)
        assert name.startswith(f"{design} s0"), f"{run['name']!r} shows as {name!r}"
    assert len(new_user.clicks) <= MAX_CLICKS, new_user.clicks
    page.wait_for_timeout(500)  # the bars' entrance transition
    page.screenshot(path=screenshots / "chart.png")


def test_a_new_user_reads_each_design_recall_in_the_runs_table(new_user, ui_url, ui_store, screenshots):
    """The same answer in the runs table: 5 clicks and a sideways scroll (no hovering). The filtered
    runs, **Columns**, the metric typed into the column search and ticked: each design's row shows
    its name (pinned on the left) and its held-out recall@100, at least 3 decimals of it."""
    page = new_user.page
    _open_trained_runs(new_user, ui_url, ui_store)
    new_user.click("Columns", page.get_by_role("button", name="Columns"))
    page.keyboard.type(SHORT_HEADLINE)  # the column search has the focus
    new_user.click("the metric", page.get_by_text(SHORT_HEADLINE, exact=True))
    page.keyboard.press("Escape")
    # At 1280 px the added column starts right of the window: scroll the table sideways, as a person
    # does with a touchpad or shift + wheel.
    grid = page.locator(".ag-center-cols-viewport").first.bounding_box()
    page.mouse.move(grid["x"] + grid["width"] / 2, grid["y"] + grid["height"] / 2)
    page.mouse.wheel(4000, 0)
    column = f"metrics.`{SHORT_HEADLINE}`"
    for design in DESIGNS:
        run_id = ui_store["designs"][design]
        run = ui_store["runs"][run_id]
        cell = page.locator(f"[row-id='{run_id}'] [col-id='{column}']")
        cell.wait_for(state="visible")
        value = _shown(cell).rstrip("…")
        assert str(run["headline"]).startswith(value) and len(value) >= len("0.123"), (design, value)
        name = _name_shown(page, ui_store, design)
        assert name.startswith(f"{design} s0"), f"{run['name']!r} shows as {name!r}"
    assert len(new_user.clicks) <= MAX_CLICKS, new_user.clicks
    page.wait_for_timeout(1000)  # let the grid finish scrolling before the screenshot
    page.screenshot(path=screenshots / "runs.png")
