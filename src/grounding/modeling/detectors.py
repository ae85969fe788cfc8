"""Zero-shot object detectors from Hugging Face ``transformers``: OWLv2, OWL-ViT, Grounding DINO.

A :class:`ZeroShotDetector` is a model of ``AutoModelForZeroShotObjectDetection`` with its
``AutoProcessor``, loaded once from a Hugging Face model id or a local folder
(:func:`load_detector`). Its family comes from the model's config (``model_type``), and each
family in :data:`FAMILIES` runs it through the library's own processor and post-processing:

- ``owlv2``: one box per image patch, the same boxes whatever the text; a query's score of a
  box is the sigmoid of its class logit; class-agnostic, each box has an objectness logit.
- ``owlvit`` (OWL-ViT, OWLv2's predecessor): the same, without objectness: a box's
  class-agnostic score is its best score for the parts of a generic prompt (``"object."``).
- ``grounding-dino``: the queries are joined into one prompt (``"a man. a red shirt."``, the
  form it was trained on) and its boxes depend on that prompt; a query's score of a box is the
  highest sigmoid of the box's logits over the query's tokens (as the library's
  post-processing scores a box); prompts longer than the model's ``max_text_len`` tokens are
  split into several runs.

Weights are read from safetensors only (``use_safetensors=True``): a folder or repository
holding only a pickled ``pytorch_model.bin`` is refused and nothing is unpickled. No remote
code runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from grounding.errors import ConfigError, DataError
from grounding.modeling.hugging_face import model_type

if TYPE_CHECKING:
    import torch

OWLV2 = "owlv2"
OWLVIT = "owlvit"
GROUNDING_DINO = "grounding-dino"


@dataclass(frozen=True)
class Detections:
    """What a detector found in an image for some text queries: ``boxes (M, 4)`` float32
    ``x1, y1, x2, y2`` in the image's pixels, clipped to it (some may be empty), and
    ``scores (P, M)`` float32 in [0, 1], query by box (0 for a box of a run that did not see
    the query)."""

    boxes: np.ndarray
    scores: np.ndarray


@dataclass(frozen=True)
class Family:
    """How to run one family of detectors: ``detect(model, processor, image, queries)`` gives
    :class:`Detections`; ``objectness(model, processor, image, prompt)`` gives each box's
    class-agnostic score ``(boxes (M, 4), scores (M,))``; ``side(processor)`` is the longer
    image side, in pixels, that the model works at."""

    detect: Callable[[Any, Any, Image.Image, Sequence[str]], Detections]
    objectness: Callable[[Any, Any, Image.Image, str], tuple[np.ndarray, np.ndarray]]
    side: Callable[[Any], int]


class ZeroShotDetector:
    """A zero-shot detector of one of :data:`FAMILIES`, in eval mode: ``reference`` is what it
    was loaded from (a model id or folder), ``family`` its ``model_type``."""

    def __init__(self, reference: str, family: str, model: Any, processor: Any) -> None:
        self.reference = reference
        self.family = family
        self.model = model
        self.processor = processor

    @property
    def side(self) -> int:
        """The longer image side, in pixels, that the model sees (its processor resizes to)."""
        return FAMILIES[self.family].side(self.processor)

    def to(self, device: torch.device) -> ZeroShotDetector:
        self.model.to(device)
        return self

    def detect(self, image: Image.Image, queries: Sequence[str]) -> Detections:
        """Every box the model finds in ``image`` with every query's score (see
        :class:`Detections`); :class:`DataError` for a query too long for the model."""
        import torch

        with torch.inference_mode():
            return FAMILIES[self.family].detect(self.model, self.processor, image, queries)

    def objectness(self, image: Image.Image, prompt: str) -> tuple[np.ndarray, np.ndarray]:
        """Class-agnostic boxes ``(M, 4)`` (image pixels, clipped) and their scores ``(M,)``
        in [0, 1]: OWLv2's objectness, or OWL-ViT's and Grounding DINO's score for the
        generic ``prompt``."""
        import torch

        with torch.inference_mode():
            return FAMILIES[self.family].objectness(self.model, self.processor, image, prompt)


def load_detector(reference: str, *, device: torch.device | str | None = None) -> ZeroShotDetector:
    """The detector ``reference`` names (a Hugging Face model id, or a local folder written by
    ``save_pretrained``) on ``device`` (default the CPU). A model id is downloaded as
    ``transformers`` does (its cache; ``HF_HUB_OFFLINE=1`` reads only the cache).

    :class:`ConfigError` with one line for a reference that cannot be loaded, a model of
    another family (its ``model_type`` is named), or weights not in safetensors."""
    from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    where = f"hf:{reference}"
    family = model_type(reference)
    if family not in FAMILIES:
        raise ConfigError(
            f"{where}: a {family or 'unknown'!r} model; the zero-shot detectors are "
            f"{', '.join(sorted(FAMILIES))}"
        )
    try:
        processor = AutoProcessor.from_pretrained(reference)
        model = AutoModelForZeroShotObjectDetection.from_pretrained(reference, use_safetensors=True)
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"{where}: cannot load it with safetensors weights ({_one_line(error)}); "
            "pickled weights (pytorch_model.bin) are not loaded"
        ) from None
    model.eval().requires_grad_(False)
    model.to(device or "cpu")
    return ZeroShotDetector(reference, family, model, processor)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _device(model: Any) -> torch.device:
    from grounding.modeling.device import module_device

    return module_device(model)


def _target_size(image: Image.Image) -> list[tuple[int, int]]:
    return [(image.height, image.width)]


def _clipped(boxes: torch.Tensor, image: Image.Image) -> np.ndarray:
    """``boxes (M, 4)`` as float32 numpy, clipped to ``image``."""
    limits = np.array([image.width, image.height, image.width, image.height], dtype=np.float32)
    return np.clip(boxes.float().cpu().numpy(), 0, limits).astype(np.float32)


# OWL-ViT and OWLv2 ------------------------------------------------------------------------


def _owl_run(model: Any, processor: Any, image: Image.Image, queries: Sequence[str]) -> Any:
    inputs = processor(images=image, text=[list(queries)], return_tensors="pt", truncation=True)
    return model(**inputs.to(_device(model)))


def _owl_boxes(processor: Any, outputs: Any, image: Image.Image) -> np.ndarray:
    # the library's post-processing knows how each family resized (OWLv2 pads to a square);
    # keep every box
    (found,) = processor.image_processor.post_process_object_detection(
        outputs, threshold=float("-inf"), target_sizes=_target_size(image)
    )
    return _clipped(found["boxes"], image)


def _owl_detect(
    model: Any, processor: Any, image: Image.Image, queries: Sequence[str]
) -> Detections:
    outputs = _owl_run(model, processor, image, queries)
    scores = outputs.logits[0].sigmoid().T  # (patches, queries) -> (queries, patches)
    return Detections(_owl_boxes(processor, outputs, image), scores.float().cpu().numpy())


def _owlv2_objectness(
    model: Any, processor: Any, image: Image.Image, prompt: str
) -> tuple[np.ndarray, np.ndarray]:
    outputs = _owl_run(model, processor, image, [prompt])  # the text does not move a box
    scores = outputs.objectness_logits[0].sigmoid().float().cpu().numpy()
    return _owl_boxes(processor, outputs, image), scores


def _owlvit_objectness(
    model: Any, processor: Any, image: Image.Image, prompt: str
) -> tuple[np.ndarray, np.ndarray]:
    # OWL-ViT has no objectness head: a box's best score for the prompt's parts
    found = _owl_detect(model, processor, image, _prompt_parts(prompt))
    return found.boxes, found.scores.max(axis=0)


def _owl_side(processor: Any) -> int:
    size = processor.image_processor.size
    return int(max(size["height"], size["width"]))


def _prompt_parts(prompt: str) -> list[str]:
    """The queries of a prompt: ``"person. thing."`` -> ``["person", "thing"]``."""
    return [" ".join(part.split()) for part in prompt.split(".") if part.strip()]


# Grounding DINO ---------------------------------------------------------------------------


def _dino_query(text: str) -> str:
    """A query as Grounding DINO's prompts spell it: lower case, no ``.`` inside (the ``.``
    separates queries), as ``transformers`` merges candidate labels."""
    return " ".join(text.replace(".", " ").lower().split())


def _dino_groups(processor: Any, queries: list[str], limit: int) -> list[list[int]]:
    """Indices of ``queries`` in consecutive groups whose joined prompt fits ``limit`` tokens."""
    tokenizer = processor.tokenizer
    groups: list[list[int]] = []
    used = limit
    for index, query in enumerate(queries):
        tokens = len(tokenizer(query, add_special_tokens=False)["input_ids"]) + 1  # and "."
        if tokens + 2 > limit:  # [CLS] and [SEP]
            raise DataError(
                f"phrase {index + 1} is {tokens - 1} tokens; Grounding DINO reads at most "
                f"{limit - 3}: shorten it"
            )
        if used + tokens > limit:
            groups.append([])
            used = 2
        groups[-1].append(index)
        used += tokens
    return groups


def _dino_run(
    model: Any, processor: Any, image: Image.Image, queries: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """One prompt of ``queries``: boxes ``(Q, 4)`` and each query's scores ``(P, Q)``."""
    import torch

    prompt = ". ".join(queries) + "."
    inputs = processor(images=image, text=prompt, return_tensors="pt", return_offsets_mapping=True)
    offsets = inputs.pop("offset_mapping")[0].tolist()
    outputs = model(**inputs.to(_device(model)))
    # every box (a threshold below any score), no label (a text threshold above any);
    # positional: older transformers call the first threshold box_threshold
    (found,) = processor.post_process_grounded_object_detection(
        outputs, inputs["input_ids"], float("-inf"), 1.0, _target_size(image)
    )
    probabilities = outputs.logits[0].sigmoid()  # (boxes, max_text_len)
    scores = torch.zeros((len(queries), probabilities.shape[0]), device=probabilities.device)
    start = 0
    for index, query in enumerate(queries):
        end = start + len(query)
        tokens = [
            t
            for t, (first, last) in enumerate(offsets)
            if last > first and start <= first and last <= end and t < probabilities.shape[1]
        ]
        if tokens:  # else the phrase's tokens fell outside the text the model read: 0
            scores[index] = probabilities[:, tokens].amax(dim=1)
        start = end + 2  # ". "
    return _clipped(found["boxes"], image), scores.float().cpu().numpy()


