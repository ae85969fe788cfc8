"""The training loop: grouping pairs by phrase, and training a head on a toy problem."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from grounding.errors import ConfigError
from grounding.evaluation.metrics import phrase_ranks, recall_at_k
from grounding.modeling.head import MatchingHead
from grounding.modeling.scoring import PairFeatures, score_pairs
from grounding.modeling.train import TrainingPairs, phrase_groups, train_head

SETTINGS = dict(
    head="matching",
    rank_weight=0.0,
    epochs=8,
    batch_size=16,
    learning_rate=3e-3,
    weight_decay=0.0,
    seed=0,
    heads={"matching": {"hidden": 32, "dropout": 0.0}},
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread, as the train stage runs (``train.threads``): on tiny tensors two
    threads that share 2 cores with other work are an order of magnitude slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


def test_training_builds_the_head_the_settings_name() -> None:
    features, pairs = toy_problem(20, seed=6)
    result = train_head(features, pairs, pairs, pos_weight=1.0, **{**SETTINGS, "epochs": 1})
    assert type(result.model) is MatchingHead and not result.model.training
    assert (result.model.config.region_dim, result.model.config.phrase_dim) == (6, 6)
    assert result.model.config.hidden == 32 and result.model.config.dropout == 0.0
    assert len(result.history) == 1
    with pytest.raises(ConfigError, match="unknown head 'transformer'"):
        train_head(features, pairs, pairs, pos_weight=1.0, **{**SETTINGS, "head": "transformer"})


@pytest.mark.parametrize("change", [{"epochs": 0}, {"batch_size": 0}])
def test_training_refuses_no_epochs_or_empty_batches(change: dict) -> None:
    features, pairs = toy_problem(4, seed=6)
    with pytest.raises(ValueError, match="epochs and batch_size must be >= 1"):
        train_head(features, pairs, pairs, pos_weight=1.0, **{**SETTINGS, **change})


def test_on_epoch_receives_each_row_of_the_history() -> None:
    features, pairs = toy_problem(20, seed=7)
    rows: list[dict[str, float]] = []
    result = train_head(
        features, pairs, pairs, pos_weight=1.0, **{**SETTINGS, "epochs": 3}, on_epoch=rows.append
    )
    assert pd.DataFrame(rows).equals(result.history)


def test_on_step_is_called_once_per_step_with_the_steps_per_epoch() -> None:
    features, pairs = toy_problem(20, seed=7)
    images = pairs["image_id"].nunique()
    calls: list[int] = []
    train_head(
        features,
        pairs,
        pairs,
        pos_weight=1.0,
        **{**SETTINGS, "epochs": 2, "batch_size": 3},
        on_step=calls.append,
    )
    steps = -(-images // 3)
    assert calls == [steps] * (2 * steps)


# --- training groups built per batch ---------------------------------------------------------


def dense_phrase_groups(features: PairFeatures, pairs: pd.DataFrame) -> tuple[np.ndarray, ...]:
    """The groups as the training loop built them before it streamed: one groupby over every
    pair into dense arrays of all phrases (the reference the per-batch groups must equal)."""
    counted = (
        pairs.groupby(["phrase_id", "region_id"], sort=True)
        .agg(image_id=("image_id", "first"), label=("label", "first"), count=("label", "size"))
        .reset_index()
    )
    region_rows, phrase_rows = features.rows(counted)
    column = counted.groupby("phrase_id", sort=True).cumcount().to_numpy()
    row = pd.factorize(counted["phrase_id"], sort=True)[0]
    shape = (row.max() + 1, column.max() + 1)
    regions, labels, counts = np.zeros(shape, np.int64), np.zeros(shape), np.zeros(shape)
    regions[row, column] = region_rows
    labels[row, column] = counted["label"].to_numpy()
    counts[row, column] = counted["count"].to_numpy()
    phrases, images = np.zeros(shape[0], np.int64), np.zeros(shape[0], np.int64)
    phrases[row] = phrase_rows
    images[row] = pd.factorize(counted["image_id"])[0]
    return regions, labels, counts, phrases, images


def uneven_pairs(seed: int) -> tuple[PairFeatures, pd.DataFrame]:
    """Images with 1-3 phrases of 2-6 candidates each, positives repeated 1-3 times, the images
    in shuffled id order (image codes follow the first phrase, not the id)."""
    rng = np.random.default_rng(seed)
    rows, phrase_id, region_id = [], 0, 0
    for image in rng.permutation(12):
        n_regions = int(rng.integers(2, 7))
        for _ in range(int(rng.integers(1, 4))):
            for region in range(n_regions - int(rng.integers(0, 2))):
                label = int(rng.random() < 0.3)
                for _ in range(1 + label * int(rng.integers(0, 3))):
                    rows.append((phrase_id, region_id + region, f"img{image}", 0.9 * label, label))
            phrase_id += 1
        region_id += n_regions
    pairs = pd.DataFrame(rows, columns=["phrase_id", "region_id", "image_id", "iou", "label"])
    features = PairFeatures(
        rng.normal(size=(region_id, 5)).astype(np.float32),
        rng.normal(size=(phrase_id, 3)).astype(np.float32),
        pd.Series(rng.permutation(phrase_id), index=np.arange(phrase_id)),
    )
    return features, pairs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_training_pairs_in_image_parts_give_the_dense_groups_batch_by_batch(seed: int) -> None:
    features, pairs = uneven_pairs(seed)
    regions, labels, counts, phrases, images = dense_phrase_groups(features, pairs)
    # parts of whole images, as the train stage reads them, in the file's (shuffled) order
    parts = [part for _, part in pairs.groupby("image_id", sort=False)]
    training = TrainingPairs.from_parts(features, parts[::-1])
    np.testing.assert_array_equal(training.images, images)
    assert training.width == regions.shape[1]
    batches = np.array_split(np.random.default_rng(seed).permutation(len(phrases)), 4)
    for chosen in batches:
        groups = training.groups(chosen)
        np.testing.assert_array_equal(groups.regions, regions[chosen])
        np.testing.assert_array_equal(groups.labels, labels[chosen])
        np.testing.assert_array_equal(groups.counts, counts[chosen])
        np.testing.assert_array_equal(groups.phrases, phrases[chosen])
        np.testing.assert_array_equal(groups.images, images[chosen])


def test_training_on_training_pairs_equals_training_on_the_table() -> None:
    features, pairs = toy_problem(60, seed=3)
    train, val = pairs[pairs["phrase_id"] < 48], pairs[pairs["phrase_id"] >= 48]
    settings = {**SETTINGS, "epochs": 2, "rank_weight": 1.0}
    table = train_head(features, train, val, pos_weight=2.0, **settings)
    parts = [part for _, part in train.groupby("image_id", sort=False)]
    streamed = train_head(
        features, TrainingPairs.from_parts(features, parts), val, pos_weight=2.0, **settings
    )
    pd.testing.assert_frame_equal(table.history, streamed.history)
    for name, tensor in table.model.state_dict().items():
        assert torch.equal(tensor, streamed.model.state_dict()[name])
