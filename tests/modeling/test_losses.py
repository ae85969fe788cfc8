"""The training losses against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from grounding.modeling.losses import listwise_loss, repeated_pair_loss


def test_listwise_loss_by_hand() -> None:
    logits = torch.tensor([[2.0, 0.0, 0.0], [1.0, 1.0, 5.0]])
    labels = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    valid = torch.tensor([[True, True, False], [True, True, True]])
    # row 0: padding ignored: -log(e^2 / (e^2 + e^0)); row 1: two positives: -log(2e / (2e + e^5))
    row0 = -math.log(math.exp(2) / (math.exp(2) + 1))
    row1 = -math.log(2 * math.e / (2 * math.e + math.exp(5)))
    assert float(listwise_loss(logits, labels, valid)) == pytest.approx((row0 + row1) / 2, rel=1e-6)


def test_listwise_loss_leaves_out_rows_without_a_positive() -> None:
    logits = torch.tensor([[2.0, 0.0], [3.0, -1.0]])
    labels = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    valid = torch.ones(2, 2, dtype=torch.bool)
    expected = -math.log(math.exp(2) / (math.exp(2) + 1))  # row 0 only
    assert float(listwise_loss(logits, labels, valid)) == pytest.approx(expected, rel=1e-6)


def test_listwise_loss_without_any_positive_is_zero_and_differentiable() -> None:
    logits = torch.tensor([[2.0, 0.0]], requires_grad=True)
    loss = listwise_loss(logits, torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool))
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert logits.grad is not None and float(logits.grad.abs().sum()) == 0.0


def test_a_padded_positive_does_not_count() -> None:
    logits = torch.tensor([[0.0, 4.0]])
    labels = torch.tensor([[0.0, 1.0]])
    valid = torch.tensor([[True, False]])  # the positive is padding: no row has a positive
    assert float(listwise_loss(logits, labels, valid)) == 0.0


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


def test_repeated_pair_loss_of_one_pair_by_hand() -> None:
    # a positive at logit 0 weighted 2: 2 * -log(sigmoid(0)) = 2 log 2, averaged over 1 pair
    got = repeated_pair_loss(torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), pos_weight=2.0)
    assert float(got) == pytest.approx(2 * math.log(2), rel=1e-6)
