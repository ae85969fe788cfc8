"""Shards: the region features of one batch of images, written by a worker (a Ray actor) into
the features folder and merged by the stage into ``regions.npy``, so large arrays never travel
through Ray's object store. A shard is one uncompressed ``.npz``: ``region_ids (N,)`` int64,
``features (N, D)`` float32 and ``counts (M,)`` int64, the regions of each of its M images in
order."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from grounding.io.files import atomic, require


def write_shard(
    path: Path, region_ids: np.ndarray, features: np.ndarray, counts: np.ndarray
) -> None:
    """Write one shard to ``path`` (``.npz``) atomically: a reader never sees half of it."""
    with atomic(path) as tmp, open(tmp, "wb") as handle:
        np.savez(
            handle,
            region_ids=np.asarray(region_ids, dtype=np.int64),
            features=np.asarray(features, dtype=np.float32),
            counts=np.asarray(counts, dtype=np.int64),
        )


def read_shard(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(region_ids (N,), features (N, D), counts (M,))`` of a shard from :func:`write_shard`."""
    require(path)
    with np.load(path, allow_pickle=False) as shard:
        return shard["region_ids"], shard["features"], shard["counts"]
