"""The Label Studio format: boxes from percents (pinned by hand), regions and their phrases into
records, every malformed task a located error, and tasks with predictions written back."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from grounding.data.formats import labelstudio
from grounding.data.formats.grounded import BadRecord
from grounding.data.formats.labelstudio import (
    CONFIG,
    LabelStudioReader,
    box_value,
    file_name_of,
    percent_box,
    write,
)
from grounding.data.records import Box, Caption, Entity, ImageRecord, Phrase, Skipped
from grounding.data.tables import build_tables
from grounding.errors import DataError, FormatError


def region(
    region_id: str, xywh: tuple[float, float, float, float], *phrases: str, size=(500, 400)
) -> list[dict[str, Any]]:
    """The two result items of one region, as Label Studio exports them."""
    x, y, w, h = xywh
    common = {
        "id": region_id,
        "to_name": "image",
        "original_width": size[0],
        "original_height": size[1],
        "image_rotation": 0,
    }
    value = {"x": x, "y": y, "width": w, "height": h, "rotation": 0}
    items = [{**common, "type": "rectangle", "from_name": "box", "value": value}]
    if phrases:
        text_value = {**value, "text": list(phrases)}
        items.append({**common, "type": "textarea", "from_name": "phrase", "value": text_value})
    return items


def a_task(task_id: int, image: str, *regions: list[dict[str, Any]], **annotation: Any) -> dict:
    result = [item for items in regions for item in items]
    return {
        "id": task_id,
        "data": {"image": image},
        "annotations": [
            {"id": task_id * 10, "result": result, "was_cancelled": False, **annotation}
        ],
        "predictions": [],
    }


def write_export(path: Path, tasks: Any) -> Path:
    path.write_text(json.dumps(tasks), encoding="utf-8")
    return path


def read(tmp_path: Path, tasks: Any, **kwargs: Any) -> list[ImageRecord]:
    return list(
        LabelStudioReader({"train": write_export(tmp_path / "export.json", tasks)}, **kwargs)
    )


def accepted(text: str) -> list[dict[str, Any]]:
    """Written tasks as a reviewer leaves them who submits each prediction unchanged."""
    tasks = json.loads(text)
    for task in tasks:
        task["annotations"] = [{"result": p["result"]} for p in task.pop("predictions")]
    return tasks


def test_percents_become_pixels_once_as_computed_by_hand() -> None:
    # 500 x 400 image: x 10 % = 50 px, y 25 % = 100 px, x + w = 40.5 % = 202.5 px,
    # y + h = 75 % = 300 px
    value = {"x": 10, "y": 25, "width": 30.5, "height": 50, "rotation": 0}
    assert percent_box(value, 500, 400) == Box(50.0, 100.0, 202.5, 300.0)
    # the whole image of a 333 x 500 photo
    assert percent_box({"x": 0, "y": 0, "width": 100, "height": 100}, 333, 500) == Box(
        0.0, 0.0, 333.0, 500.0
    )
    # 37 / 333 is no finite decimal: its percent reads back to the pixel
    box = Box(37.0, 1.0, 332.0, 499.0)
    assert percent_box(box_value(box, 333, 500), 333, 500) == box
    assert box_value(Box(50, 100, 202.5, 300), 500, 400) == {**value, "x": 10.0, "y": 25.0}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"x": 10, "y": 10, "width": 5, "height": 5, "rotation": 30}, "rotated"),
        ({"x": 10, "y": 10, "width": 0, "height": 5}, "zero area"),
        ({"x": 90, "y": 10, "width": 20, "height": 5}, "lies outside the 500x400 image"),
        ({"x": 10, "y": 10, "width": "5", "height": 5}, "not four numbers"),
    ],
)
def test_a_bad_rectangle_says_what_is_wrong(value: dict[str, Any], message: str) -> None:
    with pytest.raises(BadRecord, match=message):
        percent_box(value, 500, 400)


def test_regions_become_boxes_and_their_texts_phrases(tmp_path: Path) -> None:
    (record,) = read(
        tmp_path,
        [
            a_task(
                7,
                "/data/local-files/?d=photos/dog%20park.jpg",
                region("r1", (10, 25, 30.5, 50), "Two dogs", "a brown dog"),
                region("r2", (60, 0, 20, 10), "Two dogs"),  # ANY-box: one phrase, two boxes
                region("r3", (0, 80, 100, 20), " the grass ", "café"),
            )
        ],
    )
    assert record.image_id == "photos/dog park"
    assert (record.file_name, record.width, record.height) == ("photos/dog park.jpg", 500, 400)
    assert record.split == "train"
    assert record.boxes == (
        Box(50, 100, 202.5, 300),
        Box(300, 0, 400, 40),
        Box(0, 320, 500, 400),
    )
    # an entity is a distinct set of boxes: "the grass" and "café" name one
    assert record.entities == (Entity(1, (0, 1)), Entity(2, (0,)), Entity(3, (2,)))
    assert record.captions == (
        Caption(
            "Two dogs . a brown dog . the grass . café .",
            (
                Phrase("Two dogs", 1, (), 0),
                Phrase("a brown dog", 2, (), 3),
                Phrase("the grass", 3, (), 7),
                Phrase("café", 3, (), 10),
            ),
        ),
    )


def test_image_urls_give_the_file_names_of_the_images_folder() -> None:
    assert file_name_of("/data/local-files/?d=images/a%20b.jpg") == "images/a b.jpg"
    assert file_name_of("/data/upload/3/8f3a2b1c-1000092795.jpg") == "1000092795.jpg"
    assert file_name_of("https://example.com/photos/12.jpg?sig=x") == "12.jpg"
    assert file_name_of("s3://bucket/set/12.jpg") == "12.jpg"
    with pytest.raises(BadRecord, match="without one file"):
        file_name_of("/data/local-files/?x=1")


def test_the_task_s_file_name_wins_over_its_url(tmp_path: Path) -> None:
    task = a_task(1, "/data/local-files/?d=images/sub/1.jpg", region("a", (0, 0, 50, 50), "x"))
    task["data"]["file_name"] = "sub/1.jpg"
    (record,) = read(tmp_path, [task])
    assert record.file_name == "sub/1.jpg"


def test_the_ground_truth_annotation_is_taken_among_several(tmp_path: Path) -> None:
    task = a_task(1, "/data/upload/1/aaaaaaaa-1.jpg", region("a", (0, 0, 50, 50), "first"))
    second = copy.deepcopy(task["annotations"][0])
    second["result"] = region("b", (50, 50, 50, 50), "second")
    second["ground_truth"] = True
    cancelled = {"result": [], "was_cancelled": True}
    task["annotations"] += [second, cancelled]
    (record,) = read(tmp_path, [task])
    assert [p.text for p in record.captions[0].phrases] == ["second"]
    assert record.boxes == (Box(250, 200, 500, 400),)


GOOD = region("a", (0, 0, 50, 50), "a thing")
BAD_TASKS: list[tuple[Any, str]] = [
    ({**a_task(7, "1.jpg", GOOD), "annotations": []}, "task 7: has no annotation"),
    (a_task(7, "1.jpg", GOOD, was_cancelled=True), "task 7: was skipped by its annotator"),
    (
        {**a_task(7, "1.jpg", GOOD), "annotations": a_task(7, "1.jpg", GOOD)["annotations"] * 2},
        "task 7: has 2 annotations and 0 marked ground truth",
    ),
    (a_task(7, "1.jpg", region("a", (0, 0, 5, 5))), "task 7: region 'a' has a box but no phrase"),
    (
        a_task(7, "1.jpg", GOOD, region("b", (0, 0, 5, 5), "x")[1:]),
        "task 7: region 'b' has a phrase but no box",
    ),
    (
        a_task(7, "1.jpg", [{**GOOD[0], "type": "polygonlabels"}]),
        "task 7: result\\[0\\]: type 'polygonlabels' is not a box",
    ),
    (
        a_task(7, "1.jpg", [{k: v for k, v in GOOD[0].items() if k != "original_width"}]),
        "task 7: result\\[0\\]: missing field 'original_width'",
    ),
    (
        a_task(7, "1.jpg", GOOD, region("b", (0, 0, 5, 5), "x", size=(600, 400))),
        "task 7: result\\[2\\]: the image is 600x400 here but 500x400",
    ),
    (a_task(7, "1.jpg"), "task 7: its annotation has no region"),
    ({"id": 7, "annotations": []}, "task 7: missing field 'data'"),
    ([1], "tasks\\[0\\]: the task is not a JSON object"),
]


@pytest.mark.parametrize(("task", "message"), BAD_TASKS)
def test_a_bad_task_is_named_by_file_and_task(tmp_path: Path, task: Any, message: str) -> None:
    tasks = task if isinstance(task, list) else [a_task(1, "0.jpg", GOOD), task]
    with pytest.raises(FormatError, match=f"^{tmp_path / 'export.json'}: {message}"):
        read(tmp_path, tasks)


def test_two_tasks_of_one_image_is_an_error(tmp_path: Path) -> None:
    tasks = [a_task(1, "/data/upload/1/aaaaaaaa-1.jpg", GOOD), a_task(2, "/x/1.jpg", GOOD)]
    with pytest.raises(FormatError, match=r"task 2: image 1.jpg is also .*export.json task 1"):
        read(tmp_path, tasks)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{}", "not a Label Studio JSON export"),
        (b"[\n{,", ":2: malformed JSON"),
        (b'["\xff"]', ":1: not UTF-8 text"),
    ],
)
def test_a_file_that_is_no_export_is_named(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "export.json"
    path.write_bytes(content)
    with pytest.raises(FormatError, match=message):
        LabelStudioReader({"val": path})


def test_a_missing_export_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no such file .*Label Studio"):
        LabelStudioReader({"val": tmp_path / "nope.json"})


def test_skip_bad_files_leaves_out_bad_tasks_and_lists_them(tmp_path: Path) -> None:
    tasks = [a_task(1, "1.jpg", GOOD), a_task(2, "2.jpg", GOOD, was_cancelled=True)]
    path = write_export(tmp_path / "export.json", tasks)
    reader = LabelStudioReader({"train": path}, skip_bad_files=True)
    assert [r.file_name for r in reader] == ["1.jpg"]
    assert reader.skipped == [Skipped(str(path), "task 2: was skipped by its annotator")]


def test_write_makes_tasks_with_predictions_and_counts_what_it_cannot_hold() -> None:
    record = ImageRecord(
        image_id="1",
        file_name="1.jpg",
        width=500,
        height=400,
        boxes=(Box(50, 100, 202.5, 300), Box(0, 0, 10, 10), Box(1, 1, 2, 2)),
        entities=(Entity(1, (0, 1)), Entity(2, (0,)), Entity(3, ())),
        captions=(
            Caption(
                "Two dogs and a dog .", (Phrase("Two dogs", 1, (), 0), Phrase("a dog", 2, (), 3))
            ),
            Caption("A sky .", (Phrase("A sky", 3, (), 0), Phrase("Two dogs", 1, (), 0))),
        ),
        split="val",
    )
    bare = ImageRecord("2", "2.jpg", 10, 10, (), (), (), split="val")
    written = write([record, bare, ImageRecord("3", "3.jpg", 10, 10, (), (), ())])
    assert written.images == {"train": 0, "val": 2, "test": 0}
    assert written.left_out == {
        "phrases without a box": 1,
        "boxes that no phrase names": 1,
        "images in no split": 1,
    }
    assert json.loads(written.texts["train"]) == []
    first, second = json.loads(written.texts["val"])
    assert first["data"] == {"image": "/data/local-files/?d=images/1.jpg", "file_name": "1.jpg"}
    (prediction,) = first["predictions"]
    assert prediction["model_version"] == labelstudio.MODEL_VERSION
    items = prediction["result"]
    assert [(i["id"], i["type"], i["from_name"], i["to_name"]) for i in items] == [
        ("b0", "rectangle", "box", "image"),
        ("b0", "textarea", "phrase", "image"),
        ("b1", "rectangle", "box", "image"),
        ("b1", "textarea", "phrase", "image"),
    ]
    assert items[0]["value"] == {"x": 10, "y": 25, "width": 30.5, "height": 50, "rotation": 0}
    assert items[1]["value"]["text"] == ["Two dogs", "a dog"]
    assert items[3]["value"]["text"] == ["Two dogs"]
    assert {(i["original_width"], i["original_height"]) for i in items} == {(500, 400)}
    assert second == {
        "data": {"image": "/data/local-files/?d=images/2.jpg", "file_name": "2.jpg"},
        "predictions": [],
    }


def test_accepted_predictions_read_back_to_the_same_boxes_and_phrases(tmp_path: Path) -> None:
    first = read(
        tmp_path,
        [
            a_task(
                1,
                "/data/local-files/?d=images/sub/1.jpg",
                region("r1", (10, 25, 30.5, 50), "Two dogs", "a brown dog"),
                region("r2", (60, 0, 20, 10), "Two dogs"),
                region("r3", (3.3, 7.7, 11.11, 19.9), "café", size=(500, 400)),
            ),
            a_task(
                2, "/data/upload/1/abcdef12-2.jpg", region("x", (1, 2, 3, 4), "a", size=(333, 500))
            ),
        ],
    )
    written = write(first)
    again = list(
        LabelStudioReader(
            {"train": write_export(tmp_path / "again.json", accepted(written.texts["train"]))}
        )
    )
    assert again == first
    files = {"sub/1.jpg", "2.jpg"}
    before, after = build_tables(first, files).tables(), build_tables(again, files).tables()
    for name, table in before.items():
        assert table.equals(after[name]), name
    assert written.left_out == {}


def test_the_shipped_config_names_what_the_reader_reads() -> None:
    view = etree.fromstring(CONFIG.read_bytes())
    assert view.tag == "View"
    (image,) = view.findall("Image")
    (rectangle,) = view.findall("Rectangle")
    (textarea,) = view.findall("TextArea")
    assert image.get("name") == labelstudio.IMAGE and image.get("value") == "$image"
    assert rectangle.get("name") == labelstudio.BOX and rectangle.get("toName") == "image"
    assert rectangle.get("canRotate") == "false"
    assert textarea.get("name") == labelstudio.PHRASE and textarea.get("toName") == "image"
    assert textarea.get("perRegion") == "true" and textarea.get("required") == "true"


def test_a_task_from_any_boxes_carries_its_model_and_score() -> None:
    made = labelstudio.task(
        "a b.jpg",
        200,
        100,
        [(Box(20, 10, 120, 60), ["a dog"])],
        images="photos",
        model_version="grounder 3",
        score=0.75,
    )
    assert made["data"] == {
        "image": "/data/local-files/?d=photos/a%20b.jpg",
        "file_name": "a b.jpg",
    }
    (prediction,) = made["predictions"]
    assert (prediction["model_version"], prediction["score"]) == ("grounder 3", 0.75)
    rectangle, phrase = prediction["result"]
    assert rectangle["value"] == {"x": 10, "y": 10, "width": 50, "height": 50, "rotation": 0}
    assert phrase["value"]["text"] == ["a dog"]
