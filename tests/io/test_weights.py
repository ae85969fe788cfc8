"""Model weights files: safetensors with a JSON config, byte-stable, refused when foreign."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from grounding.errors import DataError
from grounding.io import read_weights, write_weights

CONFIG = {
    "head": {"name": "matching", "config": {"region_dim": 5, "hidden": 8, "dropout": 0.1}},
    "features": {"backbone": "efficientnet-lite0", "backbone_weights": None, "context": True},
    "threshold": 0.25,
    "candidates": {"name": "selective_search", "settings": {"mode": "fast", "max_side": 300}},
    "text": "café",
}


def tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "region.1.weight": torch.randn(8, 5, generator=generator),
        "region.1.bias": torch.randn(8, generator=generator),
        "steps": torch.tensor([3, 1, 4], dtype=torch.int64),
    }


def test_round_trip_keeps_tensors_and_nested_config(tmp_path: Path) -> None:
    path = tmp_path / "models" / "head.safetensors"
    written = tensors()
    write_weights(written, CONFIG, path)
    read, config = read_weights(path)
    assert config == CONFIG
    assert set(read) == set(written)
    for name, tensor in written.items():
        assert read[name].dtype == tensor.dtype
        torch.testing.assert_close(read[name], tensor, rtol=0, atol=0)
    assert [p.name for p in path.parent.iterdir()] == ["head.safetensors"]  # no temporary left


def test_a_non_contiguous_tensor_is_written(tmp_path: Path) -> None:
    transposed = torch.arange(6.0).reshape(2, 3).T
    assert not transposed.is_contiguous()
    write_weights({"w": transposed}, {}, tmp_path / "w.safetensors")
    torch.testing.assert_close(read_weights(tmp_path / "w.safetensors")[0]["w"], transposed)


def test_identical_values_give_byte_identical_files(tmp_path: Path) -> None:
    first, second = tmp_path / "first.safetensors", tmp_path / "second.safetensors"
    write_weights(tensors(), CONFIG, first)
    # other tensor objects with equal values, in another order, and the config's keys reversed
    reordered = dict(reversed([(name, t.clone()) for name, t in tensors().items()]))
    write_weights(reordered, dict(reversed(CONFIG.items())), second)
    assert first.read_bytes() == second.read_bytes()
    write_weights(tensors(seed=1), CONFIG, second)
    assert first.read_bytes() != second.read_bytes()


def test_a_missing_file_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nowhere\.safetensors: no model here"):
        read_weights(tmp_path / "nowhere.safetensors")
    with pytest.raises(DataError, match="no model here"):
        read_weights(tmp_path)  # a folder


@pytest.mark.parametrize(
    "content",
    [b"", b"not a model at all", torch.zeros(3).numpy().tobytes() * 100],
    ids=["empty", "text", "raw floats"],
)
def test_a_file_that_is_not_safetensors_is_a_data_error(content: bytes, tmp_path: Path) -> None:
    path = tmp_path / "head.safetensors"
    path.write_bytes(content)
    with pytest.raises(DataError, match="not a model file of this project"):
        read_weights(path)


def test_an_old_pickled_checkpoint_is_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "head.pt"
    torch.save({"state_dict": tensors(), "config": CONFIG}, path)
    with pytest.raises(DataError, match="not a model file of this project"):
        read_weights(path)


def test_safetensors_without_a_config_are_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "bare.safetensors"
    save_file(tensors(), str(path))
    with pytest.raises(DataError, match="not a model file of this project"):
        read_weights(path)
    save_file(tensors(), str(path), metadata={"config": "{not json"})
    with pytest.raises(DataError, match="not a model file of this project"):
        read_weights(path)
    save_file(tensors(), str(path), metadata={"config": json.dumps([1, 2])})
    with pytest.raises(DataError, match="its config is not a JSON object"):
        read_weights(path)
