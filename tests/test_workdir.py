"""Temporary files outlive nothing: a command's own directory goes however the command ends (error,
Ctrl-C, SIGTERM; a SIGKILLed one's with the next command), and what a killed writer left beside its
target (``.tmp-*``, ``.old-*``, ``.partial``) goes with the next write of the same target, never a
live writer's (README "Reliability")."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from convcg_cli import workdir

pytestmark = pytest.mark.faults


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def aged(path: Path, directory: bool, seconds: float = 3600) -> Path:
    """``path`` made (a directory or a file) with its modification time moved ``seconds`` into the
    past, before this process started."""
    path.mkdir() if directory else path.write_bytes(b"PAR1 half a file")
    then = time.time() - seconds
    os.utime(path, (then, then))
    return path


@pytest.fixture
def tmpdir_env(tmp_path, monkeypatch) -> Path:
    """A private ``$TMPDIR`` (and Python's temp dir) for this test."""
    root = tmp_path / "tmpdir"
    root.mkdir()
    monkeypatch.setenv("TMPDIR", str(root))
    monkeypatch.setattr("tempfile.tempdir", str(root))
    return root


# --- a command's own directory --------------------------------------------------------------------


def test_the_command_dir_is_removed_on_success_and_on_an_error(tmpdir_env):
    with workdir.command_dir("eval") as path:
        (path / "config.yaml").write_text("x")
        assert path.parent == tmpdir_env and path.name.startswith(f"convcg-eval-{os.getpid()}@")
    assert not path.exists()
    with pytest.raises(ValueError), workdir.command_dir("eval") as path:
        raise ValueError("boom")
    assert not path.exists()
    assert list(tmpdir_env.iterdir()) == []


# SIGTERM: exit 143, as a shell reports it; Ctrl-C: Python's own exit by SIGINT after the cleanup
@pytest.mark.parametrize(
    ("signum", "code"), [(signal.SIGTERM, 128 + signal.SIGTERM), (signal.SIGINT, -signal.SIGINT)]
)
def test_the_command_dir_is_removed_when_a_signal_stops_the_command(tmpdir_env, signum, code):
    # Python's own Ctrl-C handler, whatever this suite inherited: a shell's background job (nohup
    # pytest &) starts with SIGINT ignored, and the child would inherit that and sleep on.
    script = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "from convcg_cli import workdir\n"
        "with workdir.command_dir('export') as path:\n"
        "    (path / 'model.ckpt').write_bytes(b'x' * 1000)\n"
        "    print(path, flush=True)\n"
        "    time.sleep(60)\n"
    )
    env = {**os.environ, "TMPDIR": str(tmpdir_env)}
    process = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    path = Path(process.stdout.readline().decode().strip())
    assert path.is_dir()
    process.send_signal(signum)
    returncode = process.wait(timeout=60)
    assert returncode == code
    assert not path.exists()


def test_a_sigkilled_commands_dir_is_removed_by_the_next_command(tmpdir_env):
    script = (
        "import os, signal\n"
        "from convcg_cli import workdir\n"
        "with workdir.command_dir('retrieve') as path:\n"
        "    (path / 'bundle').mkdir()\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    env = {**os.environ, "TMPDIR": str(tmpdir_env)}
    assert subprocess.run([sys.executable, "-c", script], env=env).returncode == -signal.SIGKILL
    (left,) = tmpdir_env.iterdir()
    assert left.name.startswith("convcg-retrieve-")
    other_host = tmpdir_env / f"convcg-eval-{dead_pid()}@not-{socket.gethostname()}~abc"
    other_host.mkdir()  # a shared /tmp: another host's command cannot be checked from here
    with workdir.command_dir("eval") as path:
        assert sorted(tmpdir_env.iterdir()) == sorted([path, other_host])
    assert list(tmpdir_env.iterdir()) == [other_host]


# --- what killed writers leave beside their target ------------------------------------------------


def test_sweep_stale_removes_only_what_a_gone_writer_left(tmp_path):
    target = tmp_path / "imp1"
    target.mkdir()
    host = socket.gethostname()
    dead = tmp_path / f".imp1.tmp-{dead_pid()}@{host}~x1"
    live = tmp_path / f".imp1.tmp-{os.getpid()}@{host}~x2"  # this process: a live writer
    elsewhere = tmp_path / f".imp1.tmp-{dead_pid()}@not-{host}~x3"
    legacy_old = aged(tmp_path / ".imp1.tmp-k2j3h4", directory=True)  # before names carried a pid
    legacy_new = tmp_path / ".imp1.tmp-a1b2c3"  # written since this process started: maybe live
    aside = tmp_path / f".imp1.old-{dead_pid()}@{host}~x4"
    other_target = tmp_path / f".imp10.tmp-{dead_pid()}@{host}~x5"
    for path in (dead, live, elsewhere, legacy_new, aside, other_target):
        path.mkdir()
    (dead / "impressions.parquet").write_bytes(b"x" * 100)
    removed = workdir.sweep_stale(target)
    assert sorted(removed) == sorted([dead, legacy_old, aside])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in (target, live, elsewhere, legacy_new, other_target)
    )


