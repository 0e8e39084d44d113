"""Bootstrap CIs and paired differences over users against slow brute-force loops, plus coverage."""

from __future__ import annotations

import numpy as np
import pytest

from convcg_cli.metrics import bootstrap
from convcg_cli.metrics.bootstrap import (
    bootstrap_recall_ci,
    ci_names,
    paired_bootstrap_diff,
    paired_difference_replicates,
    resample_weights,
    resampled_recall,
)
from convcg_cli.metrics.retrieval import positive_hits, recall_at_k


def _clustered(rng, n_users: int, ks=(1, 5)):
    """Hit flags whose rate differs a lot between users (the reason to resample users)."""
    per_user = rng.integers(1, 6, size=n_users)
    users = np.repeat(np.arange(n_users) * 7 + 3, per_user)  # non-contiguous user ids
    rate = np.repeat(rng.beta(0.5, 0.5, size=n_users), per_user)
    u = rng.random(len(users))
    hits = np.stack([u < rate * (0.4 + 0.6 * j / (len(ks) - 1)) for j in range(len(ks))], axis=1)
    return hits, users


def test_positive_hits_match_recall_at_k_and_a_loop():
    rng = np.random.default_rng(0)
    topk = rng.integers(0, 30, size=(12, 8))
    query = rng.integers(0, 12, size=60)
    item = rng.integers(0, 30, size=60)
    query, item = np.r_[query, query[:5]], np.r_[item, item[:5]]  # duplicate pairs count once
    ks = [1, 3, 8, 20]
    pair_query, hits = positive_hits(topk, query, item, ks)
    expected = recall_at_k(topk, query, item, ks)
    np.testing.assert_allclose(hits.mean(axis=0), [expected[k] for k in ks])
    pairs = sorted(set(zip(query.tolist(), item.tolist(), strict=True)))
    assert pair_query.tolist() == [q for q, _ in pairs]
    for p, (q, i) in enumerate(pairs):
        row = topk[q].tolist()
        rank = row.index(i) if i in row else 10**9
        assert hits[p].tolist() == [rank < k for k in ks]


def test_resampled_recall_equals_repeating_positives():
    rng = np.random.default_rng(1)
    hits, users = _clustered(rng, 9)
    weights = rng.integers(0, 4, size=(6, 9))
    got = resampled_recall(hits, users, weights)
    codes = np.unique(users, return_inverse=True)[1]
    for b in range(6):
        rows = [np.flatnonzero(codes == u) for u in range(9) for _ in range(weights[b, u])]
        np.testing.assert_allclose(got[b], hits[np.concatenate(rows)].mean(axis=0))


def test_ci_matches_a_brute_force_bootstrap_loop():
    rng = np.random.default_rng(2)
    hits, users = _clustered(rng, 25)
    ks = [1, 5]
    fast = bootstrap_recall_ci(hits, users, ks, n_boot=4000, seed=3)
    # Slow reference: draw users with replacement, gather their positives, recompute recall.
    loop_rng = np.random.default_rng(4)
    ids = np.unique(users)
    reps = []
    for _ in range(4000):
        drawn = loop_rng.choice(ids, size=len(ids), replace=True)
        rows = np.concatenate([np.flatnonzero(users == u) for u in drawn])
        reps.append(hits[rows].mean(axis=0))
    low, high = np.percentile(np.array(reps), [2.5, 97.5], axis=0)
    for j, k in enumerate(ks):
        assert fast[k][0] == pytest.approx(low[j], abs=0.03)
        assert fast[k][1] == pytest.approx(high[j], abs=0.03)
        assert fast[k][0] <= hits[:, j].mean() <= fast[k][1]


def test_ci_is_seeded_and_independent_of_chunking(monkeypatch):
    rng = np.random.default_rng(5)
    hits, users = _clustered(rng, 40)
    a = bootstrap_recall_ci(hits, users, [1, 5], n_boot=300, seed=7)
    monkeypatch.setattr(bootstrap, "_WEIGHT_CHUNK_CELLS", 100)  # 2 replicates per chunk
    assert bootstrap_recall_ci(hits, users, [1, 5], n_boot=300, seed=7) == a
    assert bootstrap_recall_ci(hits, users, [1, 5], n_boot=300, seed=8) != a


def test_user_resampling_is_wider_than_positive_resampling_when_users_cluster():
    # Each user hits all or none of their 10 positives: 20 independent units, not 200.
    users = np.repeat(np.arange(20), 10)
    hits = np.repeat(np.arange(20) % 2 == 0, 10)[:, None]
    by_user = bootstrap_recall_ci(hits, users, [10], n_boot=2000)[10]
    by_positive = bootstrap_recall_ci(hits, np.arange(200), [10], n_boot=2000)[10]
    assert by_user[1] - by_user[0] > 2 * (by_positive[1] - by_positive[0])


