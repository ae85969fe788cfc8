"""The MDETR reader and writer on hand-written COCO-style files: MDETR's own Flickr30k quirks
(1-based boxes, sizes as strings, one entry per caption), RefCOCO-like files, every kind of bad
record, and the round trip."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from grounding.data.formats.flickr30k import box_from_xml
from grounding.data.formats.mdetr import MdetrReader, write
from grounding.data.records import Box, Entity, ImageRecord, Phrase, Skipped
from grounding.data.tables import build_tables
from grounding.errors import DataError, FormatError

CAPTION_0 = (
    "A man and a woman hold a dog ."  # spans: a man [0, 5], a woman [10, 17], a dog [23, 28]
)
CAPTION_1 = "Two people and their dog ."  # Two people [0, 10], their dog [15, 24]


def entry(entry_id: int, caption: str, spans: list, **fields: Any) -> dict[str, Any]:
    return {
        "id": entry_id,
        "file_name": "1000092795.jpg",
        "height": 80,
        "width": 100,
        "caption": caption,
        "tokens_positive_eval": spans,
        "sentence_id": entry_id,
        "original_img_id": 1000092795,
        **fields,
    }


def annotation(image_id: int, bbox: list, spans: list, **fields: Any) -> dict[str, Any]:
    return {
        "image_id": image_id,
        "bbox": bbox,
        "tokens_positive": spans,
        "category_id": 1,
        **fields,
    }


def flickr_like() -> dict[str, Any]:
    """Two captions of one photo, as MDETR's separateGT files hold them (in COCO boxes)."""
    return {
        "images": [
            entry(0, CAPTION_0, [[[0, 5]], [[10, 17]], [[23, 28]]]),
            entry(1, CAPTION_1, [[[0, 10]], [[15, 24]]], height="80", width="100"),
        ],
        "annotations": [
            annotation(0, [10, 10, 20, 30], [[0, 5]]),
            annotation(0, [40, 10, 20, 30], [[10, 17]]),
            annotation(1, [10, 10, 20, 30], [[0, 10]]),  # the same boxes on the other caption
            annotation(1, [40, 10, 20, 30], [[0, 10]]),
            # "a dog" [23, 28] has no annotation: a phrase without a box
        ],
        "categories": [{"id": 1, "name": "object"}],
    }


def write_json(path: Path, content: Any) -> Path:
    path.write_text(json.dumps(content), encoding="utf-8")
    return path


def read(tmp_path: Path, content: Any, **kwargs: Any) -> list[ImageRecord]:
    return list(MdetrReader({"val": write_json(tmp_path / "val.json", content)}, **kwargs))


def test_the_captions_of_a_photo_are_one_record_with_its_boxes_once(tmp_path: Path) -> None:
    (record,) = read(tmp_path, flickr_like())
    assert (record.image_id, record.file_name, record.split) == (
        "1000092795",
        "1000092795.jpg",
        "val",
    )
    assert (record.width, record.height) == (100, 80)  # "100" and "80" on the second entry
    assert record.boxes == (Box(10, 10, 30, 40), Box(40, 10, 60, 40))  # x, y, x + w, y + h
    assert [c.text for c in record.captions] == [CAPTION_0, CAPTION_1]
    assert record.captions[0].phrases == (
        Phrase("A man", 1, (), 0),
        Phrase("a woman", 2, (), 3),
        Phrase("a dog", 3, (), 6),  # evaluated, no annotation: no box
    )
    assert record.captions[1].phrases == (
        Phrase("Two people", 4, (), 0),
        Phrase("their dog", 5, (), 3),
    )
    assert record.entities == (
        Entity(1, (0,)),
        Entity(2, (1,)),
        Entity(3, ()),
        Entity(4, (0, 1)),  # two annotations on one span: ANY-box
        Entity(5, ()),
    )


def test_an_annotation_with_two_mentions_boxes_both(tmp_path: Path) -> None:
    # MDETR writes one annotation per box of a sentence, with the spans of every mention
    content = {
        "images": [
            entry(0, "A man pets his dog and he smiles .", [[[0, 5]], [[10, 18]], [[23, 25]]])
        ],
        "annotations": [
            annotation(0, [10, 10, 20, 30], [[0, 5], [23, 25]]),
            annotation(0, [0, 50, 30, 30], [[10, 18]]),
        ],
    }
    (record,) = read(tmp_path, content)
    phrases = record.captions[0].phrases
    assert [(p.text, p.entity_id) for p in phrases] == [("A man", 1), ("his dog", 2), ("he", 1)]
    assert record.entities == (Entity(1, (0,)), Entity(2, (1,)))


