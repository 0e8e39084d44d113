"""Data-parallel training: global in-batch negatives match one process, shards, one MLflow run.

Multi-process code runs in a *subprocess* (``torch.multiprocessing.spawn`` with gloo, 2 CPU
processes): Lightning's ``strategy=ddp`` re-executes the launching command for rank 1, which must
never be pytest itself.
"""

from __future__ import annotations

import gc
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convcg_cli.data.loading import ShuffledBatches
from convcg_cli.models.losses import MultiTaskSampledSoftmax, StreamingLogQ
from tests.conftest import TINY_TRAIN

REPO = Path(__file__).resolve().parents[1]
WORLD = 2
B = 8  # rows per rank; the global batch has WORLD * B rows
N_ITEMS, HARD = 12, 3  # few items, so the same item shows up on both ranks (cross-rank accidental hits)
TASKS = {"conversion": 1.0, "engagement": 0.5}
CASES = {  # name -> (multi-head towers, streaming logQ, hard negatives)
    "unified_table": (False, False, False),
    "multihead_streaming": (True, True, False),
    "hard_negatives": (False, False, True),
}


class _TwoTower(nn.Module):
    """A tiny two-tower model: one embedding per task (multi-head) or one shared by all (unified)."""

    def __init__(self, multi_head: bool) -> None:
        super().__init__()
        self.user = nn.Linear(5, 6)
        self.item = nn.Embedding(N_ITEMS, 6)
        self.heads = nn.ModuleDict({t: nn.Linear(6, 4) for t in (TASKS if multi_head else ["all"])})

    def _embed(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {name: F.normalize(head(h), dim=-1) for name, head in self.heads.items()}
        return {t: out.get(t, out.get("all")) for t in TASKS}

    def forward(self, batch: dict) -> tuple[dict, dict, dict | None]:
        hard = None
        if "hard_pos" in batch:
            flat = self._embed(self.item(batch["hard_pos"].clamp_min(0).reshape(-1)))
            hard = {t: e.view(*batch["hard_pos"].shape, -1) for t, e in flat.items()}
        return self._embed(self.user(batch["user"])), self._embed(self.item(batch["item_pos"])), hard


def _case(name: str) -> tuple[_TwoTower, MultiTaskSampledSoftmax, dict]:
    """Model, loss and the fixed global batch of one case (identical in every process)."""
    multi_head, streaming, hard = CASES[name]
    torch.manual_seed(0)
    model = _TwoTower(multi_head)
    loss_fn = MultiTaskSampledSoftmax(TASKS, temperature=0.2, logq=StreamingLogQ(64) if streaming else None)
    g = torch.Generator().manual_seed(1)
    n = WORLD * B
    conversion = (torch.rand(n, generator=g) < 0.4).float()
    conversion[B:] = 0.0  # rank 1 has no conversion anchor: its loss takes the zero branch
    batch = {
        "user": torch.randn(n, 5, generator=g),
        "item_pos": torch.randint(0, N_ITEMS, (n,), generator=g),
        "log_q": torch.log(torch.rand(n, generator=g) * 0.1 + 0.01),
        "weights": {"conversion": conversion, "engagement": torch.rand(n, generator=g).round() * 0.7},
    }
    if hard:
        batch["hard_pos"] = torch.randint(-1, N_ITEMS, (n, HARD), generator=g)  # -1 = padding
    return model, loss_fn, batch


def _shard(batch: dict, rank: int) -> dict:
    rows = slice(rank * B, (rank + 1) * B)
    return {
        k: ({t: w[rows] for t, w in v.items()} if isinstance(v, dict) else v[rows]) for k, v in batch.items()
    }


def _step(model: nn.Module, loss_fn: MultiTaskSampledSoftmax, batch: dict) -> dict[str, torch.Tensor]:
    """One forward/backward; returns the task losses (detached)."""
    user, item, hard = model(batch)
    losses = loss_fn.task_losses(user, item, batch, hard)
    sum(TASKS[t] * loss for t, loss in losses.items()).backward()
    return {t: loss.detach() for t, loss in losses.items()}


def _worker(rank: int, port: int, out_dir: str) -> None:
    """One rank: DDP over the tiny model, its half of each case's global batch; saves losses and grads."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # A bounded rendezvous: a rank that cannot reach the other fails in a minute instead of hanging.
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    result = {}
    for name in CASES:
        model, loss_fn, batch = _case(name)
        ddp = DistributedDataParallel(model)
        losses = _step(ddp, loss_fn, _shard(batch, rank))
        grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        result[name] = {"losses": losses, "grads": grads, "buffers": dict(loss_fn.named_buffers())}
        # Free DDP's reducer while the process group is alive: destroyed after it (when the frame
        # unwinds) it hung about one run in five here, after the results were written.
        del ddp
        gc.collect()
    staged = Path(out_dir) / f"rank{rank}.pt.partial"
    torch.save(result, staged)
    staged.rename(staged.with_suffix(""))  # rank{r}.pt appears complete or not at all
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Both ranks live on this host: gloo's pair sockets go over loopback, not over whatever interface the
# host name resolves to (a sandbox may resolve it to an address the ranks cannot reach, and hang).
LOOPBACK_ENV = {"GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
SPAWN_TIMEOUT_S = 240


def run_bounded(
    cmd: list[str] | Callable[[], list[str]],
    attempts: int = 2,
    timeout_s: int = SPAWN_TIMEOUT_S,
    finished: Callable[[], bool] | None = None,
    **kwargs,
) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own session with a wall-clock bound, killing the whole process group (the
    spawned ranks too) when it runs past it; try again once (``cmd`` may be a callable, so each attempt
    can pick a new free port).

    A multi-process test must fail with its output, never hang the suite. If ``finished()`` says the
    ranks already wrote their complete results when the bound hits, the run counts (with a warning):
    only their exit hung, not anything the test checks.
    """
    for attempt in range(1, attempts + 1):
        args = cmd() if callable(cmd) else cmd
        proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kwargs
        )
        try:
            out, err = proc.communicate(timeout=timeout_s)
            return subprocess.CompletedProcess(args, proc.returncode, out, err)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            if finished is not None and finished():
                warnings.warn(
                    f"the ranks finished their work but did not exit within {timeout_s} s", stacklevel=2
                )
                return subprocess.CompletedProcess(args, 0, out, err)
            if attempt == attempts:
                pytest.fail(
                    f"{args[:4]}... ran past {timeout_s} s {attempts} times; "
                    f"stdout: {out[-2000:]!r}; stderr: {err[-3000:]!r}"
                )
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """What each of 2 gloo processes computed, run in a subprocess (never DDP inside pytest)."""
    out = tmp_path_factory.mktemp("ddp")

    def cmd() -> list[str]:
        code = (
            "import torch.multiprocessing as mp; from tests.test_ddp import _worker, WORLD; "
            f"mp.spawn(_worker, args=({_free_port()}, {str(out)!r}), nprocs=WORLD)"
        )
        return [sys.executable, "-c", code]

    files = [out / f"rank{r}.pt" for r in range(WORLD)]
    done = run_bounded(
        cmd, cwd=REPO, env={**os.environ, **LOOPBACK_ENV}, finished=lambda: all(f.exists() for f in files)
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(f) for f in files]


