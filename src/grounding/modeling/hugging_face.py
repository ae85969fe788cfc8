"""``hf:<model id or folder>``: what every Hugging Face family of the package shares.

The scheme ``hf`` names a model by its Hub id (downloaded and cached by ``transformers`` where
there is internet; read from its cache where there is not) or by a local folder; its family
is the ``model_type`` of its config, read before any weights are touched. The families'
loaders (:mod:`grounding.modeling.clip`, :mod:`grounding.modeling.detectors`) load weights
with ``use_safetensors=True`` only: nothing a user points at is unpickled.
"""

from __future__ import annotations

from pathlib import Path

from grounding.errors import ConfigError

#: The scheme of a Hugging Face model wherever a model is chosen (``hf:<id or folder>``).
HF_SCHEME = "hf"


def model_type(reference: str) -> str:
    """The ``model_type`` of the config of ``reference`` (a Hub id or a folder), read from the
    config alone; :class:`ConfigError` (a :class:`ValueError`) in one line saying why when
    there is no config to read."""
    from transformers import AutoConfig

    path = Path(reference)
    # a path, not an id (``namespace/name``): say so, rather than what the Hub says of it
    path_like = path.is_absolute() or reference.startswith(".") or reference.count("/") > 1
    if path_like and not path.is_dir():
        raise ConfigError(f"'{HF_SCHEME}:{reference}': no such Hugging Face model folder")
    try:
        config = AutoConfig.from_pretrained(path if path.is_dir() else reference)
    except (OSError, ValueError) as error:
        detail = " ".join(str(error).split())[:300]
        raise ConfigError(
            f"'{HF_SCHEME}:{reference}': no Hugging Face model config found there "
            f"(a local folder or a model id in the Hugging Face cache): {detail}"
        ) from None
    return str(getattr(config, "model_type", ""))
