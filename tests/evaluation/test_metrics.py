"""Threshold sweep, pair scores and Recall@k against hand-computed examples."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from grounding.evaluation.metrics import (
    IOU_THRESHOLD,
    best_threshold,
    pair_scores,
    phrase_ranks,
    recall_at_1_by_type,
    recall_at_k,
    recall_summary,
    thin,
    threshold_sweep,
)


def test_pair_scores_by_hand() -> None:
    labels = np.array([1, 1, 0, 0, 1])
    scores = np.array([0.9, 0.4, 0.6, 0.1, 0.7])
    # at 0.5: predicted 1,0,1,0,1 -> tp=2 (0.9, 0.7), fp=1 (0.6), fn=1 (0.4), tn=1
    result = pair_scores(labels, scores, 0.5)
    assert (result.true_positives, result.false_positives) == (2, 1)
    assert (result.false_negatives, result.true_negatives) == (1, 1)
    assert result.precision == pytest.approx(2 / 3)
    assert result.recall == pytest.approx(2 / 3)
    assert result.f1 == pytest.approx(2 / 3)


def test_pair_scores_with_nothing_predicted_is_zero_not_nan() -> None:
    result = pair_scores(np.array([1, 0]), np.array([0.1, 0.2]), 0.9)
    assert (result.precision, result.recall, result.f1) == (0.0, 0.0, 0.0)


def test_threshold_sweep_matches_pair_scores_at_every_threshold() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.random(200), 2)  # ties on purpose
    sweep = threshold_sweep(labels, scores)
    assert sweep["threshold"].is_monotonic_increasing
    assert len(sweep) == len(np.unique(scores))
    for row in sweep.itertuples():
        expected = pair_scores(labels, scores, row.threshold)
        assert row.precision == pytest.approx(expected.precision)
        assert row.recall == pytest.approx(expected.recall)
        assert row.f1 == pytest.approx(expected.f1)


def test_best_threshold_by_hand() -> None:
    labels = np.array([1, 1, 0, 0])
    scores = np.array([0.8, 0.6, 0.7, 0.2])
    # >=0.8: P=1 R=.5 F1=.667; >=0.7: P=.5 R=.5 F1=.5; >=0.6: P=.667 R=1 F1=.8; >=0.2: F1=.667
    sweep = threshold_sweep(labels, scores)
    assert best_threshold(sweep) == pytest.approx(0.6)
    assert sweep["f1"].max() == pytest.approx(0.8)


def _pairs(rows: list[tuple[int, float]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["phrase_id", "iou"])


def test_recall_at_k_any_box_and_several_boxes() -> None:
    # phrase 1: best-scored region hits (IoU 0.6) -> rank 1
    # phrase 2: two ground-truth boxes; its two hits (IoU 1.0, 0.5) are ranked 2nd and 3rd
    # phrase 3: no candidate reaches IoU 0.5 -> never found (counts against the upper bound)
    pairs = _pairs([(1, 0.6), (1, 0.1), (2, 0.2), (2, 1.0), (2, 0.5), (3, 0.49), (3, 0.0)])
    scores = np.array([0.9, 0.2, 0.95, 0.5, 0.4, 0.9, 0.1])
    ranks = phrase_ranks(pairs, scores)
    assert ranks.set_index("phrase_id")["hit_rank"].to_dict() == {1: 1, 2: 2, 3: 0}
    assert recall_at_k(ranks, 1) == pytest.approx(1 / 3)
    assert recall_at_k(ranks, 2) == pytest.approx(2 / 3)
    summary = recall_summary(ranks, (1, 5))
    assert summary["recall_at_5"] == pytest.approx(2 / 3)
    assert summary["upper_bound"] == pytest.approx(2 / 3)
    assert summary["phrases"] == 3


def test_a_hit_is_an_iou_of_the_protocol_threshold_or_more() -> None:
    assert IOU_THRESHOLD == 0.5
    pairs = _pairs([(1, 0.5), (1, 0.0), (2, 0.4999), (2, 0.0)])
    ranks = phrase_ranks(pairs, np.array([0.1, 0.9, 0.9, 0.1]))
    assert ranks.set_index("phrase_id")["hit_rank"].to_dict() == {1: 2, 2: 0}


def test_ties_are_broken_against_the_hit() -> None:
    pairs = _pairs([(1, 0.0), (1, 0.9), (1, 0.0)])
    ranks = phrase_ranks(pairs, np.array([0.5, 0.5, 0.5]))
    assert ranks["hit_rank"].tolist() == [3]


def test_recall_at_1_by_type_counts_a_two_type_phrase_for_both() -> None:
    pairs = _pairs([(1, 0.9), (1, 0.0), (2, 0.0), (2, 0.9)])
    scores = np.array([0.9, 0.1, 0.9, 0.1])  # phrase 1 found, phrase 2 missed
    phrases = pd.DataFrame({"phrase_id": [1, 2], "types": ["vehicles/scene", "scene"]})
    by_type = recall_at_1_by_type(phrase_ranks(pairs, scores), phrases)
    assert by_type == {"scene": 0.5, "vehicles": 1.0}


def test_sweeping_no_pairs_is_refused() -> None:
    with pytest.raises(ValueError, match="no pairs"):
        threshold_sweep(np.array([]), np.array([]))


def test_recall_of_no_phrases_is_zero() -> None:
    ranks = phrase_ranks(_pairs([]), np.array([]))
    assert recall_summary(ranks, (1,)) == {"recall_at_1": 0.0, "upper_bound": 0.0, "phrases": 0}


def test_thin_keeps_ends_and_caps_rows() -> None:
    curve = pd.DataFrame({"x": np.arange(1000)})
    thinned = thin(curve, 50)
    assert len(thinned) <= 50
    assert thinned["x"].iloc[0] == 0 and thinned["x"].iloc[-1] == 999
    assert len(thin(curve.head(10), 50)) == 10
