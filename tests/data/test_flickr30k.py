"""The Flickr30k Entities format: boxes, XML objects, caption phrases and their errors; the
records of an image; the layout on disk (zip or folders, split lists); the reader."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
from conftest import (
    TINY_IMAGES,
    annotation_xml,
    object_xml,
    sentences_text,
    tiny_annotation_files,
    tiny_split_lists,
    write_dataset,
)

from grounding.data.formats.flickr30k import (
    IMAGE_SUFFIX,
    NOT_VISUAL_CHAIN,
    TYPES,
    Annotation,
    AnnotationArchive,
    AnnotationFiles,
    AnnotationObject,
    CaptionLine,
    Flickr30kReader,
    Mention,
    SplitList,
    box_from_xml,
    box_to_xml,
    check_boxes,
    find_annotations,
    format_annotation,
    format_phrase,
    parse_annotation,
    parse_caption,
    parse_files,
    parse_sentences,
    read_split_list,
    read_split_lists,
    to_record,
)
from grounding.data.records import NOT_VISUAL, Box, Caption, Entity, ImageRecord, Phrase, Skipped
from grounding.errors import DataError, FormatError

SOURCE = "Annotations/1.xml"


def one_object(obj: str, width: int = 100, height: int = 80) -> bytes:
    """An XML file with one object; its ``<object>`` is line 8, first ``<name>`` line 9."""
    return annotation_xml("1", width, height, [obj])


# --- boxes ----------------------------------------------------------------------------------


def test_box_from_xml_is_zero_based_with_exclusive_end() -> None:
    # pixels 1..10 inclusive (1-based) are pixels 0..9, i.e. [0, 10) 0-based
    assert box_from_xml(1, 1, 10, 10) == Box(0.0, 0.0, 10.0, 10.0)
    assert box_from_xml(5, 7, 5, 7) == Box(4.0, 6.0, 5.0, 7.0)  # a single pixel: 1 x 1
    assert box_from_xml(1, 1, 333, 500) == Box(0.0, 0.0, 333.0, 500.0)  # the whole 333x500


def test_box_to_xml_inverts_box_from_xml() -> None:
    assert box_to_xml(Box(0.0, 0.0, 10.0, 10.0)) == (1, 1, 10, 10)
    for xml in [(1, 1, 10, 10), (5, 7, 5, 7), (12, 3, 400, 375)]:
        assert box_to_xml(box_from_xml(*xml)) == xml


def test_parse_annotation_converts_the_box_once() -> None:
    annotation = parse_annotation(one_object(object_xml([1], (1, 1, 10, 20))), SOURCE)
    assert annotation.objects[0].box == Box(0.0, 0.0, 10.0, 20.0)


# --- XML objects ----------------------------------------------------------------------------


def test_parse_annotation_reads_every_quirk_of_image_100() -> None:
    annotation = parse_annotation(TINY_IMAGES[0].xml, "Annotations/100.xml")
    assert (annotation.width, annotation.height, annotation.depth) == (100, 80, 3)
    assert annotation.objects == (
        AnnotationObject((1,), Box(0.0, 0.0, 50.0, 40.0)),
        AnnotationObject((1,), Box(50.0, 0.0, 100.0, 40.0)),  # chain 1's second box
        AnnotationObject((2, 3), Box(10.0, 40.0, 30.0, 80.0)),  # one box, two chains
        AnnotationObject((4,), None, nobndbox=True, scene=False),
        AnnotationObject((5,), None, nobndbox=False, scene=True),
        AnnotationObject((6,), Box(0.0, 40.0, 10.0, 80.0)),
    )


def test_flag_zero_is_false() -> None:
    annotation = parse_annotation(one_object(object_xml([3], nobndbox=0, scene=0)), SOURCE)
    assert annotation.objects == (AnnotationObject((3,), None, nobndbox=False, scene=False),)


def test_missing_depth_defaults_to_three() -> None:
    xml = b"<annotation><size><width>4</width><height>5</height></size></annotation>"
    assert parse_annotation(xml, SOURCE) == Annotation(4, 5, 3, ())


def test_malformed_xml_names_file_and_line() -> None:
    xml = TINY_IMAGES[0].xml.replace(b"<name>6</name>", b"<name>6</nme>")  # line 47
    with pytest.raises(FormatError) as caught:
        parse_annotation(xml, "Annotations/100.xml")
    assert str(caught.value).startswith("Annotations/100.xml:47: malformed XML")
    assert caught.value.line == 47
    assert isinstance(caught.value, DataError)


def test_truncated_xml_is_a_format_error() -> None:
    xml = TINY_IMAGES[0].xml[:200]
    with pytest.raises(FormatError, match=r"^Annotations/100\.xml:\d+: malformed XML"):
        parse_annotation(xml, "Annotations/100.xml")


@pytest.mark.parametrize(
    ("box", "line"),
    [((10, 1, 9, 5), 10), ((1, 10, 5, 9), 10)],
    ids=["xmax<xmin", "ymax<ymin"],
)
def test_inverted_box_is_an_error(box: tuple[int, int, int, int], line: int) -> None:
    with pytest.raises(FormatError, match=rf"^{SOURCE}:{line}: box with xmax < xmin"):
        parse_annotation(one_object(object_xml([1], box)), SOURCE)


def test_non_numeric_coordinate_names_the_tag_and_line() -> None:
    xml = one_object(object_xml([1], (1, 1, 10, 10))).replace(
        b"<ymax>10</ymax>", b"<ymax>ten</ymax>"
    )
    with pytest.raises(FormatError) as caught:
        parse_annotation(xml, SOURCE)
    assert caught.value.line == 14  # the <ymax> line
    assert "<ymax> is not an integer: 'ten'" in str(caught.value)


def test_infinite_coordinate_is_a_format_error() -> None:
    xml = one_object(object_xml([1], (1, 1, 10, 10))).replace(
        b"<xmax>10</xmax>", b"<xmax>inf</xmax>"
    )
    with pytest.raises(FormatError, match=rf"^{SOURCE}:13:"):
        parse_annotation(xml, SOURCE)


def test_missing_coordinate_is_an_error() -> None:
    xml = one_object(object_xml([1], (1, 1, 10, 10))).replace(b"\t\t\t<xmin>1</xmin>\n", b"")
    with pytest.raises(FormatError, match=r"<bndbox> has no <xmin>"):
        parse_annotation(xml, SOURCE)


def test_non_integer_chain_id_is_an_error() -> None:
    # line 9: the <name> itself, not its <object>
    with pytest.raises(FormatError, match=rf"^{SOURCE}:9: chain id is not an integer"):
        parse_annotation(one_object(object_xml(["x"], (1, 1, 5, 5))), SOURCE)


@pytest.mark.parametrize("chain", ["12345678901234567890123", str(2**63), "-1"])
def test_chain_id_outside_int64_names_file_and_line(chain: str) -> None:
    xml = one_object(object_xml([1, 2], (1, 1, 5, 5))).replace(b">2<", f">{chain}<".encode())
    with pytest.raises(
        FormatError, match=rf"^{SOURCE}:10: chain id {chain} is not in 0\.\.2\^63-1"
    ):
        parse_annotation(xml, SOURCE)
    largest = xml.replace(chain.encode(), str(2**63 - 1).encode())
    assert parse_annotation(largest, SOURCE).objects[0].chain_ids == (1, 2**63 - 1)


def test_size_too_large_for_the_tables_is_an_error() -> None:
    xml = one_object(object_xml([1], (1, 1, 5, 5))).replace(b">100<", b">1e30<")
    with pytest.raises(FormatError, match=rf"^{SOURCE}:4: <width> is too large: '1e30'"):
        parse_annotation(xml, SOURCE)


def test_object_without_name_is_an_error() -> None:
    with pytest.raises(FormatError, match=rf"^{SOURCE}:8: <object> without <name>"):
        parse_annotation(one_object(object_xml([], (1, 1, 5, 5))), SOURCE)


def test_missing_size_is_an_error() -> None:
    with pytest.raises(FormatError, match=rf"^{SOURCE}: no <size>"):
        parse_annotation(b"<annotation><object><name>1</name></object></annotation>", SOURCE)


def test_non_numeric_width_is_an_error() -> None:
    xml = one_object(object_xml([1], (1, 1, 5, 5))).replace(b"<width>100<", b"<width>wide<")
    with pytest.raises(FormatError, match=rf"^{SOURCE}:4: <width> is not an integer"):
        parse_annotation(xml, SOURCE)


def test_check_boxes_accepts_a_box_touching_the_image_edges() -> None:
    annotation = parse_annotation(one_object(object_xml([1], (1, 1, 100, 80))), SOURCE)
    check_boxes(annotation, SOURCE)  # (0, 0, 100, 80) is the whole 100x80 image


@pytest.mark.parametrize(
    "box",
    [(1, 1, 101, 80), (1, 1, 100, 81), (0, 1, 10, 10), (1, 0, 10, 10)],
    ids=["right", "bottom", "left", "top"],
)
def test_check_boxes_rejects_a_box_outside_the_image(box: tuple[int, int, int, int]) -> None:
    annotation = parse_annotation(one_object(object_xml([7], box)), SOURCE)
    with pytest.raises(FormatError, match=rf"^{SOURCE}: box .* chain\(s\) \[7\] lies outside"):
        check_boxes(annotation, SOURCE)


def test_format_annotation_round_trips() -> None:
    original = parse_annotation(TINY_IMAGES[0].xml, "Annotations/100.xml")
    written = format_annotation(original, "100.jpg")
    assert parse_annotation(written.encode("utf-8"), "written.xml") == original
    # laid out as the official files: the same text as the hand-written fixture
    assert written + "\n" == TINY_IMAGES[0].xml.decode("utf-8")


# --- captions -------------------------------------------------------------------------------


def test_caption_phrases_chain_types_text_and_first_word() -> None:
    caption = parse_caption(
        "[/EN#1/people Two men] stand near [/EN#2/vehicles/scene a red car] .", "s.txt", 1
    )
    assert caption.text == "Two men stand near a red car ."
    assert [(m.chain_id, m.types, m.text, m.first_word) for m in caption.mentions] == [
        (1, ("people",), "Two men", 0),
        (2, ("vehicles", "scene"), "a red car", 4),
    ]


def test_not_visual_phrase_has_chain_zero() -> None:
    caption = parse_caption(
        "[/EN#3/other It] is [/EN#0/notvisual very] old near [/EN#6/other a pole] .", "s.txt", 2
    )
    assert caption.text == "It is very old near a pole ."
    assert [(m.chain_id, m.types, m.first_word) for m in caption.mentions] == [
        (3, ("other",), 0),
        (NOT_VISUAL_CHAIN, ("notvisual",), 2),
        (6, ("other",), 5),
    ]


def test_one_word_phrase_at_the_end() -> None:
    caption = parse_caption("A man holds [/EN#9/other it]", "s.txt", 1)
    assert caption.text == "A man holds it"
    assert caption.mentions[0].text == "it"
    assert caption.mentions[0].first_word == 3


def test_caption_with_no_phrase() -> None:
    caption = parse_caption("Nothing to see here .", "s.txt", 4)
    assert caption.text == "Nothing to see here ."
    assert caption.mentions == ()


def test_sentences_are_utf8_with_non_ascii_text() -> None:
    captions = parse_sentences(TINY_IMAGES[0].sentences, "Sentences/100.txt")
    assert len(captions) == 5
    assert captions[2].text == "A café in the street ."
    assert captions[2].mentions[0].text == "the street"
    assert captions[2].mentions[0].first_word == 3
    assert [len(c.mentions) for c in captions] == [2, 3, 1, 0, 2]


def test_every_type_is_accepted() -> None:
    line = " ".join(format_phrase(i + 1, (t,), "x") for i, t in enumerate(TYPES))
    assert [m.types for m in parse_caption(line, "s.txt", 1).mentions] == [(t,) for t in TYPES]


def test_format_phrase_round_trips() -> None:
    phrase = format_phrase(12, ("vehicles", "scene"), "a red car")
    assert phrase == "[/EN#12/vehicles/scene a red car]"
    mention = parse_caption(phrase, "s.txt", 1).mentions[0]
    assert (mention.chain_id, mention.types, mention.text) == (
        12,
        ("vehicles", "scene"),
        "a red car",
    )


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("[/EN#1/people Two men stand .", "phrase not closed"),
        ("Two men] stand .", "stray ']'"),
        ("[/EN#1/people Two men] stand ] .", "stray ']'"),
        ("[/EN#1/people Two [/EN#2/people men] ] .", "phrase opened inside a phrase"),
        ("[/EN#1/dogs A dog] runs .", "unknown entity type"),
        ("[/EN#1/people/robots A dog] runs .", "unknown entity type"),
        ("[/EN#x/people A man] runs .", "malformed phrase head"),
        ("[/EN#1 A man] runs .", "malformed phrase head"),
        ("[/EN#1/people ] runs .", "empty phrase"),
    ],
    ids=[
        "unclosed",
        "stray",
        "stray-after",
        "nested",
        "type",
        "second-type",
        "chain",
        "no-type",
        "empty",
    ],
)
def test_bad_caption_names_file_and_line(line: str, reason: str) -> None:
    with pytest.raises(FormatError) as caught:
        parse_caption(line, "Sentences/9.txt", 3)
    assert str(caught.value).startswith("Sentences/9.txt:3: ")
    assert reason in str(caught.value)
    assert caught.value.line == 3


def test_double_closing_bracket_is_a_stray_bracket() -> None:
    with pytest.raises(FormatError, match="stray"):
        parse_caption("[/EN#1/people A man]] runs .", "Sentences/9.txt", 3)


def test_error_line_is_the_file_line_counting_blank_lines() -> None:
    text = b"[/EN#1/people A man] runs .\n\n[/EN#2/dogs A dog] sits .\n"
    with pytest.raises(FormatError, match=r"^Sentences/9\.txt:3: unknown entity type"):
        parse_sentences(text, "Sentences/9.txt")
    # the blank line is no caption
    assert len(parse_sentences(text.replace(b"dogs", b"animals"), "s.txt")) == 2


def test_non_utf8_bytes_name_the_line() -> None:
    text = sentences_text(["[/EN#1/people A man] runs ."]) + b"A caf\xe9 .\n"  # Latin-1 'é'
    with pytest.raises(FormatError) as caught:
        parse_sentences(text, "Sentences/9.txt")
    assert str(caught.value).startswith("Sentences/9.txt:2: not UTF-8")


def test_crlf_line_ends_are_accepted() -> None:
    captions = parse_sentences(b"[/EN#1/people A man] runs .\r\nA dog .\r\n", "s.txt")
    assert [c.text for c in captions] == ["A man runs .", "A dog ."]


@pytest.mark.parametrize("end", [b"\n", b"\r\n", b"\r"], ids=["LF", "CRLF", "CR"])
def test_every_line_end_gives_five_captions(end: bytes) -> None:
    lines = [f"[/EN#{i}/people A man] number {i} runs ." for i in range(1, 6)]
    captions = parse_sentences(end.join(line.encode() for line in lines) + end, "s.txt")
    assert [c.mentions[0].chain_id for c in captions] == [1, 2, 3, 4, 5]
    assert captions[4].text == "A man number 5 runs ."


def test_cr_line_ends_count_lines_in_errors() -> None:
    text = b"[/EN#1/people A man] runs .\r\r[/EN#2/dogs A dog] sits .\r"
    with pytest.raises(FormatError, match=r"^Sentences/9\.txt:3: unknown entity type"):
        parse_sentences(text, "Sentences/9.txt")
    with pytest.raises(FormatError, match=r"^Sentences/9\.txt:3: not UTF-8 text \(.* at byte 34\)"):
        parse_sentences(b"[/EN#1/people A man] runs .\r\rA caf\xe9 .\r", "Sentences/9.txt")


def test_byte_order_mark_is_not_part_of_the_first_caption() -> None:
    captions = parse_sentences(b"\xef\xbb\xbf[/EN#1/people A man] runs .\n", "s.txt")
    assert captions[0].text == "A man runs ."
    assert captions[0].mentions[0].first_word == 0


def test_chain_id_outside_int64_in_a_caption_names_the_line() -> None:
    text = b"A dog .\n[/EN#12345678901234567890123/people A man] runs .\n"
    with pytest.raises(FormatError, match=r"^s\.txt:2: chain id 12345678901234567890123 is not in"):
        parse_sentences(text, "s.txt")


def test_a_chain_id_of_5000_digits_is_a_located_error_cut_short() -> None:
    # int() refuses more than 4,300 digits with a ValueError: no traceback, no 5,000 digits
    text = f"[/EN#{'9' * 5000}/people A man] runs .\n".encode()
    with pytest.raises(FormatError, match=r"^s\.txt:1: chain id 9{60}\.\.\. is not in"):
        parse_sentences(text, "s.txt")
    xml = one_object(object_xml([1, 2], (1, 1, 5, 5))).replace(b">2<", b">" + b"9" * 5000 + b"<")
    with pytest.raises(FormatError, match=rf"^{SOURCE}:10: chain id 9{{60}}\.\.\. is not in"):
        parse_annotation(xml, SOURCE)


def test_unicode_line_separator_inside_a_caption_does_not_split_it() -> None:
    text = "[/EN#1/people A man] in a caf\u00e9\u2028 hat .\n".encode()
    assert len(parse_sentences(text, "s.txt")) == 1


# --- an image's record ----------------------------------------------------------------------


def tiny_files(image_id: str) -> AnnotationFiles:
    return next(f for f in tiny_annotation_files() if f.image_id == image_id)


def test_record_of_image_100_carries_every_quirk() -> None:
    record = parse_files(tiny_files("100"), "train")
    assert (record.image_id, record.file_name, record.width, record.height, record.split) == (
        "100",
        "100.jpg",
        100,
        80,
        "train",
    )
    assert record.boxes == (
        Box(0.0, 0.0, 50.0, 40.0),
        Box(50.0, 0.0, 100.0, 40.0),
        Box(10.0, 40.0, 30.0, 80.0),
        Box(0.0, 40.0, 10.0, 80.0),
    )
    assert record.entities == (
        Entity(1, (0, 1)),  # a chain with two boxes
        Entity(2, (2,)),  # box 2 belongs to both chains that name it
        Entity(3, (2,)),
        Entity(4, (), nobndbox=True),
        Entity(5, (), scene=True),
        Entity(6, (3,)),
    )
    assert record.captions[1] == Caption(
        "It is very old near a pole .",
        (
            Phrase("It", 3, ("other",), 0),
            Phrase("very", NOT_VISUAL, ("notvisual",), 2),  # chain 0: no entity, no box
            Phrase("a pole", 6, ("other",), 5),
        ),
    )
    assert record.captions[0].phrases[1] == Phrase("a red car", 2, ("vehicles", "scene"), 4)
    assert record.captions[3] == Caption("Nothing to see here .", ())
    assert record.captions[2].text == "A café in the street ."


def test_to_record_of_a_hand_built_annotation() -> None:
    box = Box(1.0, 2.0, 3.0, 4.0)
    annotation = Annotation(
        width=10,
        height=8,
        depth=3,
        objects=(
            AnnotationObject((9,), None),  # a chain whose object has no box and no flag
            AnnotationObject((7, 8), box),
            AnnotationObject((7,), None, nobndbox=True),  # the same chain flagged elsewhere
        ),
    )
    caption = CaptionLine("A man .", (Mention(7, ("people",), "A man", 0),))
    assert to_record("42", annotation, [caption], None) == ImageRecord(
        image_id="42",
        file_name="42" + IMAGE_SUFFIX,
        width=10,
        height=8,
        boxes=(box,),
        entities=(Entity(7, (0,), nobndbox=True), Entity(8, (0,)), Entity(9, ())),
        captions=(Caption("A man .", (Phrase("A man", 7, ("people",), 0),)),),
        split=None,
    )


def test_a_chain_listing_its_box_twice_keeps_both_boxes() -> None:
    record = parse_files(tiny_files("300"), "test")
    assert record.boxes[1] == record.boxes[2] == Box(25.0, 0.0, 50.0, 40.0)
    assert record.entities == (Entity(11, (0,)), Entity(12, (1, 2)))


def test_not_visual_chain_is_the_neutral_not_visual_entity() -> None:
    assert NOT_VISUAL_CHAIN == NOT_VISUAL == 0


# --- the layout on disk ---------------------------------------------------------------------


def contents(archive: AnnotationArchive) -> list[tuple[str, bytes, bytes]]:
    return [(files.image_id, files.xml, files.sentences) for files in archive]


def test_zip_and_folders_yield_the_same_files(tmp_path: Path) -> None:
    zipped = AnnotationArchive(find_annotations(write_dataset(tmp_path / "z")))
    folders = AnnotationArchive(find_annotations(write_dataset(tmp_path / "f", layout="folders")))
    assert len(zipped) == len(folders) == 5
    assert zipped.image_ids == folders.image_ids == ["100", "200", "300", "400", "500"]
    expected = [(im.image_id, im.xml, im.sentences) for im in TINY_IMAGES]
    assert contents(zipped) == contents(folders) == expected


def test_sources_name_the_file_in_the_zip_or_folder(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "z")
    first = next(iter(AnnotationArchive(root / "annotations.zip")))
    assert first.xml_source == f"{root}/annotations.zip!Annotations/100.xml"
    assert first.sentences_source == f"{root}/annotations.zip!Sentences/100.txt"
    root = write_dataset(tmp_path / "f", layout="folders")
    first = next(iter(AnnotationArchive(root)))
    assert first.xml_source == f"{root}/Annotations/100.xml"
    assert first.sentences_source == f"{root}/Sentences/100.txt"


def test_archive_is_sorted_by_image_id_and_ignores_other_files(tmp_path: Path) -> None:
    root = write_dataset(tmp_path, TINY_IMAGES[::-1], layout="folders")
    (root / "Annotations" / ".DS_Store").write_bytes(b"\0")
    (root / "Sentences" / "README").write_text("notes", encoding="utf-8")
    archive = AnnotationArchive(root)
    assert [files.image_id for files in archive] == ["100", "200", "300", "400", "500"]


def test_zip_with_a_top_folder_is_read(tmp_path: Path) -> None:
    path = tmp_path / "annotations.zip"
    with zipfile.ZipFile(path, "w") as handle:
        handle.writestr("flickr30k/Annotations/7.xml", TINY_IMAGES[0].xml)
        handle.writestr("flickr30k/Sentences/7.txt", TINY_IMAGES[0].sentences)
    assert contents(AnnotationArchive(path)) == [
        ("7", TINY_IMAGES[0].xml, TINY_IMAGES[0].sentences)
    ]


def test_an_annotation_file_that_is_not_a_regular_file_is_named_unread(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "f", layout="folders")
    xml = sorted((root / "Annotations").iterdir())[0]
    xml.unlink()
    xml.symlink_to("/dev/zero")  # read whole, it would never end
    with pytest.raises(DataError, match=rf"^{xml}: not a regular file$"):
        list(AnnotationArchive(find_annotations(root)))


def test_xml_without_sentences_in_folders_is_named(tmp_path: Path) -> None:
    root = write_dataset(tmp_path, layout="folders")
    (root / "Sentences" / "300.txt").unlink()
    with pytest.raises(DataError) as caught:
        AnnotationArchive(root)
    assert str(caught.value).startswith(f"{root}/Annotations/300.xml: has no matching file")
    assert "Sentences/" in str(caught.value)


def test_xml_without_sentences_in_a_zip_is_named(tmp_path: Path) -> None:
    path = tmp_path / "annotations.zip"
    with zipfile.ZipFile(path, "w") as handle:
        for image in TINY_IMAGES:
            handle.writestr(f"Annotations/{image.image_id}.xml", image.xml)
            if image.image_id != "200":
                handle.writestr(f"Sentences/{image.image_id}.txt", image.sentences)
    with pytest.raises(DataError, match=r"annotations\.zip!Annotations/200\.xml: has no matching"):
        AnnotationArchive(path)


def test_sentences_without_xml_is_named(tmp_path: Path) -> None:
    root = write_dataset(tmp_path, layout="folders")
    (root / "Annotations" / "500.xml").unlink()
    with pytest.raises(DataError, match=r"Sentences/500\.txt: has no matching file in Annotations"):
        AnnotationArchive(root)


def test_corrupt_zip_is_a_data_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "annotations.zip"
    path.write_bytes(b"PK\x03\x04 cut short by an interrupted download")
    with pytest.raises(DataError, match=rf"^{path}: not a readable zip archive"):
        AnnotationArchive(find_annotations(tmp_path))


def test_find_annotations_prefers_the_zip(tmp_path: Path) -> None:
    root = write_dataset(tmp_path)
    assert find_annotations(root) == root / "annotations.zip"
    (root / "Annotations").mkdir()
    (root / "Sentences").mkdir()
    assert find_annotations(root) == root / "annotations.zip"
    (root / "annotations.zip").unlink()
    assert find_annotations(root) == root


@pytest.mark.parametrize("present", [[], ["Annotations"], ["Sentences"]])
def test_find_annotations_without_either_layout_is_a_data_error(
    tmp_path: Path, present: list[str]
) -> None:
    for name in present:
        (tmp_path / name).mkdir()
    with pytest.raises(DataError, match=rf"^{tmp_path}: no Flickr30k Entities annotations"):
        find_annotations(tmp_path)


def test_read_split_lists_reads_the_lists_that_exist(tmp_path: Path) -> None:
    (tmp_path / "train.txt").write_text("1\n2\n\n", encoding="utf-8")
    (tmp_path / "test.txt").write_text("3\n", encoding="utf-8")
    assert read_split_lists(tmp_path) == [
        SplitList("train", str(tmp_path / "train.txt"), ["1", "2"]),
        SplitList("test", str(tmp_path / "test.txt"), ["3"]),
    ]


def test_read_split_list_strips_blank_lines() -> None:
    split_list = read_split_list("100\n\n 200 \n300\n", "val", "val.txt")
    assert split_list == SplitList("val", "val.txt", ["100", "200", "300"])


@pytest.mark.parametrize(
    "content",
    [
        b"1\n2\n3\n",
        b"1\r\n2\r\n3\r\n",
        b"1\r2\r3\r",
        b"\xef\xbb\xbf1\n2\n3",
        b"\xef\xbb\xbf1\r2\r3\r",
    ],
    ids=["LF", "CRLF", "CR", "BOM", "BOM+CR"],
)
def test_read_split_lists_takes_any_line_end_and_a_byte_order_mark(
    tmp_path: Path, content: bytes
) -> None:
    (tmp_path / "train.txt").write_bytes(content)
    assert read_split_lists(tmp_path) == [
        SplitList("train", str(tmp_path / "train.txt"), ["1", "2", "3"])
    ]


def test_non_utf8_split_list_names_file_line_and_byte(tmp_path: Path) -> None:
    (tmp_path / "val.txt").write_bytes(b"100\r\n4\xe900\r\n")  # Latin-1
    with pytest.raises(FormatError) as caught:
        read_split_lists(tmp_path)
    assert str(caught.value).startswith(f"{tmp_path / 'val.txt'}:2: not UTF-8 text (")
    assert str(caught.value).endswith(" at byte 6)")
    (tmp_path / "val.txt").write_bytes(b"\xef\xbb\xbf100\n4\xe900\n")  # the mark is counted
    with pytest.raises(FormatError, match=r":2: not UTF-8 text \(.* at byte 8\)$"):
        read_split_lists(tmp_path)


# --- the reader -----------------------------------------------------------------------------


def with_files(image_id: str, *, xml: bytes | None = None, sentences: bytes | None = None):
    """The tiny dataset's files with one image's XML or captions replaced."""
    return [
        AnnotationFiles(
            f.image_id,
            xml if (xml is not None and f.image_id == image_id) else f.xml,
            f.xml_source,
            sentences if (sentences is not None and f.image_id == image_id) else f.sentences,
            f.sentences_source,
        )
        for f in tiny_annotation_files()
    ]


def test_reader_yields_a_record_per_image_with_its_split() -> None:
    reader = Flickr30kReader(tiny_annotation_files(), tiny_split_lists())
    assert len(reader) == 5
    records = list(reader)
    assert [(r.image_id, r.file_name, r.split) for r in records] == [
        ("100", "100.jpg", "train"),
        ("200", "200.jpg", "val"),
        ("300", "300.jpg", "test"),
        ("400", "400.jpg", "train"),
        ("500", "500.jpg", None),  # in no split list
    ]
    assert records[0] == parse_files(tiny_files("100"), "train")
    assert reader.skipped == []


def test_open_reads_a_zip_or_folders_with_their_split_lists(tmp_path: Path) -> None:
    zipped = Flickr30kReader.open(write_dataset(tmp_path / "z"), splits=tmp_path / "z")
    folders = Flickr30kReader.open(
        write_dataset(tmp_path / "f", layout="folders"), splits=tmp_path / "f"
    )
    assert len(zipped) == len(folders) == 5  # known before any file is parsed
    assert (
        list(zipped)
        == list(folders)
        == list(Flickr30kReader(tiny_annotation_files(), tiny_split_lists()))
    )


def test_open_without_annotations_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no Flickr30k Entities annotations"):
        Flickr30kReader.open(tmp_path, splits=tmp_path)


def test_split_list_id_without_annotation_files_fails_before_any_file_is_parsed() -> None:
    lists = [*tiny_split_lists()[:1], SplitList("val", "val.txt", ["200", "777"])]
    broken = with_files("100", xml=b"<annotation")  # would fail if it were parsed first
    with pytest.raises(FormatError, match=r"^val\.txt:2: image id 777 has no annotation files"):
        Flickr30kReader(broken, lists)


def test_split_list_id_without_annotation_files_is_recorded_when_skipping() -> None:
    lists = [*tiny_split_lists()[:1], SplitList("val", "val.txt", ["200", "777"])]
    reader = Flickr30kReader(tiny_annotation_files(), lists, skip_bad_files=True)
    assert reader.skipped == [
        Skipped("val.txt", "image id 777 has no annotation files", 2)
    ]  # at construction, before iteration
    assert [r.split for r in reader] == ["train", "val", None, "train", None]


def test_id_in_two_split_lists_is_an_error_even_when_skipping() -> None:
    lists = [
        SplitList("train", "train.txt", ["100", "400"]),
        SplitList("val", "val.txt", ["200"]),
        SplitList("test", "test.txt", ["300", "100"]),
    ]
    for skip in (False, True):
        with pytest.raises(
            FormatError, match=r"^test\.txt:2: image id 100 is in both train and test"
        ):
            Flickr30kReader(tiny_annotation_files(), lists, skip_bad_files=skip)


def test_an_id_listed_twice_in_one_split_list_is_accepted_once_and_listed() -> None:
    lists = [SplitList("train", "train.txt", ["100", "400", "100"])]
    reader = Flickr30kReader(tiny_annotation_files(), lists)
    assert [r.split for r in reader] == ["train", None, None, "train", None]
    assert reader.duplicate_split_ids == [
        Skipped("train.txt", "image id 100 is listed again (first on line 1)", 3)
    ]
    assert reader.skipped == []


def test_unknown_split_name_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        Flickr30kReader(tiny_annotation_files(), [SplitList("dev", "dev.txt", [])])


def test_malformed_file_stops_the_reader_naming_the_file() -> None:
    bad = TINY_IMAGES[2].xml.replace(b"</size>", b"</sise>")
    reader = Flickr30kReader(with_files("300", xml=bad), tiny_split_lists())
    with pytest.raises(FormatError, match=r"^Annotations/300\.xml:7: malformed XML"):
        list(reader)


def test_skip_bad_files_lists_a_malformed_file_once_and_leaves_its_image_out() -> None:
    bad = TINY_IMAGES[2].xml.replace(b"</size>", b"</sise>")
    reader = Flickr30kReader(with_files("300", xml=bad), tiny_split_lists(), skip_bad_files=True)
    assert [r.image_id for r in reader] == ["100", "200", "400", "500"]
    # 300 is listed in test.txt, but that line is not reported as a second problem (issue 13)
    assert [(s.source, s.line) for s in reader.skipped] == [("Annotations/300.xml", 7)]
    assert reader.skipped[0].reason.startswith("malformed XML")


def test_skip_bad_files_lists_a_bad_caption_with_its_line() -> None:
    bad = TINY_IMAGES[1].sentences.replace(b"The puppy] runs", b"The puppy runs")
    with pytest.raises(FormatError, match=r"^Sentences/200\.txt:2: "):
        list(Flickr30kReader(with_files("200", sentences=bad), []))
    reader = Flickr30kReader(with_files("200", sentences=bad), [], skip_bad_files=True)
    # all or nothing: the image's XML was fine, but it gives no record
    assert "200" not in [r.image_id for r in reader]
    assert [(s.source, s.line) for s in reader.skipped] == [("Sentences/200.txt", 2)]


def test_box_outside_its_image_is_a_bad_file() -> None:
    bad = annotation_xml("500", 30, 30, [object_xml([31], (1, 1, 31, 15))])
    with pytest.raises(FormatError, match=r"^Annotations/500\.xml: box .* outside the 30x30"):
        list(Flickr30kReader(with_files("500", xml=bad), []))
    reader = Flickr30kReader(with_files("500", xml=bad), [], skip_bad_files=True)
    assert [r.image_id for r in reader] == ["100", "200", "300", "400"]
    assert [(s.source, s.line) for s in reader.skipped] == [("Annotations/500.xml", None)]