def test_without_evaluated_phrases_an_annotation_s_spans_are_its_phrase(tmp_path: Path) -> None:
    # RefCOCO-like: no tokens_positive_eval; the spans mark the expression's head noun
    content = {
        "images": [
            {
                "id": 7,
                "file_name": "COCO_train2014_000000581857.jpg",
                "height": 480,
                "width": 640,
                "caption": "the lady in a blue shirt",
                "dataset_name": "refcoco",
                "original_id": 581857,
            }
        ],
        "annotations": [
            annotation(7, [103.93, 299.99, 134.22, 177.42], [[4, 8], [19, 24]]),
            annotation(7, [0, 0, 10, 10], []),  # named by no phrase: still a box of the image
        ],
    }
    (record,) = read(tmp_path, content)
    assert record.image_id == "COCO_train2014_000000581857"
    assert record.captions[0].phrases == (Phrase("lady shirt", 1, (), 1),)
    assert record.boxes[0] == Box(103.93, 299.99, 103.93 + 134.22, 299.99 + 177.42)
    assert record.boxes[1] == Box(0, 0, 10, 10)
    assert record.entities == (Entity(1, (0,)),)


def test_mdetr_flickr_boxes_are_1_based_and_read_as_the_xml_is(tmp_path: Path) -> None:
    # flickr_combined.py: x, y = the XML's xmin, ymin; w, h = xmax - xmin, ymax - ymin
    xmin, ymin, xmax, ymax = 11, 41, 30, 80
    mdetr_bbox = [xmin, ymin, xmax - xmin, ymax - ymin]
    for name, expected in (
        ("flickr", box_from_xml(xmin, ymin, xmax, ymax)),  # (10, 40, 30, 80)
        ("refcoco", Box(11, 41, 30, 80)),  # a COCO box: x, y, x + w, y + h
    ):
        content = {
            "images": [entry(0, CAPTION_0, [[[0, 5]]], dataset_name=name)],
            "annotations": [annotation(0, mdetr_bbox, [[0, 5]])],
        }
        (record,) = read(tmp_path, content)
        assert record.boxes == (expected,), name
    assert box_from_xml(xmin, ymin, xmax, ymax) == Box(10, 40, 30, 80)


def test_split_files_and_a_missing_file(tmp_path: Path) -> None:
    write_json(tmp_path / "final_flickr_separateGT_test.json", flickr_like())
    reader = MdetrReader.open(tmp_path, files={"test": Path("final_flickr_separateGT_test.json")})
    assert [(r.image_id, r.split) for r in reader] == [("1000092795", "test")]
    with pytest.raises(DataError, match=r"nope.json: no such file \(the train split"):
        MdetrReader({"train": tmp_path / "nope.json"})


# --- bad records ----------------------------------------------------------------------------


def _set(path: str, value: Any):
    """A change to :func:`flickr_like`: ``images.1.caption`` = value (``None`` deletes)."""

    def change(content: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target: Any = content
        for part in parents:
            target = target[int(part)] if part.isdigit() else target[part]
        if value is None:
            del target[int(last) if last.isdigit() else last]
        else:
            target[int(last) if last.isdigit() else last] = value

    return change


BAD_RECORDS = [
    (_set("images.1.caption", None), r"images\[1\]: missing field 'caption'"),
    (
        _set("images.1.height", "81"),
        r"images\[1\]: image 1000092795.jpg is 100x81 here but 100x80 at",
    ),
    (_set("images.1.id", 0), r"images\[1\]: id 0 is the id of an earlier entry"),
    (
        _set("images.1.tokens_positive_eval", [[[15, 40]]]),
        r"images\[1\]: tokens_positive_eval\[0\]: span \[15, 40\] lies outside the 26-char",
    ),
    (_set("annotations.2.bbox", None), r"annotations\[2\]: missing field 'bbox'"),
    (
        _set("annotations.2.bbox", [90, 10, 20, 30]),
        r"annotations\[2\]: box .* lies outside the 100x80 image",
    ),
    (_set("annotations.2.bbox", [10, 10, 0, 30]), r"annotations\[2\]: box .* has zero area"),
    (
        _set("annotations.3.tokens_positive", [[20, 30]]),
        r"annotations\[3\]: tokens_positive: span \[20, 30\] lies outside the 26-character caption",
    ),
    (
        _set("annotations.3.image_id", 5),
        r"annotations\[3\]: image_id 5 is not the id of an images\[\] entry",
    ),
    (
        _set("annotations.3.bbox", "10 10 20 30"),
        r"annotations\[3\]: bbox \[x, y, w, h\] is not four numbers",
    ),
]


@pytest.mark.parametrize(("change", "message"), BAD_RECORDS)
def test_a_bad_record_is_named_by_file_and_record(tmp_path: Path, change, message: str) -> None:
    content = flickr_like()
    change(content)
    path = write_json(tmp_path / "val.json", content)
    with pytest.raises(FormatError, match=message) as raised:
        MdetrReader({"val": path})
    assert str(raised.value).startswith(f"{path}: ")


def test_a_byte_order_mark_is_ignored_and_bad_bytes_are_located(tmp_path: Path) -> None:
    path = tmp_path / "val.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(flickr_like()).encode())
    assert [r.image_id for r in MdetrReader({"val": path})] == ["1000092795"]
    path.write_bytes(b'{"images": [],\n "annotations": ["caf\xe9"]}\n')
    with pytest.raises(FormatError, match=r"val\.json:2: not UTF-8 text \(.* at byte 36\)$"):
        MdetrReader({"val": path})


def test_malformed_json_is_named_by_line(tmp_path: Path) -> None:
    path = tmp_path / "val.json"
    path.write_text('{"images": [],\n "annotations": [}\n', encoding="utf-8")
    with pytest.raises(FormatError, match="malformed JSON") as raised:
        MdetrReader({"val": path})
    assert raised.value.line == 2
    write_json(path, {"images": []})
    with pytest.raises(FormatError, match="missing field 'annotations'"):
        MdetrReader({"val": path})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"images": [], "annotations": [' + "[" * 100_000 + "]" * 100_000 + "]}", "nested too"),
        ('{"images": [], "annotations": [' + "9" * 5000 + "]}", r"Exceeds the limit \(4300"),
        ('{"images": [], "annotations": [}', "Expecting value"),
    ],
)
def test_a_file_python_cannot_parse_is_an_error_or_left_out_whole(
    tmp_path: Path, text: str, message: str
) -> None:
    # nested 100,000 deep (RecursionError) and 5,000 digits (ValueError) are JSON that
    # Python's parser refuses: located errors like malformed JSON, never a traceback
    bad = tmp_path / "val.json"
    bad.write_text(text, encoding="utf-8")
    with pytest.raises(
        FormatError, match=f"^{re.escape(str(bad))}(:1)?: malformed JSON: .*{message}"
    ):
        MdetrReader({"val": bad})
    good = write_json(tmp_path / "train.json", flickr_like())
    reader = MdetrReader({"train": good, "val": bad}, skip_bad_files=True)
    assert [record.split for record in reader] == ["train"]
    (skipped,) = reader.skipped
    assert skipped.source == str(bad) and skipped.reason.startswith("malformed JSON")


