"""The Flickr30k Entities format: boxes, XML objects, caption phrases, and their errors."""

from __future__ import annotations

import pytest
from conftest import TINY_IMAGES, annotation_xml, object_xml, sentences_text

from grounding.errors import DataError
from grounding.flickr30k import (
    NOT_VISUAL_CHAIN,
    TYPES,
    Annotation,
    AnnotationObject,
    Box,
    FormatError,
    box_from_xml,
    box_to_xml,
    check_boxes,
    format_annotation,
    format_phrase,
    parse_annotation,
    parse_caption,
    parse_sentences,
)

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
    with pytest.raises(FormatError, match=rf"^{SOURCE}:8: chain id is not an integer"):
        parse_annotation(one_object(object_xml(["x"], (1, 1, 5, 5))), SOURCE)


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


def test_unicode_line_separator_inside_a_caption_does_not_split_it() -> None:
    text = "[/EN#1/people A man] in a caf\u00e9\u2028 hat .\n".encode()
    assert len(parse_sentences(text, "s.txt")) == 1
