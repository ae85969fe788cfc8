"""torchvision models with their pretrained weights, read without unpickling, and a
detection model's backbone as one feature map.

torchvision names each model's weights in an enum (``FasterRCNN_ResNet50_FPN_V2_Weights``:
``COCO_V1``, ``DEFAULT``); a weights entry holds the file's URL and the model's metadata (its
categories). torchvision keeps the files in its cache folder,
``$TORCH_HOME/hub/checkpoints/<the URL's file name>`` (``TORCH_HOME`` defaults to
``~/.cache/torch``), and downloads a file there at first use. :func:`pretrained_model` does the
same, with one difference: torchvision 0.29 reads the file with
``torch.hub.load_state_dict_from_url(..., weights_only=False)``, which unpickles it (a pickle can
run any code); here it is read with ``torch.load(weights_only=True)``, which refuses anything
but tensors and plain containers.

The model is built by its builder without weights (``get_model(builder, weights=None)``, the
number of classes taken from the weights' categories) and the file loaded into it. A builder
with weights freezes its batch norms (``FrozenBatchNorm2d``); without, they are
``BatchNorm2d``, which compute the same in eval mode, the only mode this project runs them in.
"""

from __future__ import annotations

import inspect
import math
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

from grounding.errors import ConfigError, DataError

if TYPE_CHECKING:
    from torchvision.models import WeightsEnum

DEFAULT_WEIGHTS = "DEFAULT"

# torch's refusal names the first object it will not unpickle: "Unsupported global: GLOBAL
# print ...", "Trying to load unsupported GLOBAL posix.mkdir whose module posix is blocked"
_UNSUPPORTED = re.compile(r"GLOBAL ([\w.]+)")


def builders(module: ModuleType) -> list[str]:
    """The names of torchvision's builders in ``module`` (``torchvision.models.detection``;
    ``torchvision.models`` for the classification architectures)."""
    return torchvision.models.list_models(module=module)


def check_builder(builder: str, module: ModuleType, what: str, key: str) -> None:
    """:class:`ConfigError` starting with ``key`` unless ``builder`` is one of ``module``'s
    builders; it lists them (``what``: ``"detection builder"``)."""
    known = builders(module)
    if builder not in known:
        raise ConfigError(
            f"{key}: torchvision has no {what} {builder!r}; known: {', '.join(known)}"
        )


def weights_entry(
    builder: str, weights: str = DEFAULT_WEIGHTS, key: str = "weights"
) -> WeightsEnum:
    """The entry ``weights`` (``DEFAULT``, ``COCO_V1``, ...) of ``builder``'s weights enum;
    :class:`ConfigError` starting with ``key`` that lists the enum's entries otherwise."""
    enum = torchvision.models.get_model_weights(builder)
    name = weights.removeprefix(f"{enum.__name__}.")
    try:
        return enum[name]
    except KeyError:
        known = [DEFAULT_WEIGHTS, *(member.name for member in enum)]
        raise ConfigError(
            f"{key}: {builder} has no weights {weights!r}; known: {', '.join(known)}"
        ) from None


def cached_file(entry: WeightsEnum) -> Path:
    """Where torchvision keeps the file of weights ``entry``:
    ``$TORCH_HOME/hub/checkpoints/<file name of its URL>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(entry.url).path)


def fetch_weights(entry: WeightsEnum) -> Path:
    """The cached file of weights ``entry``, downloaded there first when absent (as torchvision
    does, the hash in its name checked); :class:`DataError` naming the file, its folder and
    the URL when it is absent and cannot be downloaded (offline)."""
    path = cached_file(entry)
    if path.is_file():
        return path
    match = torch.hub.HASH_REGEX.search(path.name)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(
            entry.url, str(path), match.group(1) if match else None, progress=False
        )
    except (OSError, RuntimeError) as error:  # no network (URLError is an OSError); bad hash
        raise DataError(
            f"the weights {entry} are not in torchvision's cache and cannot be downloaded "
            f"({' '.join(str(error).split())[:200]}): place the file {path.name} in "
            f"{path.parent} (download {entry.url} on a machine with internet; TORCH_HOME "
            "moves the folder)"
        ) from None
    return path


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The ``state_dict`` in the file at ``path``, read with ``torch.load(weights_only=True)``;
    :class:`DataError` naming the file when it holds anything but a mapping of names to
    tensors (a pickle of other objects is refused before any of it runs)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = _UNSUPPORTED.search(str(error))
        raise DataError(
            f"{path}: refused: not plain weights (it pickles "
            f"{found.group(1) if found else 'other objects'}, which only unpickling would "
            "run); load only tensors: save the model's state_dict()"
        ) from None
    except (OSError, RuntimeError, EOFError) as error:
        raise DataError(f"{path}: not a PyTorch weights file ({error})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DataError(f"{path}: not a state_dict (a mapping of names to tensors)")
    return state


def load_state(model: nn.Module, state: dict[str, torch.Tensor], name: str, path: Path) -> None:
    """Load ``state`` (read from ``path``) into ``model`` (built by ``name``): every tensor
    must fit, and every one of the model's but the batch-norm counters ``num_batches_tracked``
    (which frozen batch norms do not save) must be there; :class:`DataError` otherwise."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shapes that differ
        raise DataError(f"{path}: not a state_dict of {name!r}: {_one_line(error)}") from None
    missing = [key for key in missing if not key.endswith("num_batches_tracked")]
    if missing or unexpected:
        keys = [("Missing key(s)", missing), ("Unexpected key(s)", unexpected)]
        detail = "; ".join(
            f"{kind}: {', '.join(listed[:3])}{' ...' if len(listed) > 3 else ''} ({len(listed)})"
            for kind, listed in keys
            if listed
        )
        raise DataError(f"{path}: not a state_dict of {name!r}: {detail}")


