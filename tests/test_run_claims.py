"""One process at a time writes into an existing run: ``convcg train --resume`` claims the run first,
so a second resume of the same run exits 2 naming the holder instead of training it twice."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from convcg_cli import tracking
from convcg_cli.cli import app
from convcg_cli.config import compose
from convcg_cli.errors import RunClaimedError, RunNotFoundError
from convcg_cli.tracking import claims

pytestmark = pytest.mark.faults  # README "Reliability" rows (`make faults`)
runner = CliRunner()


@pytest.fixture
def store(home):
    return tracking.Store.from_config(compose("eval").cfg.logger)


@pytest.fixture
def killed_run(store) -> str:
    """A KILLED run: what `--resume` accepts."""
    with pytest.raises(KeyboardInterrupt), tracking.open_run(store, "interrupted", {}) as run:
        raise KeyboardInterrupt
    return run.run_id


def test_a_second_resume_of_a_claimed_run_exits_2_naming_the_holder(store, killed_run):
    with tracking.claim_run(store, killed_run):
        result = runner.invoke(app, ["train", "--resume", killed_run])
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert f"Run {killed_run} is held by another process" in message and f"pid {os.getpid()}" in message
    assert store.client.get_run(killed_run).info.status == "KILLED"  # untouched


def test_a_claim_is_exclusive_and_released_when_its_holder_ends(store, killed_run):
    with tracking.claim_run(store, killed_run):
        with pytest.raises(RunClaimedError), tracking.claim_run(store, killed_run):
            pass
    with tracking.claim_run(store, killed_run):  # released: taken again
        pass


def test_a_claim_dies_with_its_process(store, killed_run):
    """The kernel drops the lock of a SIGKILLed holder: no stale claim blocks the next resume."""
    code = (
        "import os, signal; from convcg_cli import tracking; from convcg_cli.config import compose\n"
        "store = tracking.Store.from_config(compose('eval').cfg.logger)\n"
        f"with tracking.claim_run(store, '{killed_run}'): os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    holder = subprocess.run([sys.executable, "-c", code], env=os.environ.copy(), check=False)
    assert holder.returncode == -9
    with tracking.claim_run(store, killed_run):
        pass


def test_a_run_id_that_is_not_one_is_refused_before_any_file_is_made(store):
    with pytest.raises(RunNotFoundError), tracking.claim_run(store, "../../escape"):
        pass


def test_on_a_server_store_the_claim_is_a_compare_and_set_tag(store, killed_run, monkeypatch):
    monkeypatch.setattr(claims, "sqlite_path", lambda uri: None)  # as for an http:// store
    monkeypatch.setattr(claims, "CLAIM_SETTLE_SECONDS", 0.0)
    with tracking.claim_run(store, killed_run):
        assert f"pid {os.getpid()}" in store.client.get_run(killed_run).data.tags[claims.CLAIM_TAG]
        with pytest.raises(RunClaimedError), tracking.claim_run(store, killed_run):
            pass
    assert claims.CLAIM_TAG not in store.client.get_run(killed_run).data.tags
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = f"{claims.socket.gethostname()} pid {dead.pid} since 2026-01-01 00:00:00 [x]"
    store.client.set_tag(killed_run, claims.CLAIM_TAG, stale)
    with tracking.claim_run(store, killed_run):  # a dead holder's tag is taken over
        pass


def test_of_two_server_claims_written_at_once_the_overwritten_one_gives_way(store, killed_run, monkeypatch):
    monkeypatch.setattr(claims, "sqlite_path", lambda uri: None)
    other = "elsewhere pid 1 since 2026-01-01 00:00:00 [theirs]"

    def overwritten(seconds):  # another host writes its claim while this one settles
        store.client.set_tag(killed_run, claims.CLAIM_TAG, other)

    monkeypatch.setattr(claims.time, "sleep", overwritten)
    with pytest.raises(RunClaimedError, match="elsewhere pid 1"), tracking.claim_run(store, killed_run):
        pass


def test_export_of_a_claimed_run_exits_2_naming_the_holder(store, monkeypatch):
    from convcg_cli.serve import export

    monkeypatch.setattr(tracking, "resolve_run", lambda store, run: run)  # any run id will do here
    with tracking.claim_run(store, "abc123"):
        with pytest.raises(RunClaimedError, match=f"pid {os.getpid()}"):
            export.export_run(store, "abc123")
