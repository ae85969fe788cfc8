"""Where the features stage runs the backbone: a registry of engines (``features.engine``).

Every engine yields, per image with candidates and in any order, ``region_ids (N_i,)`` and
their features ``(N_i, D)`` as
:func:`~grounding.modeling.region_features.candidate_features` makes them:

- ``local``: in this process.
- ``ray``: the images are a Ray Dataset whose blocks are the ``batch_size`` consecutive images
  that ``local`` batches together, and each actor runs torch with this process's number of
  CPU threads: both change the float rounding of the trunk, so with the same batches and
  threads the features are the same bit for bit on CPU. The backbone is an actor class in
  ``map_batches``, loaded once per actor; each actor writes its batch's features as a shard
  file (:mod:`grounding.io.shards`) into ``shards`` and only the file's name travels back.
  The shards folder is removed once every shard has been read.

Ray joins the cluster of ``RAY_ADDRESS``, else starts a local one
(:func:`grounding.io.ray_cluster.connect`). On a cluster, the images folder, the features
folder and any local backbone checkpoint must be on storage every node sees at the same path.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from itertools import pairwise
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Protocol

import numpy as np

from grounding.boxes import BOX_COLUMNS
from grounding.config import FeaturesRayParams
from grounding.errors import USER_ERRORS, ConfigError
from grounding.io import ImageFolder
from grounding.io.ray_cluster import connect, error_fields, raise_error
from grounding.io.shards import read_shard, write_shard
from grounding.modeling.backbones import Backbone
from grounding.modeling.region_features import candidate_features
from grounding.registry import Registry

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from ray.data import Dataset

RegionFeatures = Iterator[tuple[np.ndarray, np.ndarray]]
#: The folder of shards inside the features folder while ``ray`` runs (removed after).
SHARDS = ".shards"


class FeatureEngine(Protocol):
    """An engine built with its :class:`EngineResources`: the features of the ``candidates`` of
    ``images``, per image, as :func:`candidate_features` makes them."""

    def __call__(
        self,
        backbone: Backbone,
        candidates: pd.DataFrame,
        images: pd.DataFrame,
        load_image: ImageFolder,
        *,
        image_size: int,
        batch_size: int,
        context: bool,
    ) -> RegionFeatures: ...


@dataclass(frozen=True)
class EngineResources:
    """What the engines may use beside the images, each taking its own: ``workers`` loader
    processes (``local``); a way to load the backbone in another process, the Ray settings
    and the folder of the shards (``ray``)."""

    workers: int = 0
    load_backbone: Callable[[], Backbone] | None = None
    ray_settings: FeaturesRayParams | None = None
    shards: Path | None = None


def local_features(
    backbone: Backbone,
    candidates: pd.DataFrame,
    images: pd.DataFrame,
    load_image: ImageFolder,
    *,
    image_size: int,
    batch_size: int,
    context: bool,
    workers: int = 0,
) -> RegionFeatures:
    """:func:`candidate_features` in this process, with the ``backbone`` already loaded
    (``workers`` loader processes read the images: see
    :func:`grounding.modeling.device.loader_workers`)."""
    return candidate_features(
        backbone,
        candidates,
        images,
        load_image,
        image_size=image_size,
        batch_size=batch_size,
        context=context,
        workers=workers,
    )


def ray_features(
    backbone: Backbone,
    candidates: pd.DataFrame,
    images: pd.DataFrame,
    load_image: ImageFolder,
    *,
    image_size: int,
    batch_size: int,
    context: bool,
    load_backbone: Callable[[], Backbone],
    ray_settings: FeaturesRayParams,
    shards: Path,
) -> RegionFeatures:
    """The features of :func:`local_features`, computed by ``ray_settings.concurrency`` Ray
    actors that each call ``load_backbone()`` once (``backbone`` itself is not shipped; each
    actor reads its own images) and hold ``ray_settings.num_gpus`` GPUs. Yields as the shards
    arrive. Joins the cluster at once, so an unreachable one fails before any work."""
    blocks = image_blocks(candidates, images, load_image, batch_size=batch_size)
    if not blocks:
        return iter(())
    ray = connect()
    written = _write_shards(
        ray,
        blocks,
        load_backbone=load_backbone,
        images_dir=load_image.folder.resolve(),  # workers may start in another folder
        image_size=image_size,
        context=context,
        ray_settings=ray_settings,
        shards=shards,
    )
    return _read_shards(written, shards)


def _local(resources: EngineResources) -> FeatureEngine:
    return partial(local_features, workers=resources.workers)


def _ray(resources: EngineResources) -> FeatureEngine:
    if resources.load_backbone is None or resources.ray_settings is None or not resources.shards:
        raise ConfigError("features.engine: ray needs a backbone loader, features.ray and shards")
    return partial(
        ray_features,
        load_backbone=resources.load_backbone,
        ray_settings=resources.ray_settings,
        shards=resources.shards,
    )


def _write_shards(
    ray: ModuleType,
    blocks: list[pd.DataFrame],
    *,
    load_backbone: Callable[[], Backbone],
    images_dir: Path,
    image_size: int,
    context: bool,
    ray_settings: FeaturesRayParams,
    shards: Path,
) -> Dataset:
    """The (lazy) Ray Dataset of :class:`BackboneActor`'s result rows, one per block."""
    import torch

    ray.data.DataContext.get_current().enable_progress_bars = False  # the stage draws one bar
    shutil.rmtree(shards, ignore_errors=True)  # left by a run that died
    shards.mkdir(parents=True)
    return ray.data.from_pandas(blocks).map_batches(
        BackboneActor,
        batch_size=None,  # one block, one batch: the batches of `local`
        batch_format="pandas",
        compute=ray.data.ActorPoolStrategy(size=ray_settings.concurrency),
        num_gpus=ray_settings.num_gpus or None,
        fn_constructor_kwargs={
            "load_backbone": load_backbone,
            "images_dir": images_dir,
            "image_size": image_size,
            "context": context,
            "shards": shards.resolve(),
            "threads": torch.get_num_threads(),
        },
    )


