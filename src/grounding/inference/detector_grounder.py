"""A zero-training grounder from a Hugging Face zero-shot detector: it grounds the phrases
itself (a family of :mod:`grounding.inference.zero_shot`).

``grounding predict --model hf:<OWLv2, OWL-ViT or Grounding DINO id or folder>`` needs no
training: the detector, loaded once (:func:`~grounding.modeling.detectors.load_detector`), is
both parts of a :class:`~grounding.inference.grounder.Grounder`:

- its candidates are the detector's class-agnostic boxes (the ``hf:`` generator of
  :mod:`grounding.candidates.zero_shot`, built on the same loaded model);
- its :class:`DetectorScorer` runs the detector with the phrases as text queries and scores
  each candidate, for each phrase, by the detector's boxes that overlap it: the highest
  ``IoU(candidate, detector box) x the phrase's probability for that box``. A candidate that
  is one of the detector's own boxes (always, for OWLv2, whose boxes do not depend on the
  text) gets at least the detector's own probability; a candidate that only half overlaps a
  confident box gets half that box's probability from it.

The threshold is the one the library's post-processing keeps boxes above by default
(:data:`THRESHOLDS`: 0.1 for OWLv2 and OWL-ViT, 0.25 for Grounding DINO).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from grounding.boxes import box_iou
from grounding.candidates.zero_shot import DetectorProposer, Settings
from grounding.errors import DataError
from grounding.inference.grounder import Grounder
from grounding.modeling.detectors import (
    GROUNDING_DINO,
    OWLV2,
    OWLVIT,
    ZeroShotDetector,
    load_detector,
)
from grounding.modeling.hugging_face import HF_SCHEME
from grounding.schemas import FeaturesMeta

if TYPE_CHECKING:
    import torch

#: The default threshold of each family: its library post-processing's default.
THRESHOLDS: dict[str, float] = {OWLV2: 0.1, OWLVIT: 0.1, GROUNDING_DINO: 0.25}


class DetectorScorer:
    """A :class:`~grounding.inference.grounder.Scorer` from a zero-shot detector (see the
    module docstring)."""

    def __init__(self, detector: ZeroShotDetector) -> None:
        self.detector = detector
        self.device: torch.device | None = None

    @property
    def features(self) -> FeaturesMeta:
        """The detector as both towers; ``image_size`` is the side its processor resizes to.
        It makes no features of its own (their sizes are 0)."""
        name = f"{HF_SCHEME}:{self.detector.reference}"
        return FeaturesMeta(name, None, name, self.detector.side, False, 0, 0, 0, 0)

    def score(self, image: Image.Image, boxes: np.ndarray, phrases: Sequence[str]) -> np.ndarray:
        """Scores ``(len(phrases), len(boxes))`` in [0, 1] of every phrase with every box
        ``(N, 4)`` (pixels of ``image``)."""
        found = self.detector.detect(image.convert("RGB"), list(phrases))
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        return match_scores(boxes, found.boxes, found.scores)

    def place(self, device: str, where: str) -> None:
        from grounding.modeling.device import resolve_device

        placed = resolve_device(device, where)
        self.detector.to(placed)
        self.device = placed

    def out_of_memory_hint(self, advice: str) -> AbstractContextManager[object]:
        from grounding.modeling.device import gpu_memory_hint

        return gpu_memory_hint(self.device, advice) if self.device else nullcontext()

    def onnx_parts(self) -> tuple[dict[str, bytes], str, dict[str, Any]]:
        raise DataError(
            f"{HF_SCHEME}:{self.detector.reference}: a zero-shot detector has no ONNX export here; "
            "export a grounder trained by the pipeline"
        )


def match_scores(boxes: np.ndarray, found: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Each phrase's score of each box: ``max over m of IoU(boxes[n], found[m]) x
    scores[p, m]`` for ``boxes (N, 4)``, the detector's boxes ``found (M, 4)`` and their
    scores ``(P, M)``: ``(P, N)`` float32."""
    overlap = box_iou(boxes, found).astype(np.float32)  # (N, M)
    if overlap.shape[1] == 0:
        return np.zeros((scores.shape[0], len(boxes)), dtype=np.float32)
    return (overlap[None, :, :] * scores[:, None, :]).max(axis=2)


def detector_grounder(reference: str) -> Grounder:
    """A grounder whose candidates and scores both come from the detector ``reference``
    names (loaded once, on the CPU until placed)."""
    detector = load_detector(reference)
    settings = Settings()
    return Grounder(
        DetectorScorer(detector),
        threshold=THRESHOLDS[detector.family],
        candidates=f"{HF_SCHEME}:{reference}",
        settings=asdict(settings),
        built=DetectorProposer(detector, settings),
        pretrained_on=f"the data {detector.family} was pretrained on (zero-training)",
    )
