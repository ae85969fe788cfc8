"""train: fit the matching head on the training pairs, watching the validation pairs.

The loss is binary cross-entropy on pairs with positives weighted by ``pos_weight``. With
``rank_weight > 0`` a listwise term is added: for each phrase, a softmax over *all* its image's
candidates, pushing its positives above the image's other regions (the natural negatives),
which is what Recall@1 rewards.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from grounding.metrics import phrase_ranks, recall_at_k
from grounding.model import HeadConfig, MatchingHead, PairFeatures, score_pairs


@dataclass(frozen=True)
class PhraseGroups:
    """Each phrase's candidates, padded: ``regions (P, K)`` rows, ``labels (P, K)``,
    ``valid (P, K)`` mask, ``phrases (P,)`` rows."""

    regions: np.ndarray
    labels: np.ndarray
    valid: np.ndarray
    phrases: np.ndarray


def phrase_groups(features: PairFeatures, pairs: pd.DataFrame) -> PhraseGroups:
    """Group ``pairs`` (duplicates removed) by phrase into padded arrays."""
    pairs = pairs.drop_duplicates(["phrase_id", "region_id"]).sort_values(
        ["phrase_id", "region_id"]
    )
    region_rows, phrase_rows = features.rows(pairs)
    group = pairs.groupby("phrase_id", sort=True).cumcount().to_numpy()
    phrase_index = pd.factorize(pairs["phrase_id"], sort=True)[0]
    n_phrases, width = phrase_index.max() + 1, group.max() + 1
    regions = np.zeros((n_phrases, width), dtype=np.int64)
    labels = np.zeros((n_phrases, width), dtype=np.float32)
    valid = np.zeros((n_phrases, width), dtype=bool)
    regions[phrase_index, group] = region_rows
    labels[phrase_index, group] = pairs["label"].to_numpy()
    valid[phrase_index, group] = True
    phrases = np.zeros(n_phrases, dtype=np.int64)
    phrases[phrase_index] = phrase_rows
    return PhraseGroups(regions, labels, valid, phrases)


def listwise_loss(logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy over each row's valid candidates with several positives allowed:
    ``-log(sum of softmax over positives)``, averaged over rows with a positive.

    ``logits, labels, valid``: ``(P, K)``.
    """
    very_negative = torch.finfo(logits.dtype).min
    all_scores = torch.where(valid, logits, very_negative)
    positive_scores = torch.where(valid & (labels > 0), logits, very_negative)
    has_positive = (valid & (labels > 0)).any(dim=1)
    loss = torch.logsumexp(all_scores, dim=1) - torch.logsumexp(positive_scores, dim=1)
    return loss[has_positive].mean() if has_positive.any() else logits.sum() * 0


@dataclass
class TrainResult:
    model: MatchingHead
    history: pd.DataFrame  # one row per epoch


def train_head(
    features: PairFeatures,
    train_pairs: pd.DataFrame,
    val_pairs: pd.DataFrame,
    *,
    pos_weight: float,
    rank_weight: float,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    weight_decay: float,
    hidden: int,
    dropout: float,
    seed: int,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train a :class:`MatchingHead`; deterministic on CPU for a given ``seed``.

    ``train_pairs`` may repeat pairs (balanced by oversampling); ``val_pairs`` are scored
    after each epoch (loss, accuracy at probability 0.5, Recall@1). ``on_epoch`` receives each
    epoch's row of the history as it is made (for progress display).
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    region_rows, phrase_rows = features.rows(train_pairs)
    labels = torch.from_numpy(train_pairs["label"].to_numpy(np.float32))
    groups = phrase_groups(features, train_pairs) if rank_weight > 0 else None
    rng = np.random.default_rng(seed)
    loss_function = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(float(pos_weight)))
    steps = int(np.ceil(len(labels) / batch_size))
    history = []
    with torch.random.fork_rng():  # seeded dropout and init without touching global state
        torch.manual_seed(seed)
        model = MatchingHead(
            HeadConfig(features.regions.shape[1], features.phrases.shape[1], hidden, dropout)
        )
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=learning_rate, weight_decay=weight_decay
        )
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=learning_rate, total_steps=epochs * steps
        )
        for epoch in range(1, epochs + 1):
            model.train()
            order = rng.permutation(len(labels))
            group_order = rng.permutation(len(groups.phrases)) if groups else None
            total_loss, correct = 0.0, 0
            for step in range(steps):
                batch = order[step * batch_size : (step + 1) * batch_size]
                regions, phrases = features.gather(region_rows[batch], phrase_rows[batch])
                logits = model(regions, phrases)
                loss = loss_function(logits, labels[batch])
                if groups is not None and group_order is not None:
                    loss = loss + rank_weight * _group_loss(
                        model, features, groups, group_order, step, steps
                    )
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
                total_loss += float(loss.detach()) * len(batch)
                correct += int(((logits.detach() > 0) == (labels[batch] > 0)).sum())
            row = {
                "epoch": epoch,
                "train_loss": total_loss / len(labels),
                "train_accuracy": correct / len(labels),
                **_validation_scores(model, features, val_pairs, loss_function),
            }
            history.append(row)
            if on_epoch is not None:
                on_epoch(row)
    return TrainResult(model.eval(), pd.DataFrame(history))


def _group_loss(
    model: MatchingHead,
    features: PairFeatures,
    groups: PhraseGroups,
    order: np.ndarray,
    step: int,
    steps: int,
) -> torch.Tensor:
    """The listwise loss on this step's share of the phrases (all phrases once per epoch)."""
    per_step = int(np.ceil(len(order) / steps))
    chosen = order[step * per_step : (step + 1) * per_step]
    if len(chosen) == 0:
        return torch.zeros(())
    regions, valid = groups.regions[chosen], groups.valid[chosen]
    # score the real candidates only (padding is most of a padded batch), then lay them out
    rows, columns = np.nonzero(valid)
    region_features, phrase_features = features.gather(
        regions[rows, columns], groups.phrases[chosen][rows]
    )
    scores = model(region_features, phrase_features)
    logits = torch.zeros(valid.shape).index_put(
        (torch.from_numpy(rows), torch.from_numpy(columns)), scores
    )
    return listwise_loss(logits, torch.from_numpy(groups.labels[chosen]), torch.from_numpy(valid))


def _validation_scores(
    model: MatchingHead, features: PairFeatures, pairs: pd.DataFrame, loss_function: nn.Module
) -> dict[str, float]:
    probabilities = score_pairs(model, features, pairs)
    labels = pairs["label"].to_numpy(np.float32)
    logits = torch.logit(torch.from_numpy(probabilities).clamp(1e-7, 1 - 1e-7))
    return {
        "val_loss": float(loss_function(logits, torch.from_numpy(labels))),
        "val_accuracy": float(np.mean((probabilities >= 0.5) == (labels > 0))),
        "val_recall_at_1": recall_at_k(phrase_ranks(pairs, probabilities), 1),
    }