def pretrained_model(
    builder: str, weights: str = DEFAULT_WEIGHTS, *, checkpoint: Path | None = None
) -> nn.Module:
    """Torchvision's model ``builder`` (any builder of ``torchvision.models``) with the weights
    ``weights`` names in its enum, from torchvision's cache (downloaded when absent, see
    :func:`fetch_weights`), or from the local ``checkpoint`` file (a ``state_dict`` of the
    same model) when given. In training mode, on the CPU: the caller picks mode and device.

    Raises :class:`ConfigError` for unknown weights and :class:`DataError` for a file that is
    absent offline, not plain weights, or not this model's."""
    entry = weights_entry(builder, weights)
    path = checkpoint if checkpoint is not None else fetch_weights(entry)
    model = torchvision.models.get_model(builder, weights=None, **_arguments(builder, entry))
    load_state(model, read_state_dict(path), builder, path)
    return model


def _arguments(builder: str, entry: WeightsEnum) -> dict[str, Any]:
    """What ``builder`` takes from a weights entry's metadata when given the entry itself, and
    ``weights_backbone=None``: a detection builder's default loads (downloads) its backbone's
    ImageNet weights, which the whole model's weights then replace."""
    arguments: dict[str, Any] = {}
    if (
        "weights_backbone"
        in inspect.signature(torchvision.models.get_model_builder(builder)).parameters
    ):
        arguments["weights_backbone"] = None
    if "categories" in entry.meta:
        arguments["num_classes"] = len(entry.meta["categories"])
    if "keypoint_names" in entry.meta:
        arguments["num_keypoints"] = len(entry.meta["keypoint_names"])
    return arguments


def _one_line(error: Exception) -> str:
    # torch's message: a header line, then one line per kind of mismatch (keys, shapes)
    return " ".join(str(error).split())[:300]


class DetectionTrunk(nn.Module):
    """A detection model's ``backbone`` (a network, often with an FPN, that maps a normalised
    batch ``(B, 3, H, W)`` to named feature maps) giving one of its maps, ``level``."""

    def __init__(self, backbone: nn.Module, level: str) -> None:
        super().__init__()
        self.backbone = backbone
        self.level = level

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        maps: Mapping[str, torch.Tensor] = self.backbone(images)
        return maps[self.level]

    @classmethod
    def nearest(cls, backbone: nn.Module, probe: int, stride: int = 16) -> DetectionTrunk:
        """``backbone`` at its level whose stride is nearest ``stride`` (the finer of two as
        near), measured on a ``probe`` px square: FPN levels run from stride 4 to 64, and 16 is
        the stride of the classic region features (Faster R-CNN's C4)."""
        with torch.inference_mode():
            maps = backbone.eval()(torch.zeros(1, 3, probe, probe))
        strides = {
            level: probe // m.shape[-1]
            for level, m in maps.items()
            if m.shape[-1] == m.shape[-2] and probe % m.shape[-1] == 0
        }
        if not strides:
            raise ValueError(f"no level of the detection backbone divides a {probe} px square")
        level = min(strides, key=lambda key: (abs(math.log2(strides[key] / stride)), strides[key]))
        return cls(backbone, level)
