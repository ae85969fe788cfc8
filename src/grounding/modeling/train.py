"""train: fit the matching head on the training pairs, watching the validation pairs.

The loss is binary cross-entropy on the (balanced) training pairs with positives weighted by
``pos_weight``. With ``rank_weight > 0`` a listwise term is added: for each phrase, a softmax
over *all* its image's candidates, pushing its positives above the image's other regions (the
natural negatives), which is what Recall@1 rewards.

Each step takes a batch of images and scores every pair of their phrases and candidates, with
each distinct region and phrase projected once. A pair that the balanced training table repeats
(an oversampled positive) counts that many times in the cross-entropy: the same loss per epoch
as a pass over the repeated rows, at the cost of the distinct pairs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.nn import functional

from grounding.evaluation.metrics import phrase_ranks, recall_at_k
from grounding.modeling.device import module_device
from grounding.modeling.head import Head, build_head
from grounding.modeling.losses import listwise_loss, repeated_pair_loss
from grounding.modeling.scoring import PairFeatures, pair_logits, score_pairs


@dataclass(frozen=True)
class PhraseGroups:
    """Each phrase's candidates, padded to ``K`` columns.

    ``regions (P, K)``: feature rows; ``labels (P, K)``; ``counts (P, K)``: how often the pair
    occurs in the pairs (0 for padding); ``phrases (P,)``: feature rows; ``images (P,)``: the
    phrase's image as a code ``0..n_images-1``.
    """

    regions: np.ndarray
    labels: np.ndarray
    counts: np.ndarray
    phrases: np.ndarray
    images: np.ndarray

    @property
    def valid(self) -> np.ndarray:
        return self.counts > 0


#: Steps between handing the memory-mapped features' pages back (:meth:`PairFeatures.
#: release_pages`): at 8 images of 100 candidates a step, some 0.3 GB of pages at most.
_RELEASE_EVERY = 64


@dataclass(frozen=True)
class TrainingPairs:
    """The training pairs counted and indexed by phrase and image, from which each training
    step builds the :class:`PhraseGroups` of its batch's images only (:meth:`groups`).

    Over the distinct pairs ``(D,)``, each phrase's pairs consecutive and in region order:
    ``regions`` (feature rows), ``labels``, ``counts`` (how often the pair occurs). Over the
    phrases ``(P,)``, sorted by ``phrase_id``: ``starts, stops`` (their pairs), ``phrases``
    (feature rows), ``images`` (the phrase's image as a code ``0..n_images-1``, numbered in
    order of the images' first phrase). ``width``: the most candidates of a phrase, the ``K``
    of every batch's groups (so a batch is padded as the whole set was).
    9 bytes per distinct pair (0.4 GB for 47M training pairs), against some 100 bytes per
    row of the pairs table in pandas.
    """

    regions: np.ndarray
    labels: np.ndarray
    counts: np.ndarray
    starts: np.ndarray
    stops: np.ndarray
    phrases: np.ndarray
    images: np.ndarray
    width: int

    @classmethod
    def from_parts(cls, features: PairFeatures, parts: Iterable[pd.DataFrame]) -> TrainingPairs:
        """From the training pairs (``phrase_id, region_id, image_id, label``, repeated pairs
        allowed) in parts that each hold all the rows of their phrases (whole images:
        :func:`grounding.io.read_image_parts`)."""
        pair_columns: dict[str, list[np.ndarray]] = {"regions": [], "labels": [], "counts": []}
        phrase_columns: dict[str, list[np.ndarray]] = {
            "phrase_id": [],
            "starts": [],
            "stops": [],
            "phrases": [],
            "image_id": [],
        }
        offset = 0
        for part in parts:
            counted = (
                part.groupby(["phrase_id", "region_id"], sort=True)
                .agg(
                    image_id=("image_id", "first"),
                    label=("label", "first"),
                    count=("label", "size"),
                )
                .reset_index()
            )
            region_rows, phrase_rows = features.rows(counted)
            first = np.flatnonzero(np.r_[True, np.diff(counted["phrase_id"].to_numpy()) != 0])
            pair_columns["regions"].append(region_rows.astype(np.int32))
            pair_columns["labels"].append(counted["label"].to_numpy(np.int8))
            pair_columns["counts"].append(counted["count"].to_numpy(np.int32))
            phrase_columns["phrase_id"].append(counted["phrase_id"].to_numpy()[first])
            phrase_columns["starts"].append(offset + first)
            phrase_columns["stops"].append(offset + np.r_[first[1:], len(counted)])
            phrase_columns["phrases"].append(phrase_rows[first])
            phrase_columns["image_id"].append(counted["image_id"].to_numpy()[first])
            offset += len(counted)
        if offset == 0:
            raise ValueError("no training pairs")
        pairs = {name: np.concatenate(chunks) for name, chunks in pair_columns.items()}
        phrase = {name: np.concatenate(chunks) for name, chunks in phrase_columns.items()}
        order = np.argsort(phrase["phrase_id"], kind="stable")
        starts, stops = phrase["starts"][order], phrase["stops"][order]
        return cls(
            regions=pairs["regions"],
            labels=pairs["labels"],
            counts=pairs["counts"],
            starts=starts,
            stops=stops,
            phrases=phrase["phrases"][order],
            images=pd.factorize(phrase["image_id"][order])[0].astype(np.int64),
            width=int((stops - starts).max()),
        )

    def groups(self, chosen: np.ndarray) -> PhraseGroups:
        """The :class:`PhraseGroups` of the ``chosen`` phrases (indices into the phrases, in
        that order), ``width`` columns."""
        starts, lengths = self.starts[chosen], self.stops[chosen] - self.starts[chosen]
        row = np.repeat(np.arange(len(chosen)), lengths)
        column = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        index = np.repeat(starts, lengths) + column
        shape = (len(chosen), self.width)
        regions = np.zeros(shape, dtype=np.int64)
        labels = np.zeros(shape, dtype=np.float32)
        counts = np.zeros(shape, dtype=np.float32)
        regions[row, column] = self.regions[index]
        labels[row, column] = self.labels[index]
        counts[row, column] = self.counts[index]
        return PhraseGroups(regions, labels, counts, self.phrases[chosen], self.images[chosen])


def phrase_groups(features: PairFeatures, pairs: pd.DataFrame) -> PhraseGroups:
    """Group all ``pairs`` by phrase into padded arrays, counting repeated pairs."""
    training = TrainingPairs.from_parts(features, [pairs])
    return training.groups(np.arange(len(training.starts)))


@dataclass
class TrainResult:
    model: Head
    history: pd.DataFrame  # one row per epoch


def train_head(
    features: PairFeatures,
    train_pairs: pd.DataFrame | TrainingPairs,
    val_pairs: pd.DataFrame,
    *,
    head: str,
    pos_weight: float,
    rank_weight: float,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    weight_decay: float,
    seed: int,
    heads: Mapping[str, Any] | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    on_step: Callable[[int], None] | None = None,
    device: torch.device | None = None,
) -> TrainResult:
    """Train a new head of type ``head`` (:data:`~grounding.modeling.head.HEADS`) with its
    settings from ``heads`` (the ``heads`` params section; its defaults when absent);
    deterministic on CPU for a given ``seed``.

    ``train_pairs`` (``phrase_id, region_id, image_id, label``, or them as
    :class:`TrainingPairs`) may repeat pairs (balanced by oversampling); ``batch_size`` is in
    images, and each step holds only its images' groups. ``val_pairs`` are scored after each epoch
    (loss, accuracy at probability 0.5, Recall@1). ``on_epoch`` receives each epoch's row of the
    history as it is made, ``on_step`` the number of steps per epoch after each step (both for
    progress display: one epoch of a large set is many minutes). The head trains in float32 on
    ``device`` (default the CPU) and is returned on the CPU.
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    training = (
        train_pairs
        if isinstance(train_pairs, TrainingPairs)
        else TrainingPairs.from_parts(features, [train_pairs])
    )
    batches = _ImageBatches(training.images)
    rng = np.random.default_rng(seed)
    steps = int(np.ceil(batches.n_images / batch_size))
    history = []
    with torch.random.fork_rng():  # seeded dropout and init without touching global state
        torch.manual_seed(seed)
        model = build_head(
            head,
            region_dim=features.regions.shape[1],
            phrase_dim=features.phrases.shape[1],
            sections=heads,
        ).to(device)
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=learning_rate, weight_decay=weight_decay
        )
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=learning_rate, total_steps=epochs * steps
        )
        for epoch in range(1, epochs + 1):
            model.train()
            order = rng.permutation(batches.n_images)
            total_loss, total_count, correct = 0.0, 0.0, 0.0
            for step in range(steps):
                chosen = batches.phrases_of(order[step * batch_size : (step + 1) * batch_size])
                groups = training.groups(chosen)
                logits = _group_logits(model, features, groups)
                labels = torch.from_numpy(groups.labels).to(device)
                counts = torch.from_numpy(groups.counts).to(device)
                valid = counts > 0
                loss = repeated_pair_loss(logits, labels, counts, pos_weight)
                if rank_weight > 0:
                    loss = loss + rank_weight * listwise_loss(logits, labels, valid)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
                if step % _RELEASE_EVERY == _RELEASE_EVERY - 1:
                    features.release_pages()
                total_loss += float(loss.detach()) * float(counts.sum())
                total_count += float(counts.sum())
                hits = ((logits.detach() > 0) == (labels > 0)) & valid
                correct += float((hits * counts).sum())
                if on_step is not None:
                    on_step(steps)
            row = {
                "epoch": epoch,
                "train_loss": total_loss / total_count,
                "train_accuracy": correct / total_count,
                **_validation_scores(model, features, val_pairs, pos_weight),
            }
            features.release_pages()
            history.append(row)
            if on_epoch is not None:
                on_epoch(row)
    return TrainResult(model.cpu().eval(), pd.DataFrame(history))


