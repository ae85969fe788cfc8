"""``hf:<model id or folder>``: a zero-shot detector's class-agnostic boxes as candidates.

An OWLv2, OWL-ViT or Grounding DINO model of Hugging Face ``transformers``
(:mod:`grounding.modeling.detectors`) proposes the boxes it finds most object-like: OWLv2 by
its objectness logit (one box per image patch), OWL-ViT and Grounding DINO by their score for
the generic ``prompt`` (``"object."``). The boxes are clipped to the image, empty ones dropped,
near-duplicates of a better box dropped (non-maximum suppression: IoU above ``nms_iou``;
1.0 keeps them), and the ``max_proposals`` best kept, best first. There is no score floor: a weak or
untrained detector still gives its best boxes, as selective search gives its largest.

Settings: ``candidates.hf`` in ``params.yaml``. :meth:`DetectorProposer.propose_scored` also
gives each box's score (in [0, 1]), for a region feature.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from grounding.candidates import GENERATORS, suppress_overlaps
from grounding.modeling.detectors import ZeroShotDetector, load_detector
from grounding.modeling.device import as_device
from grounding.modeling.hugging_face import HF_SCHEME

#: The scheme of Hugging Face models (``pair.candidates: hf:<model id or folder>``).

#: :attr:`grounding.candidates.Proposer.version` of :class:`DetectorProposer`.
VERSION = 1


@dataclass(frozen=True)
class Settings:
    """``candidates.hf`` in ``params.yaml``: at most ``max_proposals`` boxes; ``prompt`` is the
    text OWL-ViT and Grounding DINO score boxes by (OWLv2 uses its objectness instead);
    ``nms_iou``: a box overlapping a better kept box by more than this IoU is dropped."""

    max_proposals: int = 100
    prompt: str = "object."
    nms_iou: float = 0.7

    def __post_init__(self) -> None:
        if not isinstance(self.max_proposals, int) or self.max_proposals < 1:
            raise ValueError(f"max_proposals must be a whole number >= 1, got {self.max_proposals}")
        if not str(self.prompt).strip(" ."):
            raise ValueError(f"prompt must name something (such as 'object.'), got {self.prompt!r}")
        if not 0.0 < self.nms_iou <= 1.0:
            raise ValueError(f"nms_iou must be in (0, 1], got {self.nms_iou}")


class DetectorProposer:
    """A :class:`~grounding.candidates.Proposer` from a loaded :class:`ZeroShotDetector`."""

    version = VERSION

    def __init__(self, detector: ZeroShotDetector, settings: Settings) -> None:
        self.detector = detector
        self.settings = settings

    def propose(self, image: Image.Image) -> np.ndarray:
        """Boxes ``(N, 4)`` float32 ``x1, y1, x2, y2`` in ``image``'s pixels, best first;
        ``N = min(max_proposals, the non-empty boxes left after suppression)``."""
        return self.propose_scored(image)[0]

    def propose_scored(self, image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`propose`'s boxes ``(N, 4)`` and their detector scores ``(N,)`` float32 in
        [0, 1], best first."""
        boxes, scores = self.detector.objectness(image.convert("RGB"), self.settings.prompt)
        return best_boxes(boxes, scores, self.settings.max_proposals, self.settings.nms_iou)


def best_boxes(
    boxes: np.ndarray, scores: np.ndarray, limit: int, nms_iou: float
) -> tuple[np.ndarray, np.ndarray]:
    """The non-empty ``boxes (M, 4)`` (``x2 > x1``, ``y2 > y1``) by ``scores (M,)``, highest
    first (ties in the given order), each dropped if its IoU with a higher one kept is above
    ``nms_iou`` (1.0 keeps every box), at most ``limit``:
    ``(boxes (N, 4) float32, scores (N,) float32)``."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    boxes, scores = boxes[valid], scores[valid]
    order = np.argsort(-scores, kind="stable")
    boxes, scores = boxes[order], scores[order]
    keep = suppress_overlaps(boxes, nms_iou, limit)
    return boxes[keep], scores[keep]


def _make(reference: str, settings: Settings, *, device: Any = None) -> DetectorProposer:
    return DetectorProposer(load_detector(reference, device=as_device(device)), settings)


GENERATORS.add(HF_SCHEME, _make, settings=Settings, scheme=True)
