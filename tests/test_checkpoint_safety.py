"""Checkpoints are loaded as data: a pickled object that would run code is refused with a clear error."""

from __future__ import annotations

import os

import pytest
import torch

from convcg_cli.errors import ConvcgError
from convcg_cli.evaluate import read_checkpoint

RAN = "convcg-payload-ran"


class Payload:
    """Unpickling this runs code (``exec``): what a tampered checkpoint would carry."""

    def __reduce__(self):
        return (exec, (f"import os; os.environ['{RAN}'] = '1'",))


def test_plain_checkpoint_loads(tmp_path):
    path = tmp_path / "ok.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 3, "callbacks": {"k": {"best": 0.5}}}, path)
    state = read_checkpoint(path)
    assert state["epoch"] == 3 and torch.equal(state["state_dict"]["w"], torch.ones(2))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv(RAN, raising=False)
    path = tmp_path / "bad.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "extra": Payload()}, path)
    with pytest.raises(ConvcgError, match="not plain weights"):
        read_checkpoint(path)
    assert RAN not in os.environ
