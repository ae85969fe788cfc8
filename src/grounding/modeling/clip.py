"""CLIP and SigLIP from Hugging Face ``transformers``: the image tower as a backbone, the text
tower as a text encoder, both towers as the pieces of a zero-training scorer.

A model is named ``hf:<model id or folder>`` wherever a model is chosen; its family is the
``model_type`` of its config (``clip`` or ``siglip``). It is loaded with ``from_pretrained``
and ``use_safetensors=True``: a hub id downloads as ``transformers`` does when there is a
network and reads the Hugging Face cache when there is none; a model whose weights exist only
as a pickle (``pytorch_model.bin``) is refused, nothing of it is unpickled.

- :class:`PatchMap` runs the image tower on a padded image of any size (its position
  embeddings interpolated) and lays its patch tokens out as a map ``(B, hidden, H / patch, W /
  patch)``: a :class:`~grounding.modeling.backbones.Backbone` trunk of stride = patch size.
- :class:`TextTowerPooling` is the text tower's own pooled output and projection (what
  ``get_text_features`` returns), L2-normalised; SigLIP's phrases are padded to the tower's
  full length inside the module, the way SigLIP was trained, whatever padding the caller did.
- :class:`ImageTowerEmbedding` is the image tower's pooled output and projection of a whole
  (cropped) image: ``get_image_features``, L2-normalised.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn import functional as F

from grounding.modeling.hugging_face import HF_SCHEME, model_type

if TYPE_CHECKING:
    from grounding.modeling.backbones import Backbone
    from grounding.modeling.text import TextEncoder

#: The prefix of a Hugging Face model wherever a model is chosen.


@dataclass(frozen=True)
class Family:
    """What differs between the image-text families: whether the image tower's first token
    is a class token (not a patch), whether the text tower's input is padded to its full
    length, and the normalisation used when the model has no image processor config."""

    class_token: bool
    pads_to_max_length: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


#: The image-text families, by the ``model_type`` of their config.
FAMILIES = {
    "clip": Family(
        class_token=True,
        pads_to_max_length=False,
        mean=(0.48145466, 0.4578275, 0.40821073),
        std=(0.26862954, 0.26130258, 0.27577711),
    ),
    "siglip": Family(
        class_token=False, pads_to_max_length=True, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)
    ),
}


def is_image_text(reference: str) -> bool:
    """Whether ``reference`` is a model of one of :data:`FAMILIES` (False when it has no
    config to read: the caller says what it needed)."""
    try:
        return model_type(reference) in FAMILIES
    except ValueError:
        return False


def family_of(reference: str, use: str) -> str:
    """The image-text family (a key of :data:`FAMILIES`) of ``reference``; :class:`ValueError`
    naming the families ``use`` (what the model was chosen for) accepts otherwise."""
    kind = model_type(reference)
    if kind not in FAMILIES:
        raise ValueError(
            f"'{HF_SCHEME}:{reference}' is a {kind!r} model; as {use} only the image-text "
            f"families {', '.join(FAMILIES)} are supported"
        )
    return kind


@dataclass(frozen=True)
class ImageText:
    """A loaded CLIP or SigLIP model (eval mode, no gradients) and what feeding it takes:
    its ``tokenizer``, the ``mean`` and ``std`` images are normalised with, the square
    ``image_size`` and the ``patch_size`` of its image tower."""

    reference: str
    family: str
    model: nn.Module
    tokenizer: Any
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int
    patch_size: int

    @property
    def traits(self) -> Family:
        return FAMILIES[self.family]


def load_image_text(reference: str, use: str, *, tokenizer: bool = True) -> ImageText:
    """The CLIP or SigLIP model ``reference`` names, on the CPU. :class:`ValueError` with one
    line for a reference that is not found, not of these families, or whose weights are not
    safetensors (a pickle is never read)."""
    from transformers import AutoModel
    from transformers.utils import logging as transformers_logging

    family = family_of(reference, use)
    transformers_logging.disable_progress_bar()
    try:
        model = AutoModel.from_pretrained(reference, use_safetensors=True)
    except OSError as error:
        pickled = Path(reference, "pytorch_model.bin").is_file()
        reason = (
            "its weights are a pickle (pytorch_model.bin), which is never loaded; convert them "
            "to safetensors (model.save_pretrained(folder, safe_serialization=True))"
            if pickled
            else " ".join(str(error).split())[:300]
        )
        raise ValueError(f"'{HF_SCHEME}:{reference}': no safetensors weights: {reason}") from None
    model.eval().requires_grad_(False)
    vision = model.config.vision_config
    mean, std = _normalisation(reference, FAMILIES[family])
    return ImageText(
        reference,
        family,
        model,
        _tokenizer(reference) if tokenizer else None,
        mean,
        std,
        int(vision.image_size),
        int(vision.patch_size),
    )


def _tokenizer(reference: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(reference)
    except (OSError, ValueError) as error:
        detail = " ".join(str(error).split())[:300]
        raise ValueError(
            f"'{HF_SCHEME}:{reference}': cannot load its tokenizer: {detail}"
        ) from None


def _normalisation(
    reference: str, family: Family
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """The image processor config's ``image_mean`` and ``image_std``; the family's own
    constants when the model has no image processor config."""
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(reference)
    except (OSError, ValueError):
        return family.mean, family.std
    mean = tuple(float(v) for v in getattr(processor, "image_mean", family.mean))
    std = tuple(float(v) for v in getattr(processor, "image_std", family.std))
    return mean, std  # type: ignore[return-value]


class PatchMap(nn.Module):
    """``images (B, 3, H, W)`` (normalised, sides multiples of ``patch_size``) -> the image
    tower's last hidden states of the patches as a map ``(B, hidden, H / patch_size, W /
    patch_size)`` (the class token, if any, dropped). The position embeddings are interpolated
    to the image's grid, so any such size works."""

    def __init__(self, tower: nn.Module, patch_size: int, class_token: bool) -> None:
        super().__init__()
        self.tower = tower
        self.patch_size = patch_size
        self.first_patch = 1 if class_token else 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        states = self.tower(pixel_values=images, interpolate_pos_encoding=True).last_hidden_state
        patches = states[:, self.first_patch :]
        rows = images.shape[2] // self.patch_size
        return patches.transpose(1, 2).reshape(images.shape[0], patches.shape[2], rows, -1)