def test_skip_bad_files_leaves_out_bad_records_with_the_annotations_of_a_bad_caption(
    tmp_path: Path,
) -> None:
    content = flickr_like()
    content["images"][1]["height"] = "81"  # the second caption disagrees on the size
    content["annotations"][1]["bbox"] = [90, 10, 20, 30]  # outside
    path = write_json(tmp_path / "val.json", content)
    reader = MdetrReader({"val": path}, skip_bad_files=True)
    (record,) = reader
    assert [c.text for c in record.captions] == [CAPTION_0]
    assert record.boxes == (Box(10, 10, 30, 40),)
    reasons = [s.reason for s in reader.skipped]
    assert reasons[0].startswith("images[1]: image 1000092795.jpg is 100x81 here")
    assert reasons[1].startswith("annotations[1]: box (x1, y1, x2, y2) = (90, 10, 110, 40)")
    assert reader.skipped[2:] == [
        Skipped(str(path), f"annotations[{i}]: its images[] entry (id 1) is left out")
        for i in (2, 3)
    ]


# --- writing --------------------------------------------------------------------------------


def test_write_lists_every_phrase_for_evaluation_and_annotations_box_by_box(tmp_path: Path) -> None:
    (record,) = read(tmp_path, flickr_like())
    written = write([record])
    assert written.images == {"train": 0, "val": 1, "test": 0}
    assert json.loads(written.texts["train"])["images"] == []
    content = json.loads(written.texts["val"])
    assert [e["tokens_positive_eval"] for e in content["images"]] == [
        [[[0, 5]], [[10, 17]], [[23, 28]]],
        [[[0, 10]], [[15, 24]]],
    ]
    assert [e["original_img_id"] for e in content["images"]] == [1000092795, 1000092795]
    assert [(a["image_id"], a["bbox"], a["tokens_positive"]) for a in content["annotations"]] == [
        (0, [10, 10, 20, 30], [[0, 5]]),  # box 0 on each caption that names it
        (1, [10, 10, 20, 30], [[0, 10]]),
        (0, [40, 10, 20, 30], [[10, 17]]),  # then box 1
        (1, [40, 10, 20, 30], [[0, 10]]),
    ]
    assert written.left_out == {}


def test_a_box_no_phrase_names_is_written_on_the_first_caption_without_spans(
    tmp_path: Path,
) -> None:
    content = flickr_like()
    content["annotations"].insert(0, annotation(1, [0, 60, 5, 5], []))
    (record,) = read(tmp_path, content)
    assert record.boxes[0] == Box(0, 60, 5, 65) and len(record.boxes) == 3
    written = json.loads(write([record]).texts["val"])
    assert written["annotations"][0] == {
        "id": 0,
        "image_id": 0,
        "bbox": [0, 60, 5, 5],
        "area": 25,
        "iscrowd": 0,
        "category_id": 1,
        "tokens_positive": [],
    }
    (again,) = read(tmp_path, written)
    assert again == record


def test_mdetr_round_trip_gives_the_same_tables(tmp_path: Path) -> None:
    first = read(tmp_path, flickr_like())
    again = list(
        MdetrReader(
            {"val": write_json(tmp_path / "again.json", json.loads(write(first).texts["val"]))}
        )
    )
    assert again == first
    before, after = build_tables(first, set()).tables(), build_tables(again, set()).tables()
    for name, table in before.items():
        assert table.equals(after[name]), name
