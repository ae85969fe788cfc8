"""A torchvision detector as a candidate generator: ``pair.candidates: torchvision:<builder>``.

Any builder of ``torchvision.models.detection`` (Faster R-CNN, RetinaNet, FCOS, SSD, SSDlite,
Mask and Keypoint R-CNN) with its pretrained weights, loaded by
:func:`grounding.modeling.torchvision_models.pretrained_model` (torchvision's cache
``$TORCH_HOME/hub/checkpoints``, downloaded when absent; read without unpickling).

The candidates are the detector's top boxes by score, class-agnostic, as selective search's
are its largest: the model's score floor is set to 0 and it returns up to
:data:`DETECTIONS_PER_PROPOSAL` times the budget; the same object found under several classes
(or boxes nearly identical to a better one, IoU above ``dedupe_iou``) is kept once, best score
first, and the first ``max_proposals`` kept. So a weak or untrained detector still gives
candidates. Mask and keypoint heads are switched off: only boxes are needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from grounding.candidates import GENERATORS, suppress_overlaps
from grounding.modeling.device import as_device

if TYPE_CHECKING:
    import torch

#: The scheme of ``pair.candidates`` (``torchvision:<builder>``) and of its settings' section.
SCHEME = "torchvision"
#: :attr:`grounding.candidates.Proposer.version`.
VERSION = 1
#: How many detections the model may return per candidate kept: boxes of one object under
#: several classes, and near-duplicates, are dropped after it.
DETECTIONS_PER_PROPOSAL = 10


@dataclass(frozen=True)
class Settings:
    """``candidates.torchvision`` in ``params.yaml``: ``weights``, the entry of the builder's
    weights enum (``DEFAULT``, ``COCO_V1``, ...); ``max_proposals``, the budget; a box whose
    IoU with a better-scored kept box is above ``dedupe_iou`` is dropped."""

    weights: str = "DEFAULT"
    max_proposals: int = 100
    dedupe_iou: float = 0.9

    def __post_init__(self) -> None:
        if self.max_proposals < 1:
            raise ValueError(f"max_proposals must be >= 1, got {self.max_proposals}")
        if not 0.0 < self.dedupe_iou <= 1.0:
            raise ValueError(f"dedupe_iou must be in (0, 1], got {self.dedupe_iou}")
        if not self.weights:
            raise ValueError("weights must name an entry of the builder's weights enum")


class Detector:
    """A torchvision detection model as a :class:`~grounding.candidates.Proposer`, built once
    (weights loaded) on ``device`` in eval mode."""

    version = VERSION

    def __init__(self, builder: str, settings: Settings, *, device: Any = None) -> None:
        import torchvision

        from grounding.modeling.torchvision_models import (
            check_builder,
            pretrained_model,
            weights_entry,
        )

        check_builder(builder, torchvision.models.detection, "detection builder", "pair.candidates")
        weights_entry(builder, settings.weights, f"candidates.{SCHEME}.weights")
        self.builder = builder
        self.settings = settings
        self.device = as_device(device)
        model = pretrained_model(builder, settings.weights)
        detections = settings.max_proposals * DETECTIONS_PER_PROPOSAL
        for part in (model, getattr(model, "rpn", None), getattr(model, "roi_heads", None)):
            if hasattr(part, "score_thresh"):  # no score floor: the budget alone cuts
                part.score_thresh = 0.0
            if hasattr(part, "detections_per_img"):
                part.detections_per_img = detections
        roi_heads = getattr(model, "roi_heads", None)
        if roi_heads is not None:  # no masks, no keypoints: boxes are all a candidate is
            roi_heads.mask_roi_pool = None
            roi_heads.keypoint_roi_pool = None
        self.model = model.eval().requires_grad_(False).to(self.device)

    def propose(self, image: Image.Image) -> np.ndarray:
        """Boxes ``(N, 4)`` float32, ``x1, y1, x2, y2`` in ``image``'s pixels, best score first;
        ``N`` at most ``max_proposals``."""
        return self.propose_scored(image)[0]

    def propose_scored(self, image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`propose`'s boxes and their detection scores ``(N,)`` float32 (the best
        class's probability, or the score the model gives its box), in the same order."""
        import torch
        from torchvision.transforms.functional import pil_to_tensor

        pixels = pil_to_tensor(image.convert("RGB")).to(self.device, torch.float32) / 255
        with torch.inference_mode():
            found = self.model([pixels])[0]
        boxes, scores = class_agnostic(
            found["boxes"].float().cpu(),
            found["scores"].float().cpu(),
            size=image.size,
            dedupe_iou=self.settings.dedupe_iou,
            limit=self.settings.max_proposals,
        )
        return boxes.numpy(), scores.numpy()


def class_agnostic(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    *,
    size: tuple[int, int],
    dedupe_iou: float,
    limit: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Detections ``boxes (N, 4)`` (``x1, y1, x2, y2``) with ``scores (N,)`` as candidates of an
    image of ``size`` ``(width, height)``: clipped to it, boxes under a pixel wide or high
    dropped, then greedily by score (ties in the order given) each box kept unless its IoU with
    a kept one is above ``dedupe_iou``, at most ``limit``. Returns the kept boxes (float32)
    and their scores, best first."""
    import torch

    width, height = size
    boxes = boxes.reshape(-1, 4).clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    sized = ((boxes[:, 2] - boxes[:, 0]) >= 1) & ((boxes[:, 3] - boxes[:, 1]) >= 1)
    boxes, scores = boxes[sized], scores[sized]
    order = torch.sort(scores, descending=True, stable=True).indices
    boxes, scores = boxes[order], scores[order]
    chosen = torch.from_numpy(suppress_overlaps(boxes.numpy(), dedupe_iou, limit))
    return boxes[chosen].float(), scores[chosen].float()


def _make(reference: str, settings: Settings, *, device: Any = None) -> Detector:
    return Detector(reference, settings, device=device)


GENERATORS.add(SCHEME, _make, settings=Settings, scheme=True)
