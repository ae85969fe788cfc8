"""Scores of a grounding model: pair classification at a threshold and phrase Recall@k.

Pair metrics treat every (phrase, region) pair as a binary decision ``score >= threshold``.
Recall@k is the field's grounding score: a phrase is found when one of its ``k`` best-scored
candidate regions has IoU >= 0.5 with its ground truth. Papers use two protocols for a phrase
with several boxes: ANY-box (the ``iou`` column of the pairs: the best IoU over the phrase's
boxes; MDETR's default) and MERGED-box (the IoU with the union of the phrase's boxes,
:func:`merged_iou`; the protocol of most earlier Flickr30k Entities work).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from grounding.boxes import BOX_COLUMNS, aligned_iou

#: The protocol's threshold: a box "finds" a phrase at IoU >= 0.5 with its ground truth.
IOU_THRESHOLD = 0.5


@dataclass(frozen=True)
class PairScores:
    """Precision, recall and F1 of ``score >= threshold`` on labelled pairs."""

    threshold: float
    precision: float
    recall: float
    f1: float
    true_positives: int
    false_positives: int
    false_negatives: int
    true_negatives: int


def pair_scores(labels: np.ndarray, scores: np.ndarray, threshold: float) -> PairScores:
    """Classification scores of ``scores (N,) >= threshold`` against ``labels (N,)`` in {0, 1}.

    Precision is 0 when nothing is predicted positive, recall 0 when there is no positive.
    """
    labels = np.asarray(labels).astype(bool)
    predicted = np.asarray(scores) >= threshold
    tp = int(np.sum(predicted & labels))
    fp = int(np.sum(predicted & ~labels))
    fn = int(np.sum(~predicted & labels))
    tn = int(np.sum(~predicted & ~labels))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return PairScores(threshold, precision, recall, f1, tp, fp, fn, tn)


def threshold_sweep(labels: np.ndarray, scores: np.ndarray) -> pd.DataFrame:
    """Precision, recall and F1 at every distinct score used as the threshold.

    Returns ``threshold, precision, recall, f1`` sorted by threshold (ascending). Computed in
    one pass over the sorted scores, so it is exact for every threshold that changes a decision.
    """
    labels = np.asarray(labels).astype(np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    if len(scores) == 0:
        raise ValueError("cannot sweep a threshold over no pairs")
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_labels = scores[order], labels[order]
    # the last index of each run of equal scores: predicting ">= that score" takes the whole run
    last = np.r_[np.flatnonzero(np.diff(sorted_scores) != 0), len(scores) - 1]
    tp = np.cumsum(sorted_labels)[last]
    predicted = last + 1
    positives = labels.sum()
    precision = tp / predicted
    recall = tp / positives if positives else np.zeros_like(tp, dtype=np.float64)
    denominator = precision + recall
    f1 = np.divide(
        2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0
    )
    sweep = pd.DataFrame(
        {"threshold": sorted_scores[last], "precision": precision, "recall": recall, "f1": f1}
    )
    return sweep.iloc[::-1].reset_index(drop=True)


def best_threshold(sweep: pd.DataFrame) -> float:
    """The threshold of the highest F1 (the highest such threshold on ties)."""
    best = sweep["f1"].to_numpy().max()
    return float(sweep.loc[sweep["f1"] == best, "threshold"].max())


def merged_iou(
    pairs: pd.DataFrame, candidates: pd.DataFrame, ground_truth: pd.DataFrame
) -> np.ndarray:
    """IoU ``(N,)`` of each pair's region with the union box of its phrase's ground-truth
    boxes (MERGED-box). ``pairs`` has ``phrase_id, region_id``; ``candidates`` ``region_id``
    and the box; ``ground_truth`` ``phrase_id`` and the box (one row per box)."""
    union = ground_truth.groupby("phrase_id").agg(
        x1=("x1", "min"), y1=("y1", "min"), x2=("x2", "max"), y2=("y2", "max")
    )
    regions = candidates.set_index("region_id").loc[pairs["region_id"], BOX_COLUMNS]
    truth = union.loc[pairs["phrase_id"], BOX_COLUMNS]
    return aligned_iou(regions.to_numpy(np.float64), truth.to_numpy(np.float64))


def phrase_ranks(
    pairs: pd.DataFrame, scores: np.ndarray, iou: np.ndarray | None = None
) -> pd.DataFrame:
    """For each phrase, the rank of its first region with IoU >= 0.5 among its candidates.

    ``pairs`` has ``phrase_id`` and ``iou`` (one row per candidate); ``scores (N,)`` aligned
    with it; ``iou (N,)``, when given, replaces the ``iou`` column (:func:`merged_iou`).
    Returns ``phrase_id, hit_rank`` where ``hit_rank`` is 1 when the best-scored region is a
    hit, and 0 when no candidate is a hit (the phrase can never be found).
    Ties in score are broken against the hit (a constant model scores no better than chance
    on the worst-case order).
    """
    table = pd.DataFrame(
        {
            "phrase_id": pairs["phrase_id"].to_numpy(),
            "score": np.asarray(scores, dtype=np.float64),
            "hit": (pairs["iou"].to_numpy() if iou is None else np.asarray(iou)) >= IOU_THRESHOLD,
        }
    )
    table = table.sort_values(["phrase_id", "score", "hit"], ascending=[True, False, True])
    table["rank"] = table.groupby("phrase_id").cumcount() + 1
    first_hit = table[table["hit"]].groupby("phrase_id")["rank"].min()
    phrases = pd.Index(np.unique(table["phrase_id"]), name="phrase_id")
    return first_hit.reindex(phrases, fill_value=0).rename("hit_rank").reset_index()


def recall_at_k(ranks: pd.DataFrame, k: int) -> float:
    """Share of phrases found in their top ``k`` regions (``ranks`` from :func:`phrase_ranks`)."""
    hit_rank = ranks["hit_rank"].to_numpy()
    return float(np.mean((hit_rank >= 1) & (hit_rank <= k))) if len(hit_rank) else 0.0


def upper_bound(ranks: pd.DataFrame) -> float:
    """Share of phrases for which some candidate has IoU >= 0.5 (the best any model can do)."""
    return float(np.mean(ranks["hit_rank"].to_numpy() >= 1)) if len(ranks) else 0.0


def recall_at_1_by_type(ranks: pd.DataFrame, phrases: pd.DataFrame) -> dict[str, float]:
    """Recall@1 per entity type; a phrase with two types counts for both, one without a type
    (``types`` empty: data that has none) for none, so untyped data gives ``{}``.

    ``phrases`` has ``phrase_id`` and ``types`` (``/``-joined).
    """
    typed = ranks.merge(phrases[["phrase_id", "types"]], on="phrase_id")
    typed = typed[typed["types"] != ""]
    typed = typed.assign(type=typed["types"].str.split("/")).explode("type")
    found = typed["hit_rank"] == 1
    return {str(name): float(value) for name, value in found.groupby(typed["type"]).mean().items()}


def recall_summary(ranks: pd.DataFrame, ks: Sequence[int]) -> dict[str, float]:
    """``recall_at_<k>`` for each k, plus ``upper_bound`` and the number of phrases."""
    summary = {f"recall_at_{k}": recall_at_k(ranks, k) for k in ks}
    summary["upper_bound"] = upper_bound(ranks)
    summary["phrases"] = len(ranks)
    return summary


def thin(curve: pd.DataFrame, max_points: int) -> pd.DataFrame:
    """At most ``max_points`` evenly spaced rows of ``curve``, first and last kept (for plots)."""
    if len(curve) <= max_points:
        return curve.reset_index(drop=True)
    keep = np.unique(np.linspace(0, len(curve) - 1, max_points).round().astype(int))
    return curve.iloc[keep].reset_index(drop=True)
