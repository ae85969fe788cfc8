"""split: image-level splits (official and random) and oversampling of training positives."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from grounding.data.split import (
    SplitCounts,
    assign_image_splits,
    assign_splits,
    image_pair_counts,
    oversample_positives,
    split_pairs,
    split_parts,
    split_summary,
)
from grounding.errors import DataError


def synthetic_pairs(n_images: int, seed: int = 0) -> pd.DataFrame:
    """Pairs of ``n_images`` images with 5-20 pairs each and positive rates from 0 to ~0.6."""
    rng = np.random.default_rng(seed)
    parts, phrase_id = [], 0
    for index in range(n_images):
        n = int(rng.integers(5, 21))
        rate = rng.uniform(0.0, 0.6)
        labels = (rng.random(n) < rate).astype(np.int8)
        parts.append(
            pd.DataFrame(
                {
                    "phrase_id": phrase_id + np.arange(n) // 4,
                    "region_id": np.arange(n) % 4 + 4 * index,
                    "image_id": f"{index:05d}",
                    "iou": labels * 0.9,
                    "label": labels,
                }
            )
        )
        phrase_id += n // 4 + 1
    return pd.concat(parts, ignore_index=True)


def images_of(pairs: pd.DataFrame) -> pd.DataFrame:
    ids = sorted(pairs["image_id"].unique())
    return pd.DataFrame({"image_id": ids, "split": "train"})


def random_split(pairs: pd.DataFrame, seed: int = 0, fraction: float = 0.15) -> pd.Series:
    return assign_splits(
        images_of(pairs),
        pairs,
        strategy="random",
        val_fraction=fraction,
        test_fraction=fraction,
        seed=seed,
    )


def pairs_table(rows: list[tuple[str, int, int]]) -> pd.DataFrame:
    """Pairs from ``(image_id, phrase_id, label)``; region ids are row numbers."""
    table = pd.DataFrame(rows, columns=["image_id", "phrase_id", "label"])
    table.insert(1, "region_id", np.arange(len(table)))
    table["iou"] = table["label"] * 0.8
    return table[["phrase_id", "region_id", "image_id", "iou", "label"]]


# --- assign_splits --------------------------------------------------------------------------


def test_official_keeps_the_lists_and_gives_none_to_unlisted_images() -> None:
    images = pd.DataFrame(
        {
            "image_id": ["a", "b", "c", "d", "e"],
            "split": ["train", "val", "test", "none", "train"],
        }
    )
    pairs = pairs_table([("d", 0, 1), ("b", 1, 0), ("a", 2, 1), ("c", 3, 1), ("b", 1, 1)])
    split = assign_splits(
        images, pairs, strategy="official", val_fraction=0.5, test_fraction=0.4, seed=3
    )
    # "e" has no pair, so no split
    assert split.to_dict() == {"a": "train", "b": "val", "c": "test", "d": "none"}
    assert split.index.name == "image_id"


def test_official_gives_none_to_a_paired_image_missing_from_the_images_table() -> None:
    images = pd.DataFrame({"image_id": ["a"], "split": ["train"]})
    pairs = pairs_table([("a", 0, 1), ("z", 1, 0)])
    split = assign_splits(
        images, pairs, strategy="official", val_fraction=0.1, test_fraction=0.1, seed=0
    )
    assert split.to_dict() == {"a": "train", "z": "none"}


def test_random_puts_every_paired_image_in_exactly_one_split() -> None:
    pairs = synthetic_pairs(300)
    split = random_split(pairs)
    assert split.index.is_unique
    assert sorted(split.index) == sorted(pairs["image_id"].unique())
    assert set(split) == {"train", "val", "test"}


def test_random_fractions_are_close_to_the_params() -> None:
    split = random_split(synthetic_pairs(1000), fraction=0.2)
    shares = split.value_counts(normalize=True)
    assert shares["val"] == pytest.approx(0.2, abs=0.02)
    assert shares["test"] == pytest.approx(0.2, abs=0.02)
    assert shares["train"] == pytest.approx(0.6, abs=0.02)


@pytest.mark.parametrize("n_images", [30, 100])
def test_random_fractions_are_close_to_the_params_for_small_datasets(n_images: int) -> None:
    split = random_split(synthetic_pairs(n_images), fraction=0.15)
    counts = split.value_counts()
    expected = 0.15 * n_images
    assert abs(counts.get("val", 0) - expected) <= 1.5
    assert abs(counts.get("test", 0) - expected) <= 1.5


def test_random_is_deterministic_for_a_seed_and_differs_for_another() -> None:
    pairs = synthetic_pairs(200)
    first = random_split(pairs, seed=11)
    assert first.equals(random_split(pairs, seed=11))
    other = random_split(pairs, seed=12)
    assert (first != other).sum() > 20


def test_random_splits_have_similar_positive_rates() -> None:
    pairs = synthetic_pairs(1000, seed=5)
    split = random_split(pairs, seed=1)
    rate = pairs.groupby(pairs["image_id"].map(split))["label"].mean()
    overall = pairs["label"].mean()
    assert 0.2 < overall < 0.4
    for name in ("train", "val", "test"):
        assert rate[name] == pytest.approx(overall, abs=0.02), name


@pytest.mark.parametrize(("val", "test"), [(-0.1, 0.1), (0.5, 0.5), (0.7, 0.4)])
def test_random_refuses_bad_fractions(val: float, test: float) -> None:
    pairs = synthetic_pairs(10)
    with pytest.raises(ValueError, match="val_fraction"):
        assign_splits(
            images_of(pairs), pairs, strategy="random", val_fraction=val, test_fraction=test, seed=0
        )


def test_unknown_strategy_is_refused() -> None:
    pairs = synthetic_pairs(5)
    with pytest.raises(ValueError, match="unknown split strategy"):
        assign_splits(
            images_of(pairs), pairs, strategy="kfold", val_fraction=0.1, test_fraction=0.1, seed=0
        )


# --- oversample_positives -------------------------------------------------------------------


def row_counts(table: pd.DataFrame) -> Counter:
    return Counter(table.itertuples(index=False, name=None))


@pytest.mark.parametrize(
    ("n_pos", "n_neg", "share", "expected_pos"),
    [
        (10, 90, 0.5, 90),  # exactly reachable
        (10, 90, 0.3, 39),  # 0.3 * 90 / 0.7 = 38.57 -> 39
        (7, 50, 0.25, 17),  # 16.67 -> 17: each positive twice, 3 of them three times
    ],
)
def test_oversample_reaches_the_share_within_rounding(
    n_pos: int, n_neg: int, share: float, expected_pos: int
) -> None:
    pairs = pairs_table([("a", i, 1) for i in range(n_pos)] + [("a", 100, 0)] * n_neg)
    balanced = oversample_positives(pairs, positive_share=share, rng=np.random.default_rng(0))
    assert int(balanced["label"].sum()) == expected_pos
    assert len(balanced) == expected_pos + n_neg
    assert balanced["label"].mean() == pytest.approx(share, abs=1 / len(balanced))
    # negatives are never dropped nor repeated
    assert row_counts(balanced[balanced["label"] == 0]) == row_counts(pairs[pairs["label"] == 0])
    # every positive is kept, and none is repeated more than one time more than another
    repeats = row_counts(balanced[balanced["label"] == 1])
    assert set(repeats) == set(row_counts(pairs[pairs["label"] == 1]))
    assert max(repeats.values()) - min(repeats.values()) <= 1


def test_oversample_leaves_pairs_already_above_the_share() -> None:
    pairs = pairs_table([("a", i, 1) for i in range(6)] + [("a", 9, 0)] * 4)
    balanced = oversample_positives(pairs, positive_share=0.5, rng=np.random.default_rng(0))
    assert row_counts(balanced) == row_counts(pairs)  # the same rows (shuffled)


def test_oversample_is_deterministic_for_a_generator_seed() -> None:
    pairs = pairs_table([("a", i, int(i % 5 == 0)) for i in range(50)])
    first = oversample_positives(pairs, positive_share=0.5, rng=np.random.default_rng(4))
    second = oversample_positives(pairs, positive_share=0.5, rng=np.random.default_rng(4))
    assert first.equals(second)


def test_oversample_without_positives_is_a_data_error() -> None:
    pairs = pairs_table([("a", 0, 0), ("a", 1, 0)])
    with pytest.raises(DataError, match="no positive"):
        oversample_positives(pairs, positive_share=0.5, rng=np.random.default_rng(0))


@pytest.mark.parametrize("share", [0.0, 1.0, 1.2])
def test_oversample_refuses_a_share_outside_zero_one(share: float) -> None:
    pairs = pairs_table([("a", 0, 1), ("a", 1, 0)])
    with pytest.raises(ValueError, match="positive_share"):
        oversample_positives(pairs, positive_share=share, rng=np.random.default_rng(0))


# --- split_pairs and split_summary ----------------------------------------------------------

SPLIT_OF_IMAGE = pd.Series(
    {"t1": "train", "t2": "train", "v1": "val", "s1": "test", "n1": "none"}, name="split"
)
SPLIT_PAIRS = pairs_table(
    [
        *[("t1", 0, 1), ("t1", 0, 0), ("t1", 0, 0), ("t1", 1, 0)],
        *[("t2", 2, 0), ("t2", 2, 0), ("t2", 3, 0), ("t2", 3, 1)],
        *[("v1", 4, 1), ("v1", 4, 0), ("v1", 4, 0)],
        *[("s1", 5, 0), ("s1", 6, 1)],
        *[("n1", 7, 1), ("n1", 7, 0)],
    ]
)


def test_split_pairs_balances_train_only() -> None:
    tables = split_pairs(SPLIT_PAIRS, SPLIT_OF_IMAGE, train_pos_share=0.5, seed=0)
    assert set(tables) == {"train", "val", "test"}
    # val and test: exactly their pairs, in order
    for name, image_id in [("val", "v1"), ("test", "s1")]:
        expected = SPLIT_PAIRS[SPLIT_PAIRS["image_id"] == image_id].reset_index(drop=True)
        pd.testing.assert_frame_equal(tables[name], expected)
    train = tables["train"]
    # 2 positives, 6 negatives -> 6 positives
    assert (int(train["label"].sum()), int((train["label"] == 0).sum())) == (6, 6)
    assert set(train["image_id"]) == {"t1", "t2"}


def test_split_pairs_leaves_out_none_and_puts_no_image_in_two_splits() -> None:
    tables = split_pairs(SPLIT_PAIRS, SPLIT_OF_IMAGE, train_pos_share=0.5, seed=0)
    images = [set(table["image_id"]) for table in tables.values()]
    assert sum(len(s) for s in images) == len(set.union(*images)) == 4
    assert "n1" not in set.union(*images)


def test_split_pairs_random_no_image_in_two_splits() -> None:
    pairs = synthetic_pairs(200, seed=2)
    tables = split_pairs(pairs, random_split(pairs), train_pos_share=0.5, seed=0)
    images = [set(table["image_id"]) for table in tables.values()]
    assert sum(len(s) for s in images) == len(set.union(*images)) == 200


@pytest.mark.parametrize("empty", ["train", "val", "test"])
def test_split_pairs_refuses_an_empty_split(empty: str) -> None:
    split_of_image = SPLIT_OF_IMAGE.replace(empty, "none")
    with pytest.raises(DataError, match=f"the {empty} split has no pairs"):
        split_pairs(SPLIT_PAIRS, split_of_image, train_pos_share=0.5, seed=0)


def test_split_summary_hand_counts() -> None:
    tables = split_pairs(SPLIT_PAIRS, SPLIT_OF_IMAGE, train_pos_share=0.5, seed=0)
    assert split_summary(tables, SPLIT_OF_IMAGE) == {
        "train": {
            "images": 2,
            "phrases": 4,
            "pairs": 12,
            "positives": 6,
            "negatives": 6,
            "positive_share": 0.5,
        },
        "val": {
            "images": 1,
            "phrases": 1,
            "pairs": 3,
            "positives": 1,
            "negatives": 2,
            "positive_share": 0.3333,
        },
        "test": {
            "images": 1,
            "phrases": 2,
            "pairs": 2,
            "positives": 1,
            "negatives": 1,
            "positive_share": 0.5,
        },
        "none": {"images": 1},
    }


# --- split part by part ----------------------------------------------------------------------


def test_image_pair_counts_add_up_over_parts_that_cut_an_image() -> None:
    pairs = synthetic_pairs(30, seed=5)
    whole = image_pair_counts([pairs])
    cuts = [0, 7, 50, 51, 200, len(pairs)]
    parts = [pairs.iloc[a:b] for a, b in itertools.pairwise(cuts)]
    pd.testing.assert_frame_equal(image_pair_counts(parts), whole)
    rate = pairs.groupby("image_id")["label"].mean()
    np.testing.assert_array_equal(whole["positives"] / whole["pairs"], rate.to_numpy())


@pytest.mark.parametrize("strategy", ["official", "random"])
def test_assign_image_splits_from_counts_is_assign_splits(strategy: str) -> None:
    pairs = synthetic_pairs(120, seed=6)
    images = images_of(pairs).assign(split=lambda t: np.where(t.index % 5 == 0, "val", "train"))
    settings = dict(strategy=strategy, val_fraction=0.2, test_fraction=0.1, seed=3)
    from_pairs = assign_splits(images, pairs, **settings)
    from_counts = assign_image_splits(images, image_pair_counts([pairs]), **settings)
    pd.testing.assert_series_equal(from_counts, from_pairs)


def test_split_parts_give_the_split_pairs_of_the_whole_table() -> None:
    pairs = synthetic_pairs(80, seed=7)
    split_of_image = random_split(pairs)
    whole = split_pairs(pairs, split_of_image, train_pos_share=0.5, seed=4)
    counts = image_pair_counts([pairs])
    cuts = np.r_[
        0, np.sort(np.random.default_rng(0).choice(len(pairs), 6, replace=False)), len(pairs)
    ]
    parts = [pairs.iloc[a:b] for a, b in itertools.pairwise(cuts)]
    streamed = list(split_parts(parts, split_of_image, counts, train_pos_share=0.5, seed=4))
    for name in ("train", "val", "test"):
        joined = pd.concat([part[name] for part in streamed], ignore_index=True)
        pd.testing.assert_frame_equal(joined, whole[name])
    train = whole["train"]
    # each copy right after its row: the rows keep the pairs' order, images consecutive
    order = train["phrase_id"].to_numpy() * 10_000 + train["region_id"].to_numpy()
    assert (np.diff(order) >= 0).all()
    # the same multiset as balancing the training table at once (shuffled there)
    natural = pairs[pairs["image_id"].map(split_of_image) == "train"]
    at_once = oversample_positives(natural, positive_share=0.5, rng=np.random.default_rng(4))
    assert row_counts(train) == row_counts(at_once)
    counted = SplitCounts()
    for name, table in whole.items():
        counted.add(name, table)
    assert counted.summary(split_of_image) == split_summary(whole, split_of_image)