class TextTowerPooling(nn.Module):
    """``input_ids, attention_mask (P, T)`` -> unit-norm embeddings ``(P, dim)`` float32: the
    text tower's pooled output through its projection (``get_text_features``).

    With ``max_length`` (SigLIP) the phrase is padded with ``pad_id`` to exactly
    ``max_length`` tokens and the mask is not given to the tower, as SigLIP was trained and
    as its processor feeds it; the caller may pad shorter, with any id (the mask says where).
    """

    def __init__(
        self,
        tower: nn.Module,
        projection: nn.Module,
        *,
        max_length: int | None = None,
        pad_id: int = 0,
    ) -> None:
        super().__init__()
        self.tower = tower
        self.projection = projection
        self.max_length = max_length
        self.pad_id = pad_id

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.max_length is None:
            pooled = self.tower(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        else:
            ids = torch.where(attention_mask.bool(), input_ids, self.pad_id)
            # constant pad then constant cut: the same graph for every phrase length when traced
            ids = F.pad(ids, (0, self.max_length), value=self.pad_id)[:, : self.max_length]
            pooled = self.tower(input_ids=ids).pooler_output
        return F.normalize(self.projection(pooled).float(), dim=1)


class ImageTowerEmbedding(nn.Module):
    """``images (B, 3, S, S)`` (normalised, ``S`` the tower's image size) -> unit-norm
    embeddings ``(B, dim)`` float32: the image tower's pooled output through its projection
    (``get_image_features``)."""

    def __init__(self, tower: nn.Module, projection: nn.Module) -> None:
        super().__init__()
        self.tower = tower
        self.projection = projection

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pooled = self.tower(pixel_values=images).pooler_output
        return F.normalize(self.projection(pooled).float(), dim=1)


def _projection(model: nn.Module, name: str) -> nn.Module:
    """CLIP's ``text_projection`` / ``visual_projection``; SigLIP's towers project inside
    their own pooling head."""
    return getattr(model, name, None) or nn.Identity()


def text_pooling(loaded: ImageText) -> TextTowerPooling:
    """The text tower of ``loaded`` as a :class:`TextTowerPooling`."""
    model = loaded.model
    if not loaded.traits.pads_to_max_length:
        return TextTowerPooling(model.text_model, _projection(model, "text_projection"))
    pad_id = loaded.tokenizer.pad_token_id
    return TextTowerPooling(
        model.text_model,
        _projection(model, "text_projection"),
        max_length=int(model.config.text_config.max_position_embeddings),
        pad_id=int(pad_id if pad_id is not None else 0),
    )


def image_embedding(loaded: ImageText) -> ImageTowerEmbedding:
    """The image tower of ``loaded`` as an :class:`ImageTowerEmbedding`."""
    return ImageTowerEmbedding(
        loaded.model.vision_model, _projection(loaded.model, "visual_projection")
    )


def backbone(reference: str, *, weights: Path | None = None, device: object = None) -> Backbone:
    """The image tower of ``hf:<reference>`` as a backbone (``features.backbone``): a
    :class:`PatchMap` of stride = patch size and channels = the tower's width, normalised as
    the model's image processor does. ``weights`` must be None: the model brings its own."""
    from grounding.modeling.backbones import Backbone

    if weights is not None:
        raise ValueError(
            f"backbone '{HF_SCHEME}:{reference}' brings its own weights: leave "
            "features.backbone_weights unset"
        )
    loaded = load_image_text(reference, "a backbone", tokenizer=False)
    trunk = PatchMap(loaded.model.vision_model, loaded.patch_size, loaded.traits.class_token)
    channels = int(loaded.model.config.vision_config.hidden_size)
    return Backbone(
        f"{HF_SCHEME}:{reference}", trunk, loaded.patch_size, channels, loaded.mean, loaded.std
    )


def text_encoder(reference: str, *, device: torch.device | None = None) -> TextEncoder:
    """The text tower of ``hf:<reference>`` as a text encoder (``features.text_encoder``);
    see :func:`encoder_of`."""
    encoder = encoder_of(load_image_text(reference, "a text encoder"))
    if device is not None:
        encoder.model.to(device)
    return encoder


def encoder_of(loaded: ImageText) -> TextEncoder:
    """The text tower of ``loaded`` as a text encoder: :class:`TextTowerPooling` is both its
    model and its pooling; phrases are cut at the tower's length (77 tokens for CLIP, 64 for
    SigLIP)."""
    from grounding.modeling.text import MAX_TOKENS, TextEncoder

    pooling = text_pooling(loaded)
    text = loaded.model.config.text_config
    # CLIP projects to projection_dim; SigLIP's pooling head to projection_size (its width)
    dim = getattr(loaded.model.config, "projection_dim", None) or getattr(
        text, "projection_size", None
    )
    return TextEncoder(
        f"{HF_SCHEME}:{loaded.reference}",
        loaded.tokenizer,
        pooling,
        int(dim or text.hidden_size),
        pooling=pooling,
        max_tokens=min(MAX_TOKENS, int(text.max_position_embeddings)),
    )
