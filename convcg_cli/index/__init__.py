"""Item indexes: exact and approximate top-k search over item embeddings, and the retriever on top.

The one place convcg ranks items: evaluation (``convcg eval``, validation), the served model's
``predict``, batch candidate generation (``convcg retrieve``) and the benchmarks all build and search
an index from here. Metrics of the ranked ids live in :mod:`convcg_cli.metrics`.

Modules: :mod:`.checks` (the checks of a cutoff and of an embedding matrix), :mod:`.exact`
(:func:`exact_topk`, :class:`ExactIndex`: blocked GEMM with a threshold top-k; the faiss path it
replaced, kept as the reference; :func:`popularity_topk`), :mod:`.kernels` (exact search's compiled
threshold pass, numba), :mod:`.approximate` (faiss IVF and HNSW:
:class:`IVFIndex` served; :class:`IVFFlat`, :class:`HNSW` and IVF over 8-bit or 4-bit PQ codes with an
exact re-ranking benchmarked along their search knob), :mod:`.retriever` (:func:`build_index`,
:func:`encode_queries`, :class:`Retriever`), :mod:`.stored` (an index as a faiss file, written
atomically and read back without rebuilding; :func:`vectors_digest` of what it was built from).

Ranking convention, followed by every exact search here: items are ordered by descending score, and
equal scores by *ascending item index*. So a positive tied with the k-th item counts as retrieved
exactly when its index is lower than the indices of the tied items it would displace.

faiss, torch and numba (:mod:`.kernels`) are imported inside the functions that need them, so that
importing this package (e.g. for ``convcg --help``) stays cheap.
"""

from convcg_cli.index.approximate import HNSW, IVFFlat, IVFIndex
from convcg_cli.index.checks import PADDING_ID, check_k
from convcg_cli.index.exact import ExactIndex, exact_topk, popularity_topk
from convcg_cli.index.retriever import EMBED_BATCH_SIZE, ItemIndex, Retriever, build_index, encode_queries
from convcg_cli.index.stored import StoredIndex, read_index, vectors_digest, write_index

__all__ = [
    "EMBED_BATCH_SIZE",
    "HNSW",
    "PADDING_ID",
    "ExactIndex",
    "IVFFlat",
    "IVFIndex",
    "ItemIndex",
    "Retriever",
    "StoredIndex",
    "build_index",
    "check_k",
    "encode_queries",
    "exact_topk",
    "popularity_topk",
    "read_index",
    "vectors_digest",
    "write_index",
]
