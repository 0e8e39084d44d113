"""``convcg compare`` (issue 22): chosen runs side by side in the terminal, a column per run (name,
design, seed, data), the headline recalls as rows with the best of each marked, the blend's weights."""

from __future__ import annotations

from typer.testing import CliRunner

from convcg_cli import tracking
from convcg_cli.cli import app
from convcg_cli.config import compose
from convcg_cli.runs_list import BEST_MARK, ComparisonRow, comparison_rows

runner = CliRunner()


def _store():
    return tracking.Store.from_config(compose("eval").cfg.logger)


def _plant(name: str, tags: dict[str, str], history: dict[str, list[float]], last: dict[str, float]) -> str:
    """A finished run with ``tags``, the values of ``history`` logged at steps 1, 2, ... (as epochs
    log them) and ``last`` at step 0 (as an evaluation logs them); its id."""
    with tracking.open_run(_store(), name, tags) as run:
        for metric, values in history.items():
            for step, value in enumerate(values, start=1):
                tracking.log_metrics(run, {metric: value}, step=step)
        tracking.log_metrics(run, last)
    return run.run_id


def _two_designs() -> tuple[str, str]:
    """Two trained runs; the second is the newest with a checkpoint (what ``latest`` names).

    The first kept epoch 2 (its best validation recall@100): its validation recall@1000 there is 0.7,
    though its last epoch reached 0.9, above the second run's 0.8."""
    first = _plant(
        "unified_parallel s0 · tiny",
        {tracking.KIND_TAG: "trained", tracking.DESIGN_TAG: "unified_parallel", "seed": "0"},
        {
            "val/conversion/recall_at_100": [0.30, 0.50, 0.45],
            "val/conversion/recall_at_1000": [0.6, 0.7, 0.9],
        },
        {
            "heldout/conversion/recall_at_100": 0.25,
            "heldout/conversion/recall_at_1000": 0.75,
            "blend/beta": 5.0,
            "blend/fallback_weight": 0.0,
        },
    )
    second = _plant(
        "multihead_sequential s1 · tiny",
        {
            tracking.KIND_TAG: "trained",
            tracking.DESIGN_TAG: "multihead_sequential",
            "seed": "1",
            tracking.CHECKPOINT_TAG: "yes",
        },
        {"val/conversion/recall_at_100": [0.40], "val/conversion/recall_at_1000": [0.8]},
        {
            "heldout/conversion/recall_at_100": 0.30,
            "heldout/conversion/recall_at_1000": 0.70,
            "heldout/engagement/recall_at_100": 0.125,
        },
    )
    return first, second


def _row(text: str, label: str) -> list[str]:
    """The cells of the table row that starts with ``label`` (split on runs of 2+ spaces)."""
    line = next(line for line in text.splitlines() if line.strip().startswith(label + " "))
    return [cell.strip() for cell in line.strip()[len(label) :].split("  ") if cell.strip()]


def test_compare_shows_runs_as_columns_and_marks_the_best_of_each_row(home):
    first, second = _two_designs()
    result = runner.invoke(app, ["compare", first, "latest"])
    assert result.exit_code == 0, result.output
    text = result.output
    for shown in (
        "unified_parallel s0",  # the name (folded in 80 columns)
        "multihead_sequential",
        "seed 0",
        "seed 1",
        first[:8],
        second[:8],
    ):
        assert shown in text, shown
    assert text.index(first[:8]) < text.index(second[:8])  # in the order asked
    assert _row(text, "val conversion recall@100") == [f"0.5000 {BEST_MARK}", "0.4000"]
    assert _row(text, "val conversion recall@1000") == ["0.7000", f"0.8000 {BEST_MARK}"]  # the kept epoch's
    assert _row(text, "heldout conversion recall@100") == ["0.2500", f"0.3000 {BEST_MARK}"]
    assert _row(text, "heldout conversion recall@1000") == [f"0.7500 {BEST_MARK}", "0.7000"]
    assert _row(text, "heldout engagement recall@100") == ["0.1250"]  # one value: nothing to rank
    assert _row(text, "blend: popularity weight") == ["5"]  # a choice, never marked
    assert text.index("val conversion") < text.index("heldout conversion") < text.index("blend:")
    assert "heldout engagement recall@1000" not in text  # no run logged it


def test_latest_and_a_repeated_run_are_shown_once(home):
    _, second = _two_designs()
    result = runner.invoke(app, ["compare", "latest", second])
    assert result.exit_code == 0, result.output
    assert result.output.count(second[:8]) == 1


def test_a_ranked_row_marks_every_tied_best_and_a_lone_value_not_at_all():
    assert ComparisonRow("r", [0.5, 0.5, 0.25]).best() == 0.5
    assert ComparisonRow("r", [None, 0.5]).best() is None
    assert ComparisonRow("w", [1.0, 2.0], ranked=False).best() is None


def test_comparison_rows_read_validation_at_the_monitors_best_epoch():
    run = tracking.ComparedRun("a", "n", "trained", "d", "0", "tiny", {"val/conversion/recall_at_100": 0.1})
    histories = {"val/conversion/recall_at_100": [(1, 0.3), (2, 0.2)], "val/loss": [(1, 0.9), (2, 0.4)]}
    rows = comparison_rows([run], ["conversion"], ("val/loss", "min"), lambda _, name: histories[name])
    assert [(r.label, r.values) for r in rows] == [("val conversion recall@100", [0.2])]  # at min val/loss
    rows = comparison_rows([run], ["conversion"], None, lambda _, name: histories[name])
    assert rows[0].values == [0.1]  # without a monitor: the last value


def test_compare_errors_name_what_was_expected(home, tmp_path, monkeypatch):
    result = runner.invoke(app, ["compare", "0123abcd"])
    assert result.exit_code == 2 and "Run '0123abcd' was not found" in " ".join(result.output.split())
    assert "Traceback" not in result.output
    result = runner.invoke(app, ["compare", "latest"])
    assert result.exit_code == 2 and "No finished run with a checkpoint" in " ".join(result.output.split())
    result = runner.invoke(app, ["compare", "logger.experiment_name=x"])  # overrides, but no run
    assert result.exit_code == 2 and "Name the runs to compare" in " ".join(result.output.split())
    monkeypatch.setenv("CONVCG_HOME", str(tmp_path / "empty"))
    result = runner.invoke(app, ["compare", "latest"])
    assert result.exit_code == 2 and "No MLflow store at" in result.output
    assert not (tmp_path / "empty" / "mlflow.db").exists()  # looking created nothing
