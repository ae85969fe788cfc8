"""Box arithmetic on arrays of boxes in the package's canonical form.

``boxes (ndarray[N, 4])`` are ``(x1, y1, x2, y2)`` absolute pixels, 0-based, exclusive ends
(:mod:`grounding.flickr30k` converts the dataset's 1-based inclusive boxes once). IoU comes
from ``torchvision.ops`` rather than being written again.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.ops import box_iou as _torch_box_iou

#: The columns that hold a box in every table.
BOX_COLUMNS: list[str] = ["x1", "y1", "x2", "y2"]

#: Columns of :func:`box_geometry`.
GEOMETRY_COLUMNS: tuple[str, ...] = ("x1", "y1", "x2", "y2", "centre_x", "centre_y", "area")

#: The protocol's threshold: a box "finds" a phrase at IoU >= 0.5 with its ground truth.
IOU_THRESHOLD = 0.5


def box_iou(boxes1: np.ndarray, boxes2: np.ndarray) -> np.ndarray:
    """IoU of every box in ``boxes1 (N, 4)`` with every box in ``boxes2 (M, 4)``: ``(N, M)``."""
    iou = _torch_box_iou(
        torch.tensor(np.asarray(boxes1, dtype=np.float64).reshape(-1, 4)),
        torch.tensor(np.asarray(boxes2, dtype=np.float64).reshape(-1, 4)),
    )
    return iou.numpy()


def union_box(boxes: np.ndarray) -> np.ndarray:
    """The smallest box ``(4,)`` holding every box of ``boxes (N, 4)``, N >= 1 (MERGED-box)."""
    boxes = np.asarray(boxes).reshape(-1, 4)
    if len(boxes) == 0:
        raise ValueError("union_box needs at least one box")
    return np.array(
        [boxes[:, 0].min(), boxes[:, 1].min(), boxes[:, 2].max(), boxes[:, 3].max()],
        dtype=boxes.dtype,
    )


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
            (x2 - x1) * (y2 - y1) / (w * h),
        ],
        axis=1,
    ).astype(np.float32)
