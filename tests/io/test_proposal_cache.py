"""The proposal cache: computed once per image pixels and settings, rebuilt when damaged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from stand_ins import two_shapes

from grounding.io import ProposalCache

SETTINGS = ("selective_search", [("max_proposals", 50), ("mode", "fast")])


class Counting:
    """A ``compute`` that counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> np.ndarray:
        self.calls += 1
        return np.array([[1, 2, 3, 4]], dtype=np.float32) * self.calls


def test_cache_computes_once_per_image_and_settings(tmp_path: Path) -> None:
    cache, compute = ProposalCache(tmp_path), Counting()
    image = two_shapes()
    first = cache.get(image, SETTINGS, compute)
    np.testing.assert_array_equal(first, [[1, 2, 3, 4]])
    again = cache.get(image.copy(), SETTINGS, compute)  # another object, the same pixels
    np.testing.assert_array_equal(again, first)
    assert again.dtype == np.float32
    assert compute.calls == 1
    other = ("selective_search", [("max_proposals", 5), ("mode", "fast")])
    cache.get(image, other, compute)  # other settings: computed again
    edited = image.copy()
    edited.putpixel((0, 0), (0, 0, 0))
    cache.get(edited, SETTINGS, compute)  # other pixels: computed again
    cache.get(image.convert("L").convert("RGB"), SETTINGS, compute)  # other colours too
    assert compute.calls == 4
    assert len(list(tmp_path.glob("*.npy"))) == 4


def test_a_new_cache_on_the_same_folder_reads_the_entries(tmp_path: Path) -> None:
    compute = Counting()
    ProposalCache(tmp_path).get(two_shapes(), SETTINGS, compute)
    boxes = ProposalCache(tmp_path).get(two_shapes(), SETTINGS, compute)
    assert compute.calls == 1
    np.testing.assert_array_equal(boxes, [[1, 2, 3, 4]])


def test_a_damaged_entry_is_recomputed(tmp_path: Path) -> None:
    cache, compute = ProposalCache(tmp_path), Counting()
    image = two_shapes()
    cache.get(image, SETTINGS, compute)
    entry = tmp_path / f"{ProposalCache.key(image, SETTINGS)}.npy"
    assert entry.is_file()
    entry.write_bytes(b"not an array")
    np.testing.assert_array_equal(cache.get(image, SETTINGS, compute), [[2, 4, 6, 8]])
    assert compute.calls == 2
    np.testing.assert_array_equal(np.load(entry), [[2, 4, 6, 8]])  # and replaced


def test_the_key_depends_on_size_mode_pixels_and_settings() -> None:
    image = two_shapes()
    key = ProposalCache.key(image, SETTINGS)
    assert len(key) == 32 and int(key, 16) >= 0
    assert ProposalCache.key(image.copy(), SETTINGS) == key
    assert ProposalCache.key(image, ("annotated", [])) != key
    assert ProposalCache.key(image.convert("RGBA"), SETTINGS) != key
    tall, wide = Image.new("RGB", (4, 6)), Image.new("RGB", (6, 4))  # the same bytes
    assert ProposalCache.key(tall, SETTINGS) != ProposalCache.key(wide, SETTINGS)


def test_an_empty_result_is_cached(tmp_path: Path) -> None:
    cache, calls = ProposalCache(tmp_path), []

    def nothing() -> np.ndarray:
        calls.append(1)
        return np.empty((0, 4), dtype=np.float32)

    assert cache.get(two_shapes(), SETTINGS, nothing).shape == (0, 4)
    assert cache.get(two_shapes(), SETTINGS, nothing).shape == (0, 4)
    assert len(calls) == 1
