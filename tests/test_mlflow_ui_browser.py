"""The MLflow UI as a person sees it (issue 10), in headless Chromium: ``mlflow server`` on a store
with two trained designs, one evaluated, and its baseline run; the runs table, a run's page, its
artifacts, the compare page and the chart view are loaded and read for what a user should find there.

Needs the ``browser`` extra (playwright, driving the system Chromium) and Debian's Chromium:
``apt-get install -y chromium`` then ``make browser-test``. Screenshots go to a temporary folder, or
to ``$CONVCG_UI_SCREENSHOTS`` when set (``make browser-test SCREENSHOTS=docs/mlflow-ui`` refreshes
the ones the README shows).
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
DATA_NAME = "tiny"


@pytest.fixture(scope="module")
def ui_store(tmp_path_factory, tiny_data, empty_mlflow_store) -> dict[str, str]:
    """A convcg home holding two trained designs (the first evaluated, with a popularity baseline run);
    the run ids under ``trained``/``other``/``baseline``, their headline values, the experiment id, the
    store's URI and the home."""
    from mlflow.tracking import MlflowClient

    from convcg_cli.config import compose
    from convcg_cli.evaluate import evaluate
    from convcg_cli.train import train
    from tests.conftest import TINY_TRAIN

    home = tmp_path_factory.mktemp("ui-home")
    data = shutil.copytree(tiny_data, home / DATA_NAME)  # the dataset and run names read "tiny"
    shutil.copyfile(empty_mlflow_store, home / "mlflow.db")
    overrides = [f"data.dir={data}", *TINY_TRAIN]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CONVCG_HOME", str(home))
        trained = train(compose("train", ["+experiment=unified_parallel", "seed=0", *overrides])).run_id
        other = train(compose("train", ["+experiment=multihead_sequential", "seed=0", *overrides])).run_id
        evaluate(compose("eval", ["baselines=[popularity]", "bootstrap.n_boot=20"]), trained)
    uri = f"sqlite:///{home}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("convcg").experiment_id
    (baseline,) = [r for r in client.search_runs([experiment]) if r.data.tags.get("kind") == "baseline"]
    return {
        "trained": trained,
        "other": other,
        "baseline": baseline.info.run_id,
        "trained_headline": str(client.get_run(trained).data.metrics[HEADLINE]),
        "baseline_headline": str(baseline.data.metrics[HEADLINE]),
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
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def page(ui_url) -> Iterator:
    """A headless Chromium page (the system Chromium, driven by playwright), 1280x800."""
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport=SCREENSHOT_SIZE)
        page.set_default_timeout(UI_TIMEOUT_MS)
        page.goto(ui_url)
        page.get_by_text("Model training", exact=True).click()  # the UI opens in its GenAI mode
        try:
            yield page
        finally:
            browser.close()


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


def _close_assistant(page) -> None:
    """Close the MLflow Assistant side panel when it is open: it takes a third of the width."""
    close = page.get_by_role("button", name="Close")
    if close.count():
        close.first.click()


def test_runs_table_shows_names_datasets_baselines_and_the_headline(page, ui_url, ui_store, screenshots):
    """The runs table: design seed · data names, the Dataset column with the data set (not "-"),
    the baseline run beside the trained ones, and the headline metric added as a column."""
    page.goto(f"{ui_url}/#/experiments/{ui_store['experiment']}/runs")
    for name in ("unified_parallel s0 · tiny", "multihead_sequential s0 · tiny"):
        _visible(page, name, exact=True)
    _visible(page, "baseline_popularity · tiny")
    _close_assistant(page)
    dataset_cells = page.get_by_role("button", name=f"{DATA_NAME} (")
    assert dataset_cells.count() == 3, "every run's Dataset cell names the data set"
    _visible(page, "Training")
    _visible(page, "Evaluation")
    page.get_by_role("button", name="Columns").click()
    page.get_by_placeholder("Search columns").fill(HEADLINE)
    page.get_by_text(HEADLINE, exact=True).first.click()
    page.keyboard.press("Escape")
    header = page.get_by_role("columnheader").filter(has_text=HEADLINE.rsplit("/", 1)[-1])
    header.first.scroll_into_view_if_needed()
    for run in ("trained", "baseline"):  # the values as logged, in full
        _visible(page, ui_store[f"{run}_headline"], exact=True)
    page.wait_for_timeout(1500)  # let the grid finish scrolling before the screenshot
    page.screenshot(path=screenshots / "runs.png")


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
    """The compare page of the two designs: the parallel-coordinates plot picks the options that
    differ (head, cross, experiment; not ``_target_``), the headline is a row; the chart view opens on
    heldout/conversion with the baseline beside the model."""
    runs = json.dumps([ui_store["trained"], ui_store["other"]])
    page.goto(f"{ui_url}/#/compare-runs?runs={runs}&experiments={json.dumps([ui_store['experiment']])}")
    _visible(page, "Comparing 2 Runs")
    _visible(page, "Parallel Coordinates Plot")
    for name in ("unified_parallel s0 · tiny", "multihead_sequential s0 · tiny"):
        _visible(page, name, exact=True)
    _visible(page, HEADLINE, exact=True)
    parameters = page.get_by_text("Parameters:").locator("xpath=..").inner_text()
    assert parameters.split("\n")[1:4] == ["cross", "experiment", "head"], parameters
    _close_assistant(page)
    page.screenshot(path=screenshots / "compare.png")

    page.goto(f"{ui_url}/#/experiments/{ui_store['experiment']}/runs?compareRunsMode=CHART")
    _visible(page, "heldout/conversion", exact=True)
    _visible(page, "baseline_popularity · tiny")
    page.screenshot(path=screenshots / "chart.png")
