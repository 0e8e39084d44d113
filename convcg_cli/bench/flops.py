"""A training step's floating-point work against a bare GEMM of the same shapes (bench (a)).

The FLOPs of one step (forward and backward) are counted by ``torch.utils.flop_counter.FlopCounterMode``
(matrix products: what the model's arithmetic is made of; element-wise work is not counted, as usual).
The matrix products the step runs are recorded with their shapes, and a bare loop of ``torch.mm`` on
random matrices of exactly those shapes is timed in the same process: how many GFLOP/s the machine
gives this mix of shapes, against which the step's achieved GFLOP/s is read.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

_ATEN = torch.ops.aten
# (operator, how its (m, k) x (k, n) operands sit in its arguments); batched ones multiply by b.
_MATMULS = {
    _ATEN.mm.default: lambda a: (a[0].shape, a[1].shape),
    _ATEN.addmm.default: lambda a: (a[1].shape, a[2].shape),
    _ATEN.bmm.default: lambda a: (a[0].shape, a[1].shape),
    _ATEN.baddbmm.default: lambda a: (a[1].shape, a[2].shape),
}


@dataclass(frozen=True)
class Matmul:
    """One matrix product of a step: ``batch`` products of (m, k) x (k, n)."""

    batch: int
    m: int
    k: int
    n: int

    @property
    def flops(self) -> int:
        """2 m k n per product (a multiply and an add)."""
        return 2 * self.batch * self.m * self.k * self.n


class _MatmulRecorder(TorchDispatchMode):
    """Records the shape of every matrix product dispatched while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.matmuls: list[Matmul] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: D105
        operands = _MATMULS.get(func)
        if operands is not None:
            left, right = operands(args)
            batch = int(left[0]) if len(left) == 3 else 1
            self.matmuls.append(Matmul(batch, int(left[-2]), int(left[-1]), int(right[-1])))
        return func(*args, **(kwargs or {}))


def step_flops(step: Callable[[], None]) -> tuple[int, list[Matmul]]:
    """``(FLOPs FlopCounterMode counts, the matrix products with their shapes)`` of one call of
    ``step`` (e.g. forward, backward and optimizer step of one batch)."""
    recorder = _MatmulRecorder()
    with FlopCounterMode(display=False) as counter, recorder:
        step()
    return int(counter.get_total_flops()), recorder.matmuls


def record_matmuls(step: Callable[[], None]) -> list[Matmul]:
    """The matrix products of one call of ``step``, with their shapes (no FLOP counter: for models
    whose backward ``FlopCounterMode``'s module hooks cannot follow). Their FLOPs are what
    :func:`step_flops` counts for a model both can run, since it counts matrix products only."""
    recorder = _MatmulRecorder()
    with recorder:
        step()
    return recorder.matmuls


def gemm_seconds(matmuls: list[Matmul], repeats: int, seed: int = 0) -> float:
    """Median seconds of one pass of ``torch.mm``/``torch.bmm`` over ``matmuls`` (random float32
    operands made beforehand), over ``repeats`` passes after one untimed pass."""
    g = torch.Generator().manual_seed(seed)

    def operands(mm: Matmul) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (mm.batch,) if mm.batch > 1 else ()
        return torch.randn(*shape, mm.m, mm.k, generator=g), torch.randn(*shape, mm.k, mm.n, generator=g)

    pairs = [operands(mm) for mm in matmuls]
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        for a, b in pairs:
            torch.matmul(a, b)
        if i:
            times.append(time.perf_counter() - start)
    return float(np.median(times))
