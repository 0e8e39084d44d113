"""A popularity prior that keeps inner-product search: one extra coordinate on both sides.

Score ``q . i + beta * prior(i)`` equals the inner product of ``[q, 1]`` and ``[i, beta * prior(i)]``,
so the served index (faiss exact or IVF) is unchanged: the prior is appended to the item vectors
once and every query vector gets a constant 1. ``beta`` is chosen on the validation split
(:func:`choose_prior_weight`), never on the held-out one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from convcg_cli.index import exact_topk
from convcg_cli.metrics.retrieval import recall_at_k


def log_prior(counts: np.ndarray) -> np.ndarray:
    """``log1p(counts)`` scaled to a maximum of 1 (all zeros stay zeros), float64 (the index casts).

    Example:
        >>> log_prior(np.array([0, 1, 3])).round(3).tolist()
        [0.0, 0.5, 1.0]
    """
    x = np.log1p(np.maximum(np.asarray(counts, dtype=np.float64), 0.0))
    top = x.max(initial=0.0)
    return x / top if top > 0 else x


def with_bias(query_emb: np.ndarray, item_emb: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``([q, 1], [i, bias])``: inner products gain ``bias(i)`` (the served blend's coordinate,
    :mod:`convcg_cli.blend`).

    Example:
        >>> q, i = with_bias(np.ones((1, 2)), np.zeros((3, 2)), np.array([0.0, 2.0, 1.0]))
        >>> (q @ i.T).tolist()
        [[0.0, 2.0, 1.0]]
    """
    query_emb = np.asarray(query_emb, dtype=np.float32)
    item_emb = np.asarray(item_emb, dtype=np.float32)
    ones = np.ones((len(query_emb), 1), dtype=np.float32)
    return np.hstack([query_emb, ones]), np.hstack([item_emb, np.asarray(bias, np.float32).reshape(-1, 1)])


def with_item_prior(
    query_emb: np.ndarray, item_emb: np.ndarray, prior: np.ndarray, beta: float
) -> tuple[np.ndarray, np.ndarray]:
    """``([q, 1], [i, beta * prior])``: inner products gain ``beta * prior(i)``.

    Example:
        >>> q, i = with_item_prior(np.ones((1, 2)), np.zeros((3, 2)), np.array([0.0, 1.0, 0.5]), 2.0)
        >>> (q @ i.T).tolist()
        [[0.0, 2.0, 1.0]]
    """
    return with_bias(query_emb, item_emb, float(beta) * np.asarray(prior, dtype=np.float32))


def choose_prior_weight(
    query_emb: np.ndarray,
    item_emb: np.ndarray,
    prior: np.ndarray,
    betas: Sequence[float],
    query_index: np.ndarray,
    positive_item: np.ndarray,
    k: int,
) -> tuple[float, dict[float, float]]:
    """The ``beta`` in ``betas`` with the best recall@k of the given (validation) positives: the
    one-weight search that :func:`convcg_cli.blend.choose_blend` generalises (kept as its reference).

    Returns the chosen beta (the smallest among equals) and recall@k for every beta tried.
    """
    if not len(betas):
        raise ValueError("betas must hold at least one value.")
    recalls: dict[float, float] = {}
    for beta in sorted(float(b) for b in betas):
        q, i = with_item_prior(query_emb, item_emb, prior, beta)
        _, topk = exact_topk(q, i, k)
        recalls[beta] = float(recall_at_k(topk, query_index, positive_item, [k])[k])
    best = max(recalls.values())
    return min(b for b, r in recalls.items() if r == best), recalls
