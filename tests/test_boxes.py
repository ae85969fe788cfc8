"""Box arithmetic against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from grounding.boxes import GEOMETRY_COLUMNS, box_area, box_geometry, box_iou


def test_iou_of_identical_boxes_is_one() -> None:
    assert box_iou(np.array([[3, 4, 10, 12]]), np.array([[3, 4, 10, 12]])) == pytest.approx(1.0)


def test_iou_of_disjoint_and_touching_boxes_is_zero() -> None:
    iou = box_iou(np.array([[0, 0, 2, 2]]), np.array([[5, 5, 6, 6], [2, 0, 4, 2]]))
    assert iou.tolist() == [[0.0, 0.0]]  # the second one shares only the edge x = 2


def test_iou_hand_values() -> None:
    boxes1 = np.array([[0, 0, 2, 2], [0, 0, 4, 4]], dtype=np.float32)
    boxes2 = np.array([[1, 0, 3, 2], [1, 1, 3, 3], [0, 0, 10, 7]], dtype=np.float32)
    expected = [
        # half overlap: intersection 2, union 4 + 4 - 2 = 6
        [2 / 6, 1 / (4 + 4 - 1), 4 / 70],
        # (0,0,4,4) vs (1,0,3,2): inter 4, union 16; holds (1,1,3,3): 4/16; inside 16/70
        [4 / 16, 4 / 16, 16 / 70],
    ]
    iou = box_iou(boxes1, boxes2)
    assert iou.shape == (2, 3)
    np.testing.assert_allclose(iou, expected, rtol=1e-12)


def test_iou_of_a_box_and_its_top_half_is_exactly_half() -> None:
    # (0,0,10,10) vs (0,0,10,5): 50 / 100, the protocol's threshold, with no rounding error
    assert box_iou(np.array([[0, 0, 10, 10]]), np.array([[0, 0, 10, 5]]))[0, 0] == 0.5


def test_box_area_hand_values_and_shapes() -> None:
    boxes = np.array([[0, 0, 2, 3], [10, 20, 30, 60], [5, 5, 5, 9]], dtype=np.float32)
    np.testing.assert_array_equal(box_area(boxes), [6.0, 800.0, 0.0])
    # any leading shape: (2, 1, 4) -> (2, 1)
    assert box_area(boxes[:2].reshape(2, 1, 4)).tolist() == [[6.0], [800.0]]
    # an inverted box (x2 < x1) has a negative area: box_area does not clip
    assert box_area(np.array([[4.0, 0.0, 1.0, 2.0]])).tolist() == [-6.0]


def test_box_geometry_hand_example() -> None:
    boxes = np.array([[10, 20, 30, 60], [0, 0, 50, 50]])
    geometry = box_geometry(boxes, width=np.array([100, 50]), height=np.array([200, 100]))
    assert geometry.dtype == np.float32
    assert geometry.shape == (2, 7)
    # the columns are named in the order box_geometry stacks them
    assert GEOMETRY_COLUMNS == ("x1", "y1", "x2", "y2", "centre_x", "centre_y", "area")
    np.testing.assert_allclose(
        geometry,
        [
            # x1/W, y1/H, x2/W, y2/H, cx/W, cy/H, area/(W*H) = 20*40 / 20000
            [0.1, 0.1, 0.3, 0.3, 0.2, 0.2, 0.04],
            [0.0, 0.0, 1.0, 0.5, 0.5, 0.25, 0.5],
        ],
        rtol=1e-6,
    )


def test_iou_agrees_with_torchvision_on_random_boxes() -> None:
    import torch
    from torchvision.ops import box_iou as torch_box_iou

    rng = np.random.default_rng(0)
    corners = rng.uniform(0, 100, size=(2, 50, 4))
    boxes1, boxes2 = (
        np.concatenate([c[:, :2].clip(max=c[:, 2:]), np.maximum(c[:, :2], c[:, 2:])], 1)
        for c in corners
    )
    expected = torch_box_iou(torch.tensor(boxes1), torch.tensor(boxes2)).numpy()
    np.testing.assert_allclose(box_iou(boxes1, boxes2), expected, rtol=1e-10)


def test_iou_of_empty_boxes_is_zero_and_empty_inputs_give_empty_shapes() -> None:
    assert box_iou(np.array([[1, 1, 1, 1]]), np.array([[1, 1, 1, 1]])).tolist() == [[0.0]]
    assert box_iou(np.empty((0, 4)), np.array([[0, 0, 1, 1]])).shape == (0, 1)
