"""Selective search proposals on an image of two rectangles, and the greedy dedupe by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from stand_ins import SETTINGS, TWO_SHAPES, two_shapes

from grounding.boxes import box_area, box_iou
from grounding.candidates.selective_search import canonical_order, check_settings, dedupe, propose
from grounding.io import read_image

SAMPLE_IMAGES = Path(__file__).resolve().parents[2] / "data" / "sample" / "images"


def test_proposals_cover_the_shapes_and_respect_the_settings() -> None:
    boxes = propose(two_shapes(), **SETTINGS)
    assert boxes.dtype == np.float32 and boxes.shape[1] == 4
    assert 2 <= len(boxes) <= SETTINGS["max_proposals"]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 240).all() and (boxes[:, 3] <= 160).all()
    assert (np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) >= 8).all()
    assert (box_iou(boxes, TWO_SHAPES).max(axis=0) >= 0.7).all()
    assert (np.diff(box_area(boxes)) <= 0).all()  # largest first
    assert box_iou(boxes, boxes)[np.triu_indices(len(boxes), 1)].max() < 0.7  # deduped


def test_proposals_of_a_downscaled_image_are_in_original_pixels() -> None:
    large = two_shapes().resize((960, 640), Image.Resampling.NEAREST)
    boxes = propose(large, **SETTINGS)  # searched at 300 px, scaled back by 3.2
    assert (box_iou(boxes, TWO_SHAPES * 4).max(axis=0) >= 0.7).all()
    assert boxes[:, 2].max() > 300  # not left in the searched image's pixels


def test_max_proposals_caps_the_count() -> None:
    assert len(propose(two_shapes(), **{**SETTINGS, "max_proposals": 3})) == 3


def test_quality_mode_also_finds_the_shapes() -> None:
    boxes = propose(two_shapes(), **{**SETTINGS, "mode": "quality", "max_side": 120})
    assert (box_iou(boxes, TWO_SHAPES).max(axis=0) >= 0.7).all()


def test_no_proposal_survives_a_min_size_larger_than_the_image() -> None:
    boxes = propose(two_shapes(), **{**SETTINGS, "min_size": 500})
    assert boxes.shape == (0, 4) and boxes.dtype == np.float32


def test_dedupe_by_hand() -> None:
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 9], [20, 20, 30, 30], [0, 0, 10, 10]])
    # box 1 has IoU 0.9 with box 0; box 3 is box 0 again
    assert dedupe(boxes, max_iou=0.7, limit=10).tolist() == [0, 2]
    assert dedupe(boxes, max_iou=0.95, limit=10).tolist() == [0, 1, 2]
    assert dedupe(boxes, max_iou=1.0, limit=10).tolist() == [0, 1, 2]  # exact duplicate only
    assert dedupe(boxes, max_iou=0.7, limit=1).tolist() == [0]
    assert dedupe(np.zeros((0, 4)), max_iou=0.7, limit=5).tolist() == []


def test_dedupe_compares_with_kept_boxes_only() -> None:
    # box 1 is dropped (IoU 2/3 with box 0); box 2 is as close to box 1, but box 1 was not kept
    boxes = np.array([[0, 0, 10, 10], [2, 0, 12, 10], [4, 0, 14, 10]])
    assert box_iou(boxes[2:], boxes[:1])[0, 0] < 0.7
    assert dedupe(boxes, max_iou=0.65, limit=10).tolist() == [0, 2]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"mode": "slow"}, "mode must be 'fast' or 'quality'"),
        ({"max_side": 8}, "max_side >= 16"),
        ({"min_size": 0}, "min_size >= 1"),
        ({"max_proposals": 0}, "max_proposals >= 1"),
        ({"dedupe_iou": 0.0}, r"dedupe_iou must be in \(0, 1\]"),
        ({"dedupe_iou": 1.5}, r"dedupe_iou must be in \(0, 1\]"),
    ],
)
def test_bad_settings_are_refused(change: dict, message: str) -> None:
    settings = {**SETTINGS, **change}
    with pytest.raises(ValueError, match=message):
        check_settings(**settings)
    with pytest.raises(ValueError, match=message):
        propose(two_shapes(), **settings)


def test_good_settings_pass() -> None:
    check_settings(**SETTINGS)
    check_settings(**{**SETTINGS, "mode": "quality", "max_side": 16, "dedupe_iou": 1.0})


def test_the_same_pixels_give_the_same_proposals_whatever_ran_before() -> None:
    # selective search orders its boxes at random, from state the process's earlier calls
    # moved: on these sample images a second call gave other kept boxes before the order fix
    images = [read_image(path) for path in sorted(SAMPLE_IMAGES.glob("*.jpg"))[:4]]
    first = [propose(image, **SETTINGS) for image in images]
    again = [propose(image, **SETTINGS) for image in reversed(images)][::-1]
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)


def test_canonical_order_is_largest_first_then_by_coordinates_whatever_the_input_order() -> None:
    boxes = np.array(
        [[0, 0, 2, 2], [5, 5, 7, 7], [0, 0, 3, 3], [1, 0, 3, 2], [0, 1, 2, 3]], dtype=np.float64
    )
    expected = boxes[[2, 0, 4, 3, 1]]  # the 3x3 box, then the 2x2 boxes by x1, y1
    for seed in range(5):
        shuffled = np.random.default_rng(seed).permutation(boxes)
        np.testing.assert_array_equal(shuffled[canonical_order(shuffled)], expected)