def test_coverage_of_the_true_recall():
    # A finite population of users; each evaluation samples 80 of them. The 95% CI should cover the
    # population's micro recall in roughly 95% of evaluations.
    rng = np.random.default_rng(6)
    n_pop = 20_000
    rate = rng.beta(0.6, 1.2, size=n_pop)
    size = rng.integers(1, 8, size=n_pop)
    truth = float((rate * size).sum() / size.sum())
    covered = 0
    trials = 200
    for t in range(trials):
        chosen = rng.choice(n_pop, size=80, replace=False)
        users = np.repeat(chosen, size[chosen])
        hits = (rng.random(len(users)) < np.repeat(rate[chosen], size[chosen]))[:, None]
        low, high = bootstrap_recall_ci(hits, users, [10], n_boot=400, seed=t)[10]
        covered += low <= truth <= high
    assert 0.88 <= covered / trials <= 0.99


def test_single_user_gives_a_point_interval_and_names():
    hits = np.array([[True], [False], [True]])
    assert bootstrap_recall_ci(hits, np.array([5, 5, 5]), [100], n_boot=50)[100] == (2 / 3, 2 / 3)
    assert ci_names("heldout/conversion/recall_at_100") == (
        "heldout/conversion/recall_at_100_ci_low",
        "heldout/conversion/recall_at_100_ci_high",
    )


@pytest.mark.parametrize(
    "hits, users, kwargs, message",
    [
        (np.zeros((0, 1), dtype=bool), np.zeros(0), {}, "No positives"),
        (np.ones((2, 1)), np.zeros(2), {}, "bool"),
        (np.ones((2, 1), dtype=bool), np.zeros(3), {}, "user_of_positive"),
        (np.ones((2, 2), dtype=bool), np.zeros(2), {}, "2 columns"),
        (np.ones((2, 1), dtype=bool), np.zeros(2), {"n_boot": 0}, "n_boot"),
        (np.ones((2, 1), dtype=bool), np.zeros(2), {"level": 1.0}, "level"),
    ],
)
def test_bad_inputs_are_rejected(hits, users, kwargs, message):
    with pytest.raises(ValueError, match=message):
        bootstrap_recall_ci(hits, users, [10], **kwargs)


def test_paired_replicates_equal_a_brute_force_loop_on_the_same_draws():
    rng = np.random.default_rng(9)
    hits_a, users = _clustered(rng, 7)
    hits_b = rng.random(hits_a.shape) < 0.4
    weights = np.concatenate(list(resample_weights(7, n_boot=50, seed=11)))  # (50, 7)
    got = paired_difference_replicates(hits_a, hits_b, users, weights)
    ids = np.unique(users)
    for b in range(50):
        # Draw user ids[u] weights[b, u] times; every drawn user brings all of its positives.
        drawn = np.repeat(ids, weights[b])
        rows = np.concatenate([np.flatnonzero(users == u) for u in drawn])
        expected = hits_a[rows].mean(axis=0) - hits_b[rows].mean(axis=0)
        assert got[b].tolist() == expected.tolist()  # exact: the same draws, the same counts


def test_paired_bootstrap_uses_the_draws_of_the_seed():
    rng = np.random.default_rng(12)
    hits_a, users = _clustered(rng, 30)
    hits_b = rng.random(hits_a.shape) < 0.5
    result = paired_bootstrap_diff(hits_a, hits_b, users, [1, 5], n_boot=400, seed=3)
    weights = np.concatenate(list(resample_weights(30, n_boot=400, seed=3)))
    reps = paired_difference_replicates(hits_a, hits_b, users, weights)
    low, high = np.percentile(reps, [2.5, 97.5], axis=0)
    for j, k in enumerate([1, 5]):
        d = result[k]
        assert d.k == k and d.difference == pytest.approx(hits_a[:, j].mean() - hits_b[:, j].mean())
        assert (d.low, d.high) == (pytest.approx(low[j]), pytest.approx(high[j]))


def test_paired_ci_excludes_zero_for_a_consistent_gain_and_includes_it_for_noise():
    rng = np.random.default_rng(13)
    users = np.repeat(np.arange(200), 3)
    base = rng.random((600, 1)) < 0.3
    better = base | (rng.random((600, 1)) < 0.2)  # never worse on any positive, better on many
    gain = paired_bootstrap_diff(better, base, users, [10], n_boot=500)[10]
    assert gain.above_zero and gain.low > 0.05
    twin = rng.permutation(base)  # same recall level, unrelated hits
    same = paired_bootstrap_diff(base, base, users, [10], n_boot=200)[10]
    assert (same.difference, same.low, same.high) == (0.0, 0.0, 0.0)
    noise = paired_bootstrap_diff(twin, base, users, [10], n_boot=500)[10]
    assert noise.low < 0 < noise.high and not noise.above_zero


