"""What the baselines learn from, recounted from the tables with plain loops (``make mutate``).

On the tiny logs with the user history read: the popularity scores with the history's conversions
added, and the share of last-day conversions that repeat an earlier engagement.
"""

from __future__ import annotations

from collections import Counter

import polars as pl
import pytest

from convcg_cli.baselines import training_history
from convcg_cli.builders import build_datamodule
from convcg_cli.config import compose
from convcg_cli.data.features.history import ACTION_CONVERSION
from tests.conftest import TINY_SPLIT

TASKS = ["conversion", "engagement"]


@pytest.fixture(scope="module")
def dm_and_history(tiny_data):
    cfg = compose("train", [f"data.dir={tiny_data}", TINY_SPLIT, "data.use_user_history=true"]).cfg
    dm = build_datamodule(cfg, TASKS, stage="validate")
    return dm, training_history(dm)


def test_history_popularity_adds_the_history_conversions_to_the_counts(dm_and_history):
    dm, hist = dm_and_history
    _, hist_item, action = dm.history_pairs
    extra = Counter(int(i) for i, a in zip(hist_item, action, strict=True) if a == ACTION_CONVERSION)
    assert extra  # the tiny logs' history holds conversions
    perf = dm.items.performance
    keys = [
        (int(c) + extra.get(j, 0), int(k), int(n))
        for j, (c, k, n) in enumerate(
            zip(perf["conversions"], perf["clicks"], perf["impressions"], strict=True)
        )
    ]
    rank = {key: r + 1 for r, key in enumerate(sorted(set(keys)))}  # equal counts, equal scores
    assert hist.history_popularity.tolist() == [rank[key] for key in keys]


def test_repeat_share_is_recounted_from_the_training_window(dm_and_history, tiny_data):
    dm, hist = dm_and_history
    first, last_train = dm.split_days["train"]
    imp = pl.read_parquet(tiny_data / "impressions.parquet").with_columns(day=pl.col("timestamp") // 86_400)
    window = imp.filter(pl.col("day").is_between(first, last_train))
    engaged = window.filter(pl.col("converted") | pl.col("clicked") | pl.col("saved"))
    last = engaged["day"].max()
    earlier = set(engaged.filter(pl.col("day") < last).select("user_id", "item_id").iter_rows())
    hist_user, hist_item, _ = dm.history_pairs
    earlier |= {
        (int(dm.users.user_ids[u]), int(dm.items.item_ids[i]))
        for u, i in zip(hist_user, hist_item, strict=True)
    }
    targets = list(
        engaged.filter((pl.col("day") == last) & pl.col("converted")).select("user_id", "item_id").iter_rows()
    )
    assert targets
    assert hist.repeat_share == pytest.approx(sum(t in earlier for t in targets) / len(targets))
