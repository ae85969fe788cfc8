"""The Flickr30k Entities annotation format: reading and writing one image's files.

An image has an XML file (``Annotations/<id>.xml``: its size and boxes, each box naming the
coreference chains it belongs to) and a text file (``Sentences/<id>.txt``: five captions whose
bracketed phrases name a chain and one or more entity types)::

    [/EN#1/people Two young guys] with [/EN#2/bodyparts shaggy hair] look at ...

Everything here works on bytes and strings; :mod:`grounding.io` finds the files. Boxes leave
this module in the package's canonical form: ``(x1, y1, x2, y2)`` absolute pixels, 0-based,
with exclusive ends, so that a box covering a whole ``W x H`` image is ``(0, 0, W, H)`` and
``(x2 - x1) * (y2 - y1)`` is its pixel count. The XML stores 1-based inclusive pixel indices;
:func:`box_from_xml` and :func:`box_to_xml` are the only conversions between the two.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from lxml import etree

from grounding.errors import DataError

#: The entity types of Flickr30k Entities, in the dataset's order.
TYPES: tuple[str, ...] = (
    "people",
    "clothing",
    "bodyparts",
    "animals",
    "vehicles",
    "instruments",
    "scene",
    "other",
    "notvisual",
)

#: Chain id 0 marks a mention that is not visual: it stands alone and never has a box.
NOT_VISUAL_CHAIN = 0

_PHRASE_HEAD = re.compile(r"^\[/EN#(\d+)((?:/[^/\s]+)+)$")


class FormatError(DataError):
    """A file that breaks the Flickr30k Entities format; the message names file and line."""

    def __init__(self, source: str, message: str, line: int | None = None) -> None:
        where = f"{source}:{line}" if line is not None else source
        super().__init__(f"{where}: {message}")
        self.source = source
        self.line = line
        self.reason = message


@dataclass(frozen=True)
class Box:
    """A box in canonical form: 0-based absolute pixels, exclusive ends."""

    x1: float
    y1: float
    x2: float
    y2: float


@dataclass(frozen=True)
class AnnotationObject:
    """One ``<object>``: the chains it names and its box, or the flags of a box-less object."""

    chain_ids: tuple[int, ...]
    box: Box | None
    nobndbox: bool = False
    scene: bool = False


@dataclass(frozen=True)
class Annotation:
    """One image's XML file."""

    width: int
    height: int
    depth: int
    objects: tuple[AnnotationObject, ...]


@dataclass(frozen=True)
class Mention:
    """One bracketed phrase of a caption.

    ``first_word`` is the index of the phrase's first word among the caption's words
    (as in the dataset's official reader).
    """

    chain_id: int
    types: tuple[str, ...]
    text: str
    first_word: int


@dataclass(frozen=True)
class Caption:
    """One caption line: its plain text (brackets removed) and its phrases."""

    text: str
    mentions: tuple[Mention, ...]


def box_from_xml(xmin: int, ymin: int, xmax: int, ymax: int) -> Box:
    """Convert the XML's 1-based inclusive pixel indices to the canonical box."""
    return Box(float(xmin - 1), float(ymin - 1), float(xmax), float(ymax))


def box_to_xml(box: Box) -> tuple[int, int, int, int]:
    """Inverse of :func:`box_from_xml`: ``(xmin, ymin, xmax, ymax)`` as the XML stores them."""
    return round(box.x1) + 1, round(box.y1) + 1, round(box.x2), round(box.y2)


def _int_text(element: etree._Element, tag: str, source: str) -> int:
    child = element.find(tag)
    if child is None or child.text is None:
        raise FormatError(source, f"<{element.tag}> has no <{tag}>", element.sourceline)
    text = child.text.strip()
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value.is_integer():
        raise FormatError(source, f"<{tag}> is not an integer: {text!r}", child.sourceline)
    return int(value)


def _flag(element: etree._Element, tag: str) -> bool:
    child = element.find(tag)
    return child is not None and (child.text or "").strip() == "1"


def parse_annotation(xml: bytes, source: str) -> Annotation:
    """Parse one ``Annotations/<id>.xml`` file.

    Raises :class:`FormatError` naming ``source`` (and the line) for malformed XML, a missing
    size, a non-numeric coordinate or chain id, or a box with ``xmax < xmin`` or
    ``ymax < ymin``. Whether a box lies inside its image is checked by :func:`check_boxes`.
    """
    try:
        root = etree.fromstring(xml)
    except etree.XMLSyntaxError as error:
        raise FormatError(source, f"malformed XML: {error.msg}", error.lineno) from None
    size = root.find("size")
    if size is None:
        raise FormatError(source, "no <size> element")
    objects = []
    for element in root.iterfind("object"):
        names = element.findall("name")
        if not names:
            raise FormatError(source, "<object> without <name>", element.sourceline)
        try:
            chain_ids = tuple(int((name.text or "").strip()) for name in names)
        except ValueError:
            raise FormatError(source, "chain id is not an integer", element.sourceline) from None
        bndbox = element.find("bndbox")
        box = None
        if bndbox is not None:
            xmin, ymin, xmax, ymax = (
                _int_text(bndbox, tag, source) for tag in ("xmin", "ymin", "xmax", "ymax")
            )
            if xmax < xmin or ymax < ymin:
                raise FormatError(
                    source,
                    f"box with xmax < xmin or ymax < ymin: ({xmin}, {ymin}, {xmax}, {ymax})",
                    bndbox.sourceline,
                )
            box = box_from_xml(xmin, ymin, xmax, ymax)
        objects.append(
            AnnotationObject(
                chain_ids=chain_ids,
                box=box,
                nobndbox=_flag(element, "nobndbox"),
                scene=_flag(element, "scene"),
            )
        )
    return Annotation(
        width=_int_text(size, "width", source),
        height=_int_text(size, "height", source),
        depth=_int_text(size, "depth", source) if size.find("depth") is not None else 3,
        objects=tuple(objects),
    )


