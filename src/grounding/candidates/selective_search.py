"""Selective search: class-agnostic candidate boxes for an image nobody annotated.

OpenCV's selective search (``opencv-contrib-python-headless``) groups superpixels bottom-up
into boxes. It runs on the CPU with no weights to download. The image is shrunk to
``max_side`` first (selective search costs grow with the pixel count), the boxes are scaled
back, tiny boxes dropped, the rest ordered largest first, near-duplicates of a larger box
dropped, and the first ``max_proposals`` kept.

Largest first, because selective search's own order starts with small fragments while
phrases mostly name people, clothing and scenery. On 40 real Flickr30k images (fast mode,
300 px, dedupe IoU 0.7) the share of phrases that one of the first 100 proposals covers at
IoU >= 0.5 was 0.88 in this order, 0.70 in selective search's.

Boxes of equal area are put in coordinate order. Selective search's own order is random and
depends on what the process ran before (on the same pixels, a later call orders its boxes
differently; seeding ``cv2.setRNGSeed`` does not fix it), and through the ties and the greedy
dedupe that order changed the kept boxes of 131 of 985 real images between two runs. Its set
of boxes does not change: in this order the proposals are a function of the pixels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
from PIL import Image

from grounding.boxes import box_area, box_iou
from grounding.candidates import GENERATORS, SELECTIVE_SEARCH

#: :attr:`grounding.candidates.Proposer.version`: 2 since equal areas are in coordinate order
VERSION = 2


def check_settings(
    *, mode: str, max_side: int, min_size: int, dedupe_iou: float, max_proposals: int
) -> None:
    """Raise :class:`ValueError` naming the first setting of :func:`propose` out of range."""
    if mode not in ("fast", "quality"):
        raise ValueError(f"selective search mode must be 'fast' or 'quality', got {mode!r}")
    if max_side < 16 or min_size < 1 or max_proposals < 1:
        raise ValueError(
            "selective search needs max_side >= 16, min_size >= 1 and max_proposals >= 1, got "
            f"{max_side}, {min_size}, {max_proposals}"
        )
    if not 0.0 < dedupe_iou <= 1.0:
        raise ValueError(f"dedupe_iou must be in (0, 1], got {dedupe_iou}")


@dataclass(frozen=True)
class Settings:
    """``candidates.selective_search`` in ``params.yaml`` (see :func:`propose`)."""

    mode: Literal["fast", "quality"] = "fast"
    max_side: int = 300
    min_size: int = 16
    dedupe_iou: float = 0.7
    max_proposals: int = 100

    def __post_init__(self) -> None:
        check_settings(**asdict(self))


@dataclass(frozen=True)
class SelectiveSearch:
    """:func:`propose` with its settings: a :class:`~grounding.candidates.Proposer`."""

    settings: Settings
    version: int = VERSION

    def propose(self, image: Image.Image) -> np.ndarray:
        return propose(image, **asdict(self.settings))


def propose(
    image: Image.Image,
    *,
    mode: Literal["fast", "quality"],
    max_side: int,
    min_size: int,
    dedupe_iou: float,
    max_proposals: int,
) -> np.ndarray:
    """Boxes ``(N, 4)`` float32 in ``image``'s pixels (0-based, exclusive ends), largest first;
    ``N`` may be 0 (nothing survives the size filter) but never exceeds ``max_proposals``.

    ``mode``: selective search's ``fast`` or ``quality`` strategy; ``max_side``: the longer
    side (pixels) the image is shrunk to first; ``min_size``: the smallest box side kept, in
    original pixels; ``dedupe_iou``: a box this close to a kept one is dropped.
    """
    import cv2

    check_settings(
        mode=mode,
        max_side=max_side,
        min_size=min_size,
        dedupe_iou=dedupe_iou,
        max_proposals=max_proposals,
    )
    scale = min(1.0, max_side / max(image.size))
    small = image.convert("RGB")
    if scale < 1.0:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        small = small.resize(size, Image.Resampling.BILINEAR)
    search = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    search.setBaseImage(np.ascontiguousarray(np.asarray(small)[:, :, ::-1]))  # RGB -> BGR
    if mode == "fast":
        search.switchToSelectiveSearchFast()
    else:
        search.switchToSelectiveSearchQuality()
    rects = np.asarray(search.process(), dtype=np.float64).reshape(-1, 4)  # x, y, w, h
    boxes = np.concatenate([rects[:, :2], rects[:, :2] + rects[:, 2:]], axis=1) / scale
    boxes = np.clip(boxes, 0, [image.width, image.height, image.width, image.height])
    sides = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    boxes = boxes[sides >= min_size]
    boxes = boxes[canonical_order(boxes)]
    keep = dedupe(boxes, dedupe_iou, max_proposals)
    return boxes[keep].astype(np.float32)


def canonical_order(boxes: np.ndarray) -> np.ndarray:
    """Indices ordering ``boxes (N, 4)`` largest area first, equal areas by ``x1, y1, x2, y2``:
    the same for any order the same boxes come in."""
    return np.lexsort((boxes[:, 3], boxes[:, 2], boxes[:, 1], boxes[:, 0], -box_area(boxes)))


def dedupe(boxes: np.ndarray, max_iou: float, limit: int) -> np.ndarray:
    """Indices of the boxes kept, in order: each box is kept unless its IoU with a box kept
    before it is ``>= max_iou`` (greedy, like non-maximum suppression by rank); at most
    ``limit``. ``max_iou`` 1.0 drops only exact duplicates."""
    kept: list[int] = []
    kept_boxes = np.empty((0, 4))
    for index, box in enumerate(np.asarray(boxes, dtype=np.float64).reshape(-1, 4)):
        if len(kept) == limit:
            break
        if len(kept) and box_iou(box[None], kept_boxes).max() >= max_iou:
            continue
        kept.append(index)
        kept_boxes = np.vstack([kept_boxes, box])
    return np.asarray(kept, dtype=np.int64)


def _make(settings: Settings, *, device: object = None) -> SelectiveSearch:
    return SelectiveSearch(settings)


GENERATORS.add(SELECTIVE_SEARCH, _make, settings=Settings)
