"""Paths in committed reports: relative inside the checkout, a variable elsewhere, and a reproduce
command that still runs (the shell expands the variables, convcg gets absolute paths)."""

import shlex
from pathlib import PurePosixPath

import pytest

from convcg_cli.ablate import Grid, Variant
from convcg_cli.ablate.report import render_report
from convcg_cli.ablate.summary import Summary
from convcg_cli.report_paths import Places, portable_command, portable_path, portable_text, portable_uri

PLACES = Places(
    PurePosixPath("/work/main"),
    {"CONVCG_HOME": PurePosixPath("/work/runs/grid"), "TMPDIR": PurePosixPath("/tmp")},
)


@pytest.mark.parametrize(
    "path, shown",
    [
        ("/work/main/data/kuairand", "data/kuairand"),
        ("/work/main", "."),
        ("/work/main/../main/data/x/", "data/x"),
        ("/work/runs/grid/mlflow.db", "$CONVCG_HOME/mlflow.db"),
        ("/work/runs/grid", "$CONVCG_HOME"),
        ("/tmp/wt14-home/mlflow.db", "$TMPDIR/wt14-home/mlflow.db"),
        ("/work/runs/synthetic-small", "$RUNS/synthetic-small"),  # elsewhere: named after its parent
        ("/work/mainly/data", "$MAINLY/data"),  # a sibling with a common prefix is not inside
        ("/data", "$ROOT/data"),
        ("data/kuairand", "data/kuairand"),  # relative: as given
    ],
)
def test_portable_path(path, shown):
    assert portable_path(path, PLACES) == shown


def test_the_deepest_directory_holding_a_path_names_it():
    places = Places(PurePosixPath("/w"), {"CONVCG_HOME": PurePosixPath("/w/home")})
    assert portable_path("/w/home/x", places) == "$CONVCG_HOME/x"
    assert portable_path("/w/data/x", places) == "data/x"


def test_portable_uri():
    assert portable_uri("sqlite:////work/runs/grid/mlflow.db", PLACES) == "sqlite:///$CONVCG_HOME/mlflow.db"
    assert portable_uri("sqlite:////work/main/mlflow.db", PLACES) == "sqlite:///$PWD/mlflow.db"
    assert portable_uri("file:///work/main/mlartifacts", PLACES) == "file://$PWD/mlartifacts"
    assert portable_uri("/work/main/mlflow.db", PLACES) == "$PWD/mlflow.db"
    assert portable_uri("http://127.0.0.1:5000", PLACES) == "http://127.0.0.1:5000"
    assert portable_uri("sqlite:///mlflow.db", PLACES) == "sqlite:///mlflow.db"  # relative: as given


def test_portable_command_runs_with_the_variables_expanded():
    command = shlex.join(
        [
            "convcg",
            "ablate",
            "kuairand",
            "data=kuairand",
            "data.dir=/work/main/data/kuairand",
            "logger.tracking_uri=sqlite:////work/runs/grid/mlflow.db",
            "paths.root_dir=/srv/my home/convcg",
            "--config-dir",
            "/work/main/my conf",
            "--seeds",
            "0,1,2",
            "--variants",
            "*/engagement=0.3",
        ]
    )
    shown = portable_command(command, PLACES)
    assert shown == (
        "convcg ablate kuairand data=kuairand data.dir=$PWD/data/kuairand "
        "logger.tracking_uri=sqlite:///$CONVCG_HOME/mlflow.db paths.root_dir=$MY_HOME/convcg "
        "--config-dir $PWD/'my conf' --seeds 0,1,2 --variants '*/engagement=0.3'"
    )
    # What the shell passes on, with the variables set: the same arguments, paths where they are now.
    words = shlex.split(shown.replace("$PWD", "/elsewhere/checkout").replace("$CONVCG_HOME", "/h"))
    assert words[4] == "data.dir=/elsewhere/checkout/data/kuairand"
    assert words[8] == "/elsewhere/checkout/my conf" and words[-1] == "*/engagement=0.3"
    assert portable_command("convcg ablate g data.dir=/work/main/d 'cut sho", PLACES) == (
        "convcg ablate g data.dir=$PWD/d 'cut sho"  # a tag cut at 500 characters: text replaced
    )


def test_portable_text_leaves_what_is_not_a_path():
    text = "Loading and checking /tmp/convcg-bench-1/eval-small; 3.1 GFLOP/s, 1/2 of it, sqlite:////x/y"
    assert portable_text(text, PLACES) == (
        "Loading and checking $TMPDIR/convcg-bench-1/eval-small; 3.1 GFLOP/s, 1/2 of it, sqlite:////x/y"
    )


def test_places_here_reads_the_process(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CONVCG_HOME", str(tmp_path / "home"))
    places = Places.here(WORKDIR=tmp_path / "work")
    assert portable_path(str(tmp_path.resolve() / "data" / "k"), places) == "data/k"
    assert portable_path(str(tmp_path.resolve() / "home" / "mlflow.db"), places) == "$CONVCG_HOME/mlflow.db"
    assert portable_path(str(tmp_path.resolve() / "work" / "x"), places) == "$WORKDIR/x"
    monkeypatch.delenv("CONVCG_HOME")
    assert "CONVCG_HOME" not in Places.here().named


def test_ablation_report_reproduce_line_and_data_are_portable():
    grid = Grid("toy", (Variant("a", ()),), (0,))
    context = {
        "command": "convcg ablate toy data.dir=/work/main/data/kuairand --seeds 0",
        "parent_run_id": "p",
        "tracking_uri": "sqlite:////work/runs/grid/mlflow.db",
        "data_dirs": ["/work/main/data/kuairand", "/srv/runs/synthetic-small"],
        "split": "heldout",
    }
    report = render_report(grid, Summary({0: []}, [], []), context, PLACES)
    assert "convcg ablate toy data.dir=$PWD/data/kuairand --seeds 0\n" in report
    assert "MLflow parent run `p` (sqlite:///$CONVCG_HOME/mlflow.db);" in report
    assert "Data: `data/kuairand`, `$RUNS/synthetic-small`;" in report
    assert "/work/" not in report
