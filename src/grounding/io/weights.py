"""Model weights as safetensors: plain tensors and a JSON config, never a pickle.

A weights file holds named tensors and one metadata entry, ``config``: the JSON (sorted keys)
that says what the tensors are (the head's type and shape, how its features were made, the
threshold, ...). Its bytes depend only on the values, so an unchanged model is an unchanged
file for DVC, and loading one runs no code.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from grounding.errors import DataError
from grounding.io.files import atomic

if TYPE_CHECKING:
    import torch

_CONFIG = "config"


def write_weights(
    tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any], path: Path
) -> None:
    """Write ``tensors`` and ``config`` (JSON-ready) to ``path`` atomically."""
    from safetensors.torch import save_file

    metadata = {_CONFIG: json.dumps(config, sort_keys=True, ensure_ascii=False)}
    contiguous = {name: tensor.detach().contiguous() for name, tensor in tensors.items()}
    with atomic(path) as tmp:
        save_file(contiguous, str(tmp), metadata=metadata)


def read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and config of a file :func:`write_weights` wrote; :class:`DataError` for a
    missing file or one that is not such a file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    if not path.is_file():
        raise DataError(f"{path}: no model here; train one with `dvc repro`")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        config = json.loads(metadata[_CONFIG])
        tensors = load_file(str(path))
    except (SafetensorError, OSError, KeyError, ValueError) as error:
        raise DataError(
            f"{path}: not a model file of this project (safetensors with a config): {error}"
        ) from None
    if not isinstance(config, dict):
        raise DataError(f"{path}: its config is not a JSON object")
    return tensors, config
