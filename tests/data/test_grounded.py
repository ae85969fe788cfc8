"""What ODVG and MDETR share: entities from the boxes phrases name, and the JSON value checks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from grounding.data.formats.grounded import (
    BadRecord,
    CaptionWords,
    GroundedCaption,
    GroundedPhrase,
    PendingImages,
    check_box,
    image_id_of,
    image_record,
    phrase_span,
    spans,
    whole_number,
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
    caption = CaptionWords("a man and a dog")
    assert spans([[10, 15], [0, 5]], caption, "tokens_positive") == ((0, 5), (10, 15))
    with pytest.raises(BadRecord, match=r"span \[10, 16\] lies outside the 15-character caption"):
        spans([[10, 16]], caption, "tokens_positive")
    with pytest.raises(BadRecord, match=r"span \[5, 5\] lies outside"):
        spans([[5, 5]], caption, "tokens_positive")
    with pytest.raises(BadRecord, match="is blank"):
        spans([[5, 6]], caption, "tokens_positive")
    with pytest.raises(BadRecord, match="is blank"):
        spans([[1, 5]], CaptionWords("a    man"), "tokens_positive")
    assert spans([[1, 6]], CaptionWords("a    man"), "tokens_positive") == ((1, 6),)
    with pytest.raises(BadRecord, match="is not \\[start, end\\]"):
        spans([[1, 2, 3]], caption, "tokens_positive")
    with pytest.raises(BadRecord, match="is not a list"):
        spans("0-5", caption, "tokens_positive")


def test_words_and_spans_of_a_phrase() -> None:
    caption = CaptionWords("A  man  and a man .")  # two spaces: offsets are not word counts
    assert caption.words_before(0) == 0
    assert caption.words_before(13) == 4
    assert caption.words_before(12) == 3  # "a" starts at 12: not before it
    assert caption.locate("a man") == 3
    assert caption.locate("man") == 1
    assert caption.locate("ma") == 1  # a phrase may end inside a word
    assert caption.locate("and a") == 2
    assert caption.locate("A man") == -1  # two spaces in the caption
    assert caption.locate("woman") == -1
    assert caption.locate(" man") == -1
    assert phrase_span(caption, Phrase("a man", 1, (), 3)) == (12, 17)
    assert phrase_span(caption, Phrase("man", 1, (), 1)) == (3, 6)
    assert phrase_span(caption, Phrase("a dog", 1, (), 3)) is None  # not where it says
    assert phrase_span(caption, Phrase("man", 1, (), -1)) is None


# --- hostile files: reading time linear in the file's size ------------------------------------


def _long_caption(size: int) -> tuple[str, int]:
    """A caption of about ``size`` characters, of 7-character words ``w000123``, and its word
    count."""
    count = size // 8
    return " ".join(f"w{i:06d}" for i in range(count)), count


def _hostile_odvg(size: int) -> str:
    """One ODVG line of about ``size`` bytes: half a long caption, half regions placed near its
    end, by text (one word, two words, not in the caption) or by a span."""
    caption, count = _long_caption(size // 2)
    regions, written = [], 0
    while written < size // 2:
        last = count - 1 - len(regions) % (count - 1)
        start = 8 * last
        region: dict = {"bbox": [0, 0, 1, 1]}
        region.update(
            [
                {"phrase": f"w{last:06d}"},
                {"phrase": f"w{last - 1:06d} w{last:06d}"},
                {"phrase": f"absent{len(regions)}"},
                {"tokens_positive": [[start, start + 7]]},
            ][len(regions) % 4]
        )
        regions.append(region)
        written += len(json.dumps(region)) + 2
    line = {"filename": "1.jpg", "width": 10, "height": 10}
    return json.dumps({**line, "grounding": {"caption": caption, "regions": regions}}) + "\n"


def _hostile_mdetr(size: int) -> str:
    """An MDETR file of about ``size`` bytes: half a long caption, half evaluated phrases near
    its end, each with an annotation."""
    caption, count = _long_caption(size // 2)
    phrases = [[[8 * (count - 1 - k), 8 * (count - 1 - k) + 7]] for k in range(size // 2 // 80)]
    image = {"id": 0, "file_name": "1.jpg", "width": 10, "height": 10, "caption": caption}
    return json.dumps(
        {
            "images": [{**image, "tokens_positive_eval": phrases}],
            "annotations": [
                {"image_id": 0, "bbox": [0, 0, 1, 1], "tokens_positive": spans} for spans in phrases
            ],
        }
    )


@pytest.mark.parametrize(
    ("reader", "name", "hostile"),
    [("OdvgReader", "odvg", _hostile_odvg), ("MdetrReader", "mdetr", _hostile_mdetr)],
)
def test_a_5_mb_hostile_file_is_read_in_time_linear_in_its_size(
    tmp_path: Path, reader: str, name: str, hostile
) -> None:
    # Placing each phrase by rescanning its caption made reading quadratic: a 0.2 MB file of
    # this kind took 9 s (ODVG) and 1.7 s (MDETR), each doubling of its size five times as
    # long, so hours for 5 MB. Read linearly it takes a few seconds; the bound is generous.
    path = tmp_path / "train.data"
    path.write_text(hostile(5_000_000), encoding="utf-8")
    assert path.stat().st_size > 4_500_000
    program = (
        f"from pathlib import Path; from grounding.data.formats.{name} import {reader}; "
        f"records = list({reader}({{'train': Path({str(path)!r})}})); "
        "print(len(records[0].captions[0].phrases))"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", program], capture_output=True, text=True, timeout=90
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"reading a 5 MB {name} file took over 90 s: not linear in its size")
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) > 30_000
