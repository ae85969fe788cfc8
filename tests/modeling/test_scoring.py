"""The one scoring path, checked against scoring each pair by hand with the head's interface,
and a trained head with the features it expects."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from stand_ins import features_meta, random_head

from grounding.errors import DataError
from grounding.io import StoredFeatures, read_weights, write_weights
from grounding.modeling.head import Head
from grounding.modeling.scoring import (
    PairFeatures,
    TrainedHead,
    pair_logits,
    score_grid,
    score_pairs,
)

REGION_DIM, PHRASE_DIM = 6, 4


def by_hand(head: Head, region: np.ndarray, phrase: np.ndarray) -> float:
    """One pair's logit: embed each side alone, score the pair alone."""
    with torch.inference_mode():
        regions = head.embed_regions(torch.from_numpy(region[None]))
        phrases = head.embed_phrases(torch.from_numpy(phrase[None]))
        return float(head.score(regions, phrases)[0])


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


@pytest.fixture
def head() -> Head:
    return random_head(REGION_DIM, PHRASE_DIM, seed=3)


@pytest.fixture
def features() -> PairFeatures:
    """Ten regions and three distinct phrase texts; phrases 11 and 14 share a text."""
    rng = np.random.default_rng(0)
    phrase_rows = pd.DataFrame({"phrase_id": [10, 11, 12, 14], "row": [2, 0, 1, 0]})
    return PairFeatures.from_arrays(
        rng.normal(size=(10, REGION_DIM)).astype(np.float32),
        rng.normal(size=(3, PHRASE_DIM)).astype(np.float32),
        phrase_rows,
    )


@pytest.fixture
def pairs() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "phrase_id": [10, 10, 11, 12, 14, 11, 12],
            "region_id": [0, 3, 3, 9, 4, 0, 0],
        }
    )


# --- pair_logits, score_pairs and score_grid -------------------------------------------------


def test_pair_logits_equal_scoring_each_pair_by_hand(head: Head) -> None:
    rng = np.random.default_rng(1)
    regions = rng.normal(size=(5, REGION_DIM)).astype(np.float32)
    phrases = rng.normal(size=(3, PHRASE_DIM)).astype(np.float32)
    region_index = np.array([0, 4, 4, 2, 1, 0])
    phrase_index = np.array([2, 0, 1, 1, 2, 2])
    with torch.inference_mode():
        logits = pair_logits(
            head,
            torch.from_numpy(regions),
            torch.from_numpy(phrases),
            torch.from_numpy(region_index),
            torch.from_numpy(phrase_index),
        )
    assert logits.shape == (6,)
    expected = [
        by_hand(head, regions[r], phrases[p])
        for r, p in zip(region_index, phrase_index, strict=True)
    ]
    np.testing.assert_allclose(logits.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_score_pairs_is_the_sigmoid_of_each_pair_scored_by_hand(
    head: Head, features: PairFeatures, pairs: pd.DataFrame
) -> None:
    scores = score_pairs(head, features, pairs)
    row = features.phrase_row
    expected = sigmoid(
        np.array(
            [
                by_hand(head, features.regions[r], features.phrases[row[p]])
                for p, r in zip(pairs["phrase_id"], pairs["region_id"], strict=True)
            ]
        )
    )
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)
    # phrases 11 and 14 share a text: with the same region they score the same
    same = score_pairs(head, features, pd.DataFrame({"phrase_id": [11, 14], "region_id": [5, 5]}))
    assert same[0] == same[1]


def test_score_pairs_does_not_depend_on_the_chunks(
    head: Head, features: PairFeatures, pairs: pd.DataFrame
) -> None:
    np.testing.assert_allclose(
        score_pairs(head, features, pairs, chunk_size=2),
        score_pairs(head, features, pairs),
        rtol=1e-6,
        atol=1e-7,
    )
    assert score_pairs(head, features, pairs.iloc[:0]).shape == (0,)


def test_score_pairs_puts_the_head_in_eval_mode(
    features: PairFeatures, pairs: pd.DataFrame
) -> None:
    head = random_head(REGION_DIM, PHRASE_DIM).train()
    head.region[3].p = 0.9  # dropout that would make two calls differ in training mode
    first, second = score_pairs(head, features, pairs), score_pairs(head, features, pairs)
    np.testing.assert_array_equal(first, second)
    assert not head.training


