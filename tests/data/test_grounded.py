"""What ODVG and MDETR share: entities from the boxes phrases name, and the JSON value checks."""

from __future__ import annotations

import pytest

from grounding.data.formats.grounded import (
    BadRecord,
    GroundedCaption,
    GroundedPhrase,
    PendingImages,
    check_box,
    image_id_of,
    image_record,
    locate,
    phrase_span,
    spans,
    whole_number,
    words_before,
)
from grounding.data.records import Box, Entity, Phrase

A, B, C = Box(0, 0, 10, 10), Box(5, 5, 20, 20), Box(1, 1, 2, 2)


def test_phrases_naming_the_same_boxes_share_an_entity_numbered_from_one() -> None:
    record = image_record(
        image_id="7",
        file_name="7.jpg",
        width=30,
        height=30,
        split="train",
        boxes={"a": A, "b": B, "c": C},
        captions=[
            GroundedCaption(
                "two dogs and a cat",
                (
                    GroundedPhrase("two dogs", 0, ("a", "b")),
                    GroundedPhrase("a cat", 3, ("c",)),
                ),
            ),
            GroundedCaption(
                "the dogs and the sky",
                (
                    GroundedPhrase("the dogs", 0, ("b", "a", "a")),  # same set, any order
                    GroundedPhrase("the sky", 3, ()),
                ),
            ),
            GroundedCaption("the sky", (GroundedPhrase("the sky", 0, ()),)),
        ],
    )
    assert record.boxes == (A, B, C)
    assert record.entities == (
        Entity(1, (0, 1)),
        Entity(2, (2,)),
        Entity(3, ()),  # a phrase without a box is an entity of its own ...
        Entity(4, ()),  # ... even with the same text
    )
    assert [p.entity_id for c in record.captions for p in c.phrases] == [1, 2, 1, 3, 4]
    assert record.captions[0].phrases[1] == Phrase("a cat", 2, (), 3)
    assert record.split == "train"


def test_image_id_is_the_file_name_without_its_suffix() -> None:
    assert image_id_of("1000092795.jpg") == "1000092795"
    assert image_id_of("train2014/COCO_train2014_000000000009.jpg") == (
        "train2014/COCO_train2014_000000000009"
    )


def test_a_later_record_must_agree_on_size_and_split() -> None:
    images = PendingImages()
    first = images.get("1.jpg", 40, 30, "train", "a.jsonl:1")
    assert images.get("1.jpg", 40, 30, "train", "a.jsonl:5") is first
    with pytest.raises(BadRecord, match=r"image 1.jpg is 41x30 here but 40x30 at a.jsonl:1"):
        images.get("1.jpg", 41, 30, "train", "a.jsonl:6")
    with pytest.raises(BadRecord, match=r"also in the train split \(a.jsonl:1\)"):
        images.get("1.jpg", 40, 30, "val", "b.jsonl:1")
    with pytest.raises(BadRecord, match=r"has the image id '1' of '1\.jpg'"):
        images.get("1.png", 40, 30, "train", "a.jsonl:7")
    assert len(images) == 1


def test_whole_numbers_may_be_strings() -> None:
    assert whole_number("500", "height") == 500
    assert whole_number(333.0, "width") == 333
    for bad in ("500px", 12.5, True, None, "nan"):
        with pytest.raises(BadRecord, match="is not a whole number"):
            whole_number(bad, "width")
    # the tables hold int64: a larger size is refused here, not when the table is written
    assert whole_number(2**62, "width") == 2**62
    for huge in (10**23, "12345678901234567890123", 1e30):
        with pytest.raises(BadRecord, match="width is too large"):
            whole_number(huge, "width")


def test_boxes_must_have_area_and_lie_inside_up_to_a_pixel_of_rounding() -> None:
    assert check_box(0, 0, 40, 30, 40, 30) == Box(0, 0, 40, 30)
    # x + w of a converted box lands a fraction past the edge: clipped, as MDETR clips
    assert check_box(-0.5, 2, 40.75, 30.5, 40, 30) == Box(0, 2, 40, 30)
    with pytest.raises(BadRecord, match=r"\(5, 5, 5, 9\) has zero area"):
        check_box(5, 5, 5, 9, 40, 30)
    with pytest.raises(BadRecord, match="has zero area"):
        check_box(5, 9, 8, 2, 40, 30)
    for outside in ((0, 0, 42, 30), (-2, 0, 10, 10), (40, 0, 41, 10), (-1, -1, 0, 0.5)):
        with pytest.raises(BadRecord, match="lies outside the 40x30 image"):
            check_box(*outside, 40, 30)


def test_spans_are_checked_against_the_caption() -> None:
    caption = "a man and a dog"
    assert spans([[10, 15], [0, 5]], caption, "tokens_positive") == ((0, 5), (10, 15))
    with pytest.raises(BadRecord, match=r"span \[10, 16\] lies outside the 15-character caption"):
        spans([[10, 16]], caption, "tokens_positive")
    with pytest.raises(BadRecord, match=r"span \[5, 5\] lies outside"):
        spans([[5, 5]], caption, "tokens_positive")
    with pytest.raises(BadRecord, match="is blank"):
        spans([[5, 6]], caption, "tokens_positive")
    with pytest.raises(BadRecord, match="is not \\[start, end\\]"):
        spans([[1, 2, 3]], caption, "tokens_positive")
    with pytest.raises(BadRecord, match="is not a list"):
        spans("0-5", caption, "tokens_positive")


def test_words_and_spans_of_a_phrase() -> None:
    caption = "A  man  and a man ."  # two spaces: offsets are not word counts
    assert words_before(caption, 0) == 0
    assert words_before(caption, 13) == 4
    assert locate(caption, "a man") == 3
    assert locate(caption, "man") == 1
    assert locate(caption, "woman") == -1
    assert phrase_span(caption, Phrase("a man", 1, (), 3)) == (12, 17)
    assert phrase_span(caption, Phrase("man", 1, (), 1)) == (3, 6)
    assert phrase_span(caption, Phrase("a dog", 1, (), 3)) is None  # not where it says
    assert phrase_span(caption, Phrase("man", 1, (), -1)) is None
