"""The synthetic generator: contract, determinism, realism ratios and planted structure (tiny preset)."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from convcg_cli.data.contract import load_tables, validate_frames, write_tables
from convcg_cli.data.importing import PRESETS, SURFACES, SynthConfig, generate, synthesize
from convcg_cli.errors import ConfigError, ConvcgError

DAY = 86_400


def _day(imp: pl.DataFrame) -> pl.Expr:
    return ((pl.col("timestamp") - PRESETS["tiny"].start_unix) // DAY).alias("day")


# --------------------------------------------------------------------------------------------------
# Contract and determinism
# --------------------------------------------------------------------------------------------------


def test_tiny_sizes_and_contract(tiny_tables):
    assert {k: df.height for k, df in tiny_tables.items()} == {
        "items": 600,
        "users": 400,
        "impressions": 150_000,
        "user_history": 10_474,  # the engaged rows of 7 pre-log days
    }
    assert validate_frames(tiny_tables) == []


def test_custom_config_validates():
    cfg = dataclasses.replace(PRESETS["tiny"], n_impressions=5_000, n_days=3, start_date="2025-06-01")
    tables = generate(cfg, seed=3)
    assert validate_frames(tables) == []
    ts = tables["impressions"]["timestamp"]
    assert ts.min() >= 1_748_736_000 and ts.max() < 1_748_736_000 + 3 * DAY  # 2025-06-01 UTC


def test_deterministic_per_seed(tiny_tables):
    again = generate("tiny", seed=0)
    other = generate("tiny", seed=1)
    for name, df in tiny_tables.items():
        assert df.equals(again[name]), name
        assert not df.equals(other[name]), name


def test_bad_presets_and_configs():
    with pytest.raises(ConfigError, match="choose one of tiny, small, large"):
        generate("huge")
    with pytest.raises(ConfigError, match="surface_shares must sum to 1"):
        dataclasses.replace(PRESETS["tiny"], surface_shares=(0.5, 0.2, 0.2))
    with pytest.raises(ConfigError, match="n_items >= n_categories"):
        dataclasses.replace(PRESETS["tiny"], n_items=5)


def test_ids_are_shuffled_and_non_contiguous(tiny_tables):
    items = tiny_tables["items"]["item_id"].to_numpy()
    users = tiny_tables["users"]["user_id"].to_numpy()
    for ids in (items, users):
        assert ids.min() >= 0 and np.unique(ids).size == ids.size
        assert ids.max() - ids.min() + 1 > ids.size  # not a contiguous range
    # Popularity does not follow id order.
    counts = tiny_tables["impressions"].group_by("item_id").len()
    rank_corr = np.corrcoef(counts["item_id"].rank().to_numpy(), counts["len"].rank().to_numpy())[0, 1]
    assert abs(rank_corr) < 0.15


# --------------------------------------------------------------------------------------------------
# Realism
# --------------------------------------------------------------------------------------------------


def test_funnel_rates(tiny_tables):
    imp = tiny_tables["impressions"]
    clicks, conversions = imp["clicked"].sum(), imp["converted"].sum()
    assert 0.05 < clicks / imp.height < 0.15
    assert 0.01 < conversions / clicks < 0.03
    assert imp["saved"].sum() < clicks / 2
    assert imp.filter(pl.col("converted") & ~pl.col("clicked")).height == 0


def test_surfaces_behave_differently(tiny_tables):
    imp = tiny_tables["impressions"]
    by = (
        imp.group_by("surface")
        .agg(
            share=pl.len() / imp.height,
            ctr=pl.col("clicked").mean(),
            conv_per_click=pl.col("converted").sum() / pl.col("clicked").sum(),
            conv_rate=pl.col("converted").mean(),
        )
        .sort("surface")
    )
    assert by["surface"].to_list() == ["home_feed", "related_items", "search"]
    assert by["share"].to_list() == pytest.approx([0.60, 0.25, 0.15], abs=0.01)
    assert by["ctr"].to_list() == pytest.approx([0.10, 0.13, 0.18], abs=0.01)
    # Search converts best, per click and per impression.
    assert by["conv_per_click"].arg_max() == 2 and by["conv_rate"].arg_max() == 2


def test_related_items_and_search_carry_their_context(tiny_tables):
    imp = tiny_tables["impressions"]
    cats = tiny_tables["items"].select("item_id", "category_id")
    related = imp.filter(pl.col("surface") == "related_items")
    assert related["subject_item_id"].null_count() == 0
    assert (related["subject_item_id"] != related["item_id"]).all()
    same = (
        related.join(cats, on="item_id")
        .join(
            cats.rename({"item_id": "subject_item_id", "category_id": "subject_category"}),
            on="subject_item_id",
        )
        .select((pl.col("category_id") == pl.col("subject_category")).mean())
        .item()
    )
    assert same > 0.7

    search = imp.filter(pl.col("surface") == "search").join(cats, on="item_id")
    assert search["query_id"].null_count() == 0
    # A query token mostly comes with items of one category.
    purity = (
        search.group_by("query_id", "category_id")
        .len()
        .group_by("query_id")
        .agg(top=pl.col("len").max(), total=pl.col("len").sum())
        .select(pl.col("top").sum() / pl.col("total").sum())
        .item()
    )
    assert purity > 0.75


def test_heavy_tails(tiny_tables):
    imp, items = tiny_tables["impressions"], tiny_tables["items"]
    item_counts = imp.group_by("item_id").len().sort("len", descending=True)["len"]
    assert item_counts.head(6).sum() / imp.height > 0.10  # top 1% of 600 items
    user_counts = imp.group_by("user_id").len().sort("len", descending=True)["len"]
    assert user_counts.head(40).sum() / imp.height > 0.30  # top 10% of users
    adv_sizes = items.group_by("advertiser_id").len().sort("len", descending=True)["len"]
    assert adv_sizes.head(3).sum() / items.height > 0.25  # top 10% of 30 advertisers
    assert items["category_id"].n_unique() == 8


def test_dwell_and_saves(tiny_tables):
    clicks = tiny_tables["impressions"].filter("clicked")
    assert 0.15 < (clicks["dwell_seconds"] < 5).mean() < 0.35  # the bounce mode
    dwell = (
        clicks.group_by("converted").agg(pl.col("dwell_seconds").mean()).sort("converted")["dwell_seconds"]
    )
    assert dwell[1] > 2 * dwell[0]  # converters dwell longer
    assert 10 < clicks.filter(pl.col("dwell_seconds") >= 5)["dwell_seconds"].median() < 60
    imp = tiny_tables["impressions"]
    saved_if_converted = imp.filter("converted")["saved"].mean()
    assert saved_if_converted > 5 * imp["saved"].mean()


def test_stationary_days_with_enough_conversions_for_val_and_heldout(tiny_tables):
    imp = tiny_tables["impressions"]
    per_day = imp.group_by(_day(imp)).agg(n=pl.len(), conversions=pl.col("converted").sum()).sort("day")
    assert per_day["day"].to_list() == list(range(14))
    assert per_day["n"].min() > 0.9 * imp.height / 14
    # Training tests split val = days 10-11 and held-out = days 12-13.
    assert per_day["conversions"].tail(4).min() >= 20


# --------------------------------------------------------------------------------------------------
# Planted structure a model can recover
# --------------------------------------------------------------------------------------------------


def test_late_conversions_follow_earlier_clicked_categories(tiny_tables):
    imp = tiny_tables["impressions"].with_columns(_day(tiny_tables["impressions"]))
    imp = imp.join(tiny_tables["items"].select("item_id", "category_id"), on="item_id")
    early = imp.filter((pl.col("day") < 12) & pl.col("clicked"))
    # Share of each user's early clicks that fall in a category: a personal category profile.
    profile = (
        early.group_by("user_id", "category_id")
        .len()
        .with_columns(share=pl.col("len") / pl.col("len").sum().over("user_id"))
    )
    global_share = early.group_by("category_id").agg(global_share=pl.len() / early.height)
    late = imp.filter((pl.col("day") >= 12) & pl.col("converted"))
    scored = (
        late.join(profile, on=["user_id", "category_id"], how="left")
        .join(global_share, on="category_id")
        .select(pl.col("share").fill_null(0.0).mean(), pl.col("global_share").mean())
    )
    personal, baseline = scored.row(0)
    # 3.2 here; ~1.0 with the latent signals switched off.
    assert personal > 2.0 * baseline


def test_advertisers_carry_conversion_signal(tiny_tables):
    clicks = tiny_tables["impressions"].filter("clicked").join(tiny_tables["items"], on="item_id")
    # Expected conversions of an advertiser if only its categories mattered.
    clicks = clicks.with_columns(category_rate=pl.col("converted").mean().over("category_id"))
    per_adv = clicks.group_by("advertiser_id").agg(
        conv=pl.col("converted").sum(), expected=pl.col("category_rate").sum()
    )
    per_adv = per_adv.filter(pl.col("expected") >= 3)
    chi2 = ((per_adv["conv"] - per_adv["expected"]) ** 2 / per_adv["expected"]).sum()
    # Overdispersion 3.4 here; 1.8 with advertiser_quality_sd=0.
    assert chi2 / (per_adv.height - 1) > 2.5


def test_user_features_are_weakly_informative(tiny_tables):
    users = tiny_tables["users"]
    users = users.with_columns(shuffled_age=users["age_bucket"].sample(fraction=1.0, shuffle=True, seed=0))
    clicks = tiny_tables["impressions"].filter("clicked").join(tiny_tables["items"], on="item_id")
    clicks = clicks.join(users, on="user_id")

    def spread(col: str) -> float:
        """Mean over categories of the std across ``col`` groups of that category's click share."""
        mix = clicks.group_by(col, "category_id").len()
        mix = mix.with_columns(p=pl.col("len") / pl.col("len").sum().over(col))
        return mix.group_by("category_id").agg(pl.col("p").std()).select(pl.col("p").mean()).item()

    # Ratio 1.8 here; ~1.0 with user_feature_signal=0.
    assert spread("age_bucket") > 1.3 * spread("shuffled_age")


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def test_synthesize_writes_loadable_tables_and_provenance(tmp_path, tiny_tables):
    written = synthesize("tiny", tmp_path / "data", seed=0)
    assert all(written[k].equals(tiny_tables[k]) for k in tiny_tables)
    out = tmp_path / "data"
    assert sorted(p.name for p in out.iterdir()) == [
        "impressions.parquet",
        "items.parquet",
        "synth.json",
        "user_history.parquet",
        "users.parquet",
    ]
    info = json.loads((out / "synth.json").read_text())
    assert (info["preset"], info["seed"]) == ("tiny", 0)
    assert info["config"]["n_impressions"] == 150_000
    assert info["rows"] == {"items": 600, "users": 400, "impressions": 150_000, "user_history": 10_474}
    loaded = load_tables(out)
    # loading adds the contract's optional columns the generator leaves out (all null)
    assert all(loaded[k].select(tiny_tables[k].columns).equals(tiny_tables[k]) for k in tiny_tables)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no temp dirs left behind


