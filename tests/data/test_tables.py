"""build_tables: the tables of the tiny hand-written dataset and of hand-built records, the
counts, and the published counts of the real annotation set."""

from __future__ import annotations

import re
import zipfile

import pytest
from conftest import (
    SHARED_DATA,
    TINY_COUNTS,
    TINY_IMAGES,
    annotation_xml,
    object_xml,
    parse_dataset,
    tiny_annotation_files,
    tiny_image_files,
    tiny_split_lists,
)

from grounding.data.formats.flickr30k import AnnotationFiles, Flickr30kReader, SplitList
from grounding.data.records import Box, Caption, Entity, ImageRecord, Phrase, Skipped
from grounding.data.tables import ParsedDataset, build_tables
from grounding.schemas import PARSED


def rows(table, image_id: str | None = None) -> list[tuple]:
    if image_id is not None:
        table = table[table["image_id"] == image_id]
    return list(table.itertuples(index=False, name=None))


def with_files(image_id: str, *, xml: bytes | None = None, sentences: bytes | None = None):
    """The tiny dataset's files with one image's XML or captions replaced."""
    files = tiny_annotation_files()
    return [
        AnnotationFiles(
            f.image_id,
            xml if (xml is not None and f.image_id == image_id) else f.xml,
            f.xml_source,
            sentences if (sentences is not None and f.image_id == image_id) else f.sentences,
            f.sentences_source,
        )
        for f in files
    ]


# --- the tables -----------------------------------------------------------------------------


def test_counts_match_hand_counts(tiny_parsed: ParsedDataset) -> None:
    assert tiny_parsed.counts() == TINY_COUNTS
    assert tiny_parsed.skipped == []


def test_images(tiny_parsed: ParsedDataset) -> None:
    assert rows(tiny_parsed.images) == [
        ("100", "100.jpg", 100, 80, "train", True),
        ("200", "200.jpg", 60, 60, "val", True),
        ("300", "300.jpg", 50, 40, "test", True),
        ("400", "400.jpg", 40, 40, "train", False),  # its JPEG is missing
        ("500", "500.jpg", 30, 30, "none", True),
    ]


def test_captions_of_image_100(tiny_parsed: ParsedDataset) -> None:
    assert rows(tiny_parsed.captions, "100") == [
        ("100", 0, "Two men stand near a red car .", 2),
        ("100", 1, "It is very old near a pole .", 3),
        ("100", 2, "A café in the street .", 1),
        ("100", 3, "Nothing to see here .", 0),
        ("100", 4, "A sign and the men .", 2),
    ]
    assert tiny_parsed.captions.groupby("image_id").size().tolist() == [5] * 5


def test_phrases_of_image_100(tiny_parsed: ParsedDataset) -> None:
    assert rows(tiny_parsed.phrases, "100") == [
        (0, "100", 0, 0, 1, "people", "people", "Two men", 0, True),
        (1, "100", 0, 1, 2, "vehicles/scene", "vehicles", "a red car", 4, True),
        (2, "100", 1, 0, 3, "other", "other", "It", 0, True),  # shares chain 2's box
        (3, "100", 1, 1, 0, "notvisual", "notvisual", "very", 2, False),
        (4, "100", 1, 2, 6, "other", "other", "a pole", 5, True),
        (5, "100", 2, 0, 5, "scene", "scene", "the street", 3, False),  # <scene>1 object
        (6, "100", 4, 0, 4, "other", "other", "A sign", 0, False),  # <nobndbox>1 object
        (7, "100", 4, 1, 1, "people", "people", "the men", 3, True),
    ]


def test_phrase_ids_are_unique_row_numbers(tiny_parsed: ParsedDataset) -> None:
    assert tiny_parsed.phrases["phrase_id"].tolist() == list(range(36))
    assert tiny_parsed.phrases.groupby("image_id").size().to_dict() == {
        "100": 8,
        "200": 7,
        "300": 6,
        "400": 5,
        "500": 10,
    }


