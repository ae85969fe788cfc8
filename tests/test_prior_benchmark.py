"""benchmarks/prior.py: the box prior's data leaves held-out images out, its candidates are
labelled by IoU as the pairs are, and its pieces have the shapes the evaluation relies on."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from benchmarks import prior
from grounding.boxes import box_iou
from grounding.modeling.head import HeadConfig
from grounding.modeling.scoring import pair_logits


def parsed_tables() -> dict[str, pd.DataFrame]:
    """Three images of 100 x 200 pixels; image ``b`` is the one to hold out. Phrase 0 has two
    boxes (a chain with two), phrase 2 has none."""
    images = pd.DataFrame({"image_id": ["a", "b", "c"], "width": 100, "height": 200})
    phrases = pd.DataFrame(
        {
            "phrase_id": [0, 1, 2, 3],
            "image_id": ["a", "a", "a", "b"],
            "chain_id": [1, 2, 3, 1],
            "has_box": [True, True, False, True],
            "text": ["two dogs", "the sky", "a view", "a man"],
        }
    )
    boxes = pd.DataFrame(
        {
            "image_id": ["a", "a", "a", "b"],
            "box_id": [0, 1, 2, 0],
            "x1": [0.0, 50.0, 0.0, 10.0],
            "y1": [0.0, 100.0, 0.0, 10.0],
            "x2": [50.0, 100.0, 100.0, 20.0],
            "y2": [100.0, 200.0, 40.0, 20.0],
        }
    )
    chain_boxes = pd.DataFrame(
        {"image_id": ["a", "a", "a", "b"], "chain_id": [1, 1, 2, 1], "box_id": [0, 1, 2, 0]}
    )
    return {"images": images, "phrases": phrases, "boxes": boxes, "chain_boxes": chain_boxes}


def test_prior_data_leaves_held_out_images_and_boxless_phrases_out() -> None:
    data = prior.prior_data(parsed_tables(), held_out={"b"})
    assert data.texts == ["the sky", "two dogs"]
    assert data.counts["prior_images"] == 1 and data.counts["prior_phrases"] == 2
    assert data.counts["images_held_out"] == 1
    # phrase 0 ("two dogs") has its two boxes, relative to the 100 x 200 image
    first = data.text_rows.tolist().index(1)
    np.testing.assert_allclose(
        data.truth[first][data.truth_valid[first]], [[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]]
    )
    assert data.image_valid[data.image[first]].sum() == 3  # every annotated box of image a


def test_max_iou_is_the_best_iou_over_the_valid_truth_boxes() -> None:
    rng = np.random.default_rng(0)
    candidates = np.sort(rng.random((3, 5, 2, 2)), axis=2).transpose(0, 1, 3, 2).reshape(3, 5, 4)
    truth = np.sort(rng.random((3, 4, 2, 2)), axis=2).transpose(0, 1, 3, 2).reshape(3, 4, 4)
    valid = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]], bool)
    expected = np.stack([box_iou(candidates[i], truth[i][valid[i]]).max(1) for i in range(3)])
    np.testing.assert_allclose(prior._max_iou(candidates, truth, valid), expected, atol=1e-6)


def test_candidates_are_positives_exactly_at_iou_one_half_with_the_phrase() -> None:
    data = prior.prior_data(parsed_tables(), held_out={"b"})
    pool = np.array([[0.9, 0.0, 1.0, 0.1]], np.float32)  # far from every truth box
    boxes, labels, valid = prior.candidate_batch(data, np.arange(2), pool, np.random.default_rng(0))
    assert boxes.shape == (2, prior.IMAGE_BOXES + prior.JITTERS + prior.PROPOSALS, 4)
    image = slice(0, prior.IMAGE_BOXES)
    sky = data.text_rows.tolist().index(0)
    # the sky's one box is a positive among the image's boxes; the dogs' two boxes are not
    assert labels[sky, image].sum() == 1 and labels[1 - sky, image].sum() == 2
    assert not labels[:, -prior.PROPOSALS :].any()
    assert not labels[~valid].any()


def test_the_learned_prior_head_adds_the_frozen_prior_to_the_matching_score() -> None:
    torch.manual_seed(0)
    box_prior = prior.BoxPrior(phrase_dim=6, hidden=8)
    head = prior.LearnedPriorHead(
        HeadConfig(region_dim=11, phrase_dim=6, hidden=4, dropout=0.0), box_prior
    )
    regions, phrases = torch.rand(5, 11), torch.rand(3, 6)
    index = torch.tensor([0, 1, 2, 3, 4, 0]), torch.tensor([0, 0, 1, 1, 2, 2])
    logits = pair_logits(head, regions, phrases, *index)
    with torch.no_grad():
        head.weight.zero_()
    without = pair_logits(head, regions, phrases, *index)
    expected = box_prior(phrases[index[1]], regions[index[0], -7:-3][:, None])[:, 0]
    torch.testing.assert_close(logits - without, expected)
    assert not any(p.requires_grad for p in head.frozen.parameters())


@pytest.mark.parametrize("shape", [(4,), (2, 3)])
def test_jittered_boxes_stay_in_the_image(shape: tuple[int, ...]) -> None:
    boxes = np.broadcast_to(np.array([0.0, 0.0, 1.0, 1.0], np.float32), (*shape, 4))
    out = prior.jittered(boxes, np.random.default_rng(1))
    assert out.shape == (*shape, 4) and out.min() >= 0 and out.max() <= 1


def test_paired_gain_counts_phrases_found_at_rank_1_and_bootstraps_images() -> None:
    # two images, two phrases each, two candidates per phrase; candidate 0 is the hit
    pairs = pd.DataFrame(
        {
            "phrase_id": np.repeat([0, 1, 2, 3], 2),
            "image_id": np.repeat(["a", "a", "b", "b"], 2),
            "iou": np.tile([0.9, 0.1], 4),
        }
    )
    before = np.tile([0.0, 1.0], 4)  # every phrase missed
    after = np.array([1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0])  # image a's phrases found
    gain = prior.paired_gain(pairs, before, after, draws=500)
    assert gain["gain"] == 0.5
    assert 0.0 <= gain["ci95_low"] < 0.5 < gain["ci95_high"] <= 1.0
    same = prior.paired_gain(pairs, before, before, draws=50)
    assert same == {"gain": 0.0, "ci95_low": 0.0, "ci95_high": 0.0}
