"""Region features: what a backbone sees in each candidate box, and where the box is.

The image is resized (longer side ``image_size``, aspect kept), padded with the mean colour to
a multiple of the trunk's stride, passed once through the trunk, and every box ``(x1, y1, x2,
y2)`` (absolute pixels of the *original* image, 0-based, exclusive ends) is average-pooled
from the feature map with :func:`torchvision.ops.roi_align`. A whole-image context vector is
the region feature of the box ``(0, 0, W, H)``. The box's position and size relative to its
image (:func:`grounding.boxes.box_geometry`) follow the pooled channels.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from grounding.boxes import BOX_COLUMNS, GEOMETRY_COLUMNS, box_geometry
from grounding.errors import DataError
from grounding.io.images import size_disagreement
from grounding.modeling.backbones import Backbone

if TYPE_CHECKING:  # torch costs about 1.3 s to import: loaded by the functions that use it
    import pandas as pd
    import torch


def region_dim(backbone: Backbone, *, context: bool) -> int:
    """The width of a region's features: pooled channels (twice with ``context``), then the box
    geometry."""
    return (2 if context else 1) * backbone.channels + len(GEOMETRY_COLUMNS)


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
    cores at ``image_size >= 448`` (see ``benchmarks/features.py``). The trunk runs where its
    weights are (:func:`~grounding.modeling.backbones.load_backbone`'s ``device``), in mixed
    precision on a GPU (:func:`grounding.modeling.device.autocast`).
    """
    _check_sizes(backbone, image_size, batch_size)
    feed = _Feed.of(backbone, image_size)
    prepared = (feed.prepare(image, boxes) for image, boxes in items)
    yield from _batched_features(backbone, prepared, batch_size)