def _read_shards(written: Dataset, shards: Path) -> RegionFeatures:
    """Run ``written``; yield each image's ``(region_ids, features)`` from its shard."""
    try:
        for row in written.iter_rows():
            raise_error(row)
            region_ids, features, counts = read_shard(Path(row["shard"]))
            for start, end in pairwise(np.concatenate([[0], np.cumsum(counts)])):
                yield region_ids[start:end], features[start:end]
    finally:
        shutil.rmtree(shards, ignore_errors=True)


def image_blocks(
    candidates: pd.DataFrame, images: pd.DataFrame, load_image: ImageFolder, *, batch_size: int
) -> list[pd.DataFrame]:
    """The images that have candidates, one row each, cut into blocks of ``batch_size``
    consecutive images in the order :func:`candidate_features` reads them (by ``image_id``).
    Columns: ``image_id, file_name, width, height, region_ids`` (int64 array), ``boxes``
    (float32 array ``(x1, y1, x2, y2)`` per region, flattened), ``block, block_images``."""
    import pandas as pd

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    sizes = images.set_index("image_id")[["width", "height"]]
    rows = [
        {
            "image_id": image_id,
            "file_name": load_image.path(image_id).relative_to(load_image.folder).as_posix(),
            "width": int(sizes.loc[image_id, "width"]),
            "height": int(sizes.loc[image_id, "height"]),
            "region_ids": group["region_id"].to_numpy(np.int64),
            "boxes": group[BOX_COLUMNS].to_numpy(np.float32).ravel(),
        }
        for image_id, group in candidates.sort_values(["image_id", "region_id"]).groupby(
            "image_id", sort=True
        )
    ]
    blocks = []
    for index, start in enumerate(range(0, len(rows), batch_size)):
        block = pd.DataFrame(rows[start : start + batch_size])
        block["block"] = index
        block["block_images"] = len(block)
        blocks.append(block)
    return blocks


