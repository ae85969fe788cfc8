"""Box arithmetic on arrays of boxes in the package's canonical form.

``boxes (ndarray[N, 4])`` are ``(x1, y1, x2, y2)`` absolute pixels, 0-based, exclusive ends
(each dataset format converts its own convention once, in its reader). NumPy only:
the stages that label and score boxes need not import torch (seconds of start-up each).
"""

from __future__ import annotations

import numpy as np

#: The columns that hold a box in every table.
BOX_COLUMNS: list[str] = ["x1", "y1", "x2", "y2"]

#: Columns of :func:`box_geometry`.
GEOMETRY_COLUMNS: tuple[str, ...] = ("x1", "y1", "x2", "y2", "centre_x", "centre_y", "area")


def box_iou(boxes1: np.ndarray, boxes2: np.ndarray) -> np.ndarray:
    """IoU of every box in ``boxes1 (N, 4)`` with every box in ``boxes2 (M, 4)``: ``(N, M)``
    float64 (0 where two empty boxes meet)."""
    a = np.asarray(boxes1, dtype=np.float64).reshape(-1, 1, 4)
    b = np.asarray(boxes2, dtype=np.float64).reshape(1, -1, 4)
    width = (np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0])).clip(min=0)
    height = (np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1])).clip(min=0)
    intersection = width * height
    union = box_area(a) + box_area(b) - intersection
    return np.divide(intersection, union, out=np.zeros_like(intersection), where=union > 0)


def aligned_iou(boxes1: np.ndarray, boxes2: np.ndarray) -> np.ndarray:
    """IoU of each box in ``boxes1 (N, 4)`` with the box in the same row of ``boxes2 (N, 4)``:
    ``(N,)`` float64 (0 where two empty boxes meet)."""
    a = np.asarray(boxes1, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(boxes2, dtype=np.float64).reshape(-1, 4)
    width = (np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0])).clip(min=0)
    height = (np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1])).clip(min=0)
    intersection = width * height
    union = box_area(a) + box_area(b) - intersection
    return np.divide(intersection, union, out=np.zeros_like(intersection), where=union > 0)


def box_area(boxes: np.ndarray) -> np.ndarray:
    """Areas ``(...)`` of ``boxes (..., 4)`` in square pixels (negative for inverted boxes)."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_geometry(boxes: np.ndarray, width: np.ndarray, height: np.ndarray) -> np.ndarray:
    """Position and size of ``boxes (N, 4)`` relative to their images: ``(N, 7)`` float32.

    Columns: x1/W, y1/H, x2/W, y2/H, centre x/W, centre y/H, area/(W*H); ``width`` and
    ``height`` are the sizes ``(N,)`` of each box's image.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    w = np.asarray(width, dtype=np.float64)
    h = np.asarray(height, dtype=np.float64)
    x1, y1, x2, y2 = boxes.T
    return np.stack(
        [
            x1 / w,
            y1 / h,
            x2 / w,
            y2 / h,
            (x1 + x2) / (2 * w),
            (y1 + y2) / (2 * h),
            box_area(boxes) / (w * h),
        ],
        axis=1,
    ).astype(np.float32)
