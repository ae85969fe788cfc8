"""Feature engines: ``ray`` gives the features of ``local`` bit for bit.

The fast tests call the Ray actor class directly (no Ray) with the stand-in trunk; the slow
ones run both engines on images of the shipped sample with the packaged backbone, on the
local Ray of 2 workers that ``conftest.local_ray`` starts once for the test run.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from repository import REPO
from stand_ins import pooling_backbone

from grounding.config import FeaturesRayParams
from grounding.errors import ConfigError
from grounding.io import ImageFolder
from grounding.io.shards import read_shard
from grounding.modeling.backbones import load_backbone
from grounding.modeling.engines import (
    BackboneActor,
    EngineResources,
    feature_engine,
    image_blocks,
    local_features,
)

SAMPLE_IMAGES = REPO / "data" / "sample" / "images"


def image_tables(folder: Path, names: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``images`` (image_id, file_name, width, height) and three seeded random candidate boxes
    an image, region ids in a shuffled image order (the engines must sort them)."""
    rng = np.random.default_rng(0)
    images, candidates = [], []
    for name in names:
        width, height = Image.open(folder / name).size
        image_id = Path(name).stem
        images.append({"image_id": image_id, "file_name": name, "width": width, "height": height})
        for _ in range(3):
            x1, y1 = rng.uniform(0, [width - 20, height - 20])
            x2, y2 = rng.uniform([x1 + 10, y1 + 10], [width, height])
            candidates.append({"image_id": image_id, "x1": x1, "y1": y1, "x2": x2, "y2": y2})
    table = pd.DataFrame(candidates).sample(frac=1.0, random_state=0).reset_index(drop=True)
    table.insert(0, "region_id", np.arange(len(table), dtype=np.int64))
    table[["x1", "y1", "x2", "y2"]] = table[["x1", "y1", "x2", "y2"]].astype(np.float32)
    return pd.DataFrame(images), table


def as_array(per_image: Iterator[tuple[np.ndarray, np.ndarray]], rows: int) -> np.ndarray:
    """The features stage's array: row = region_id."""
    array = np.full((rows, 0), np.nan, dtype=np.float32)
    for region_ids, vectors in per_image:
        if array.shape[1] == 0:
            array = np.full((rows, vectors.shape[1]), np.nan, dtype=np.float32)
        array[region_ids] = vectors
    return array


@pytest.fixture
def coloured(tmp_path: Path) -> tuple[Path, pd.DataFrame, pd.DataFrame]:
    """Five small images, two of one size (batched together), candidates on each."""
    rng = np.random.default_rng(1)
    sizes = [(64, 48), (64, 48), (40, 72), (56, 56), (64, 48)]
    names = []
    for index, (width, height) in enumerate(sizes):
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        names.append(f"{index:03d}.png")
        Image.fromarray(pixels).save(tmp_path / names[-1])
    images, candidates = image_tables(tmp_path, names)
    return tmp_path, images, candidates


def test_an_unknown_engine_is_a_config_error_listing_the_known_ones() -> None:
    with pytest.raises(
        ConfigError, match=r"features.engine: unknown engine 'spark'.*known: local, ray"
    ):
        feature_engine("spark")


def test_blocks_are_the_batches_local_reads_in_order(coloured) -> None:
    folder, images, candidates = coloured
    blocks = image_blocks(candidates, images, ImageFolder(folder, images), batch_size=2)
    assert [block["image_id"].tolist() for block in blocks] == [
        ["000", "001"],
        ["002", "003"],
        ["004"],
    ]
    assert [block["block_images"].iloc[0] for block in blocks] == [2, 2, 1]
    first = blocks[0].iloc[0]
    mine = candidates[candidates["image_id"] == "000"].sort_values("region_id")
    np.testing.assert_array_equal(first["region_ids"], mine["region_id"])
    np.testing.assert_array_equal(
        first["boxes"], mine[["x1", "y1", "x2", "y2"]].to_numpy(np.float32).ravel()
    )


@pytest.mark.parametrize("context", [False, True])
def test_the_actor_s_shards_hold_local_s_features_bit_for_bit(coloured, context: bool) -> None:
    folder, images, candidates = coloured
    backbone = pooling_backbone()
    kwargs = {"image_size": 32, "batch_size": 2, "context": context}
    local = as_array(
        local_features(backbone, candidates, images, ImageFolder(folder, images), **kwargs),
        len(candidates),
    )
    shards = folder / "shards"
    shards.mkdir()
    actor = BackboneActor(pooling_backbone, folder, 32, context, shards)
    blocks = image_blocks(candidates, images, ImageFolder(folder, images), batch_size=2)
    paths = [actor(block)["shard"].iloc[0] for block in blocks]
    merged = np.full_like(local, np.nan)
    for path in paths:
        region_ids, features, counts = read_shard(Path(path))
        assert counts.sum() == len(region_ids)
        merged[region_ids] = features
    assert merged.tobytes() == local.tobytes()


def test_the_actor_returns_a_data_error_as_its_message(coloured) -> None:
    folder, images, candidates = coloured
    lying = images.assign(width=images["width"].where(images["image_id"] != "001", 99))
    actor = BackboneActor(pooling_backbone, folder, 32, False, folder)
    block = image_blocks(candidates, lying, ImageFolder(folder, lying), batch_size=2)[0]
    row = actor(block).iloc[0]
    assert row["shard"] == ""
    assert row["error_kind"] == "DataError"
    assert row["error"] == "image 001: the file is 64x48 pixels but its annotation says 99x48"


def test_the_actor_refuses_a_block_ray_split(coloured) -> None:
    folder, images, candidates = coloured
    actor = BackboneActor(pooling_backbone, folder, 32, False, folder)
    block = image_blocks(candidates, images, ImageFolder(folder, images), batch_size=2)[0]
    with pytest.raises(RuntimeError, match="split or merged block 0"):
        actor(block.iloc[:1])


# --- both engines on the sample, with a local Ray of 2 workers ---------------------------


@pytest.mark.slow
def test_ray_features_are_local_s_bit_for_bit_on_the_sample(
    local_ray: None, tmp_path: Path
) -> None:
    names = sorted(p.name for p in SAMPLE_IMAGES.iterdir())[:16]  # 2 blocks, 1 per actor
    images, candidates = image_tables(SAMPLE_IMAGES, names)
    backbone = load_backbone("efficientnet-lite0")
    # 224 px: the sample's images pad to a few shapes, so batches hold several images
    kwargs = {"image_size": 224, "batch_size": 8, "context": True}
    load_image = ImageFolder(SAMPLE_IMAGES, images)
    local = as_array(
        local_features(backbone, candidates, images, load_image, **kwargs), len(candidates)
    )
    shards = tmp_path / "features" / ".shards"
    ray = as_array(
        feature_engine(
            "ray",
            EngineResources(
                load_backbone=partial(load_backbone, "efficientnet-lite0", None),
                ray_settings=FeaturesRayParams(concurrency=2, num_gpus=0),
                shards=shards,
            ),
        )(backbone, candidates, images, load_image, **kwargs),
        len(candidates),
    )
    assert not np.isnan(local).any()
    assert ray.tobytes() == local.tobytes()
    assert not shards.exists()  # merged, then removed: the features folder is as local's
