"""Approximate indexes against exact search: probing every cell (or a beam as wide as the corpus)
finds the exact top k; fewer cells find a part of it; rows pad with -1 where cells run short."""

import numpy as np
import pytest

from convcg_cli.index import HNSW, ExactIndex, IVFFlat, IVFIndex, exact_topk
from convcg_cli.index.approximate import IVFPQFastScanRefine, IVFScalarRefine
from convcg_cli.metrics.retrieval import overlap_at_k


def _unit(n: int, seed: int, dim: int = 16) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_ivf_index_probing_every_cell_is_exact():
    rng = np.random.default_rng(3)
    items, queries = rng.standard_normal((400, 8)), rng.standard_normal((30, 8))
    _, exact = ExactIndex(items).search(queries, 20)
    ivf = IVFIndex(items, nlist=4, nprobe=4)  # every cell probed: the exact result
    assert ivf.nlist == 4 and ivf.description == "IVF-Flat, nlist=4, nprobe=4"
    scores, approx = ivf.search(queries, 20)
    assert np.array_equal(approx, exact)
    assert (np.diff(scores, axis=1) <= 0).all()  # best first
    assert overlap_at_k(approx, exact) == 1.0
    assert 0.0 < overlap_at_k(IVFIndex(items, nlist=8, nprobe=1).search(queries, 20)[1], exact) <= 1.0


def test_ivf_index_caps_cells_and_pads_short_rows_at_the_end():
    items = _unit(400, 1)
    ivf = IVFIndex(items, nlist=1024, nprobe=1)
    assert ivf.nlist == 400 // 39  # each cell gets >= 39 training points
    scores, ids = ivf.search(_unit(20, 2), 300)  # one cell holds fewer than 300 items
    padded = ids == -1
    assert padded.any() and np.isneginf(scores[padded]).all()
    # Padding only ever follows the items found.
    assert all((~row[np.argmax(row) :]).sum() == 0 for row in padded if row.any())
    same_seed = IVFIndex(items, nlist=1024, nprobe=1).search(_unit(20, 2), 300)[1]
    np.testing.assert_array_equal(same_seed, ids)  # seeded k-means: the same cells every time


def test_bench_ivf_flat_probing_every_cell_is_exact():
    queries, items = _unit(50, 5), _unit(2000, 6)
    ann = IVFFlat(nlist=16)
    ann.build(items)
    assert ann.description == "IVF-Flat, nlist=16" and ann.effort_name == "nprobe"
    _, exact = exact_topk(queries, items, 20)
    assert overlap_at_k(ann.search(queries, 20, effort=16), exact) == 1.0
    assert overlap_at_k(ann.search(queries, 20, effort=1), exact) < 1.0


@pytest.mark.parametrize("effort", [5, 500])
def test_bench_hnsw_finds_the_exact_top_k_with_a_wide_beam(effort):
    queries, items = _unit(30, 7), _unit(500, 8)
    ann = HNSW(m=16, ef_construction=200, efforts=[effort])
    ann.build(items)
    assert ann.efforts == [effort] and ann.description == "HNSW-Flat, M=16, efConstruction=200"
    ids = ann.search(queries, 10, effort)  # efSearch is raised to at least k
    assert ids.shape == (30, 10) and ann.index.hnsw.efSearch == max(effort, 10)
    _, exact = exact_topk(queries, items, 10)
    if effort >= len(items):
        assert overlap_at_k(ids, exact) == 1.0
    else:
        assert 0.5 < overlap_at_k(ids, exact) <= 1.0


@pytest.mark.parametrize(
    "ann",
    [
        IVFScalarRefine(nlist=16, k_factor=4, efforts=[1, 16]),
        IVFPQFastScanRefine(nlist=16, m=32, k_factor=40),
    ],
    ids=["sq8", "pq-fastscan"],
)
def test_bench_ivf_with_exact_re_ranking_finds_the_exact_top_k_probing_every_cell(ann):
    # Every cell probed and a shortlist long enough for the codes' error: re-scored exactly, the
    # exact top k (the ids; the codes only choose the shortlist).
    queries, items = _unit(40, 9, dim=64), _unit(3000, 10, dim=64)
    ann.build(items)
    assert ann.effort_name == "nprobe" and ann.ivf.nlist == 16
    assert ann.description.endswith(f"nlist=16, exact re-rank of {ann.k_factor}k")
    assert 0 < ann.nbytes and ann.index.k_factor == ann.k_factor
    _, exact = exact_topk(queries, items, 10)
    ids = ann.search(queries, 10, effort=16)
    assert overlap_at_k(ids, exact) == 1.0
    assert overlap_at_k(ann.search(queries, 10, effort=1), exact) < 1.0  # one cell of 16: a part


def test_bench_indexes_report_their_bytes():
    items = _unit(2000, 11)
    flat, graph = IVFFlat(nlist=16), HNSW(m=16)
    flat.build(items)
    graph.build(items)
    assert flat.nbytes >= items.nbytes  # the vectors themselves, plus the cells
    assert graph.nbytes > items.nbytes  # the vectors and the graph's links