@pytest.mark.slow  # ~6 s of waiting; it guards the multi-process tests, all of them slow
def test_a_hung_subprocess_is_killed_with_its_children_and_fails(tmp_path):
    marker = tmp_path / "child-alive"
    grandchild = tmp_path / "grandchild.py"
    grandchild.write_text(f"import time\ntime.sleep(2)\nopen({str(marker)!r}, 'w').close()\n")
    code = (
        f"import subprocess, sys, time; subprocess.Popen([sys.executable, {str(grandchild)!r}]); "
        "time.sleep(60)"
    )
    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match="ran past 1 s 2 times"):
        run_bounded([sys.executable, "-c", code], attempts=2, timeout_s=1)
    with pytest.warns(UserWarning, match="did not exit"):
        done = run_bounded(
            [sys.executable, "-c", "import time; time.sleep(60)"], timeout_s=1, finished=lambda: True
        )
    assert done.returncode == 0 and time.monotonic() - start < 20
    time.sleep(2.5)
    assert not marker.exists()  # the grandchild died with its process group


@pytest.mark.slow  # the `ranks` fixture spawns 2 gloo processes: about a minute on 2 busy cores
@pytest.mark.parametrize("name", list(CASES))
def test_every_rank_loss_equals_the_single_process_global_batch_loss(ranks, name):
    model, loss_fn, batch = _case(name)
    expected = _step(model, loss_fn, batch)
    assert expected["conversion"] > 0  # rank 0's anchors are everyone's conversion anchors
    for rank in ranks:
        for task, value in expected.items():
            torch.testing.assert_close(rank[name]["losses"][task], value, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_ddp_averaged_gradients_equal_the_single_process_gradients(ranks, name):
    model, loss_fn, batch = _case(name)
    _step(model, loss_fn, batch)
    for rank in ranks:
        for param, p in model.named_parameters():
            torch.testing.assert_close(rank[name]["grads"][param], p.grad, rtol=1e-5, atol=1e-6)
        # A streaming logQ sees the gathered global ids: every rank's estimate matches one process's.
        for buffer, value in loss_fn.named_buffers():
            torch.testing.assert_close(rank[name]["buffers"][buffer], value)


def _batches(n_rows: int, batch_size: int, world: int, monkeypatch) -> list[list[torch.Tensor]]:
    """The item positions of each rank's batches for one epoch, faking ``world`` ranks."""
    data = ShuffledBatches(
        user={"user_id": torch.ones(n_rows, dtype=torch.long)},
        item_pos=torch.arange(n_rows),
        weights={},
        item_features={"item_id": torch.arange(n_rows)},
        item_log_q=torch.zeros(n_rows),
        batch_size=batch_size,
        seed=3,
    )
    out = []
    for rank in range(world):
        monkeypatch.setattr("convcg_cli.distributed_env.rank_and_world", lambda r=rank: (r, world))
        data.epoch = 0
        out.append([b["item_pos"] for b in data])
        assert len(out[-1]) == len(data)
    return out


def test_each_rank_reads_a_disjoint_equal_shard_and_steps_form_the_big_batch(monkeypatch):
    (single,) = _batches(1000, 100, 1, monkeypatch)
    shards = _batches(1000, 50, WORLD, monkeypatch)
    assert [len(s) for s in shards] == [10, 10]
    assert all(len(b) == 50 for s in shards for b in s)
    seen = torch.cat([b for s in shards for b in s])
    assert len(seen.unique()) == len(seen)  # disjoint
    # Step i's global batch (rank order) is batch i of one process with a 2x larger batch.
    for i, big in enumerate(single):
        assert torch.equal(torch.cat([s[i] for s in shards]), big)


def test_fewer_rows_than_a_global_batch_gives_every_rank_one_equal_batch(monkeypatch):
    shards = _batches(101, 64, WORLD, monkeypatch)
    assert [[len(b) for b in s] for s in shards] == [[50], [50]]


@pytest.mark.slow
@pytest.mark.parametrize("streamed", [False, True], ids=["in_memory", "streamed"])
def test_train_trainer_ddp_end_to_end_logs_one_finished_run(tiny_data, tmp_path, streamed):
    """``convcg train trainer=ddp`` on 2 CPU processes: one FINISHED run, one value per step; streamed,
    rank 0 writes the shards and each rank reads its own."""
    from mlflow.tracking import MlflowClient

    env = {**os.environ, "CONVCG_HOME": str(tmp_path), **LOOPBACK_ENV}
    for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "SLURM_PROCID"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "convcg_cli", "train", "trainer=ddp", "trainer.accelerator=cpu"]
    if streamed:
        cmd += ["data/stream=streamed", "data.stream.chunk_rows=5000"]
    done = run_bounded(
        [*cmd, f"data.dir={tiny_data}", *TINY_TRAIN], attempts=1, timeout_s=540, cwd=tmp_path, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path.resolve()}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("convcg").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["checkpoint"] == "yes"
    assert run.data.params["trainer"] == "ddp"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == [0, 1, 2, 3]  # 4 steps, logged once (by rank 0)
    assert "val/conversion/recall_at_100" in run.data.metrics
    assert list((tmp_path / "outputs" / "runs").iterdir()) == [
        tmp_path / "outputs" / "runs" / run.info.run_id
    ]
