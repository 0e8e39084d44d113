"""The datamodule on the tiny logs: what reaches a batch (weights, hard negatives), and time hygiene."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from convcg_cli.data.contract import load_tables
from convcg_cli.data.features import DualPositives
from convcg_cli.data.features.encodings import SECONDS_PER_DAY, SplitError, split_by_time
from convcg_cli.data.loading import ImpressionDataModule, InMemoryDataModule, StreamedDataModule
from convcg_cli.errors import ConfigError
from convcg_cli.models.losses import MultiTaskSampledSoftmax, sampled_softmax_loss

TASKS = ["conversion", "engagement"]


@pytest.fixture(scope="module")
def dual_dm(tiny_data):
    dm = ImpressionDataModule(
        str(tiny_data),
        batch_size=64,
        tasks=TASKS,
        positives=DualPositives(engagement_scale=0.3),
        hard_negatives=3,
    )
    dm.setup()
    return dm


def test_split_is_by_whole_days_and_in_order(tiny_data):
    imp = load_tables(tiny_data)["impressions"]
    split = split_by_time(imp, val_days=2, heldout_days=2)
    day = lambda f: f["timestamp"] // SECONDS_PER_DAY  # noqa: E731
    assert day(split.train).max() < day(split.val).min() <= day(split.val).max() < day(split.heldout).min()
    assert split.train.height + split.val.height + split.heldout.height == imp.height


def test_too_few_days_is_a_clear_error(tiny_data):
    imp = load_tables(tiny_data)["impressions"]
    with pytest.raises(SplitError, match="need at least 15 days"):
        split_by_time(imp, val_days=7, heldout_days=7)


def test_batch_weights_reach_the_loss_exactly(dual_dm):
    batch = next(iter(dual_dm.train_dataloader()))
    w = batch["weights"]["conversion"]
    assert set(batch) >= {"user", "item", "item_pos", "log_q", "weights", "hard_pos", "hard_item"}
    # Conversions weigh 1, engagement positives 0.3 * dwell weight (< 0.3), nothing else is an anchor.
    assert torch.all((w == 1) | ((w >= 0) & (w <= 0.3 + 1e-6)))
    # The loss weighs each anchor's cross-entropy by exactly that weight.
    emb = torch.nn.functional.normalize(
        torch.randn(len(w), 8, generator=torch.Generator().manual_seed(0)), dim=-1
    )
    loss_fn = MultiTaskSampledSoftmax({"conversion": 1.0}, temperature=0.1)
    _, logs = loss_fn({"conversion": emb}, {"conversion": emb}, {**batch, "log_q": batch["log_q"]})
    ce = torch.stack(
        [
            sampled_softmax_loss(emb, emb, batch["item_pos"], batch["log_q"], torch.arange(len(w)) == i, 0.1)
            for i in range(len(w))
        ]  # fmt: skip
    )
    expected = (w * torch.nan_to_num(ce)).sum() / w.sum()
    assert logs["conversion/loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_hard_negatives_are_the_users_own_unengaged_training_impressions(dual_dm, tiny_data):
    imp = load_tables(tiny_data)["impressions"]
    train = split_by_time(imp, 2, 2).train
    unengaged = train.filter(~(pl.col("clicked") | pl.col("saved") | pl.col("converted")))
    allowed = set(zip(unengaged["user_id"].to_list(), unengaged["item_id"].to_list(), strict=True))
    for batch in list(dual_dm.train_dataloader())[:3]:
        users = dual_dm.users.user_ids[batch["user"]["user_id"].numpy() - 1]
        hard = batch["hard_pos"].numpy()
        assert hard.shape == (len(users), 3)
        for u, row in zip(users, hard, strict=True):
            for pos in row[row >= 0]:
                assert (int(u), int(dual_dm.items.item_ids[pos])) in allowed
        # the gathered hard-item features are those of the sampled items
        flat = np.clip(hard.reshape(-1), 0, None)
        assert torch.equal(batch["hard_item"]["item_id"], torch.from_numpy(flat + 1))


def test_performance_features_ignore_later_days(tiny_data, tmp_path):
    """Changing anything on validation/held-out days leaves every item feature unchanged."""
    tables = load_tables(tiny_data)
    imp = tables["impressions"]
    cut = (imp["timestamp"].max() // SECONDS_PER_DAY - 3) * SECONDS_PER_DAY
    flipped = imp.with_columns(
        clicked=pl.when(pl.col("timestamp") >= cut).then(True).otherwise(pl.col("clicked")),
        dwell_seconds=pl.when(pl.col("timestamp") >= cut).then(10.0).otherwise(pl.col("dwell_seconds")),
    )
    (tmp_path / "d").mkdir()
    for name, frame in {**tables, "impressions": flipped}.items():
        frame.write_parquet(tmp_path / "d" / f"{name}.parquet")
    a = ImpressionDataModule(str(tiny_data), tasks=TASKS)
    b = ImpressionDataModule(str(tmp_path / "d"), tasks=TASKS)
    a.setup(), b.setup()
    for name in a.items.features:
        assert np.array_equal(a.items.features[name], b.items.features[name]), name


def test_context_switch_drops_surface_features(tiny_data):
    dm = ImpressionDataModule(str(tiny_data), tasks=TASKS, context=[])
    dm.setup()
    assert not {"surface", "subject_item_id", "query_bucket"} & set(dm.user_spec.categorical)


# --------------------------------------------------------------------------------------------------
# One class per data path, chosen by config; data never imports models
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "cls"),
    [([], InMemoryDataModule), (["data/stream=streamed"], StreamedDataModule)],
    ids=["in_memory", "streamed"],
)
def test_data_stream_option_selects_the_class(overrides, cls, tiny_data):
    from hydra.utils import instantiate

    from convcg_cli.config import compose

    cfg = compose("train", [f"data.dir={tiny_data}", *overrides]).cfg
    dm = instantiate(cfg.data, tasks=TASKS)
    assert type(dm) is cls


def test_configs_saved_before_the_split_still_build_their_datamodule(tiny_data, tmp_path):
    old = {"enabled": True, "chunk_rows": 5000, "cache_dir": str(tmp_path)}
    assert type(ImpressionDataModule(str(tiny_data), stream=old, tasks=TASKS)) is StreamedDataModule
    assert type(ImpressionDataModule(str(tiny_data), tasks=TASKS)) is InMemoryDataModule


def test_the_data_layer_imports_no_model_code():
    import ast
    from pathlib import Path

    import convcg_cli.data

    root = Path(convcg_cli.data.__file__).parent
    paths = sorted(root.rglob("*.py"))
    assert {p.parent.name for p in paths} >= {"contract", "importing", "features", "loading"}
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            names += [a.name for a in node.names] if isinstance(node, ast.Import) else []
            where = path.relative_to(root)
            assert not any(n.startswith("convcg_cli.models") for n in names), f"{where} imports {names}"


# --------------------------------------------------------------------------------------------------
# data.end_offset_days: rolling-origin evaluation
# --------------------------------------------------------------------------------------------------


def _without_last_days(tiny_data, out, n_days: int):
    """The tiny logs with their last ``n_days`` logged days removed from impressions."""
    tables = load_tables(tiny_data)
    imp = tables["impressions"]
    last = imp["timestamp"].max() // SECONDS_PER_DAY
    out.mkdir()
    kept = imp.filter(pl.col("timestamp") // SECONDS_PER_DAY <= last - n_days)
    for name, frame in {**tables, "impressions": kept}.items():
        frame.write_parquet(out / f"{name}.parquet")
    return out


def _assert_same_data(a, b) -> None:
    assert a.split_days == b.split_days and a.n_rows == b.n_rows
    for name in a.items.features:
        np.testing.assert_array_equal(a.items.features[name], b.items.features[name], err_msg=name)
    for split in ("val", "heldout"):
        for name, values in a.queries[split].features.items():
            np.testing.assert_array_equal(values, b.queries[split].features[name], err_msg=name)
    for name, values in a.train_set.user.items():
        torch.testing.assert_close(values, b.train_set.user[name])
    torch.testing.assert_close(a.train_set.item_pos, b.train_set.item_pos)
    torch.testing.assert_close(a.train_set.item_log_q, b.train_set.item_log_q)


def test_end_offset_days_is_the_log_without_its_last_days(tiny_data, tmp_path):
    """Dropping the last N days by option == training on logs that end N days earlier: the split,
    item performance, queries, history and training examples never read the dropped days."""
    options = {"tasks": TASKS, "history": {"max_len": 4}, "hard_negatives": 2}
    offset = InMemoryDataModule(str(tiny_data), end_offset_days=2, **options)
    cut = InMemoryDataModule(str(_without_last_days(tiny_data, tmp_path / "cut", 2)), **options)
    full = InMemoryDataModule(str(tiny_data), **options)
    offset.setup(), cut.setup(), full.setup()
    _assert_same_data(offset, cut)
    assert offset.split_days["heldout"][1] == full.split_days["heldout"][1] - 2
    assert offset.split_days["train"][1] == full.split_days["train"][1] - 2
    hard = offset.train_set.hard_negatives, cut.train_set.hard_negatives
    for name in ("start", "count", "items"):
        torch.testing.assert_close(getattr(hard[0], name), getattr(hard[1], name))


def test_streamed_end_offset_days_equals_the_in_memory_one(tiny_data, tmp_path):
    memory = InMemoryDataModule(str(tiny_data), tasks=TASKS, end_offset_days=3)
    stream = {"chunk_rows": 5000, "cache_dir": str(tmp_path)}
    streamed = StreamedDataModule(str(tiny_data), tasks=TASKS, end_offset_days=3, stream=stream)
    memory.setup(), streamed.setup()
    assert streamed.split_days == memory.split_days and streamed.n_rows == memory.n_rows
    for name, values in memory.item_features.items():
        torch.testing.assert_close(streamed.item_features[name], values)
    assert streamed.train_set.n_examples == memory.train_set.n_examples
    for split in ("val", "heldout"):
        assert len(streamed.queries[split]) == len(memory.queries[split])


def test_a_negative_or_too_large_end_offset_is_a_clear_error(tiny_data):
    with pytest.raises(ConfigError, match=r"data.end_offset_days must be >= 0 .* got -1"):
        InMemoryDataModule(str(tiny_data), tasks=TASKS, end_offset_days=-1)
    dm = InMemoryDataModule(str(tiny_data), tasks=TASKS, end_offset_days=30)
    with pytest.raises(SplitError, match="once data.end_offset_days=30 are dropped"):
        dm.setup()


def test_the_old_stream_switch_points_to_the_config_group():
    from convcg_cli.config import compose

    with pytest.raises(ConfigError, match="select it with 'data/stream=streamed'"):
        compose("train", ["data.stream.enabled=true"])
