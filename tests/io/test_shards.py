"""Shards: a batch's region features as one file, read back as written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from grounding.errors import DataError
from grounding.io.shards import read_shard, write_shard


def test_a_shard_reads_back_bit_for_bit(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    region_ids = np.array([7, 3, 9], dtype=np.int64)
    features = rng.normal(size=(3, 5)).astype(np.float32)
    write_shard(tmp_path / "0.npz", region_ids, features, np.array([2, 1]))
    ids, read, counts = read_shard(tmp_path / "0.npz")
    np.testing.assert_array_equal(ids, region_ids)
    assert read.dtype == np.float32
    assert read.tobytes() == features.tobytes()
    np.testing.assert_array_equal(counts, [2, 1])
    assert [p.name for p in tmp_path.iterdir()] == ["0.npz"]  # no temporary file left


def test_a_missing_shard_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="missing"):
        read_shard(tmp_path / "none.npz")