class _ImageBatches:
    """The phrases (rows of a :class:`PhraseGroups`) of any set of images."""

    def __init__(self, images: np.ndarray) -> None:
        self.by_image = np.argsort(images, kind="stable")
        self.n_images = int(images.max()) + 1
        self.bounds = np.searchsorted(images[self.by_image], np.arange(self.n_images + 1))

    def phrases_of(self, images: np.ndarray) -> np.ndarray:
        return np.concatenate([self.by_image[self.bounds[i] : self.bounds[i + 1]] for i in images])


def _group_logits(model: Head, features: PairFeatures, groups: PhraseGroups) -> torch.Tensor:
    """Logits ``(P, K)`` of the groups' candidates (0 in the padding), with each distinct
    region and phrase projected once (on the head's device)."""
    device = module_device(model)
    valid = groups.valid
    rows, columns = np.nonzero(valid)
    distinct, region_index = np.unique(groups.regions[rows, columns], return_inverse=True)
    region_features, phrase_features = features.gather(distinct, groups.phrases, device)
    row_index = torch.from_numpy(rows).to(device)
    scores = pair_logits(
        model,
        region_features,
        phrase_features,
        torch.from_numpy(region_index.reshape(-1)).to(device),
        row_index,
    )
    return torch.zeros(valid.shape, device=device).index_put(
        (row_index, torch.from_numpy(columns).to(device)), scores
    )


def _validation_scores(
    model: Head, features: PairFeatures, pairs: pd.DataFrame, pos_weight: float
) -> dict[str, float]:
    probabilities = score_pairs(model, features, pairs)
    labels = pairs["label"].to_numpy(np.float32)
    logits = torch.logit(torch.from_numpy(probabilities).clamp(1e-7, 1 - 1e-7))
    return {
        "val_loss": float(
            functional.binary_cross_entropy_with_logits(
                logits, torch.from_numpy(labels), pos_weight=torch.tensor(float(pos_weight))
            )
        ),
        "val_accuracy": float(np.mean((probabilities >= 0.5) == (labels > 0))),
        "val_recall_at_1": recall_at_k(phrase_ranks(pairs, probabilities), 1),
    }
