"""split: assign images (never pairs) to train/val/test, then balance the training pairs.

``official`` keeps the dataset's split lists; ``random`` draws seeded fractions of the images,
stratified by each image's positive rate so that the splits have similar positive rates. Only
the training pairs are balanced, by oversampling positives; validation and test never are.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd

from grounding.errors import DataError
from grounding.schemas import NO_SPLIT, SPLITS

#: Strata of image positive rate for the ``random`` strategy.
_STRATA = 10


def assign_splits(
    images: pd.DataFrame,
    pairs: pd.DataFrame,
    *,
    strategy: Literal["official", "random"],
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> pd.Series:
    """The split of each paired image: a Series indexed by ``image_id``.

    ``images`` is parse's table (its ``split`` column is the official one),
    ``pairs`` pair's. Under ``official`` a paired image in no split list gets
    ``none``; under ``random`` every paired image gets a split.
    """
    paired = np.sort(pairs["image_id"].unique())
    if strategy == "official":
        official = images.set_index("image_id")["split"]
        return official.reindex(paired).fillna(NO_SPLIT).rename("split")
    if strategy != "random":
        raise ValueError(f"unknown split strategy {strategy!r}")
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise ValueError(
            f"val_fraction and test_fraction must be >= 0 with a sum below 1, got "
            f"{val_fraction} and {test_fraction}"
        )
    rng = np.random.default_rng(seed)
    rate = pairs.groupby("image_id")["label"].mean().reindex(paired).to_numpy()
    # Stratify by systematic sampling: shuffle the images within strata of positive rate,
    # give each its quantile within its stratum, and deal the splits out in quantile order.
    # Every stratum then feeds each split in proportion, and the split sizes are exact.
    ranks = pd.Series(rate).rank(method="first").to_numpy()
    stratum = np.floor((ranks - 1) / len(rate) * _STRATA)
    quantile = np.empty(len(rate))
    for value in np.unique(stratum):
        members = np.flatnonzero(stratum == value)
        quantile[members] = (rng.permutation(len(members)) + rng.random()) / len(members)
    order = np.argsort(quantile, kind="stable")
    n_test = round(len(order) * test_fraction)
    n_val = round(len(order) * val_fraction)
    split = pd.Series("train", index=pd.Index(paired, name="image_id"), name="split")
    split.iloc[order[:n_test]] = "test"
    split.iloc[order[n_test : n_test + n_val]] = "val"
    return split


def oversample_positives(
    pairs: pd.DataFrame, *, positive_share: float, rng: np.random.Generator
) -> pd.DataFrame:
    """Repeat positive pairs until they make ``positive_share`` of the pairs.

    Every positive is repeated the same whole number of times and the remainder is drawn
    without replacement, so no positive is favoured. Pairs already at or above the share are
    returned as they are (negatives are never dropped). The result is shuffled.
    """
    if not 0.0 < positive_share < 1.0:
        raise ValueError(f"positive_share must be in (0, 1), got {positive_share}")
    positives = pairs[pairs["label"] == 1]
    negatives = pairs[pairs["label"] == 0]
    if len(positives) == 0:
        raise DataError("cannot balance the training pairs: they hold no positive")
    target = round(positive_share * len(negatives) / (1.0 - positive_share))
    extra = max(target - len(positives), 0)
    repeats, remainder = divmod(extra, len(positives))
    parts = [pairs] + [positives] * repeats
    parts.append(positives.iloc[rng.choice(len(positives), size=remainder, replace=False)])
    balanced = pd.concat(parts, ignore_index=True)
    return balanced.iloc[rng.permutation(len(balanced))].reset_index(drop=True)


def split_pairs(
    pairs: pd.DataFrame,
    split_of_image: pd.Series,
    *,
    train_pos_share: float,
    seed: int,
) -> dict[str, pd.DataFrame]:
    """The pairs of each split (``train`` balanced, ``val`` and ``test`` as they are).

    Images whose split is ``none`` are left out.
    """
    split = pairs["image_id"].map(split_of_image)
    tables = {name: pairs[split == name].reset_index(drop=True) for name in SPLITS}
    for name, table in tables.items():
        if table.empty:
            raise DataError(
                f"the {name} split has no pairs: check the split lists or split fractions"
            )
    tables["train"] = oversample_positives(
        tables["train"], positive_share=train_pos_share, rng=np.random.default_rng(seed)
    )
    return tables


def split_summary(
    tables: dict[str, pd.DataFrame], split_of_image: pd.Series
) -> dict[str, dict[str, int | float]]:
    """Images, phrases, pairs, positives and positive share per split (and images left out)."""
    summary: dict[str, dict[str, int | float]] = {}
    for name, table in tables.items():
        summary[name] = {
            "images": int(table["image_id"].nunique()),
            "phrases": int(table["phrase_id"].nunique()),
            "pairs": len(table),
            "positives": int(table["label"].sum()),
            "negatives": int((table["label"] == 0).sum()),
            "positive_share": round(float(table["label"].mean()), 4),
        }
    summary[NO_SPLIT] = {"images": int((split_of_image == NO_SPLIT).sum())}
    return summary
