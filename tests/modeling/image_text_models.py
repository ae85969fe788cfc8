"""Randomly initialised CLIP and SigLIP models saved with ``save_pretrained``, for the tests
(tiny) and the speed benchmark (the real models' sizes): nothing is downloaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

FAMILIES = ("clip", "siglip")
PATCH = 8
WIDTH = 32
# A mean the family does not use: the backbone must read it from the image processor config.
CLIP_MEAN = (0.25, 0.5, 0.75)


def tiny_tokenizer() -> Any:
    """A CLIP tokenizer without files: every byte's character, alone and word-final; no
    merges (OFFLINE.md's recipe). Words become one token per character."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = sorted(set(bytes_to_unicode().values()))
    words = [*chars, *(char + "</w>" for char in chars), "<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={word: i for i, word in enumerate(words)}, merges=[])


def save_tiny(folder: Path, family: str) -> Path:
    """A randomly initialised two-layer CLIP or SigLIP (width 32, patch 8, 32 px images),
    its tokenizer and image processor config saved into ``folder``."""
    tower = {
        "hidden_size": WIDTH,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
    }
    return save_model(
        folder,
        family,
        text={**tower, "max_position_embeddings": 40},
        vision={**tower, "image_size": 32, "patch_size": PATCH},
        projection_dim=16,
        mean=CLIP_MEAN,
    )


def save_full_size(folder: Path, family: str) -> Path:
    """A randomly initialised model of the sizes of ``openai/clip-vit-base-patch32`` (CLIP) or
    ``google/siglip-base-patch16-224`` (SigLIP): the transformers configs' defaults."""
    return save_model(folder, family, text={}, vision={}, projection_dim=512, mean=None)


def save_model(
    folder: Path,
    family: str,
    *,
    text: dict[str, Any],
    vision: dict[str, Any],
    projection_dim: int,
    mean: tuple[float, float, float] | None,
) -> Path:
    """A random CLIP or SigLIP with these tower settings, :func:`tiny_tokenizer` and an image
    processor config (CLIP's with ``mean`` if given) saved into ``folder``."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        SiglipConfig,
        SiglipImageProcessor,
        SiglipModel,
    )

    tokenizer = tiny_tokenizer()
    side = int(vision.get("image_size", 224))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        if family == "clip":
            ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
            config = CLIPConfig(
                text_config={**text, **ids}, vision_config=vision, projection_dim=projection_dim
            )
            model = CLIPModel(config)
            processor = CLIPImageProcessor(
                size={"shortest_edge": side},
                crop_size={"height": side, "width": side},
                **({"image_mean": list(mean)} if mean else {}),
            )
        else:
            model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
            processor = SiglipImageProcessor(size={"height": side, "width": side})
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