def test_boxes_are_canonical(tiny_parsed: ParsedDataset) -> None:
    assert rows(tiny_parsed.boxes) == [
        ("100", 0, 0.0, 0.0, 50.0, 40.0),
        ("100", 1, 50.0, 0.0, 100.0, 40.0),
        ("100", 2, 10.0, 40.0, 30.0, 80.0),
        ("100", 3, 0.0, 40.0, 10.0, 80.0),
        ("200", 0, 0.0, 0.0, 30.0, 30.0),
        ("200", 1, 0.0, 0.0, 30.0, 30.0),
        ("200", 2, 30.0, 30.0, 60.0, 60.0),
        ("300", 0, 0.0, 0.0, 25.0, 40.0),
        ("300", 1, 25.0, 0.0, 50.0, 40.0),
        ("300", 2, 25.0, 0.0, 50.0, 40.0),
        ("400", 0, 0.0, 0.0, 40.0, 40.0),
        ("500", 0, 0.0, 0.0, 15.0, 15.0),
        ("500", 1, 15.0, 15.0, 30.0, 30.0),
    ]
    assert {str(tiny_parsed.boxes[c].dtype) for c in ("x1", "y1", "x2", "y2")} == {"float32"}


def test_chain_boxes_link_shared_boxes_and_multi_box_chains(tiny_parsed: ParsedDataset) -> None:
    assert rows(tiny_parsed.chain_boxes, "100") == [
        ("100", 1, 0),
        ("100", 1, 1),  # chain 1 owns two boxes
        ("100", 2, 2),
        ("100", 3, 2),  # box 2 is shared by chains 2 and 3
        ("100", 6, 3),
    ]
    assert rows(tiny_parsed.chain_boxes, "300") == [("300", 11, 0), ("300", 12, 1), ("300", 12, 2)]


def test_chains_with_flags(tiny_parsed: ParsedDataset) -> None:
    assert rows(tiny_parsed.chains, "100") == [
        ("100", 1, 2, False, False),
        ("100", 2, 1, False, False),
        ("100", 3, 1, False, False),
        ("100", 4, 0, True, False),
        ("100", 5, 0, False, True),
        ("100", 6, 1, False, False),
    ]
    # chain 0 is never in the XML, so never in chains
    assert 0 not in set(tiny_parsed.chains["chain_id"])


def test_chain_ids_are_keyed_by_image() -> None:
    # chain 1 has a box in image "a" but not in image "b": b's chain-1 phrase has no box
    files = [
        AnnotationFiles(
            "a",
            annotation_xml("a", 10, 10, [object_xml([1], (1, 1, 5, 5))]),
            "a.xml",
            b"[/EN#1/people A man] .\n",
            "a.txt",
        ),
        AnnotationFiles(
            "b",
            annotation_xml("b", 10, 10, [object_xml([1], nobndbox=1, scene=0)]),
            "b.xml",
            b"[/EN#1/people A man] .\n",
            "b.txt",
        ),
    ]
    parsed = parse_dataset(files, [], set())
    assert parsed.phrases["has_box"].tolist() == [True, False]
    assert parsed.counts()["chains"] == 2
    assert set(parsed.images["split"]) == {"none"}


def test_a_phrase_whose_chain_the_xml_never_names_has_no_box_and_is_counted() -> None:
    files = [
        AnnotationFiles(
            "a",
            annotation_xml("a", 10, 10, [object_xml([1], (1, 1, 5, 5))]),
            "a.xml",
            b"[/EN#1/people A man] and [/EN#7/animals a dog] and [/EN#0/notvisual fun] .\n",
            "a.txt",
        )
    ]
    parsed = parse_dataset(files, [], set())
    assert parsed.phrases["has_box"].tolist() == [True, False, False]
    assert parsed.counts()["phrases_with_unknown_chain"] == 1  # not the not-visual phrase
    assert parsed.examples()["phrases_with_unknown_chain"] == [
        {"image_id": "a", "caption_index": 0, "chain_id": 7, "text": "a dog"}
    ]
    assert parsed.counts()["chains"] == 1  # chain 7 has no row


