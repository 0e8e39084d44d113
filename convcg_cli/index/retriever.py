"""The one retrieval path: query features -> trained query tower -> top-k search over the item index.

``convcg eval`` (:func:`convcg_cli.evaluate.evaluate`), the served MLflow model's ``predict``
(:mod:`convcg_cli.serve`) and batch candidate generation (``convcg retrieve``) all embed queries
with :func:`encode_queries` and rank with an index of this package (:class:`ExactIndex` by default,
:class:`IVFIndex` when configured, made by :func:`build_index`), through :class:`Retriever`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from convcg_cli.index.approximate import IVFIndex
from convcg_cli.index.exact import ExactIndex

EMBED_BATCH_SIZE = 8192  # queries per forward pass when no batch size is given


class ItemIndex(Protocol):
    """What :class:`Retriever` needs from an index: ``search(query_emb, k) -> (scores, ids)``."""

    ntotal: int

    def search(self, query_emb: np.ndarray, k: int, batch_size: int = 65536) -> tuple[np.ndarray, np.ndarray]:
        """(Q, k') scores and item positions, best first."""
        ...


def encode_queries(
    embed: Callable, features: Mapping[str, np.ndarray], batch_size: int = EMBED_BATCH_SIZE
) -> np.ndarray:
    """Query embeddings (Q, E) float32 of encoded query features ``{name: (Q,) or (Q, L)}``, embedded
    ``batch_size`` rows at a time by ``embed`` (the query tower's serving embedding, e.g.
    ``RetrievalModule.embed_queries``)."""
    import torch

    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in features.items()}
    n = len(next(iter(tensors.values()))) if tensors else 0
    # inference_mode, not no_grad: no autograd bookkeeping at all (version counters, views), which
    # is most of a small batch's forward; the embeddings leave as numpy, never back into autograd.
    with torch.inference_mode():
        parts = [
            embed({k: v[start : start + batch_size] for k, v in tensors.items()}).float().cpu()
            for start in range(0, n, batch_size)
        ]
        if not parts:
            return np.zeros((0, 1), dtype=np.float32)
        return (parts[0] if len(parts) == 1 else torch.cat(parts)).numpy()


def build_index(item_emb: np.ndarray, kind: str = "exact", nlist: int = 1024, nprobe: int = 16) -> ItemIndex:
    """The item index a model serves: ``exact`` (:class:`ExactIndex`) or ``ivf`` (:class:`IVFIndex`)."""
    if kind == "exact":
        return ExactIndex(item_emb)
    if kind == "ivf":
        return IVFIndex(item_emb, nlist=nlist, nprobe=nprobe)
    raise ValueError(f"Unknown index kind {kind!r}; choose exact or ivf.")


@dataclass
class Retriever:
    """A trained query tower and an item index: ``topk(features, k)`` ranks the corpus for each query.

    Attributes:
        embed: the query tower's serving embedding, ``{name: tensor} -> (B, E)``.
        index: the item index (row i = item position i of the corpus).
        batch_size: queries embedded per forward pass.
    """

    embed: Callable
    index: ItemIndex
    batch_size: int = EMBED_BATCH_SIZE

    def embed_queries(self, features: Mapping[str, np.ndarray]) -> np.ndarray:
        """(Q, E) query embeddings of encoded query features."""
        return encode_queries(self.embed, features, self.batch_size)

    def topk(self, features: Mapping[str, np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, item positions)`` of shape (Q, min(k, N)), best first, ties by lower position."""
        return self.index.search(self.embed_queries(features), k)
