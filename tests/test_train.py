"""The matching head, its losses and the training loop."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from grounding.errors import DataError
from grounding.metrics import phrase_ranks, recall_at_k
from grounding.model import (
    HeadConfig,
    MatchingHead,
    PairFeatures,
    check_trained_on,
    head_from_state,
    head_state,
    score_pairs,
)
from grounding.train import listwise_loss, phrase_groups, repeated_pair_loss, train_head

SETTINGS = dict(
    rank_weight=0.0,
    epochs=8,
    batch_size=16,
    learning_rate=3e-3,
    weight_decay=0.0,
    hidden=32,
    dropout=0.0,
    seed=0,
)


def toy_problem(n_images: int, seed: int) -> tuple[PairFeatures, pd.DataFrame]:
    """Images with 4 regions of random 'colours'; each phrase names one region's colour.

    Region features are the colour one-hot plus noise; phrase features the one-hot of the
    colour it names: learnable only by matching the two.
    """
    rng = np.random.default_rng(seed)
    colours, regions, rows, phrase_vectors = 6, [], [], []
    for image in range(n_images):
        palette = rng.choice(colours, 4, replace=False)
        target = rng.integers(4)
        phrase_id = image
        phrase_vectors.append(np.eye(colours)[palette[target]])
        for slot, colour in enumerate(palette):
            region_id = len(regions)
            regions.append(np.eye(colours)[colour] + rng.normal(0, 0.1, colours))
            label = int(slot == target)
            rows.append((phrase_id, region_id, str(image), float(label), label))
    pairs = pd.DataFrame(rows, columns=["phrase_id", "region_id", "image_id", "iou", "label"])
    features = PairFeatures(
        np.asarray(regions, np.float32),
        np.asarray(phrase_vectors, np.float32),
        pd.Series(np.arange(n_images), index=np.arange(n_images)),
    )
    return features, pairs


def test_head_scores_one_logit_per_pair() -> None:
    head = MatchingHead(HeadConfig(region_dim=5, phrase_dim=3, hidden=8, dropout=0.0))
    logits = head(torch.zeros(7, 5), torch.zeros(7, 3))
    assert logits.shape == (7,)


def test_head_state_round_trip_gives_the_same_scores() -> None:
    features, pairs = toy_problem(20, seed=1)
    head = MatchingHead(HeadConfig(6, 6, 16, 0.0)).eval()
    again = head_from_state(head_state(head))
    np.testing.assert_array_equal(
        score_pairs(head, features, pairs), score_pairs(again, features, pairs)
    )


def test_rows_of_unknown_phrase_raise() -> None:
    features, pairs = toy_problem(3, seed=1)
    with pytest.raises(DataError, match="phrases without features"):
        features.rows(pairs.assign(phrase_id=99))


def test_listwise_loss_by_hand() -> None:
    logits = torch.tensor([[2.0, 0.0, 0.0], [1.0, 1.0, 5.0]])
    labels = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    valid = torch.tensor([[True, True, False], [True, True, True]])
    # row 0: padding ignored: -log(e^2 / (e^2 + e^0)); row 1: two positives: -log(2e / (2e + e^5))
    row0 = -math.log(math.exp(2) / (math.exp(2) + 1))
    row1 = -math.log(2 * math.e / (2 * math.e + math.exp(5)))
    assert float(listwise_loss(logits, labels, valid)) == pytest.approx((row0 + row1) / 2, rel=1e-6)


def test_phrase_groups_pad_and_count_oversampled_duplicates() -> None:
    features, pairs = toy_problem(3, seed=2)
    doubled = pd.concat([pairs, pairs[pairs["label"] == 1]])
    groups = phrase_groups(features, doubled)
    assert groups.regions.shape == (3, 4)
    assert groups.valid.all()
    assert groups.labels.sum(axis=1).tolist() == [1, 1, 1]
    # each positive is there twice, each negative once
    np.testing.assert_array_equal(groups.counts, 1 + groups.labels)
    assert groups.images.tolist() == [0, 1, 2]


def test_phrase_groups_pad_phrases_with_fewer_candidates() -> None:
    features, pairs = toy_problem(2, seed=2)
    fewer = pairs.drop(index=pairs.index[(pairs["phrase_id"] == 1) & (pairs["label"] == 0)][:2])
    groups = phrase_groups(features, fewer)
    assert groups.counts.sum(axis=1).tolist() == [4, 2]
    assert groups.valid.sum() == len(fewer)


def test_repeated_pair_loss_equals_the_loss_over_repeated_rows() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.3, 1.5, 0.0]])
    labels = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    counts = torch.tensor([[3.0, 1.0, 1.0], [1.0, 2.0, 0.0]])  # last one: padding
    repeats = counts.flatten().long()
    rows = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(2.5))(
        logits.flatten().repeat_interleave(repeats), labels.flatten().repeat_interleave(repeats)
    )
    got = repeated_pair_loss(logits, labels, counts, pos_weight=2.5)
    assert float(got) == pytest.approx(float(rows), rel=1e-6)


def test_training_learns_the_toy_problem_and_is_deterministic() -> None:
    features, pairs = toy_problem(300, seed=0)
    train, val = pairs[pairs["phrase_id"] < 240], pairs[pairs["phrase_id"] >= 240]
    first = train_head(features, train, val, pos_weight=3.0, **SETTINGS)
    second = train_head(features, train, val, pos_weight=3.0, **SETTINGS)
    pd.testing.assert_frame_equal(first.history, second.history)
    scores = score_pairs(first.model, features, val)
    assert recall_at_k(phrase_ranks(val, scores), 1) > 0.9
    assert list(first.history.columns) == [
        "epoch",
        "train_loss",
        "train_accuracy",
        "val_loss",
        "val_accuracy",
        "val_recall_at_1",
    ]
    assert first.history["train_loss"].iloc[-1] < first.history["train_loss"].iloc[0]


def test_pos_weight_raises_the_scores_of_pairs() -> None:
    features, pairs = toy_problem(200, seed=4)
    settings = {**SETTINGS, "epochs": 2}
    low = train_head(features, pairs, pairs, pos_weight=1.0, **settings)
    high = train_head(features, pairs, pairs, pos_weight=20.0, **settings)
    # a heavier positive class pushes every probability up, negatives included
    negatives = pairs[pairs["label"] == 0]
    assert (
        score_pairs(high.model, features, negatives).mean()
        > score_pairs(low.model, features, negatives).mean() + 0.1
    )


def test_rank_weight_adds_the_listwise_term() -> None:
    features, pairs = toy_problem(120, seed=5)
    settings = {**SETTINGS, "epochs": 3, "rank_weight": 1.0}
    ranked = train_head(features, pairs, pairs, pos_weight=1.0, **settings)
    plain = train_head(features, pairs, pairs, pos_weight=1.0, **{**settings, "rank_weight": 0.0})
    # same seed and data: only the extra loss term can make the training losses differ
    assert ranked.history["train_loss"].iloc[0] > plain.history["train_loss"].iloc[0]


def test_a_model_trained_on_other_features_is_refused() -> None:
    head = MatchingHead(HeadConfig(6, 6, 16, 0.0))
    state = {**head_state(head), "features": {"backbone": "efficientnet-lite0", "regions": 10}}
    check_trained_on(state, {"backbone": "efficientnet-lite0", "regions": 10})
    with pytest.raises(DataError, match="trained on other features"):
        check_trained_on(state, {"backbone": "mobilenet-v2", "regions": 10})