def _dino_detect(
    model: Any, processor: Any, image: Image.Image, queries: Sequence[str]
) -> Detections:
    cleaned = [_dino_query(query) or "object" for query in queries]
    boxes, scores = [], []
    for group in _dino_groups(processor, cleaned, int(model.config.max_text_len)):
        found, found_scores = _dino_run(model, processor, image, [cleaned[i] for i in group])
        every = np.zeros((len(cleaned), len(found)), dtype=np.float32)
        every[group] = found_scores
        boxes.append(found)
        scores.append(every)
    return Detections(np.concatenate(boxes), np.concatenate(scores, axis=1))


def _dino_objectness(
    model: Any, processor: Any, image: Image.Image, prompt: str
) -> tuple[np.ndarray, np.ndarray]:
    found = _dino_detect(model, processor, image, _prompt_parts(prompt))
    return found.boxes, found.scores.max(axis=0)


def _dino_side(processor: Any) -> int:
    size = processor.image_processor.size
    return int(size.get("longest_edge") or max(size.values()))


#: The detector families :func:`load_detector` runs, by ``model_type``.
FAMILIES: dict[str, Family] = {
    OWLV2: Family(_owl_detect, _owlv2_objectness, _owl_side),
    OWLVIT: Family(_owl_detect, _owlvit_objectness, _owl_side),
    GROUNDING_DINO: Family(_dino_detect, _dino_objectness, _dino_side),
}