def test_score_grid_equals_score_pairs_on_the_explicit_grid(head: Head) -> None:
    rng = np.random.default_rng(2)
    regions = rng.normal(size=(4, REGION_DIM)).astype(np.float32)
    phrases = rng.normal(size=(3, PHRASE_DIM)).astype(np.float32)
    grid = score_grid(head, regions, phrases)
    assert grid.shape == (3, 4)
    features = PairFeatures.from_arrays(
        regions, phrases, pd.DataFrame({"phrase_id": [0, 1, 2], "row": [0, 1, 2]})
    )
    explicit = pd.DataFrame(
        [(p, r) for p in range(3) for r in range(4)], columns=["phrase_id", "region_id"]
    )
    np.testing.assert_allclose(
        grid.reshape(-1), score_pairs(head, features, explicit), rtol=1e-6, atol=1e-7
    )
    assert grid[1, 2] == pytest.approx(sigmoid(by_hand(head, regions[2], phrases[1])), rel=1e-5)


# --- PairFeatures ----------------------------------------------------------------------------


def test_rows_map_pairs_to_feature_rows(features: PairFeatures, pairs: pd.DataFrame) -> None:
    region_rows, phrase_rows = features.rows(pairs)
    assert region_rows.tolist() == [0, 3, 3, 9, 4, 0, 0]
    assert phrase_rows.tolist() == [2, 2, 0, 1, 0, 0, 1]
    chunks = list(features.chunks(pairs, 3))
    assert [len(r) for r, _ in chunks] == [3, 3, 1]
    assert np.concatenate([p for _, p in chunks]).tolist() == phrase_rows.tolist()


def test_rows_of_unknown_phrase_raise(features: PairFeatures, pairs: pd.DataFrame) -> None:
    with pytest.raises(DataError, match=r"phrases without features, e.g. phrase_id \[99\]"):
        features.rows(pairs.assign(phrase_id=[10, 10, 11, 99, 14, 11, 12]))


def test_rows_of_a_region_beyond_the_features_raise(
    features: PairFeatures, pairs: pd.DataFrame
) -> None:
    with pytest.raises(DataError, match=r"region_id 10 has no features \(10 rows\)"):
        features.rows(pairs.assign(region_id=10))


# --- TrainedHead -----------------------------------------------------------------------------


def test_trained_head_round_trips_through_a_weights_file(
    head: Head, features: PairFeatures, pairs: pd.DataFrame, tmp_path: Path
) -> None:
    meta = features_meta(region_dim=REGION_DIM, phrase_dim=PHRASE_DIM)
    path = tmp_path / "head.safetensors"
    write_weights(*TrainedHead(head, meta).to_weights(), path)
    again = TrainedHead.from_weights(*read_weights(path))
    assert again.features == meta
    np.testing.assert_array_equal(
        score_pairs(again.head, features, pairs), score_pairs(head, features, pairs)
    )


def test_a_grounder_config_holds_a_trained_head(head: Head) -> None:
    tensors, config = TrainedHead(head, features_meta()).to_weights()
    config = {**config, "threshold": 0.4, "candidates": {"name": "annotated", "settings": {}}}
    assert TrainedHead.from_weights(tensors, config).features == features_meta()


def test_weights_without_head_or_features_are_refused(head: Head) -> None:
    tensors, config = TrainedHead(head, features_meta()).to_weights()
    with pytest.raises(DataError, match="not a trained head"):
        TrainedHead.from_weights(tensors, {"head": config["head"]})
    partial = {**config, "features": {"backbone": "average-pooling"}}
    with pytest.raises(DataError, match="features metadata lacks"):
        TrainedHead.from_weights(tensors, partial)


def test_check_features_refuses_other_features(head: Head) -> None:
    trained = TrainedHead(head, features_meta())
    trained.check_features(features_meta())
    with pytest.raises(DataError, match="trained on other features"):
        trained.check_features(features_meta(image_size=448))
    with pytest.raises(DataError, match="trained on other features"):
        trained.check_features(features_meta(backbone="mobilenet-v2"))


def test_trained_head_scores_features_made_as_its_own(
    head: Head, features: PairFeatures, pairs: pd.DataFrame
) -> None:
    meta = features_meta(region_dim=REGION_DIM, phrase_dim=PHRASE_DIM)
    phrase_rows = features.phrase_row.rename_axis("phrase_id").reset_index()
    arrays = (features.regions, features.phrases, phrase_rows)
    trained = TrainedHead(head, meta)
    np.testing.assert_array_equal(
        trained.score(StoredFeatures(*arrays, meta), pairs), score_pairs(head, features, pairs)
    )
    other = features_meta(region_dim=REGION_DIM, context=False)
    with pytest.raises(DataError, match="trained on other features"):
        trained.score(StoredFeatures(*arrays, other), pairs)
