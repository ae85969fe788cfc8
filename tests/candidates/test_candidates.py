"""The registry of candidate generators, the proposer it builds, and the candidates table."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from stand_ins import SETTINGS, TWO_SHAPES, registered, two_shapes

from grounding import candidates
from grounding.boxes import box_iou
from grounding.candidates import (
    GENERATORS,
    build_proposer,
    candidate_regions,
    candidates_table,
    from_pixels,
    proposer,
    proposer_for_new_images,
    selective_search,
    settings_of,
)
from grounding.candidates.selective_search import propose
from grounding.errors import ConfigError
from grounding.io import ProposalCache
from grounding.schemas import CANDIDATES

BOXES = pd.DataFrame(
    [
        ("1", 0, 0.0, 0.0, 10.0, 10.0),
        ("1", 1, 0.0, 0.0, 10.0, 10.0),  # two chains' box with the same coordinates
        ("1", 2, 5.0, 5.0, 20.0, 20.0),
        ("2", 0, 1.0, 1.0, 2.0, 2.0),
        ("3", 0, 3.0, 3.0, 4.0, 4.0),  # image 3 is not asked for
    ],
    columns=["image_id", "box_id", "x1", "y1", "x2", "y2"],
)
IMAGES = pd.DataFrame({"image_id": ["1", "2"]})


# --- the registry ----------------------------------------------------------------------------


def test_generators_are_registered_by_name() -> None:
    assert {"annotated", "selective_search"} <= set(GENERATORS)
    assert not from_pixels("annotated")  # from the annotations, not from pixels
    assert from_pixels("selective_search")
    built = build_proposer("selective_search", SETTINGS)
    np.testing.assert_array_equal(built.propose(two_shapes()), propose(two_shapes(), **SETTINGS))


def test_an_unknown_generator_is_a_config_error_listing_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown candidate generator 'proposals'.*annotated"):
        from_pixels("proposals")
    with pytest.raises(ConfigError, match=r"did you mean 'selective_search'"):
        from_pixels("selectivesearch")


def test_new_images_get_a_generator_that_works_from_pixels() -> None:
    assert proposer_for_new_images("selective_search") == "selective_search"
    assert proposer_for_new_images("annotated") == candidates.DEFAULT_PROPOSER == "selective_search"
    with pytest.raises(ConfigError):
        proposer_for_new_images("nope")


def test_settings_of_fills_the_defaults_of_the_generators_dataclass() -> None:
    assert settings_of("selective_search", {"selective_search": {"max_proposals": 7}}) == {
        **dataclasses.asdict(selective_search.Settings()),
        "max_proposals": 7,
    }
    assert settings_of("annotated", {}) == {}


# --- proposer --------------------------------------------------------------------------------


def test_proposer_proposes_with_its_settings() -> None:
    boxes = proposer("selective_search", SETTINGS)(two_shapes())
    np.testing.assert_array_equal(boxes, propose(two_shapes(), **SETTINGS))
    fewer = proposer("selective_search", {**SETTINGS, "max_proposals": 2})(two_shapes())
    assert len(fewer) == 2


def test_proposer_refuses_the_annotated_generator() -> None:
    with pytest.raises(ConfigError, match="'annotated' needs annotations; it cannot propose"):
        proposer("annotated", {})


@pytest.mark.parametrize(
    "settings, message",
    [
        ({**SETTINGS, "max_side": 8}, r"candidates\.selective_search: .*max_side >= 16"),
        ({**SETTINGS, "mode": "slow"}, r"candidates\.selective_search\.mode: 'slow' is not one of"),
        ({**SETTINGS, "max_proposal": 3}, r"candidates\.selective_search\.max_proposal.*did you"),
    ],
    ids=["out of range", "unknown mode", "unknown key"],
)
def test_proposer_refuses_bad_settings_naming_the_key(settings: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        proposer("selective_search", settings)


@dataclasses.dataclass(frozen=True)
class CountingSettings:
    size: int = 5


@dataclasses.dataclass
class Counting:
    """A stand-in generator that counts the images it proposes for."""

    settings: CountingSettings
    calls: ClassVar[list[tuple[int, int]]] = []
    version: int = 1

    def propose(self, image: Image.Image) -> np.ndarray:
        self.calls.append(image.size)
        return np.array([[0, 0, 5, 5]], dtype=np.float32) * len(self.calls)


def test_proposer_with_a_cache_computes_each_image_once(tmp_path: Path) -> None:
    Counting.calls.clear()
    with registered(GENERATORS, "counting", lambda s, *, device: Counting(s), CountingSettings):
        cache = ProposalCache(tmp_path)
        cached = proposer("counting", {}, cache)
        first = cached(two_shapes())
        np.testing.assert_array_equal(cached(two_shapes()), first)
        np.testing.assert_array_equal(proposer("counting", {}, cache)(two_shapes()), first)
        assert len(Counting.calls) == 1
        # other settings are another entry
        proposer("counting", {"size": 6}, cache)(two_shapes())
    assert len(Counting.calls) == 2 and len(list(tmp_path.glob("*.npy"))) == 2
    assert "counting" not in GENERATORS


# --- candidate_regions -----------------------------------------------------------------------


def test_annotated_candidates_are_the_distinct_boxes_of_the_images_asked_for() -> None:
    def no_pixels(image_id: str) -> Image.Image:
        raise AssertionError("annotated candidates need no image")

    regions = candidate_regions("annotated", {}, IMAGES, BOXES, no_pixels)
    assert list(regions) == ["1", "2"]
    np.testing.assert_array_equal(regions["1"], [[0, 0, 10, 10], [5, 5, 20, 20]])
    np.testing.assert_array_equal(regions["2"], [[1, 1, 2, 2]])


def test_selective_search_candidates_come_from_each_image(tmp_path: Path) -> None:
    loaded: list[str] = []
    shown: list[list[str]] = []

    def load(image_id: str) -> Image.Image:
        loaded.append(image_id)
        return two_shapes()

    def progress(ids):
        shown.append(list(ids))
        return iter(shown[-1])

    regions = candidate_regions(
        "selective_search",
        {"selective_search": SETTINGS},
        IMAGES,
        BOXES,
        load,
        cache=ProposalCache(tmp_path),
        progress=progress,
    )
    assert loaded == ["1", "2"] and shown == [["1", "2"]]
    assert list(regions) == ["1", "2"]
    for boxes in regions.values():
        assert (box_iou(boxes, TWO_SHAPES).max(axis=0) >= 0.7).all()
    assert len(list(tmp_path.glob("*.npy"))) == 1  # both images have the same pixels


def test_unknown_generator_or_settings_are_refused_before_any_image_is_read() -> None:
    def load(image_id: str) -> Image.Image:
        raise AssertionError("read an image")

    with pytest.raises(ConfigError, match="unknown candidate generator"):
        candidate_regions("proposals", {}, IMAGES, BOXES, load)
    with pytest.raises(ConfigError, match="max_side"):
        candidate_regions(
            "selective_search", {"selective_search": {"max_side": 1}}, IMAGES, BOXES, load
        )
    with pytest.raises(ConfigError, match=r"candidates\.selectve_search: no candidate generator"):
        candidate_regions("annotated", {"selectve_search": {}}, IMAGES, BOXES, load)


# --- the candidates table --------------------------------------------------------------------


def test_candidates_table_numbers_the_regions_of_the_sorted_images() -> None:
    regions = {
        "b": np.array([[0, 0, 4, 4]]),
        "a": np.array([[1, 2, 3, 4], [5, 6, 7, 8]]),
        "c": np.zeros((0, 4)),
    }
    table = candidates_table(regions, "selective_search")
    assert list(table.columns) == list(CANDIDATES.columns)
    assert table["region_id"].tolist() == [0, 1, 2]
    assert table["image_id"].tolist() == ["a", "a", "b"]
    assert table[["x1", "y1", "x2", "y2"]].to_numpy().tolist() == [
        [1, 2, 3, 4],
        [5, 6, 7, 8],
        [0, 0, 4, 4],
    ]
    assert (table["source"] == "selective_search").all()
    assert table["x1"].dtype == np.float32 and table["region_id"].dtype == np.int64


def test_candidates_table_of_no_regions_has_the_columns() -> None:
    table = candidates_table({}, "annotated")
    assert list(table.columns) == list(CANDIDATES.columns) and table.empty


def test_a_generator_that_holds_a_model_gets_the_device_the_stage_names(tmp_path: Path) -> None:
    devices: list[object] = []

    def make(settings: CountingSettings, *, device: object) -> Counting:
        devices.append(device)
        return Counting(settings)

    with registered(GENERATORS, "on_device", make, CountingSettings):
        candidate_regions(
            "on_device", {}, IMAGES, BOXES, lambda image_id: two_shapes(), device="cpu"
        )
    assert devices == ["cpu"]  # the runtime.device spec, resolved by a generator that needs it
