"""``convcg retrieve``: a request file ranked in chunks gives what one ``predict`` call gives."""

from __future__ import annotations

import mlflow.pyfunc
import numpy as np
import polars as pl
from typer.testing import CliRunner

from convcg_cli.cli import app

runner = CliRunner()


def test_retrieve_in_chunks_writes_what_predict_returns(served, tiny_data, tmp_path):
    _, run_id = served
    users = pl.read_parquet(tiny_data / "users.parquet")["user_id"].to_numpy()
    n = 150
    requests = pl.DataFrame(
        {
            "user_id": np.concatenate([users[: n - 1], [-1]]),  # the last one is a cold-start user
            "surface": ["home_feed", "search", "related_items"] * (n // 3),
        }
    )
    requests.write_parquet(tmp_path / "requests.parquet")
    out = tmp_path / "candidates.parquet"
    args = [
        "--requests",
        str(tmp_path / "requests.parquet"),
        "--k",
        "9",
        "--out",
        str(out),
        "--chunk-rows",
        "64",
    ]
    result = runner.invoke(app, ["retrieve", "--run", run_id, *args])
    assert result.exit_code == 0, result.output
    written = pl.read_parquet(out)
    assert written.columns == ["request", "rank", "item_id", "score"]
    assert written.height == n * 9 and written["request"].unique().sort().to_list() == list(range(n))
    predicted = mlflow.pyfunc.load_model(f"runs:/{run_id}/model").predict(
        requests.to_pandas(), params={"k": 9}
    )
    assert np.array_equal(written["item_id"].to_numpy(), predicted["item_id"].to_numpy())
    np.testing.assert_allclose(written["score"].to_numpy(), predicted["score"].to_numpy(), rtol=1e-6)


def test_retrieve_reports_a_malformed_request_file(served, tmp_path):
    _, run_id = served
    pl.DataFrame({"user_id": [1]}).write_parquet(tmp_path / "requests.parquet")
    args = ["--requests", str(tmp_path / "requests.parquet"), "--out", str(tmp_path / "c.parquet")]
    result = runner.invoke(app, ["retrieve", "--run", run_id, *args])
    assert result.exit_code == 2
    assert "lack column(s) ['surface']" in " ".join(result.output.split())
    assert not (tmp_path / "c.parquet").exists()


def test_retrieve_reports_a_cut_short_request_file_and_a_directory_as_out(served, tmp_path):
    _, run_id = served
    whole = tmp_path / "whole.parquet"
    pl.DataFrame({"user_id": [1, 2] * 500, "surface": ["home_feed"] * 1000}).write_parquet(whole)
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    out = tmp_path / "c.parquet"
    result = runner.invoke(app, ["retrieve", "--run", run_id, "--requests", str(cut), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert f"The requests file {cut} is not a readable parquet file" in " ".join(result.output.split())
    assert not out.exists() and not any(p.name.startswith(".c.parquet") for p in tmp_path.iterdir())
    (tmp_path / "dir").mkdir()
    result = runner.invoke(
        app, ["retrieve", "--run", run_id, "--requests", str(whole), "--out", str(tmp_path / "dir")]
    )
    assert result.exit_code == 2 and "is a directory" in result.output and "Traceback" not in result.output
