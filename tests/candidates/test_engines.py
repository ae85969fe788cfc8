"""Proposal engines: ``ray`` proposes the boxes of ``local`` (slow: on the local Ray of 2
workers that ``conftest.local_ray`` starts once for the test run)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from repository import REPO
from stand_ins import SETTINGS, two_shapes

from grounding.candidates import SELECTIVE_SEARCH, candidate_regions
from grounding.candidates.engines import local_proposals, proposal_engine, ray_proposals
from grounding.config import PairRayParams
from grounding.errors import ConfigError
from grounding.io import ImageFolder, ProposalCache

SAMPLE_IMAGES = REPO / "data" / "sample" / "images"


def test_an_unknown_engine_is_a_config_error_listing_the_known_ones() -> None:
    with pytest.raises(
        ConfigError, match=r"pair.engine: unknown engine 'spark'.*known: local, ray"
    ):
        proposal_engine("spark")


def test_the_local_engine_proposes_each_image_once_through_the_progress_bar() -> None:
    seen: list[str] = []

    def progress(ids):
        for image_id in ids:
            seen.append(image_id)
            yield image_id

    boxes = local_proposals(
        lambda image: np.array([[0, 0, *image.size]], dtype=np.float64),
        ["a", "b"],
        lambda image_id: two_shapes(),
        progress=progress,
    )
    assert seen == ["a", "b"]
    np.testing.assert_array_equal(boxes["b"], [[0, 0, 240, 160]])


def test_ray_without_its_settings_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"pair.ray"):
        ray_proposals(np.asarray, ["a"], lambda i: two_shapes(), progress=iter, ray_settings=None)


def test_candidate_regions_refuse_an_unknown_engine() -> None:
    with pytest.raises(ConfigError, match="unknown engine 'spark'"):
        candidate_regions(
            SELECTIVE_SEARCH,
            {SELECTIVE_SEARCH: SETTINGS},
            pd.DataFrame({"image_id": ["a"]}),
            pd.DataFrame(),
            lambda i: two_shapes(),
            engine="spark",
        )


@pytest.mark.slow
def test_ray_fills_the_cache_that_local_then_reads(local_ray: None, tmp_path: Path) -> None:
    # OpenCV's selective search ranks with random numbers, so two runs of either engine differ
    # by the order of ties; the proposal cache is what makes the boxes the same
    names = sorted(p.name for p in SAMPLE_IMAGES.iterdir())[:10]
    images = pd.DataFrame({"image_id": [Path(n).stem for n in names], "file_name": names})
    load_image = ImageFolder(SAMPLE_IMAGES, images)
    cache = ProposalCache(tmp_path / "proposals")
    bar: list[int] = []

    def progress(ids):
        bar.append(len(ids))  # the bar knows the total
        yield from ids

    ray = candidate_regions(
        SELECTIVE_SEARCH,
        {SELECTIVE_SEARCH: SETTINGS},
        images,
        pd.DataFrame(),
        load_image,
        cache=cache,
        progress=progress,
        engine="ray",
        ray_settings=PairRayParams(concurrency=2),
    )
    assert bar == [10]
    assert len(list((tmp_path / "proposals").glob("*.npy"))) == 10  # written by the workers
    local = candidate_regions(
        SELECTIVE_SEARCH,
        {SELECTIVE_SEARCH: SETTINGS},
        images,
        pd.DataFrame(),
        load_image,
        cache=cache,
    )
    assert sorted(ray) == sorted(local)
    for image_id, boxes in local.items():
        assert len(boxes) > 0
        assert ray[image_id].tobytes() == boxes.astype(np.float64).tobytes()