def test_a_set_aside_target_is_kept_while_the_target_is_missing(tmp_path):
    """A writer killed between moving the old directory aside and moving the new one in: the aside
    copy is the only data there is, so it stays until the target exists again."""
    target = tmp_path / "logs"
    aside = tmp_path / f".logs.old-{dead_pid()}@{socket.gethostname()}~q"
    (aside / "logs").mkdir(parents=True)
    assert workdir.sweep_stale(target) == []
    target.mkdir()
    assert workdir.sweep_stale(target) == [aside]


def test_a_killed_table_write_leaves_nothing_the_next_write_keeps(tmp_path):
    """``convcg data import``/``synth`` write through ``write_tables``: a SIGKILL between writing the
    tables and renaming them leaves ``.<out>.tmp-<pid>@<host>~*`` (with the tester's 9.6 MB in it);
    the next write of the same directory removes it."""
    from convcg_cli.data.contract import tables as tables_module
    from convcg_cli.data.importing import synth

    data = synth.generate("tiny", seed=0)
    out = tmp_path / "imp1"
    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from convcg_cli.data.contract import tables\n"
        "from convcg_cli.data.importing import synth\n"
        "tables._replace_dir = lambda new, target: os.kill(os.getpid(), signal.SIGKILL)\n"
        f"tables.write_tables(synth.generate('tiny', seed=0), Path({str(out)!r}))\n"
    )
    assert subprocess.run([sys.executable, "-c", script]).returncode == -signal.SIGKILL
    (left,) = tmp_path.iterdir()
    assert left.name.startswith(".imp1.tmp-") and any(left.iterdir())
    tables_module.write_tables(data, out)
    assert [p.name for p in tmp_path.iterdir()] == ["imp1"]


def test_a_killed_retrieval_leaves_a_partial_file_the_next_one_removes(tmp_path):
    from convcg_cli.serve.batch import retrieve_file

    out = tmp_path / "candidates.parquet"
    dead = tmp_path / f".candidates.parquet.partial-{dead_pid()}@{socket.gethostname()}~"
    dead.write_bytes(b"PAR1 half a file")
    aged(tmp_path / ".candidates.parquet.partial", directory=False)  # before names carried a pid
    requests = tmp_path / "requests.parquet"
    pl.DataFrame({"user_id": [1, 2], "surface": ["home_feed"] * 2}).write_parquet(requests)
    result = retrieve_file(_FakeModel(), requests, out, k=3)
    assert result.rows == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["candidates.parquet", "requests.parquet"]


class _FakeModel:
    """A CandidateModel stand-in: ``k`` candidates per request, item ids 0..k-1."""

    class bundle:  # noqa: N801  (the attribute CandidateModel has)
        limits = {"max_k": 10, "max_rows": 10}

    def candidates(self, requests, k, first_request=0):
        from convcg_cli.serve.model import CANDIDATE_SCHEMA

        n = requests.height
        return pl.DataFrame(
            {
                "request": [first_request + i for i in range(n) for _ in range(k)],
                "rank": [r + 1 for _ in range(n) for r in range(k)],
                "item_id": [r for _ in range(n) for r in range(k)],
                "score": [1.0 - r / 10 for _ in range(n) for r in range(k)],
            },
            schema=CANDIDATE_SCHEMA,
        )
