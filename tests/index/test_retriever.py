"""The retrieval path: ``build_index`` picks the served index, ``Retriever`` embeds in batches and
ranks exactly as the index does."""

import numpy as np
import pytest
import torch

from convcg_cli.index import ExactIndex, IVFIndex, Retriever, build_index, encode_queries


def _embed(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """A stand-in query tower: the feature rows as embeddings, recording each batch's size."""
    _embed.sizes.append(len(batch["x"]))
    return batch["x"].double()  # a tower in another dtype: the retriever casts to float32


_embed.sizes = []


def test_build_index_by_kind():
    items = np.random.default_rng(0).standard_normal((100, 4))
    assert isinstance(build_index(items), ExactIndex)
    ivf = build_index(items, "ivf", nlist=2, nprobe=2)
    assert isinstance(ivf, IVFIndex) and ivf.index.nprobe == 2
    with pytest.raises(ValueError, match="choose exact or ivf"):
        build_index(items, "hnsw")


def test_retriever_embeds_in_batches_and_ranks_like_the_index():
    rng = np.random.default_rng(1)
    items, queries = rng.standard_normal((50, 3)), rng.standard_normal((7, 3)).astype(np.float32)
    _embed.sizes.clear()
    retriever = Retriever(_embed, ExactIndex(items), batch_size=3)
    scores, ids = retriever.topk({"x": queries}, 5)
    assert _embed.sizes == [3, 3, 1]
    expected = ExactIndex(items).search(queries, 5)
    np.testing.assert_array_equal(ids, expected[1])
    np.testing.assert_allclose(scores, expected[0], rtol=1e-6)
    embedded = encode_queries(_embed, {"x": queries}, batch_size=100)
    assert embedded.dtype == np.float32 and embedded.shape == (7, 3)
    assert encode_queries(_embed, {}).shape == (0, 1)