def _check_sizes(backbone: Backbone, image_size: int, batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if image_size < backbone.stride:
        raise ValueError(f"image_size must be >= the stride {backbone.stride}, got {image_size}")


def _batched_features(
    backbone: Backbone, prepared: Iterable[tuple[torch.Tensor, torch.Tensor]], batch_size: int
) -> Iterator[np.ndarray]:
    iterator = iter(prepared)
    while chunk := list(islice(iterator, batch_size)):
        yield from _chunk_features(backbone, chunk)


def _chunk_features(
    backbone: Backbone, chunk: list[tuple[torch.Tensor, torch.Tensor]]
) -> list[np.ndarray]:
    """The features of prepared images (``(3, H', W')`` inputs and their boxes ``(N_i, 4)``
    in resized pixels), the images of one shape in one batch of the trunk."""
    import torch

    from grounding.modeling.device import autocast, module_device
    from grounding.modeling.pooling import RegionPooling, rois

    device = module_device(backbone.trunk)
    pooling = RegionPooling(backbone.trunk, backbone.stride)
    same_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for index, (tensor, _) in enumerate(chunk):
        same_shape[tuple(tensor.shape)].append(index)
    features: list[np.ndarray] = [np.empty(0)] * len(chunk)
    with torch.inference_mode(), autocast(device):
        for indices in same_shape.values():
            batch = torch.stack([chunk[i][0] for i in indices])
            if device.type == "cuda":  # pinned: the copy to the GPU overlaps the next batch
                batch = batch.pin_memory()
            batch = batch.to(device, non_blocking=True)
            pooled = pooling(
                batch.contiguous(memory_format=torch.channels_last),
                rois([chunk[i][1] for i in indices]).to(device),
            )
            counts = [len(chunk[i][1]) for i in indices]
            for i, rows in zip(indices, pooled.float().cpu().split(counts), strict=True):
                features[i] = rows.numpy().astype(np.float32, copy=True)
    return features


@dataclass(frozen=True)
class _Feed:
    """How a backbone wants its images: the longer side, the stride to pad to, the
    normalisation (no weights: cheap to copy into a loader worker)."""

    image_size: int
    stride: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def of(cls, backbone: Backbone, image_size: int) -> _Feed:
        return cls(image_size, backbone.stride, backbone.mean, backbone.std)

    def prepare(self, image: Image.Image, boxes: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The trunk's input ``(3, H', W')`` and ``boxes (N, 4)`` in its pixels ``(N, 4)``."""
        import torch

        tensor, scale = self.image_tensor(image)
        return tensor, torch.from_numpy(scaled_boxes(boxes, scale))

    def image_tensor(self, image: Image.Image) -> tuple[torch.Tensor, tuple[float, float]]:
        """:func:`normalised_image` as a tensor ``(3, H', W')``, and the scale ``(sx, sy)``."""
        import torch

        pixels, scale = normalised_image(
            image, self.image_size, stride=self.stride, mean=self.mean, std=self.std
        )
        return torch.from_numpy(pixels), scale


def normalised_image(
    image: Image.Image,
    image_size: int,
    *,
    stride: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
) -> tuple[np.ndarray, tuple[float, float]]:
    """What a trunk is fed: the image resized (longer side ``image_size`` pixels, aspect kept,
    bilinear), as RGB in [0, 1], normalised ``(x - mean) / std``, padded with 0 on the right and
    bottom to a multiple of ``stride``: ``(3, H', W')`` float32; and the scale ``(sx, sy)``
    from original to resized pixels. Plain numpy: the ONNX grounder feeds the same array."""
    width, height = image.size
    factor = image_size / max(width, height)
    new_width, new_height = max(1, round(width * factor)), max(1, round(height * factor))
    resized = image.convert("RGB").resize((new_width, new_height), Image.Resampling.BILINEAR)
    pixels = np.array(resized, dtype=np.float32).transpose(2, 0, 1) / np.float32(255)
    mean_ = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
    std_ = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
    normalised = (pixels - mean_) / std_
    # Padding with 0 after normalising is padding with the mean colour.
    padded = np.zeros(
        (3, new_height + -new_height % stride, new_width + -new_width % stride), np.float32
    )
    padded[:, :new_height, :new_width] = normalised
    return padded, (new_width / width, new_height / height)


def scaled_boxes(boxes: np.ndarray, scale: tuple[float, float]) -> np.ndarray:
    """``boxes (N, 4)`` of the original image in pixels of the resized one: ``(N, 4)``
    float32; :class:`ValueError` if a value is not finite."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    if not np.isfinite(boxes).all():
        raise ValueError("boxes must be finite")
    sx, sy = scale
    return boxes * np.array([sx, sy, sx, sy], dtype=np.float32)


def candidate_features(
    backbone: Backbone,
    candidates: pd.DataFrame,
    images: pd.DataFrame,
    load_image: Callable[[str], Image.Image],
    *,
    image_size: int,
    batch_size: int,
    context: bool = False,
    workers: int = 0,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The features of every candidate region, one image at a time.

    ``candidates`` has ``region_id, image_id, x1, y1, x2, y2``; ``images`` has ``image_id,
    width, height`` (the annotated size, which the loaded image must have). Yields, per image,
    ``region_ids (N_i,)`` and ``features (N_i, backbone.channels + len(GEOMETRY_COLUMNS))``:
    the pooled visual features, then the box geometry relative to the image. With
    ``context``, the features of the whole image (the same for every region of an image)
    come between the two: ``(N_i, 2 * backbone.channels + len(GEOMETRY_COLUMNS))``.
    ``workers`` processes read and resize the images (0: this process, as on the CPU;
    :func:`grounding.modeling.device.loader_workers` says how many feed a GPU).
    """
    _check_sizes(backbone, image_size, batch_size)
    sizes = images.set_index("image_id")[["width", "height"]]
    groups = [
        (image_id, group["region_id"].to_numpy(), group[BOX_COLUMNS].to_numpy(np.float32))
        for image_id, group in candidates.sort_values(["image_id", "region_id"]).groupby(
            "image_id", sort=True
        )
    ]
    images_of = _CandidateImages(
        _Feed.of(backbone, image_size),
        [(image_id, boxes) for image_id, _, boxes in groups],
        {image_id: (int(w), int(h)) for image_id, (w, h) in sizes.iterrows()},
        load_image,
        context,
    )
    visual = _batched_features(backbone, _in_order(images_of, workers), batch_size)
    for (image_id, region_ids, boxes), vectors in zip(groups, visual, strict=True):
        yield region_ids, assemble_features(vectors, boxes, tuple(sizes.loc[image_id]), context)


@dataclass(frozen=True)
class _CandidateImages:
    """Item ``i``: the prepared input of image ``i`` of ``boxes`` (``image_id, boxes (N, 4)``)
    and its boxes, with the whole image's box last with ``context`` (a map-style dataset of
    a torch ``DataLoader``; a :class:`DataError` is returned, to be raised by the caller)."""

    feed: _Feed
    boxes: list[tuple[str, np.ndarray]]
    sizes: dict[str, tuple[int, int]]
    load_image: Callable[[str], Image.Image]
    context: bool

    def __len__(self) -> int:
        return len(self.boxes)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor] | DataError:
        image_id, boxes = self.boxes[index]
        expected = self.sizes[image_id]
        try:
            image = self.load_image(image_id)
        except DataError as error:  # raised in a worker, it would reach the user as a traceback
            return DataError(str(error))
        disagreement = size_disagreement(image, expected)
        if disagreement:
            return DataError(f"image {image_id}: {disagreement}")
        query = with_whole_image(boxes, expected) if self.context else boxes
        return self.feed.prepare(image, query)


def _in_order(items: _CandidateImages, workers: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``items`` in order: read in this process with ``workers=0``, else by that many loader
    processes (what keeps a GPU fed)."""
    if workers == 0:
        prepared: Iterable[tuple[torch.Tensor, torch.Tensor] | DataError] = (
            items[i] for i in range(len(items))
        )
    else:
        from torch.utils.data import DataLoader

        prepared = DataLoader(items, batch_size=None, num_workers=workers)  # type: ignore[arg-type]
    for item in prepared:
        if isinstance(item, DataError):
            raise item
        yield item


def image_features(
    backbone: Backbone, image: Image.Image, boxes: np.ndarray, *, image_size: int, context: bool
) -> np.ndarray:
    """The features of ``boxes (N, 4)`` on one image, made as :func:`candidate_features` makes
    them (for an image outside any table: grounding phrases in a new image)."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    query = with_whole_image(boxes, image.size) if context else boxes
    visual = region_features(backbone, image, query, image_size=image_size)
    return assemble_features(visual, boxes, image.size, context)


def with_whole_image(boxes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``boxes (N, 4)`` and the whole image's box ``(0, 0, W, H)`` after them: ``(N + 1, 4)``."""
    return np.concatenate([boxes, np.array([[0, 0, *size]], dtype=np.float32)])


def assemble_features(
    visual: np.ndarray, boxes: np.ndarray, size: tuple[int, int], context: bool
) -> np.ndarray:
    """Pooled features (with the whole image's as the last row when ``context``) and box
    geometry -> the rows of the features stage."""
    width, height = size
    geometry = box_geometry(boxes, np.full(len(boxes), width), np.full(len(boxes), height))
    if context:
        visual = np.concatenate([visual[:-1], np.repeat(visual[-1:], len(boxes), 0)], 1)
    return np.concatenate([visual, geometry], axis=1)