class BackboneActor:
    """One Ray actor: loads the backbone once, then turns each block of images into a shard.
    ``threads``: torch's CPU threads (None: leave them as Ray set them)."""

    def __init__(
        self,
        load_backbone: Callable[[], Backbone],
        images_dir: Path,
        image_size: int,
        context: bool,
        shards: Path,
        threads: int | None = None,
    ) -> None:
        if threads is not None:
            import torch

            # torch's CPU kernels round differently with another thread count: the actor
            # uses the driver's (Ray would give it 1), so its features are local's bit for bit
            torch.set_num_threads(threads)
        self.backbone = load_backbone()
        self.images_dir = images_dir
        self.image_size = image_size
        self.context = context
        self.shards = shards

    def __call__(self, block: pd.DataFrame) -> pd.DataFrame:
        """``block``: rows of :func:`image_blocks` (one whole block) -> one row: the shard's
        ``path``, or the ``error`` (and its ``error_kind``) that stopped it."""
        import pandas as pd

        index = int(block["block"].iloc[0])
        if block["block"].nunique() != 1 or len(block) != int(block["block_images"].iloc[0]):
            # another batching would give other batch neighbours, so other float rounding
            raise RuntimeError(f"Ray split or merged block {index}: the features would differ")
        try:
            path = self._write_shard(block, index)
        except USER_ERRORS as error:  # back to the stage as its one-line message
            return pd.DataFrame({"shard": [""], **error_fields(error)})
        return pd.DataFrame({"shard": [str(path)], **error_fields(None)})

    def _write_shard(self, block: pd.DataFrame, index: int) -> Path:
        import pandas as pd

        counts = np.array([len(ids) for ids in block["region_ids"]], dtype=np.int64)
        candidates = pd.DataFrame(
            np.concatenate([np.asarray(b, np.float32).reshape(-1, 4) for b in block["boxes"]]),
            columns=BOX_COLUMNS,
        )
        candidates.insert(0, "image_id", np.repeat(block["image_id"].to_numpy(), counts))
        candidates.insert(0, "region_id", np.concatenate(list(block["region_ids"])))
        per_image = list(
            candidate_features(
                self.backbone,
                candidates,
                block[["image_id", "width", "height"]],
                ImageFolder(self.images_dir, block[["image_id", "file_name"]]),
                image_size=self.image_size,
                batch_size=len(block),  # the whole block in one batch, as `local` batches it
                context=self.context,
            )
        )
        path = self.shards / f"{index:08d}.npz"
        write_shard(
            path,
            np.concatenate([ids for ids, _ in per_image]),
            np.concatenate([vectors for _, vectors in per_image]),
            counts,
        )
        return path


def ray_device(ray_settings: FeaturesRayParams) -> torch.device:
    """Where each actor runs the backbone: the GPU Ray gives it when ``num_gpus`` asks for
    one (Ray sets the actor's ``CUDA_VISIBLE_DEVICES``), else the CPU."""
    import torch

    return torch.device("cuda" if ray_settings.num_gpus else "cpu")


#: Where the backbone runs, ``features.engine``: ``local`` (this process) or ``ray``; each
#: built as ``make(resources=EngineResources(...))``.
ENGINES: Registry[FeatureEngine] = Registry("engine", "features.engine")
ENGINES.add("local", _local)
ENGINES.add("ray", _ray)


def feature_engine(name: str, resources: EngineResources | None = None) -> FeatureEngine:
    """The engine called ``name``, built with ``resources``; :class:`ConfigError` listing the
    known ones for another name."""
    return ENGINES.build(name, resources=resources or EngineResources())
