"""parse_dataset: the tables of the tiny hand-written dataset, split lists, skipped files."""

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
    tiny_annotation_files,
    tiny_image_files,
    tiny_split_lists,
)

from grounding.flickr30k import FormatError
from grounding.parse import (
    AnnotationFiles,
    ParsedDataset,
    SplitList,
    parse_dataset,
    read_split_list,
)


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
        ("100", 100, 80, "train", True),
        ("200", 60, 60, "val", True),
        ("300", 50, 40, "test", True),
        ("400", 40, 40, "train", False),
        ("500", 30, 30, "none", True),
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


# --- split lists and image files ------------------------------------------------------------


def test_has_file_comes_from_image_files() -> None:
    parsed = parse_dataset(tiny_annotation_files(), tiny_split_lists(), {"200", "999"})
    assert parsed.images.set_index("image_id")["has_file"].to_dict() == {
        "100": False,
        "200": True,
        "300": False,
        "400": False,
        "500": False,
    }
    assert parsed.counts()["images_with_file"] == 1


def test_split_list_id_without_annotation_files_is_an_error() -> None:
    lists = [*tiny_split_lists()[:1], SplitList("val", "val.txt", ["200", "777"])]
    with pytest.raises(FormatError, match=r"^val\.txt:2: image id 777 has no annotation files"):
        parse_dataset(tiny_annotation_files(), lists, tiny_image_files())


def test_split_list_id_without_annotation_files_is_recorded_when_skipping() -> None:
    lists = [*tiny_split_lists()[:1], SplitList("val", "val.txt", ["200", "777"])]
    parsed = parse_dataset(tiny_annotation_files(), lists, tiny_image_files(), skip_bad_files=True)
    assert [(s.source, s.line) for s in parsed.skipped] == [("val.txt", 2)]
    assert "777" in parsed.skipped[0].reason
    assert parsed.counts()["skipped_files"] == 1
    assert parsed.counts()["images"] == 5
    assert parsed.counts()["images_val"] == 1


def test_id_in_two_split_lists_is_an_error() -> None:
    lists = [
        SplitList("train", "train.txt", ["100", "400"]),
        SplitList("val", "val.txt", ["200"]),
        SplitList("test", "test.txt", ["300", "100"]),
    ]
    with pytest.raises(FormatError, match=r"^test\.txt:2: image id 100 is in both train and test"):
        parse_dataset(tiny_annotation_files(), lists, tiny_image_files())


def test_unknown_split_name_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        parse_dataset(tiny_annotation_files(), [SplitList("dev", "dev.txt", [])], set())


def test_read_split_list_strips_blank_lines() -> None:
    split_list = read_split_list("100\n\n 200 \n300\n", "val", "val.txt")
    assert split_list == SplitList("val", "val.txt", ["100", "200", "300"])


# --- bad files ------------------------------------------------------------------------------


def test_malformed_xml_stops_the_parse_naming_the_file() -> None:
    bad = TINY_IMAGES[2].xml.replace(b"</size>", b"</sise>")
    with pytest.raises(FormatError, match=r"^Annotations/300\.xml:7: malformed XML"):
        parse_dataset(with_files("300", xml=bad), tiny_split_lists(), tiny_image_files())


def test_skip_bad_files_records_a_malformed_file_and_leaves_its_image_out() -> None:
    bad = TINY_IMAGES[2].xml.replace(b"</size>", b"</sise>")
    parsed = parse_dataset(
        with_files("300", xml=bad), tiny_split_lists(), tiny_image_files(), skip_bad_files=True
    )
    assert (parsed.skipped[0].source, parsed.skipped[0].line) == ("Annotations/300.xml", 7)
    assert "malformed XML" in parsed.skipped[0].reason
    # 300 is listed in test.txt: that line is recorded as well
    assert [(s.source, s.line) for s in parsed.skipped[1:]] == [("test.txt", 1)]
    for name, table in parsed.tables().items():
        assert "300" not in set(table["image_id"]), name
    counts = parsed.counts()
    assert counts["images"] == 4
    assert counts["phrases"] == TINY_COUNTS["phrases"] - 6
    assert counts["boxes"] == TINY_COUNTS["boxes"] - 3
    assert counts["images_test"] == 0
    assert counts["skipped_files"] == 2


def test_skip_bad_files_records_a_bad_caption_with_its_line() -> None:
    bad = TINY_IMAGES[1].sentences.replace(b"The puppy] runs", b"The puppy runs")
    with pytest.raises(FormatError, match=r"^Sentences/200\.txt:2: "):
        parse_dataset(with_files("200", sentences=bad), [], set())
    parsed = parse_dataset(with_files("200", sentences=bad), [], set(), skip_bad_files=True)
    assert [(s.source, s.line) for s in parsed.skipped] == [("Sentences/200.txt", 2)]
    # all or nothing: the image's XML was fine, but none of its rows are kept
    for table in parsed.tables().values():
        assert "200" not in set(table["image_id"])


def test_box_outside_its_image_is_a_bad_file() -> None:
    bad = annotation_xml("500", 30, 30, [object_xml([31], (1, 1, 31, 15))])
    with pytest.raises(FormatError, match=r"^Annotations/500\.xml: box .* outside the 30x30"):
        parse_dataset(with_files("500", xml=bad), [], set())
    parsed = parse_dataset(with_files("500", xml=bad), [], set(), skip_bad_files=True)
    assert [s.source for s in parsed.skipped] == ["Annotations/500.xml"]
    assert "500" not in set(parsed.images["image_id"])


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


@pytest.mark.real_data
@pytest.mark.skipif(
    not (SHARED_DATA / "annotations.zip").is_file(),
    reason=f"real annotations absent: {SHARED_DATA / 'annotations.zip'}",
)
def test_real_annotation_set_reproduces_the_published_counts() -> None:
    from grounding import io

    reader = io.AnnotationReader(SHARED_DATA / "annotations.zip")
    parsed = parse_dataset(reader, io.read_split_lists(SHARED_DATA), set())
    counts = parsed.counts()
    assert parsed.skipped == []
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