def test_pairing_narrows_the_interval_against_unpaired_bounds():
    # Two rankings that succeed on the same users: the paired interval of their difference is much
    # narrower than the gap between their own (unpaired) intervals would suggest.
    rng = np.random.default_rng(14)
    users = np.repeat(np.arange(100), 4)
    a = np.repeat(rng.random(100) < 0.5, 4)[:, None]
    b = a & (rng.random((400, 1)) < 0.9)
    paired = paired_bootstrap_diff(a, b, users, [10], n_boot=500)[10]
    low_a, high_a = bootstrap_recall_ci(a, users, [10], n_boot=500)[10]
    assert paired.high - paired.low < (high_a - low_a) / 2


def test_resample_weights_are_the_draws_of_the_ci():
    hits = np.array([[True], [False], [True], [False], [True]])
    users = np.array([0, 1, 2, 3, 4])
    weights = np.concatenate(list(resample_weights(5, n_boot=300, seed=4)))
    reps = resampled_recall(hits, users, weights)
    low, high = np.percentile(reps, [2.5, 97.5], axis=0)
    assert bootstrap_recall_ci(hits, users, [10], n_boot=300, seed=4)[10] == (low[0], high[0])


def test_paired_inputs_must_be_the_same_positives():
    with pytest.raises(ValueError, match="not the same positives"):
        paired_bootstrap_diff(np.ones((3, 1), bool), np.ones((3, 2), bool), np.arange(3), [10])


