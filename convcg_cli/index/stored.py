"""An item index as a file: faiss's own serialisation (no pickle), read back without rebuilding, and
the digest of the item vectors it was built from.

The served model carries its built index (``item_index.faiss`` in the bundle, see
:mod:`convcg_cli.serve.bundle`), so loading the model does not retrain an IVF index's cells:

- :class:`~convcg_cli.index.ExactIndex` is stored as a faiss ``IndexFlatIP`` of its vectors and read
  back into an ``ExactIndex`` of the same vectors (the same search, the same bits);
- :class:`~convcg_cli.index.IVFIndex` is stored as its trained ``IndexIVFFlat`` (cells and lists).

:func:`vectors_digest` names the vectors an index was built from; a reader compares it with the
digest of the vectors it serves and rebuilds when they differ (:class:`StoredIndex`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from convcg_cli.index.approximate import IVFIndex
from convcg_cli.index.checks import as_float32_matrix
from convcg_cli.index.exact import ExactIndex
from convcg_cli.index.retriever import ItemIndex, build_index

# Bytes hashed per update: bounds the copy a non-contiguous slice would need.
_DIGEST_CHUNK_ROWS = 1 << 16


def vectors_digest(vectors: np.ndarray) -> str:
    """sha256 (hex) of an index's item vectors as float32, their shape included: two corpora with the
    same bytes in another shape differ.

    Example:
        >>> vectors_digest(np.zeros((2, 3))) == vectors_digest(np.zeros((2, 3), np.float32))
        True
        >>> vectors_digest(np.zeros((2, 3))) == vectors_digest(np.zeros((3, 2)))
        False
    """
    vectors = np.asarray(vectors, dtype=np.float32)
    digest = hashlib.sha256(f"float32{vectors.shape}".encode())
    for start in range(0, len(vectors), _DIGEST_CHUNK_ROWS):
        digest.update(np.ascontiguousarray(vectors[start : start + _DIGEST_CHUNK_ROWS]).data)
    return digest.hexdigest()


def build_options(options: dict[str, Any]) -> dict[str, Any]:
    """What changes the built index among a bundle's index options (the kind, IVF's ``nlist``); not
    the search settings (``nprobe``), which a loaded index takes as it is read."""
    return {k: v for k, v in options.items() if k != "nprobe"}


def to_faiss(index: ItemIndex) -> Any:
    """The faiss index that stores ``index``: an ``IndexFlatIP`` of an ExactIndex's vectors, an
    IVFIndex's own ``IndexIVFFlat``."""
    import faiss

    if isinstance(index, ExactIndex):
        flat = faiss.IndexFlatIP(index.dim)
        flat.add(index.items[: index.ntotal])
        return flat
    if isinstance(index, IVFIndex):
        return index.index
    raise TypeError(f"Cannot store an index of type {type(index).__name__}; expected ExactIndex or IVFIndex.")


def from_faiss(stored: Any, kind: str, nprobe: int = 16) -> ItemIndex:
    """The convcg index of kind ``kind`` held by the faiss index ``stored`` (see :func:`to_faiss`);
    ValueError when ``stored`` is another kind of index."""
    import faiss

    owner, stored = stored, faiss.downcast_index(stored)
    if stored is not owner:  # the concrete proxy owns the index from now on (``owner`` is dropped)
        owner.this.disown()
        stored.this.own()
    if stored.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise ValueError("the stored index does not rank by inner product")
    if kind == "exact" and isinstance(stored, faiss.IndexFlat):
        return ExactIndex(stored.reconstruct_n(0, stored.ntotal))  # its float32 vectors, as stored
    if kind == "ivf" and isinstance(stored, faiss.IndexIVFFlat):
        return IVFIndex.from_trained(stored, nprobe)
    raise ValueError(f"the stored index is a faiss {type(stored).__name__}, not a {kind} index")


def write_index(index: ItemIndex, path: Path) -> Path:
    """Write ``index`` to ``path`` with faiss's serialisation (see :func:`to_faiss`); a caller that
    replaces a served file writes a temporary one and renames it (``serve.bundle``)."""
    import faiss

    faiss.write_index(to_faiss(index), str(path))
    return path


def read_index(path: Path, kind: str, nprobe: int = 16) -> ItemIndex:
    """The index :func:`write_index` wrote (``nprobe``: an IVF index's probes from now on)."""
    import faiss

    return from_faiss(faiss.read_index(str(path)), kind, nprobe)


@dataclass(frozen=True)
class StoredIndex:
    """A built index with what it was built from: ``digest`` (:func:`vectors_digest` of its vectors)
    and ``options`` (:func:`build_options`). ``index`` is None when it could not be read (``problem``
    says why)."""

    index: ItemIndex | None
    digest: str
    options: dict[str, Any]
    problem: str = ""

    @classmethod
    def build(cls, vectors: np.ndarray, options: dict[str, Any], digest: str | None = None) -> StoredIndex:
        """Build the index ``options`` name (``{"kind": .., **kind options}``) over ``vectors``."""
        vectors = as_float32_matrix(vectors, "item vectors")
        settings = dict(options)
        kind = str(settings.pop("kind", "exact"))
        index = build_index(vectors, kind, **{k: int(v) for k, v in settings.items()})
        return cls(index, digest or vectors_digest(vectors), build_options(options))

    def stale_for(self, digest: str, options: dict[str, Any]) -> str:
        """Why this index cannot serve vectors of ``digest`` with ``options`` ('' when it can)."""
        if self.index is None:
            return self.problem or "it could not be read"
        if self.digest != digest:
            return (
                f"it was built from other item vectors (sha256 {self.digest[:12]}, "
                f"the model's are {digest[:12]})"
            )
        if self.options != build_options(options):
            return f"it was built with {self.options}, the model serves {build_options(options)}"
        return ""
