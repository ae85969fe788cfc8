"""The ODVG reader and writer on hand-written JSON Lines: every quirk the field writes, every kind
of bad line, and the round trip."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO_ROOT

from grounding.data.formats.odvg import OdvgReader, write
from grounding.data.records import NOT_VISUAL, Box, Caption, Entity, ImageRecord, Phrase, Skipped
from grounding.data.tables import build_tables
from grounding.errors import DataError, FormatError


def grounding(filename: str, caption: str, regions: list[dict], size=(100, 80)) -> dict:
    width, height = size
    return {
        "filename": filename,
        "height": height,
        "width": width,
        "grounding": {"caption": caption, "regions": regions},
    }


def write_lines(path: Path, lines: list[Any]) -> Path:
    """One line per item: a dict as JSON, a string as it is."""
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    path.write_text(text, encoding="utf-8")
    return path


def read(tmp_path: Path, lines: list[Any], **kwargs: Any) -> list[ImageRecord]:
    return list(OdvgReader({"train": write_lines(tmp_path / "train.jsonl", lines)}, **kwargs))


def only(records: list[ImageRecord]) -> ImageRecord:
    assert len(records) == 1
    return records[0]


# --- quirks -----------------------------------------------------------------------------------


def test_lines_sharing_an_image_are_its_captions_with_its_boxes_once(tmp_path: Path) -> None:
    man = {"bbox": [10, 20, 50, 80], "phrase": "A man", "tokens_positive": [[0, 5]]}
    record = only(
        read(
            tmp_path,
            [
                grounding("1.jpg", "A man rides a bike .", [man]),
                grounding("2.jpg", "A cat .", [{"bbox": [0, 0, 5, 5], "phrase": "A cat"}]),
                grounding(
                    "1.jpg",
                    "The person and a bike .",
                    [
                        {"bbox": [10, 20, 50, 80], "phrase": "The person"},
                        {"bbox": [40, 40, 100, 80], "phrase": "a bike"},
                    ],
                ),
            ],
        )[:1]
    )
    assert record.image_id == "1" and record.file_name == "1.jpg"
    assert (record.width, record.height, record.split) == (100, 80, "train")
    assert record.boxes == (Box(10, 20, 50, 80), Box(40, 40, 100, 80))
    assert [c.text for c in record.captions] == ["A man rides a bike .", "The person and a bike ."]
    # "A man" and "The person" name the same box: one entity
    assert record.captions[0].phrases == (Phrase("A man", 1, (), 0),)
    assert record.captions[1].phrases == (
        Phrase("The person", 1, (), 0),
        Phrase("a bike", 2, (), 3),
    )
    assert record.entities == (Entity(1, (0,)), Entity(2, (1,)))


def test_records_come_sorted_by_image_id(tmp_path: Path) -> None:
    lines = [grounding(f"{n}.jpg", "x", []) for n in ("20", "10", "3")]
    assert [r.image_id for r in read(tmp_path, lines)] == ["10", "20", "3"]


def test_spans_tell_a_repeated_phrase_apart_and_gather_a_phrase_s_boxes(tmp_path: Path) -> None:
    caption = "a man talks to a man and two dogs ."
    record = only(
        read(
            tmp_path,
            [
                grounding(
                    "1.jpg",
                    caption,
                    [
                        {
                            "bbox": [0, 0, 10, 10],
                            "phrase": "two dogs",
                            "tokens_positive": [[25, 33]],
                        },
                        {"bbox": [1, 1, 9, 9], "phrase": "a man", "tokens_positive": [[15, 20]]},
                        {
                            "bbox": [20, 0, 30, 10],
                            "phrase": "two dogs",
                            "tokens_positive": [[25, 33]],
                        },
                        {"bbox": [50, 0, 60, 10], "phrase": "a man", "tokens_positive": [[0, 5]]},
                    ],
                )
            ],
        )
    )
    phrases = record.captions[0].phrases
    assert [(p.text, p.first_word) for p in phrases] == [
        ("a man", 0),
        ("a man", 4),
        ("two dogs", 7),
    ]
    boxes = {e.entity_id: [record.boxes[b] for b in e.box_ids] for e in record.entities}
    assert [boxes[p.entity_id] for p in phrases] == [
        [Box(50, 0, 60, 10)],
        [Box(1, 1, 9, 9)],
        [Box(0, 0, 10, 10), Box(20, 0, 30, 10)],  # two regions, one phrase: ANY-box
    ]


def test_without_spans_a_phrase_is_its_text_found_in_the_caption(tmp_path: Path) -> None:
    # Open-GroundingDino's flickr30ke2odvg.py: one region per (phrase, box), no tokens_positive
    record = only(
        read(
            tmp_path,
            [
                grounding(
                    "1.jpg",
                    "Two men near a woman .",
                    [
                        {"bbox": [0, 0, 10, 10], "phrase": "a woman"},
                        {"bbox": [10, 0, 20, 10], "phrase": "Two men"},
                        {"bbox": [20, 0, 30, 10], "phrase": "Two men"},
                        {"bbox": [30, 0, 40, 10], "phrase": "a tree"},  # not in the caption
                    ],
                )
            ],
        )
    )
    phrases = record.captions[0].phrases
    assert [(p.text, p.first_word) for p in phrases] == [
        ("Two men", 0),
        ("a woman", 3),
        ("a tree", -1),
    ]
    entities = {e.entity_id: e.box_ids for e in record.entities}
    assert [len(entities[p.entity_id]) for p in phrases] == [2, 1, 1]


def test_mm_grounding_dino_regions_hold_lists_of_boxes_and_of_phrases(tmp_path: Path) -> None:
    # goldg2odvg.py: the boxes of one phrase in one region; a split phrase as a list
    record = only(
        read(
            tmp_path,
            [
                grounding(
                    "1.jpg",
                    "the man in red shirt",
                    [
                        {
                            "bbox": [[0, 0, 10, 10], [20, 20, 30, 30]],
                            "phrase": ["the man", "shirt"],
                            "tokens_positive": [[0, 7], [15, 20]],
                        }
                    ],
                )
            ],
        )
    )
    assert record.captions[0].phrases == (Phrase("the man shirt", 1, (), 0),)
    assert record.boxes == (Box(0, 0, 10, 10), Box(20, 20, 30, 30))
    assert record.entities == (Entity(1, (0, 1)),)


def test_detection_categories_become_typed_phrases_of_a_prompt(tmp_path: Path) -> None:
    line = {
        "filename": "d.jpg",
        "height": 50,
        "width": 60,
        "detection": {
            "instances": [
                {"bbox": [0, 0, 10, 10], "label": 0, "category": "person"},
                {"bbox": [20, 0, 30, 10], "label": 16, "category": "dog"},
                {"bbox": [30, 5, 60, 50], "label": 0, "category": "person"},
            ]
        },
    }
    empty = {"filename": "e.jpg", "height": 5, "width": 5, "detection": {"instances": []}}
    detected, nothing = read(tmp_path, [line, empty])
    (caption,) = detected.captions
    assert caption.text == "person . dog ."
    assert caption.phrases == (Phrase("person", 1, ("person",), 0), Phrase("dog", 2, ("dog",), 2))
    assert detected.entities == (Entity(1, (0, 2)), Entity(2, (1,)))
    assert nothing.captions == () and nothing.boxes == ()


def test_sizes_as_strings_non_ascii_and_a_caption_without_regions(tmp_path: Path) -> None:
    line = grounding(
        "café.jpg",
        "Un café près de la fenêtre .",
        [{"bbox": [0, 0, 4, 4], "phrase": "Un café", "tokens_positive": [[0, 7]]}],
    )
    line["width"], line["height"] = "100", "80"
    record = only(read(tmp_path, [line, "", grounding("café.jpg", "Rien .", [])]))
    assert (record.width, record.height) == (100, 80)
    assert record.captions[0].phrases[0].text == "Un café"
    assert record.captions[1].text == "Rien ." and record.captions[1].phrases == ()


def test_box_id_keeps_boxes_apart_and_in_their_order(tmp_path: Path) -> None:
    # grounding convert writes box_id: the same coordinates twice stay two boxes
    record = only(
        read(
            tmp_path,
            [
                grounding(
                    "1.jpg", "a dog", [{"bbox": [5, 5, 9, 9], "phrase": "a dog", "box_id": 2}]
                ),
                grounding(
                    "1.jpg",
                    "a cat and a puppy",
                    [
                        {"bbox": [1, 1, 3, 3], "phrase": "a cat", "box_id": 0},
                        {"bbox": [5, 5, 9, 9], "phrase": "a puppy", "box_id": 1},
                    ],
                ),
            ],
        )
    )
    assert record.boxes == (Box(1, 1, 3, 3), Box(5, 5, 9, 9), Box(5, 5, 9, 9))
    assert [e.box_ids for e in record.entities] == [(2,), (0,), (1,)]


def test_each_file_is_its_split_and_a_missing_file_is_named(tmp_path: Path) -> None:
    files = {
        "train": write_lines(tmp_path / "a.jsonl", [grounding("1.jpg", "x", [])]),
        "test": write_lines(tmp_path / "b.jsonl", [grounding("2.jpg", "y", [])]),
    }
    assert [(r.image_id, r.split) for r in OdvgReader(files)] == [("1", "train"), ("2", "test")]
    with pytest.raises(DataError, match=r"nope.jsonl: no such file \(the val split"):
        OdvgReader({"val": tmp_path / "nope.jsonl"})
    opened = OdvgReader.open(tmp_path, files={"train": Path("a.jsonl")})
    assert [r.image_id for r in opened] == ["1"]
    (tmp_path / "dev.jsonl").symlink_to("/dev/zero")
    with pytest.raises(DataError, match=r"dev.jsonl: not a regular file \(the test split"):
        OdvgReader({"test": tmp_path / "dev.jsonl"})


# --- bad lines ------------------------------------------------------------------------------

GOOD = grounding("1.jpg", "a dog", [{"bbox": [0, 0, 10, 10], "phrase": "a dog"}])
BAD_LINES = [
    ('{"filename": "2.jpg", "height": 80', r"malformed JSON: .* \(column \d+\)"),
    (
        {"height": 80, "width": 100, "grounding": {"caption": "x", "regions": []}},
        "missing field 'filename'",
    ),
    ({"filename": "2.jpg", "height": 80, "width": 100}, "neither 'grounding' nor 'detection'"),
    (grounding("2.jpg", "x", [{"phrase": "x"}]), r"regions\[0\]: missing field 'bbox'"),
    (
        grounding(
            "2.jpg", "a dog", [{"bbox": [0, 0, 10, 10], "phrase": "a", "tokens_positive": [[0, 9]]}]
        ),
        r"regions\[0\]: tokens_positive: span \[0, 9\] lies outside the 5-character caption",
    ),
    (
        grounding("2.jpg", "a dog", [{"bbox": [90, 0, 110, 10], "phrase": "a dog"}]),
        r"regions\[0\]: box .* lies outside the 100x80 image",
    ),
    (
        grounding("2.jpg", "a dog", [{"bbox": [5, 5, 5, 10], "phrase": "a dog"}]),
        r"regions\[0\]: box .* has zero area",
    ),
    (
        grounding("1.jpg", "a dog", [], size=(100, 81)),
        r"image 1.jpg is 100x81 here but 100x80 at .*:1",
    ),
    (
        {
            "filename": "2.jpg",
            "height": 8,
            "width": 9,
            "detection": {"instances": [{"bbox": [0, 0, 1, 1]}]},
        },
        r"instances\[0\]: missing field 'category'",
    ),
    (
        {"filename": "2.jpg", "height": "tall", "width": 9, "grounding": {}},
        "height is not a whole number",
    ),
    (
        grounding(
            "2.jpg",
            "a dog",
            [
                {"bbox": [0, 0, 10, 10], "phrase": "a", "box_id": 0},
                {"bbox": [1, 1, 10, 10], "phrase": "dog", "box_id": 0},
            ],
        ),
        r"regions\[1\]: box_id 0 is given two sets of coordinates",
    ),
    # what Python's JSON parser refuses beyond the grammar, and numbers too large for a float
    ("[" * 100_000 + "]" * 100_000, "malformed JSON: nested too deeply$"),
    (
        '{"filename": "2.jpg", "width": ' + "9" * 5000 + "}",
        r"malformed JSON: Exceeds the limit \(4300 digits\) for integer string conversion",
    ),
    (
        {"filename": "2.jpg", "width": 10**4000, "height": 8, "grounding": {}},
        r"width is too large: 10{17}\.\.\.0{19}$",  # the number cut short
    ),
    (
        grounding("2.jpg", "a dog", [{"bbox": [0, 0, 10**4000, 10], "phrase": "a dog"}]),
        r"regions\[0\]: bbox is not four numbers: \[0, 0, 1000",
    ),
]


@pytest.mark.parametrize(("line", "message"), BAD_LINES)
def test_a_bad_line_is_named_by_file_and_line(tmp_path: Path, line: Any, message: str) -> None:
    path = write_lines(tmp_path / "train.jsonl", [GOOD, "", line])
    with pytest.raises(FormatError, match=message) as raised:
        OdvgReader({"train": path})
    assert raised.value.source == str(path) and raised.value.line == 3
    assert str(raised.value).startswith(f"{path}:3: ")


def test_a_box_id_must_keep_its_coordinates_across_lines(tmp_path: Path) -> None:
    lines = [
        grounding("1.jpg", "a dog", [{"bbox": [0, 0, 10, 10], "phrase": "a dog", "box_id": 0}]),
        grounding("1.jpg", "the dog", [{"bbox": [0, 0, 10, 12], "phrase": "the dog", "box_id": 0}]),
    ]
    with pytest.raises(FormatError, match=r":2: box_id 0 of image 1.jpg has other coordinates"):
        read(tmp_path, lines)


def test_not_utf8_is_named(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"filename": "\xff.jpg"}\n')
    with pytest.raises(FormatError, match="not UTF-8") as raised:
        OdvgReader({"train": path})
    assert raised.value.line == 2


def test_a_byte_order_mark_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\r\n")
    assert [r.image_id for r in OdvgReader({"train": path})] == ["1"]


def test_an_image_in_two_split_files_is_an_error(tmp_path: Path) -> None:
    files = {
        "train": write_lines(tmp_path / "train.jsonl", [GOOD]),
        "val": write_lines(tmp_path / "val.jsonl", [GOOD]),
    }
    with pytest.raises(FormatError, match=r"val.jsonl:1: image 1.jpg is also in the train split"):
        OdvgReader(files)


def test_skip_bad_files_leaves_out_bad_lines_and_lists_them(tmp_path: Path) -> None:
    lines = [GOOD, *(line for line, _ in BAD_LINES), grounding("3.jpg", "a cat", [])]
    path = write_lines(tmp_path / "train.jsonl", lines)
    reader = OdvgReader({"train": path}, skip_bad_files=True)
    assert [r.image_id for r in reader] == ["1", "3"]
    assert [s.line for s in reader.skipped] == list(range(2, 2 + len(BAD_LINES)))
    assert all(s.source == str(path) for s in reader.skipped)
    assert reader.skipped[0].reason.startswith("malformed JSON")
    assert reader.skipped[7] == Skipped(
        str(path), f"image 1.jpg is 100x81 here but 100x80 at {path}:1", 9
    )


# --- writing --------------------------------------------------------------------------------


def test_write_gives_a_region_per_phrase_and_box_and_counts_what_odvg_cannot_hold(
    tmp_path: Path,
) -> None:
    caption = Caption(
        "Two men and it and very .",
        (
            Phrase("Two men", 1, ("people",), 0),
            Phrase("it", 2, ("other",), 3),  # an entity without a box
            Phrase("very", NOT_VISUAL, ("notvisual",), 5),
        ),
    )
    record = ImageRecord(
        image_id="1",
        file_name="1.jpg",
        width=100,
        height=80,
        boxes=(Box(0, 0, 50, 40), Box(50, 0, 100, 40.5), Box(1, 1, 2, 2)),
        entities=(Entity(1, (0, 1)), Entity(2, ())),
        captions=(caption,),
        split="val",
    )
    unsplit = ImageRecord("9", "9.jpg", 5, 5, (), (), (), None)
    written = write([record, unsplit])
    assert written.images == {"train": 0, "val": 1, "test": 0}
    assert written.texts["train"] == "" and written.texts["test"] == ""
    (line,) = [json.loads(text) for text in written.texts["val"].splitlines()]
    assert line == {
        "filename": "1.jpg",
        "height": 80,
        "width": 100,
        "grounding": {
            "caption": "Two men and it and very .",
            "regions": [
                {
                    "bbox": [0, 0, 50, 40],
                    "phrase": "Two men",
                    "tokens_positive": [[0, 7]],
                    "box_id": 0,
                },
                {
                    "bbox": [50, 0, 100, 40.5],
                    "phrase": "Two men",
                    "tokens_positive": [[0, 7]],
                    "box_id": 1,
                },
            ],
        },
        "other_boxes": [{"bbox": [1, 1, 2, 2], "box_id": 2}],  # named by no phrase
    }
    assert written.left_out == {"phrases without a box": 2, "images in no split": 1}
    (again,) = OdvgReader({"val": write_lines(tmp_path / "val.jsonl", [line])})
    assert again.boxes == record.boxes


def test_odvg_round_trip_gives_the_same_tables(tmp_path: Path) -> None:
    lines = [
        grounding(
            "1.jpg",
            "a man talks to a man .",
            [
                {"bbox": [50, 0, 60, 10], "phrase": "a man", "tokens_positive": [[15, 20]]},
                {"bbox": [1, 1, 9, 9], "phrase": "a man", "tokens_positive": [[0, 5]]},
            ],
        ),
        grounding(
            "1.jpg",
            "Two men and café .",
            [
                {"bbox": [1, 1, 9, 9], "phrase": "Two men"},
                {"bbox": [50, 0, 60, 10], "phrase": "Two men"},
                {"bbox": [70, 10, 80, 79.5], "phrase": "café"},
            ],
        ),
        grounding("0.jpg", "nothing here .", []),
    ]
    first = list(OdvgReader({"test": write_lines(tmp_path / "a.jsonl", lines)}))
    written = write(first)
    again = list(
        OdvgReader({"test": write_lines(tmp_path / "b.jsonl", written.texts["test"].splitlines())})
    )
    assert again == first
    files = {"1.jpg"}
    before, after = build_tables(first, files).tables(), build_tables(again, files).tables()
    for name, table in before.items():
        assert table.equals(after[name]), name
    assert written.left_out == {}


def test_the_documented_example_reads(tmp_path: Path) -> None:
    page = (REPO_ROOT / "docs" / "formats.md").read_text(encoding="utf-8")
    example = page.split("Three lines of ODVG", 1)[1].split("```json\n", 1)[1].split("```", 1)[0]
    kitchen, street = read(tmp_path, example.splitlines())
    assert [c.text for c in kitchen.captions] == [
        "A man holds a red mug .",
        "Someone drinks coffee .",
    ]
    assert [(p.text, p.entity_id) for c in kitchen.captions for p in c.phrases] == [
        ("A man", 1),
        ("a red mug", 2),
        ("Someone", 1),  # the same box as "A man"
    ]
    assert street.captions[0].phrases == (Phrase("person", 1, ("person",), 0),)
