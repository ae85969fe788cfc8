"""The training losses on groups of pairs: each row a phrase, each column one of its image's
candidates (``(P, K)`` arrays, padded where a phrase has fewer than ``K``)."""

from __future__ import annotations

import torch
from torch.nn import functional


def repeated_pair_loss(
    logits: torch.Tensor, labels: torch.Tensor, counts: torch.Tensor, pos_weight: float
) -> torch.Tensor:
    """Binary cross-entropy with positives weighted by ``pos_weight``, averaged over the pairs
    as if each were repeated ``counts`` times (0: padding, left out).

    ``logits, labels, counts``: ``(P, K)``.
    """
    valid = counts > 0
    total = functional.binary_cross_entropy_with_logits(
        logits[valid],
        labels[valid],
        weight=counts[valid],
        pos_weight=torch.tensor(float(pos_weight)),
        reduction="sum",
    )
    return total / counts.sum()


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
