"""split: assign images (never pairs) to train/val/test, then balance the training pairs.

``official`` keeps the dataset's split lists; ``random`` draws seeded fractions of the images,
stratified by each image's positive rate so that the splits have similar positive rates. Only
the training pairs are balanced, by oversampling positives; validation and test never are.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd

from grounding.errors import DataError
from grounding.schemas import NO_SPLIT, SPLITS

#: Strata of image positive rate for the ``random`` strategy.
_STRATA = 10


def image_pair_counts(parts: Iterable[pd.DataFrame]) -> pd.DataFrame:
    """``pairs, positives`` per paired image (index ``image_id``, sorted), added up over parts
    of the pairs (any cut: an image may span parts)."""
    counted = [
        part.groupby("image_id", sort=False)["label"].agg(pairs="size", positives="sum")
        for part in parts
    ]
    if not counted:
        return pd.DataFrame(
            {"pairs": np.empty(0, np.int64), "positives": np.empty(0, np.int64)},
            index=pd.Index([], name="image_id", dtype=object),
        )
    total = pd.concat(counted).groupby(level=0, sort=True).sum()
    return total.astype(np.int64).rename_axis("image_id")


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
    return assign_image_splits(
        images,
        image_pair_counts([pairs]),
        strategy=strategy,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
    )


def assign_image_splits(
    images: pd.DataFrame,
    counts: pd.DataFrame,
    *,
    strategy: Literal["official", "random"],
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> pd.Series:
    """:func:`assign_splits` from the pairs' :func:`image_pair_counts` (what it needs of the
    pairs: which images are paired and their positive rates)."""
    paired = counts.index.to_numpy()
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
    rate = counts["positives"].to_numpy() / counts["pairs"].to_numpy()
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


def positive_copies(
    n_positives: int, n_negatives: int, *, positive_share: float, rng: np.random.Generator
) -> np.ndarray:
    """How many times ``(n_positives,)`` each positive appears in the balanced pairs, so that
    positives make ``positive_share`` of them: every positive the same whole number of times,
    the remainder drawn without replacement (no positive favoured); 1 each when the pairs are
    already at or above the share (negatives are never dropped)."""
    if not 0.0 < positive_share < 1.0:
        raise ValueError(f"positive_share must be in (0, 1), got {positive_share}")
    if n_positives == 0:
        raise DataError("cannot balance the training pairs: they hold no positive")
    target = round(positive_share * n_negatives / (1.0 - positive_share))
    extra = max(target - n_positives, 0)
    repeats, remainder = divmod(extra, n_positives)
    copies = np.full(n_positives, 1 + repeats, dtype=np.int64)
    copies[rng.choice(n_positives, size=remainder, replace=False)] += 1
    return copies


def oversample_positives(
    pairs: pd.DataFrame, *, positive_share: float, rng: np.random.Generator
) -> pd.DataFrame:
    """Repeat positive pairs until they make ``positive_share`` of the pairs.

    Every positive is repeated the same whole number of times and the remainder is drawn
    without replacement, so no positive is favoured. Pairs already at or above the share are
    returned as they are (negatives are never dropped). The result is shuffled.
    """
    labels = pairs["label"].to_numpy()
    copies = np.ones(len(pairs), dtype=np.int64)
    copies[labels == 1] = positive_copies(
        int((labels == 1).sum()), int((labels == 0).sum()), positive_share=positive_share, rng=rng
    )
    balanced = pairs.iloc[np.repeat(np.arange(len(pairs)), copies)]
    return balanced.iloc[rng.permutation(len(balanced))].reset_index(drop=True)


def split_pairs(
    pairs: pd.DataFrame,
    split_of_image: pd.Series,
    *,
    train_pos_share: float,
    seed: int,
) -> dict[str, pd.DataFrame]:
    """The pairs of each split (``train`` balanced, ``val`` and ``test`` as they are), in
    memory: :func:`split_parts` on one part.

    Images whose split is ``none`` are left out.
    """
    parts = list(
        split_parts(
            [pairs],
            split_of_image,
            image_pair_counts([pairs]),
            train_pos_share=train_pos_share,
            seed=seed,
        )
    )
    return {name: pd.concat([part[name] for part in parts], ignore_index=True) for name in SPLITS}


def split_parts(
    parts: Iterable[pd.DataFrame],
    split_of_image: pd.Series,
    counts: pd.DataFrame,
    *,
    train_pos_share: float,
    seed: int,
) -> Iterator[dict[str, pd.DataFrame]]:
    """Each part of the pairs cut into the splits, ``{split: rows}``, the training rows
    balanced: each training positive repeated as :func:`positive_copies` says (drawn from
    ``seed`` over the training positives in the order of the pairs), every copy right after
    its row, so the rows keep the pairs' order (each image's rows consecutive). ``counts``:
    the pairs' :func:`image_pair_counts`. Images whose split is ``none`` are left out. An
    empty split is a :class:`DataError` at the call, before any part is read.
    """
    split = split_of_image.reindex(counts.index)
    for name in SPLITS:
        if not (split == name).any():
            raise DataError(
                f"the {name} split has no pairs: check the split lists or split fractions"
            )
    train = counts[split == "train"].sum()
    copies = positive_copies(
        int(train["positives"]),
        int(train["pairs"] - train["positives"]),
        positive_share=train_pos_share,
        rng=np.random.default_rng(seed),
    )
    return _balanced_parts(parts, split_of_image, copies)


def _balanced_parts(
    parts: Iterable[pd.DataFrame], split_of_image: pd.Series, copies: np.ndarray
) -> Iterator[dict[str, pd.DataFrame]]:
    seen = 0
    for part in parts:
        split_of_row = part["image_id"].map(split_of_image).to_numpy()
        cut = {}
        for name in SPLITS:
            rows = part[split_of_row == name]
            if name == "train":
                positive = rows["label"].to_numpy() == 1
                repeat = np.ones(len(rows), dtype=np.int64)
                repeat[positive] = copies[seen : seen + int(positive.sum())]
                seen += int(positive.sum())
                rows = rows.iloc[np.repeat(np.arange(len(rows)), repeat)]
            cut[name] = rows.reset_index(drop=True)
        yield cut


@dataclass
class SplitCounts:
    """Images, phrases, pairs and positives of each split, added up part by part."""

    images: dict[str, set] = field(default_factory=lambda: {name: set() for name in SPLITS})
    phrases: dict[str, set] = field(default_factory=lambda: {name: set() for name in SPLITS})
    pairs: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    positives: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))

    def add(self, name: str, table: pd.DataFrame) -> None:
        self.images[name].update(pd.unique(table["image_id"]))
        self.phrases[name].update(pd.unique(table["phrase_id"]).tolist())
        self.pairs[name] += len(table)
        self.positives[name] += int(table["label"].sum())

    def summary(self, split_of_image: pd.Series) -> dict[str, dict[str, int | float]]:
        """Images, phrases, pairs, positives and positive share per split (and images left
        out)."""
        summary: dict[str, dict[str, int | float]] = {}
        for name in SPLITS:
            pairs, positives = self.pairs[name], self.positives[name]
            summary[name] = {
                "images": len(self.images[name]),
                "phrases": len(self.phrases[name]),
                "pairs": pairs,
                "positives": positives,
                "negatives": pairs - positives,
                "positive_share": round(positives / pairs if pairs else float("nan"), 4),
            }
        summary[NO_SPLIT] = {"images": int((split_of_image == NO_SPLIT).sum())}
        return summary


def split_summary(
    tables: dict[str, pd.DataFrame], split_of_image: pd.Series
) -> dict[str, dict[str, int | float]]:
    """Images, phrases, pairs, positives and positive share per split (and images left out)."""
    counts = SplitCounts()
    for name, table in tables.items():
        counts.add(name, table)
    return counts.summary(split_of_image)
