"""``python -m convcg_cli.bench``: the benchmark command line (see ``convcg_cli.bench.cli``)."""

from convcg_cli.bench.cli import app

app()
