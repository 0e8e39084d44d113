"""An index as a faiss file: read back without rebuilding, it answers with the same bits as a freshly
built one; the digest names the vectors it was built from."""

from __future__ import annotations

import numpy as np
import pytest

from convcg_cli.index import ExactIndex, IVFIndex, StoredIndex, read_index, vectors_digest, write_index


def _corpus(n: int = 3000, d: int = 9, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    items = rng.standard_normal((n, d)).astype(np.float32)
    queries = rng.standard_normal((40, d)).astype(np.float32)
    items[3] = items[7] = 10 * queries[0]  # query 0's top two, an exact tie: broken by id
    return queries, items


@pytest.mark.parametrize(
    ("kind", "build"),
    [("exact", ExactIndex), ("ivf", lambda items: IVFIndex(items, nlist=32, nprobe=4))],
)
def test_a_saved_index_reads_back_byte_identical_to_a_fresh_build(tmp_path, kind, build):
    queries, items = _corpus()
    path = write_index(build(items), tmp_path / "index.faiss")
    loaded = read_index(path, kind, nprobe=4)
    fresh = build(items)
    assert type(loaded) is type(fresh) and loaded.ntotal == len(items)
    for k in (1, 10, 100):
        fresh_scores, fresh_ids = fresh.search(queries, k)
        scores, ids = loaded.search(queries, k)
        assert np.array_equal(ids, fresh_ids)
        assert scores.tobytes() == fresh_scores.tobytes()  # the same bits, not merely close
    assert loaded.search(queries[:1], 2)[1].tolist() == [[3, 7]]


def test_an_ivf_index_is_read_with_its_cells_and_the_asked_probes(tmp_path):
    _, items = _corpus()
    built = IVFIndex(items, nlist=32, nprobe=4)
    loaded = read_index(write_index(built, tmp_path / "ivf.faiss"), "ivf", nprobe=9)
    assert loaded.nlist == built.nlist and loaded.index.nprobe == 9
    # The cells are the trained ones (k-means is not run again): the same centroids, bit for bit.
    centroids = loaded.quantizer.reconstruct_n(0, loaded.nlist)
    assert centroids.tobytes() == built.quantizer.reconstruct_n(0, built.nlist).tobytes()


def test_reading_a_file_of_another_kind_is_refused(tmp_path):
    _, items = _corpus(n=500)
    path = write_index(ExactIndex(items), tmp_path / "flat.faiss")
    with pytest.raises(ValueError, match="not a ivf index"):
        read_index(path, "ivf")


def test_the_digest_names_the_vectors_their_shape_and_not_their_dtype():
    _, items = _corpus(n=200)
    digest = vectors_digest(items)
    assert digest == vectors_digest(items.astype(np.float64))  # what the index holds: float32
    changed = items.copy()
    changed[199, 8] = np.nextafter(changed[199, 8], np.float32(np.inf))  # one bit of one value
    assert vectors_digest(changed) != digest
    assert vectors_digest(items.reshape(100, 18)) != digest
    assert len(digest) == 64 and int(digest, 16) >= 0  # sha256, hex


def test_a_stored_index_says_why_it_cannot_serve_other_vectors_or_options():
    _, items = _corpus(n=500)
    built = StoredIndex.build(items, {"kind": "ivf", "nlist": 8, "nprobe": 2})
    assert built.options == {"kind": "ivf", "nlist": 8}  # nprobe is a search setting, not a build one
    assert built.stale_for(vectors_digest(items), {"kind": "ivf", "nlist": 8, "nprobe": 5}) == ""
    assert "other item vectors" in built.stale_for(vectors_digest(items[:-1]), {"kind": "ivf", "nlist": 8})
    assert "built with" in built.stale_for(built.digest, {"kind": "ivf", "nlist": 16})
    assert "damaged" in StoredIndex(None, "", {}, "damaged").stale_for(built.digest, {"kind": "exact"})