def check_boxes(annotation: Annotation, source: str) -> None:
    """Raise :class:`FormatError` if a box of ``annotation`` leaves its image."""
    for obj in annotation.objects:
        box = obj.box
        if box is None:
            continue
        if box.x1 < 0 or box.y1 < 0 or box.x2 > annotation.width or box.y2 > annotation.height:
            raise FormatError(
                source,
                f"box {box_to_xml(box)} (1-based, inclusive) of chain(s) {list(obj.chain_ids)} "
                f"lies outside the {annotation.width}x{annotation.height} image",
            )


def parse_caption(line: str, source: str, line_number: int) -> Caption:
    """Parse one caption line of a ``Sentences/<id>.txt`` file.

    Raises :class:`FormatError` naming ``source`` and ``line_number`` for unbalanced brackets,
    a malformed phrase head, or an unknown entity type.
    """
    words: list[str] = []
    mentions: list[Mention] = []
    current: list[str] | None = None
    chain_id = 0
    types: tuple[str, ...] = ()
    first_word = 0
    for token in line.split():
        if current is None and token.startswith("["):
            head = _PHRASE_HEAD.match(token)
            if head is None:
                raise FormatError(source, f"malformed phrase head {token!r}", line_number)
            chain_id = int(head.group(1))
            types = tuple(head.group(2).strip("/").split("/"))
            unknown = [t for t in types if t not in TYPES]
            if unknown:
                raise FormatError(
                    source, f"unknown entity type(s) {unknown} in {token!r}", line_number
                )
            current, first_word = [], len(words)
            continue
        if current is not None and token.startswith("[/EN#"):
            raise FormatError(
                source, "unbalanced brackets: phrase opened inside a phrase", line_number
            )
        closes = current is not None and token.endswith("]")
        word = token[:-1] if closes else token
        if "]" in word:
            raise FormatError(source, f"unbalanced brackets: stray ']' in {token!r}", line_number)
        if word:
            words.append(word)
            if current is not None:
                current.append(word)
        if closes:
            assert current is not None
            if not current:
                raise FormatError(source, "empty phrase", line_number)
            mentions.append(Mention(chain_id, types, " ".join(current), first_word))
            current = None
    if current is not None:
        raise FormatError(source, "unbalanced brackets: phrase not closed", line_number)
    return Caption(text=" ".join(words), mentions=tuple(mentions))


def parse_sentences(text: bytes, source: str) -> list[Caption]:
    """Parse one ``Sentences/<id>.txt`` file (UTF-8), one caption per non-empty line."""
    try:
        decoded = text.decode("utf-8")
    except UnicodeDecodeError as error:
        line = text[: error.start].count(b"\n") + 1
        raise FormatError(source, f"not UTF-8 text ({error.reason})", line) from None
    # split on "\n" only, as the official reader does: str.splitlines() would also break
    # lines at characters such as U+2028 inside a caption
    return [
        parse_caption(line.rstrip("\r"), source, number)
        for number, line in enumerate(decoded.split("\n"), start=1)
        if line.strip()
    ]


def format_annotation(annotation: Annotation, filename: str) -> str:
    """Write ``annotation`` as the dataset's XML, laid out as the official files are."""
    lines = [
        "<annotation>",
        f"\t<filename>{filename}</filename>",
        "\t<size>",
        f"\t\t<width>{annotation.width}</width>",
        f"\t\t<height>{annotation.height}</height>",
        f"\t\t<depth>{annotation.depth}</depth>",
        "\t</size>",
    ]
    for obj in annotation.objects:
        lines.append("\t<object>")
        lines.extend(f"\t\t<name>{chain}</name>" for chain in obj.chain_ids)
        if obj.box is None:
            lines.append(f"\t\t<scene>{int(obj.scene)}</scene>")
            lines.append(f"\t\t<nobndbox>{int(obj.nobndbox)}</nobndbox>")
        else:
            xmin, ymin, xmax, ymax = box_to_xml(obj.box)
            lines.extend(
                [
                    "\t\t<bndbox>",
                    f"\t\t\t<xmin>{xmin}</xmin>",
                    f"\t\t\t<ymin>{ymin}</ymin>",
                    f"\t\t\t<xmax>{xmax}</xmax>",
                    f"\t\t\t<ymax>{ymax}</ymax>",
                    "\t\t</bndbox>",
                ]
            )
        lines.append("\t</object>")
    lines.append("</annotation>")
    return "\n".join(lines)


def format_phrase(chain_id: int, types: tuple[str, ...], text: str) -> str:
    """Write one bracketed phrase, e.g. ``[/EN#1/people Two young guys]``."""
    return f"[/EN#{chain_id}/{'/'.join(types)} {text}]"