def _fail_on_second_write(monkeypatch):
    real = pl.DataFrame.write_parquet
    calls = []

    def flaky(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pl.DataFrame, "write_parquet", flaky)


def test_failed_write_leaves_no_partial_directory(tmp_path, monkeypatch, tiny_tables):
    _fail_on_second_write(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        write_tables(tiny_tables, tmp_path / "data")
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_the_existing_directory(tmp_path: Path, monkeypatch, tiny_tables):
    out = write_tables(tiny_tables, tmp_path / "data", {"seed": 0})
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _fail_on_second_write(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        write_tables(generate("tiny", seed=1), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_rewrite_replaces_a_synth_directory_but_not_a_foreign_one(tmp_path, tiny_tables):
    out = write_tables(tiny_tables, tmp_path / "data")
    other = generate("tiny", seed=1)
    write_tables(other, out)
    assert load_tables(out)["impressions"].select(other["impressions"].columns).equals(other["impressions"])

    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ConvcgError, match="refusing to replace"):
        write_tables(tiny_tables, foreign)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


def test_synth_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        PRESETS["tiny"].n_users = 3  # type: ignore[misc]
    assert isinstance(PRESETS["large"], SynthConfig) and PRESETS["large"].n_impressions >= 5_000_000


def test_surfaces_match_the_contract(schemas):
    assert schemas["impressions"].column("surface").allowed == SURFACES
