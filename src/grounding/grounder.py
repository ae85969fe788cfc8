"""Ground phrases in a new image: proposals, features, the trained head and its threshold.

A :class:`Grounder` is the whole trained system in one object. Its *bundle* (plain
containers and tensors) is what ``models/grounder.pt`` and the MLflow model hold: the head's
weights, how its features were made (backbone, text encoder, image size, context), the
threshold chosen on validation and the proposal settings. Backbone and encoder weights are
not copied: they come from the installed packages (or the local files the features params
named), as in the pipeline.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from grounding.errors import DataError
from grounding.proposals import ProposalSettings, propose

if TYPE_CHECKING:
    from grounding.features import Backbone, TextEncoder
    from grounding.model import MatchingHead

#: The smallest image side accepted (the backbone's stride is 32 pixels).
MIN_IMAGE_SIDE = 32
#: The most pixels accepted; larger images are almost certainly a mistake (or an attack).
MAX_IMAGE_PIXELS = 60_000_000

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
    """Proposals + backbone + text encoder + head + threshold."""

    def __init__(
        self,
        head: MatchingHead,
        backbone: Backbone,
        encoder: TextEncoder,
        *,
        features: dict[str, Any],
        threshold: float,
        proposals: ProposalSettings,
    ) -> None:
        self.head = head
        self.backbone = backbone
        self.encoder = encoder
        self.features = features
        self.threshold = threshold
        self.proposal_settings = proposals

    @classmethod
    def from_bundle(cls, bundle: dict[str, Any]) -> Grounder:
        """Rebuild from :func:`grounder_bundle`'s output, loading backbone and encoder."""
        from pathlib import Path

        from grounding.features import load_backbone, load_text_encoder
        from grounding.model import head_from_state

        try:
            features = bundle["features"]
            weights = features.get("backbone_weights")
            return cls(
                head_from_state(bundle["head"]),
                load_backbone(features["backbone"], Path(weights) if weights else None),
                load_text_encoder(features["text_encoder"]),
                features=features,
                threshold=float(bundle["threshold"]),
                proposals=ProposalSettings(**bundle["proposals"]),
            )
        except (KeyError, TypeError) as error:
            raise DataError(f"not a grounder bundle of this project (no {error})") from None
        except ValueError as error:  # a backbone, encoder or setting this install lacks
            raise DataError(f"the grounder cannot be rebuilt here: {error}") from None

    def propose(self, image: Image.Image) -> np.ndarray:
        """The proposals of ``image`` under this grounder's settings (not cached)."""
        return propose(image, self.proposal_settings)

    def ground(
        self,
        image: Image.Image,
        phrases: Sequence[str],
        *,
        top_k: int = 1,
        proposals: Callable[[Image.Image], np.ndarray] | None = None,
    ) -> list[Grounding]:
        """Each phrase's ``top_k`` best proposals of ``image``, one pass over the image for
        all phrases. ``proposals`` computes (or fetches from a cache) the boxes; by default
        :meth:`propose`. Bad input raises :class:`DataError`; an image where no proposal
        survives gives empty results with the reason."""
        if top_k < 1:
            raise DataError(f"top_k must be >= 1, got {top_k}")
        phrases = check_phrases(phrases)
        image = check_image(image)
        boxes = (proposals or self.propose)(image)
        if len(boxes) == 0:
            reason = (
                "no proposal survived: every box selective search found was smaller than "
                f"min_size {self.proposal_settings.min_size} pixels"
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
        import torch

        from grounding.features import encode_phrases, image_features

        regions = image_features(
            self.backbone,
            image,
            boxes,
            image_size=int(self.features["image_size"]),
            context=bool(self.features.get("context", False)),
        )
        texts = encode_phrases(self.encoder, list(phrases))
        with torch.inference_mode():
            region = self.head.region(torch.from_numpy(regions))  # (N, hidden)
            phrase = self.head.phrase(torch.from_numpy(texts))  # (P, hidden)
            n_phrases, n_regions = len(phrase), len(region)
            logits = self.head.score_projected(
                region.unsqueeze(0).expand(n_phrases, -1, -1).reshape(n_phrases * n_regions, -1),
                phrase.unsqueeze(1).expand(-1, n_regions, -1).reshape(n_phrases * n_regions, -1),
            )
            return torch.sigmoid(logits).reshape(n_phrases, n_regions).numpy()


def grounder_bundle(
    checkpoint: dict[str, Any], threshold: float, proposals: ProposalSettings
) -> dict[str, Any]:
    """The bundle of a trained head's ``checkpoint`` (``head_state`` + ``features`` meta),
    the chosen ``threshold`` and the proposal settings."""
    head = {key: checkpoint[key] for key in ("config", "state_dict")}
    return {
        "head": head,
        "features": checkpoint["features"],
        "threshold": float(threshold),
        "proposals": asdict(proposals),
    }
