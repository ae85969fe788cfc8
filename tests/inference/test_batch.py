"""Many images through one grounder: results in order, a bad image skipped with its reason,
the threshold override, integer boxes in the record, unique picture names. Stand-in models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import stand_ins
from PIL import Image

from grounding.errors import DataError
from grounding.inference.batch import (
    ImageGrounding,
    Skipped,
    check_threshold,
    ground_images,
    picture_names,
    with_threshold,
)
from grounding.inference.grounder import Found, Grounding
from grounding.io import read_image


def test_a_bad_image_is_skipped_with_its_reason_and_the_batch_goes_on(tmp_path: Path) -> None:
    good, broken, tiny = tmp_path / "a.png", tmp_path / "b.jpg", tmp_path / "c.png"
    stand_ins.two_shapes().save(good)
    broken.write_bytes(b"not a picture")
    Image.new("RGB", (10, 10)).save(tiny)
    paths = [good, broken, tmp_path / "missing.png", tiny, good]
    results = list(
        ground_images(stand_ins.grounder(), paths, ["a red box", "a blue box"], read=read_image)
    )
    assert [type(r) for r in results] == [ImageGrounding, Skipped, Skipped, Skipped, ImageGrounding]
    assert results[1].error.startswith(f"{broken}: unreadable image")
    assert results[2].error == f"{tmp_path / 'missing.png'}: image file missing"
    assert results[3].error.startswith(f"{tiny}: image is 10x10 pixels")
    first = results[0]
    assert first.size == (240, 160) and first.threshold == 0.5
    assert [g.phrase for g in first.groundings] == ["a red box", "a blue box"]
    assert results[4].groundings == first.groundings


def test_the_record_holds_model_image_size_and_integer_boxes() -> None:
    grounding = Grounding("a dog", [Found((10.4, 20.6, 50.5, 60.0), 0.7, True)])
    result = ImageGrounding(Path("x.jpg"), (200, 100), 0.5, [grounding], Image.new("RGB", (1, 1)))
    record = result.record("models/grounder.safetensors")
    assert json.loads(json.dumps(record)) == {
        "model": "models/grounder.safetensors",
        "image": "x.jpg",
        "size": [200, 100],
        "threshold": 0.5,
        "phrases": [
            {
                "phrase": "a dog",
                "boxes": [{"box": [10, 21, 50, 60], "score": 0.7, "above_threshold": True}],
                "reason": None,
            }
        ],
    }


def test_the_threshold_override_decides_above_threshold(tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    stand_ins.two_shapes().save(image)
    grounder = stand_ins.grounder()
    [default] = ground_images(grounder, [image], ["a red box"], read=read_image, top_k=3)
    [lowered] = ground_images(
        grounder, [image], ["a red box"], read=read_image, top_k=3, threshold=0.0
    )
    [raised] = ground_images(
        grounder, [image], ["a red box"], read=read_image, top_k=3, threshold=1.0
    )
    scores = [found.score for found in default.groundings[0].boxes]
    assert [f.score for f in lowered.groundings[0].boxes] == scores
    assert all(f.above_threshold for f in lowered.groundings[0].boxes)
    assert not any(f.above_threshold for f in raised.groundings[0].boxes if f.score < 1.0)
    assert lowered.threshold == 0.0 and raised.threshold == 1.0


def test_with_threshold_marks_scores_at_the_threshold_as_above() -> None:
    found = [Grounding("p", [Found((0, 0, 1, 1), 0.4, False), Found((0, 0, 2, 2), 0.3, True)])]
    [marked] = with_threshold(found, 0.35)
    assert [f.above_threshold for f in marked.boxes] == [True, False]
    assert [f.above_threshold for f in with_threshold(found, 0.4)[0].boxes] == [True, False]


@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_a_threshold_outside_zero_to_one_is_refused(value: float) -> None:
    with pytest.raises(DataError, match="not between 0 and 1"):
        check_threshold(value)


def test_picture_names_are_unique_in_one_folder() -> None:
    paths = [Path("x/a.jpg"), Path("y/a.jpg"), Path("y/A.png"), Path("b.jpeg")]
    assert list(picture_names(paths).values()) == ["a.png", "a-2.png", "A-3.png", "b.png"]