def test_an_id_twice_in_a_split_list_counts_once_and_is_listed() -> None:
    lists = [SplitList("train", "train.txt", ["100", "100", "400", "100"])]
    parsed = parse_dataset(tiny_annotation_files(), lists, tiny_image_files())
    assert parsed.counts()["images_train"] == 2
    assert parsed.counts()["duplicate_split_ids"] == 2
    assert parsed.examples(limit=1)["duplicate_split_ids"] == [
        {
            "source": "train.txt",
            "reason": "image id 100 is listed again (first on line 1)",
            "line": 2,
        }
    ]


# --- image files and skipped files ---------------------------------------------------------


def test_has_file_comes_from_the_file_names_present() -> None:
    parsed = parse_dataset(
        tiny_annotation_files(), tiny_split_lists(), {"200.jpg", "999.jpg", "100.png", "300"}
    )
    assert parsed.images.set_index("image_id")["has_file"].to_dict() == {
        "100": False,  # 100.png is another file
        "200": True,
        "300": False,  # a file named like the id is not the image's file
        "400": False,
        "500": False,
    }
    assert parsed.counts()["images_with_file"] == 1


def test_skipped_files_are_counted_and_their_image_is_in_no_table() -> None:
    bad = TINY_IMAGES[2].xml.replace(b"</size>", b"</sise>")
    parsed = parse_dataset(
        with_files("300", xml=bad), tiny_split_lists(), tiny_image_files(), skip_bad_files=True
    )
    assert [(s.source, s.line) for s in parsed.skipped] == [("Annotations/300.xml", 7)]
    for name, table in parsed.tables().items():
        assert "300" not in set(table["image_id"]), name
    counts = parsed.counts()
    assert counts["images"] == 4
    assert counts["phrases"] == TINY_COUNTS["phrases"] - 6
    assert counts["boxes"] == TINY_COUNTS["boxes"] - 3
    assert counts["images_test"] == 0
    assert counts["skipped_files"] == 1  # the file, not also its line in test.txt (issue 13)


def test_skipped_is_read_after_the_records_are_exhausted() -> None:
    # a reader fills its list of skipped files while it is iterated
    skipped: list[Skipped] = []

    def records():
        yield record("a")
        skipped.append(Skipped("b.xml", "malformed XML", 3))

    parsed = build_tables(records(), set(), skipped)
    assert parsed.skipped == [Skipped("b.xml", "malformed XML", 3)]
    assert parsed.counts()["skipped_files"] == 1


# --- hand-built records (any format) ---------------------------------------------------------


def record(image_id: str, **changes) -> ImageRecord:
    """A record as a format without entity types gives it: one box shared by two entities, an
    entity without a box, a phrase of an entity the record does not list."""
    values = dict(
        image_id=image_id,
        file_name=f"train/{image_id}.png",
        width=20,
        height=10,
        boxes=(Box(0.0, 0.0, 5.0, 5.0), Box(5.0, 0.0, 20.0, 10.0)),
        entities=(Entity(3, ()), Entity(2, (1,)), Entity(1, (0, 1))),  # any order
        captions=(
            Caption(
                "a dog and a ball near nothing",
                (
                    Phrase("a dog", 1, (), 0),
                    Phrase("a ball", 2, (), 3),
                    Phrase("nothing", 3, (), 5),
                    Phrase("and", 9, (), 2),  # entity 9 is not listed: no box
                ),
            ),
            Caption("no phrase here", ()),
        ),
        split="val",
    )
    values.update(changes)
    return ImageRecord(**values)


def test_tables_of_a_record_without_types() -> None:
    parsed = build_tables([record("a")], {"train/a.png"})
    assert rows(parsed.images) == [("a", "train/a.png", 20, 10, "val", True)]
    assert rows(parsed.captions) == [
        ("a", 0, "a dog and a ball near nothing", 4),
        ("a", 1, "no phrase here", 0),
    ]
    assert rows(parsed.phrases) == [
        (0, "a", 0, 0, 1, "", "", "a dog", 0, True),
        (1, "a", 0, 1, 2, "", "", "a ball", 3, True),
        (2, "a", 0, 2, 3, "", "", "nothing", 5, False),
        (3, "a", 0, 3, 9, "", "", "and", 2, False),
    ]
    assert rows(parsed.boxes) == [("a", 0, 0.0, 0.0, 5.0, 5.0), ("a", 1, 5.0, 0.0, 20.0, 10.0)]
    # entities in id order whatever the record's order; box 1 belongs to entities 1 and 2
    assert rows(parsed.chain_boxes) == [("a", 1, 0), ("a", 1, 1), ("a", 2, 1)]
    assert rows(parsed.chains) == [
        ("a", 1, 2, False, False),
        ("a", 2, 1, False, False),
        ("a", 3, 0, False, False),
    ]