def _fresh_draws(n_users: int, n_boot: int, seed: int) -> list[np.ndarray]:
    """The chunks of draws as numpy's generator gives them (the kept draws set aside)."""
    rng = np.random.default_rng(seed)
    chunk = max(1, bootstrap._WEIGHT_CHUNK_CELLS // n_users)
    uniform = np.full(n_users, 1.0 / n_users)
    return [
        rng.multinomial(n_users, uniform, size=min(chunk, n_boot - start))
        for start in range(0, n_boot, chunk)
    ]


def test_kept_draws_are_given_again_chunk_by_chunk(monkeypatch):
    monkeypatch.setattr(bootstrap, "_WEIGHT_CHUNK_CELLS", 1000)  # 3 chunks of 333 users' draws
    monkeypatch.setattr(bootstrap, "_draw_cache", bootstrap.OrderedDict())
    expected = _fresh_draws(333, 7, seed=5)
    first, again = list(resample_weights(333, 7, 5)), list(resample_weights(333, 7, 5))
    assert (333, 7, 5) in bootstrap._draw_cache
    for chunks in (first, again):
        assert [c.shape for c in chunks] == [c.shape for c in expected] == [(3, 333), (3, 333), (1, 333)]
        assert all(c.dtype == e.dtype and np.array_equal(c, e) for c, e in zip(chunks, expected, strict=True))
    again[0][:] = 99  # what a caller does with its chunk does not reach the kept draws
    assert np.array_equal(next(resample_weights(333, 7, 5)), expected[0])


def test_draws_stopped_early_are_not_kept_and_the_oldest_go_first(monkeypatch):
    monkeypatch.setattr(bootstrap, "_WEIGHT_CHUNK_CELLS", 1000)
    monkeypatch.setattr(bootstrap, "_draw_cache", bootstrap.OrderedDict())
    next(resample_weights(100, 50, 0))  # the first chunk only
    assert not bootstrap._draw_cache
    monkeypatch.setattr(bootstrap, "_DRAW_CACHE_BYTES", 2 * 100 * 50)  # room for two
    for seed in (1, 2, 3):
        list(resample_weights(100, 50, seed))
    assert list(bootstrap._draw_cache) == [(100, 50, 2), (100, 50, 3)]
    for seed in (1, 2, 3):  # the same draws, kept or drawn again
        assert np.array_equal(
            np.concatenate(list(resample_weights(100, 50, seed))), np.concatenate(_fresh_draws(100, 50, seed))
        )


def test_integer_draws_are_summed_exactly_as_the_float_product(monkeypatch):
    # The draws (uint8 when kept, int64 when just drawn) are summed with integers in a compiled pass;
    # every figure must equal the float64 matrix product of the same counts, bit for bit.
    monkeypatch.setattr(bootstrap, "_WEIGHT_CHUNK_CELLS", 1000)
    monkeypatch.setattr(bootstrap, "_draw_cache", bootstrap.OrderedDict())
    hits, users = _clustered(np.random.default_rng(8), 300, ks=(1, 5, 20))
    hit_count, pos_count = bootstrap._per_user_counts(hits.astype(np.float64), users)
    fresh = list(bootstrap._draws(len(pos_count), 40, 2))
    kept = list(bootstrap._draws(len(pos_count), 40, 2))
    assert {c.dtype for c in fresh} == {np.dtype(np.int64)}
    assert {c.dtype for c in kept} == {np.dtype(np.uint8)}
    assert not any(c.flags.writeable for c in kept)  # views of the kept draws: read-only
    for chunk in (*fresh, *kept):
        floats = chunk.astype(np.float64)
        expected = (floats @ hit_count) / (floats @ pos_count)[:, None]
        np.testing.assert_array_equal(bootstrap._weighted_recall(hit_count, pos_count, chunk), expected)
    # A replicate drawing no user with a positive: NaN either way (0 / 0).
    none = np.zeros((1, len(pos_count)), dtype=np.uint8)
    assert np.isnan(bootstrap._weighted_recall(hit_count, pos_count, none)).all()
    # And the intervals are the ones the float path gives.
    ci = bootstrap_recall_ci(hits, users, [1, 5, 20], n_boot=40, seed=2)
    replicates = np.concatenate([resampled_recall(hits, users, w) for w in resample_weights(300, 40, 2)])
    low, high = bootstrap._percentile_interval(replicates, 0.95)
    assert ci == {k: (float(lo), float(hi)) for k, lo, hi in zip([1, 5, 20], low, high, strict=True)}


def test_a_reused_draw_is_kept_over_an_older_one_and_only_draws_that_fit_are_kept(monkeypatch):
    monkeypatch.setattr(bootstrap, "_WEIGHT_CHUNK_CELLS", 1000)
    monkeypatch.setattr(bootstrap, "_draw_cache", bootstrap.OrderedDict())
    monkeypatch.setattr(bootstrap, "_DRAW_CACHE_BYTES", 2 * 100 * 50)  # room for two
    for seed in (1, 2, 1, 3):  # seed 1 used again: seed 2 is now the oldest, and goes
        list(resample_weights(100, 50, seed))
    assert list(bootstrap._draw_cache) == [(100, 50, 1), (100, 50, 3)]
    # Draws are kept when their bytes (users x replicates) fit the room, and not one byte over it;
    # draws that do not fit are not even copied aside while they are drawn (a million users' would
    # take a gigabyte).
    empty = np.empty
    for room, kept in ((100 * 50, True), (100 * 50 - 1, False)):
        held = []
        monkeypatch.setattr(bootstrap, "_draw_cache", bootstrap.OrderedDict())
        monkeypatch.setattr(bootstrap, "_DRAW_CACHE_BYTES", room)

        def recording(*shape, held=held, **kw):
            held.append(shape)
            return empty(*shape, **kw)

        monkeypatch.setattr(bootstrap.np, "empty", recording)
        list(resample_weights(100, 50, 0))
        monkeypatch.setattr(bootstrap.np, "empty", empty)
        assert ((100, 50, 0) in bootstrap._draw_cache) is kept
        assert held == ([((50, 100),)] if kept else [])


@pytest.mark.parametrize("largest, kept", [(255, True), (256, False)])
def test_draws_are_kept_only_while_every_count_fits_a_byte(monkeypatch, largest, kept):
    # A uniform draw of U users practically never counts one user 256 times: numpy's generator is
    # replaced by one drawing a given largest count.
    class Generator:
        def multinomial(self, n, pvals, size):
            counts = np.zeros((size, len(pvals)), dtype=np.int64)
            counts[:, 0] = largest
            return counts

    monkeypatch.setattr(bootstrap, "_draw_cache", bootstrap.OrderedDict())
    monkeypatch.setattr(bootstrap.np.random, "default_rng", lambda seed: Generator())
    drawn = np.concatenate(list(resample_weights(300, 4, 0)))
    assert ((300, 4, 0) in bootstrap._draw_cache) is kept
    assert drawn[:, 0].tolist() == [largest] * 4 and np.array_equal(
        np.concatenate(list(resample_weights(300, 4, 0))), drawn
    )


def test_weighted_counts_is_the_integer_matrix_product():
    from convcg_cli.metrics.kernels import weighted_counts

    rng = np.random.default_rng(3)
    counts = rng.integers(0, 50, (4, 37))
    for dtype in (np.uint8, np.int64):
        weights = rng.integers(0, 9, (6, 37)).astype(dtype)
        np.testing.assert_array_equal(weighted_counts(weights, counts), weights.astype(np.int64) @ counts.T)
