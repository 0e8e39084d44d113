"""``convcg runs`` and what makes runs readable at a glance (issue 22): a kind on every run, short
headline names that stay apart in a cut column header, a colour per design, the UI hint per store."""

from __future__ import annotations

import re
import shutil

from typer.testing import CliRunner

from convcg_cli import tracking
from convcg_cli.cli import app, ui_command
from convcg_cli.config import compose
from convcg_cli.tracking.ui import DESIGN_COLOURS, headline_metrics, pick_colour, ui_hint

runner = CliRunner()
RECALLS = {
    "heldout/conversion/recall_at_100": 0.25,
    "heldout/conversion/recall_at_1000": 0.75,
    "heldout/engagement/recall_at_100": 0.125,
    "heldout/conversion/recall_at_10": 0.05,
    "heldout_ci/conversion/recall_at_100_ci_low": 0.2,
    "heldout_by_surface/feed/conversion/recall_at_100": 0.3,
    "heldout/conversion/cold/recall_at_100": 0.1,
}


def _store():
    return tracking.Store.from_config(compose("eval").cfg.logger)


def _plant(name: str, kind: str, metrics: dict[str, float] | None = None) -> str:
    """A finished run of ``kind`` with ``metrics`` logged as convcg logs them; its id."""
    with tracking.open_run(_store(), name, {tracking.KIND_TAG: kind}) as run:
        tracking.log_metrics(run, metrics or {})
    return run.run_id


def test_headline_recalls_get_short_names_that_differ_early():
    short = headline_metrics(RECALLS)
    assert short == {
        "r100_conversion_heldout": 0.25,
        "r1000_conversion_heldout": 0.75,
        "r100_engagement_heldout": 0.125,
    }
    cut = {name[:15] for name in short}  # what the UI's cut column header still shows
    assert len(cut) == len(short)
    for name in short:
        assert tracking.parse_headline(name) is not None
        assert re.fullmatch(r"[\w.\- /:]+", name)  # a name MLflow accepts, and no '@'


def test_designs_get_different_colours_and_seeds_of_one_design_the_same():
    taken: dict[str, str] = {}
    for design in ("unified_parallel", "multihead_sequential", "unified_sequential", "multihead_parallel"):
        taken[design] = pick_colour(taken, design, DESIGN_COLOURS)
    assert len(set(taken.values())) == 4
    assert pick_colour(taken, "unified_parallel", DESIGN_COLOURS) == taken["unified_parallel"]


def test_runs_lists_the_newest_runs_with_their_kind_and_headline(home):
    trained = _plant("unified_parallel s0 · tiny", tracking.TRAINED_KIND, RECALLS)
    baseline = _plant(
        "baseline_popularity · tiny · heldout",
        tracking.BASELINE_KIND,
        {"heldout/conversion/recall_at_100": 0.5},
    )
    logged = tracking.run_info(_store(), trained).data.metrics
    assert logged["r100_conversion_heldout"] == logged["heldout/conversion/recall_at_100"] == 0.25

    result = runner.invoke(app, ["runs"])
    assert result.exit_code == 0, result.output
    text = result.output
    assert trained in text and baseline in text and text.index(baseline) < text.index(trained)  # newest first
    assert "0.2500" in text and "0.7500" in text and "0.5000" in text and "0.1250" not in text  # conversion
    assert "FINISHED" in text and "trained" in text and "baseline" in text
    assert max(len(line) for line in text.splitlines() if not line.startswith(("Open", "Runs of"))) <= 80

    result = runner.invoke(app, ["runs", "--kind", "trained", "--task", "engagement"])
    assert result.exit_code == 0 and trained in result.output and baseline not in result.output
    assert "0.1250" in result.output
    result = runner.invoke(app, ["runs", "--limit", "1"])
    assert baseline in result.output and trained not in result.output


def test_runs_hint_opens_the_ui_on_the_trained_runs_best_first(home):
    _plant("a", tracking.TRAINED_KIND, RECALLS)
    result = runner.invoke(app, ["runs"])
    hint = result.output.split("Open the MLflow UI: ", 1)[1]
    assert f" ui --backend-store-uri sqlite:///{home.resolve()}/mlflow.db" in hint
    assert not hint.startswith(".venv")
    assert "http://127.0.0.1:5000/#/experiments/" in hint
    assert "searchFilter=tags.kind+%3D+%27trained%27" in hint
    assert "orderByKey=metrics.%60r100_conversion_heldout%60&orderByAsc=false" in hint


def test_a_server_store_is_opened_at_its_own_address():
    assert ui_command("http://mlflow.team:5000") == "http://mlflow.team:5000"
    url = ui_hint("https://mlflow.team/", "7", "tags.kind = 'trained'")
    assert url == "https://mlflow.team/#/experiments/7/runs?searchFilter=tags.kind+%3D+%27trained%27"
    assert "mlflow ui" not in ui_hint("http://h:1", "1") and "--backend-store-uri" not in ui_hint(
        "http://h:1"
    )


def test_runs_errors_name_the_store_and_what_to_do(tmp_path, monkeypatch, empty_mlflow_store):
    monkeypatch.setenv("CONVCG_HOME", str(tmp_path))
    result = runner.invoke(app, ["runs"])
    assert (
        result.exit_code == 2
        and f"No MLflow store at sqlite:///{tmp_path.resolve()}/mlflow.db" in result.output
    )
    assert "MLFLOW_TRACKING_URI" in result.output
    assert not (tmp_path / "mlflow.db").exists()  # looking created nothing

    shutil.copyfile(empty_mlflow_store, tmp_path / "mlflow.db")
    result = runner.invoke(app, ["runs", "--experiment", "nope"])
    assert result.exit_code == 2 and "No experiment 'nope'" in " ".join(result.output.split())
    assert "Default" in result.output
    result = runner.invoke(app, ["runs", "--kind", "model"])
    assert result.exit_code == 2 and "trained, baseline" in result.output


def test_an_absent_server_is_named_at_once(monkeypatch, tmp_path):
    monkeypatch.setenv("CONVCG_HOME", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # the discard port: nothing listens
    result = runner.invoke(app, ["runs"])
    assert result.exit_code == 2
    assert "The MLflow tracking server at http://127.0.0.1:9 does not answer" in " ".join(
        result.output.split()
    )


def test_mlflow_variables_decide_unless_the_command_line_does(monkeypatch, tmp_path):
    monkeypatch.setenv("CONVCG_HOME", str(tmp_path))
    local = compose("eval").cfg.logger
    assert (
        local.tracking_uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
        and local.experiment_name == "convcg"
    )
    store = tracking.Store.from_config(local)
    assert store.new_artifact_location() == (tmp_path.resolve() / "mlartifacts").as_uri()

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://team:5000")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "shared")
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", "http://registry:5000")
    store = tracking.Store.from_config(compose("train").cfg.logger)
    assert (store.uri, store.experiment_name, store.registry) == (
        "http://team:5000",
        "shared",
        "http://registry:5000",
    )
    assert store.is_server and store.new_artifact_location() is None  # where the server says
    overridden = compose("eval", ["logger.tracking_uri=sqlite:///x.db", "logger.artifact_location=s3://b/a"])
    store = tracking.Store.from_config(overridden.cfg.logger)
    assert store.uri == "sqlite:///x.db" and store.new_artifact_location() == "s3://b/a"