def test_phrase_ids_run_over_all_records_and_split_none_is_named() -> None:
    parsed = build_tables([record("a"), record("b", split=None)], set())
    assert parsed.phrases["phrase_id"].tolist() == list(range(8))
    assert parsed.phrases["image_id"].tolist() == ["a"] * 4 + ["b"] * 4
    assert parsed.images["split"].tolist() == ["val", "none"]
    assert parsed.counts()["images_none"] == 1


def test_no_record_gives_empty_tables_with_their_columns() -> None:
    parsed = build_tables([], set())
    for schema in PARSED:
        table = parsed.tables()[schema.name]
        assert list(table.columns) == list(schema.columns), schema.name
        assert table.empty
    assert parsed.counts()["images"] == 0


# --- the real annotation set ----------------------------------------------------------------

_OBJECT = re.compile(rb"<object>(.*?)</object>", re.S)
_NAME = re.compile(rb"<name>\s*(\d+)\s*</name>")
_PHRASE_CHAIN = re.compile(r"\[/EN#(\d+)/")


def count_raw(archive: zipfile.ZipFile) -> dict[str, int]:
    """The counts of the whole set by plain regex and string counting, without the package."""
    counts = dict.fromkeys(
        ["images", "captions", "phrases", "phrases_with_box", "boxes", "chains"], 0
    )
    for name in archive.namelist():
        if not (name.startswith("Annotations/") and name.endswith(".xml")):
            continue
        counts["images"] += 1
        xml = archive.read(name)
        chains, chains_with_box = set(), set()
        for obj in _OBJECT.findall(xml):
            names = {int(n) for n in _NAME.findall(obj)}
            chains |= names
            if b"<bndbox>" in obj:
                counts["boxes"] += 1
                chains_with_box |= names
        counts["chains"] += len(chains)
        text = archive.read("Sentences/" + name[len("Annotations/") : -4] + ".txt")
        for line in text.decode("utf-8").split("\n"):
            if not line.strip():
                continue
            counts["captions"] += 1
            for chain in _PHRASE_CHAIN.findall(line):
                counts["phrases"] += 1
                counts["phrases_with_box"] += int(chain) in chains_with_box
    return counts


@pytest.mark.slow
@pytest.mark.real_data
@pytest.mark.skipif(
    not (SHARED_DATA / "annotations.zip").is_file(),
    reason=f"real annotations absent: {SHARED_DATA / 'annotations.zip'}",
)
def test_real_annotation_set_reproduces_the_published_counts() -> None:
    reader = Flickr30kReader.open(SHARED_DATA, splits=SHARED_DATA)
    parsed = build_tables(reader, set(), reader.skipped, reader.duplicate_split_ids)
    counts = parsed.counts()
    assert parsed.skipped == []
    # the official files name every chain of a caption in its XML and list each id once
    assert counts["phrases_with_unknown_chain"] == 0 and counts["duplicate_split_ids"] == 0
    assert counts["images"] == 31783
    assert counts["captions"] == 158915
    assert counts["boxes"] == 275775
    assert counts["images_train"] + counts["images_val"] + counts["images_test"] == 31783
    with zipfile.ZipFile(SHARED_DATA / "annotations.zip") as archive:
        raw = count_raw(archive)
    assert raw["images"] == 31783 and raw["captions"] == 158915 and raw["boxes"] == 275775
    for key in ("phrases", "phrases_with_box", "chains"):
        assert counts[key] == raw[key], key
    # about 244k chains, as published
    assert 240_000 < counts["chains"] < 250_000
