"""The Flickr30k Entities annotation format: reading and writing one image's files.

An image has an XML file (``Annotations/<id>.xml``: its size and boxes, each box naming the
coreference chains it belongs to) and a text file (``Sentences/<id>.txt``: five captions whose
bracketed phrases name a chain and one or more entity types)::

    [/EN#1/people Two young guys] with [/EN#2/bodyparts shaggy hair] look at ...

:class:`Flickr30kReader` finds the files (``annotations.zip`` or the unpacked
``Annotations/`` + ``Sentences/``, the split lists ``train.txt``/``val.txt``/``test.txt``)
and yields one :class:`~grounding.data.records.ImageRecord` per image; the functions below it
work on bytes and strings. Boxes leave this module in the package's canonical form:
``(x1, y1, x2, y2)`` absolute pixels, 0-based, with exclusive ends, so that a box covering a
whole ``W x H`` image is ``(0, 0, W, H)`` and ``(x2 - x1) * (y2 - y1)`` is its pixel count.
The XML stores 1-based inclusive pixel indices; :func:`box_from_xml` and :func:`box_to_xml` are
the only conversions between the two.
"""

from __future__ import annotations

import math
import os
import re
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from lxml import etree

from grounding.data.records import NOT_VISUAL, Box, Caption, Entity, ImageRecord, Phrase, Skipped
from grounding.errors import DataError, FormatError
from grounding.schemas import INT64_MAX, SPLITS

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
NOT_VISUAL_CHAIN = NOT_VISUAL
#: The images of the layout: ``<images>/<id>.jpg``.
IMAGE_SUFFIX = ".jpg"

_PHRASE_HEAD = re.compile(r"^\[/EN#(\d+)((?:/[^/\s]+)+)$")
#: A line ends at ``\r\n``, ``\n`` or a lone ``\r`` (old Mac files), as in Python's universal
#: newlines; not at the other characters ``str.splitlines()`` breaks at (U+2028, form feed ...),
#: which may stand inside a caption.
_LINE_END = re.compile(r"\r\n|\r|\n")
_LINE_END_BYTES = re.compile(rb"\r\n|\r|\n")


def text_lines(data: bytes, source: str) -> list[str]:
    """The lines of a text file (UTF-8, with or without a byte order mark; any line ends).

    Raises :class:`FormatError` naming ``source``, the line and the byte offset of bytes that
    are not UTF-8.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = len(_LINE_END_BYTES.findall(data, 0, error.start)) + 1
        raise FormatError(
            source, f"not UTF-8 text ({error.reason} at byte {error.start})", line
        ) from None
    return _LINE_END.split(text.removeprefix("\ufeff"))


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
class CaptionLine:
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
    if abs(value) > INT64_MAX:
        raise FormatError(source, f"<{tag}> is too large: {text!r}", child.sourceline)
    return int(value)


def _chain_id(name: etree._Element, source: str) -> int:
    text = (name.text or "").strip()
    too_long = len(text.lstrip("+-0")) > len(str(INT64_MAX))  # int() refuses 4,300 digits
    try:
        chain_id = -1 if too_long else int(text)
    except ValueError:
        raise FormatError(source, "chain id is not an integer", name.sourceline) from None
    if not 0 <= chain_id <= INT64_MAX:
        raise FormatError(source, f"chain id {_cut(text)} is not in 0..2^63-1", name.sourceline)
    return chain_id


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
        chain_ids = tuple(_chain_id(name, source) for name in names)
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


def parse_caption(line: str, source: str, line_number: int) -> CaptionLine:
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
                raise FormatError(source, f"malformed phrase head {_cut(token)!r}", line_number)
            digits = head.group(1)
            if len(digits.lstrip("0")) > len(str(INT64_MAX)) or int(digits) > INT64_MAX:
                raise FormatError(
                    source, f"chain id {_cut(digits)} is not in 0..2^63-1", line_number
                )
            chain_id = int(digits)
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
    return CaptionLine(text=" ".join(words), mentions=tuple(mentions))


def _cut(text: str, size: int = 60) -> str:
    """``text``, cut to ``size`` characters for a message."""
    return text if len(text) <= size else f"{text[:size]}..."


def parse_sentences(text: bytes, source: str) -> list[CaptionLine]:
    """Parse one ``Sentences/<id>.txt`` file (see :func:`text_lines`), one caption per
    non-empty line."""
    return [
        parse_caption(line, source, number)
        for number, line in enumerate(text_lines(text, source), start=1)
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


# --- image records ----------------------------------------------------------------------------


def to_record(
    image_id: str, annotation: Annotation, captions: Sequence[CaptionLine], split: str | None
) -> ImageRecord:
    """One image's parsed files as a neutral record: each chain an entity whose boxes are the
    boxes of the objects that name it (a box named by two chains belongs to both)."""
    boxes: list[Box] = []
    chain_boxes: dict[int, list[int]] = {}
    flags: dict[int, list[bool]] = {}
    for obj in annotation.objects:
        if obj.box is not None:
            boxes.append(obj.box)
        for chain in obj.chain_ids:
            chain_boxes.setdefault(chain, [])
            if obj.box is not None:
                chain_boxes[chain].append(len(boxes) - 1)
            nobndbox, scene = flags.setdefault(chain, [False, False])
            flags[chain] = [nobndbox or obj.nobndbox, scene or obj.scene]
    entities = tuple(
        Entity(chain, tuple(chain_boxes[chain]), *flags[chain]) for chain in sorted(chain_boxes)
    )
    return ImageRecord(
        image_id=image_id,
        file_name=f"{image_id}{IMAGE_SUFFIX}",
        width=annotation.width,
        height=annotation.height,
        boxes=tuple(boxes),
        entities=entities,
        captions=tuple(
            Caption(
                line.text,
                tuple(Phrase(m.text, m.chain_id, m.types, m.first_word) for m in line.mentions),
            )
            for line in captions
        ),
        split=split,
    )


@dataclass(frozen=True)
class AnnotationFiles:
    """The raw files of one image: its XML and its captions, with names for error messages."""

    image_id: str
    xml: bytes
    xml_source: str
    sentences: bytes
    sentences_source: str


def parse_files(files: AnnotationFiles, split: str | None) -> ImageRecord:
    """One image's files -> its record; :class:`FormatError` naming the file that breaks the
    format."""
    annotation = parse_annotation(files.xml, files.xml_source)
    check_boxes(annotation, files.xml_source)
    captions = parse_sentences(files.sentences, files.sentences_source)
    return to_record(files.image_id, annotation, captions, split)


def find_annotations(root: Path) -> Path:
    """The annotations under ``root``: ``annotations.zip`` if present, else ``root`` itself
    when it holds ``Annotations/`` and ``Sentences/``."""
    archive = root / "annotations.zip"
    if archive.is_file():
        return archive
    if (root / "Annotations").is_dir() and (root / "Sentences").is_dir():
        return root
    raise DataError(
        f"{root}: no Flickr30k Entities annotations: expected annotations.zip or the folders "
        "Annotations/ and Sentences/"
    )


class AnnotationArchive:
    """Every image's ``(xml, sentences)`` pair from a zip or from unpacked folders.

    ``len()`` and :attr:`image_ids` are known before reading; iterating yields
    :class:`AnnotationFiles` sorted by image id. An image with an XML file but no captions (or
    the reverse) raises :class:`DataError` naming the file.
    """

    def __init__(self, location: Path) -> None:
        self.location = location
        try:
            self._zip = zipfile.ZipFile(location) if location.suffix == ".zip" else None
        except zipfile.BadZipFile:
            raise DataError(f"{location}: not a readable zip archive") from None
        if self._zip is not None:
            names = self._zip.namelist()
        else:
            names = [f"Annotations/{n}" for n in os.listdir(location / "Annotations")] + [
                f"Sentences/{n}" for n in os.listdir(location / "Sentences")
            ]
        xml = {_stem(n): n for n in names if _in_folder(n, "Annotations", ".xml")}
        txt = {_stem(n): n for n in names if _in_folder(n, "Sentences", ".txt")}
        for present, missing, mine, theirs in (
            ("Annotations", "Sentences", xml, txt),
            ("Sentences", "Annotations", txt, xml),
        ):
            orphans = sorted(set(mine) - set(theirs))
            if orphans:
                raise DataError(
                    f"{self._source(mine[orphans[0]])}: has no matching file in {missing}/ "
                    f"({len(orphans)} such file(s) in {present}/)"
                )
        self._names = [(image_id, xml[image_id], txt[image_id]) for image_id in sorted(xml)]

    @property
    def image_ids(self) -> list[str]:
        return [image_id for image_id, _, _ in self._names]

    def __len__(self) -> int:
        return len(self._names)

    def __iter__(self) -> Iterator[AnnotationFiles]:
        for image_id, xml_name, txt_name in self._names:
            yield AnnotationFiles(
                image_id=image_id,
                xml=self._read(xml_name),
                xml_source=self._source(xml_name),
                sentences=self._read(txt_name),
                sentences_source=self._source(txt_name),
            )

    def _read(self, name: str) -> bytes:
        if self._zip is not None:
            return self._zip.read(name)
        path = self.location / name
        if not path.is_file():  # a device or FIFO (also behind a symlink) would never end
            raise DataError(f"{self._source(name)}: not a regular file")
        return path.read_bytes()

    def _source(self, name: str) -> str:
        return f"{self.location}/{name}" if self._zip is None else f"{self.location}!{name}"


def _in_folder(name: str, folder: str, suffix: str) -> bool:
    parts = name.split("/")
    return len(parts) >= 2 and parts[-2] == folder and parts[-1].endswith(suffix)


def _stem(name: str) -> str:
    return name.rsplit("/", 1)[-1].rsplit(".", 1)[0]


@dataclass(frozen=True)
class SplitList:
    """One split list: its name (``train``), its file name for messages, and its ids in order."""

    split: str
    source: str
    image_ids: Sequence[str]


def read_split_list(text: str, split: str, source: str) -> SplitList:
    """A split list file's text (one image id per line, any line ends) as a
    :class:`SplitList`; blank lines are dropped."""
    ids = [line.strip() for line in _LINE_END.split(text.removeprefix("\ufeff"))]
    return SplitList(split, source, [image_id for image_id in ids if image_id])


def read_split_lists(folder: Path) -> list[SplitList]:
    """The split lists ``<folder>/{train,val,test}.txt`` that exist (see :func:`text_lines`)."""
    return [
        read_split_list("\n".join(text_lines(path.read_bytes(), str(path))), split, str(path))
        for split in SPLITS
        if (path := folder / f"{split}.txt").is_file()
    ]


def split_of_images(
    image_ids: set[str],
    split_lists: Sequence[SplitList],
    skip_bad: bool,
    skipped: list[Skipped],
    duplicates: list[Skipped] | None = None,
) -> dict[str, str]:
    """Map image id -> split from the lists; an unknown id or an id in two lists is an error
    (an unknown id is skipped and listed with ``skip_bad``). An id listed again in the same
    list counts once and is listed in ``duplicates``."""
    split_of: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for split_list in split_lists:
        if split_list.split not in SPLITS:
            raise ValueError(f"unknown split {split_list.split!r}; expected one of {SPLITS}")
        for line, image_id in enumerate(split_list.image_ids, start=1):
            if image_id not in image_ids:
                error = FormatError(
                    split_list.source, f"image id {image_id} has no annotation files", line
                )
                if not skip_bad:
                    raise error
                skipped.append(Skipped(split_list.source, error.reason, line))
                continue
            if image_id in split_of and split_of[image_id] != split_list.split:
                raise FormatError(
                    split_list.source,
                    f"image id {image_id} is in both {split_of[image_id]} and {split_list.split}",
                    line,
                )
            if image_id in split_of:
                if duplicates is not None:
                    first = first_line[image_id]
                    reason = f"image id {image_id} is listed again (first on line {first})"
                    duplicates.append(Skipped(split_list.source, reason, line))
                continue
            split_of[image_id] = split_list.split
            first_line[image_id] = line
    return split_of


class Flickr30kReader:
    """The records of a dataset in the Flickr30k Entities layout.

    ``files`` are the images' annotation files (an :class:`AnnotationArchive`, or any
    sequence of :class:`AnnotationFiles`), ``split_lists`` the dataset's split lists. A file
    that breaks the format raises :class:`FormatError` naming it, or, with
    ``skip_bad_files``, leaves its image out and is listed in :attr:`skipped`. An id listed
    twice in one split list counts once and is listed in :attr:`duplicate_split_ids`.
    """

    def __init__(
        self,
        files: Sequence[AnnotationFiles] | AnnotationArchive,
        split_lists: Sequence[SplitList],
        *,
        skip_bad_files: bool = False,
    ) -> None:
        self.files = files
        self.skip_bad_files = skip_bad_files
        self.skipped: list[Skipped] = []
        self.duplicate_split_ids: list[Skipped] = []
        image_ids = (
            files.image_ids if isinstance(files, AnnotationArchive) else [f.image_id for f in files]
        )
        self._split_of = split_of_images(
            set(image_ids), split_lists, skip_bad_files, self.skipped, self.duplicate_split_ids
        )

    @classmethod
    def open(
        cls,
        root: Path,
        *,
        splits: Path,
        files: Mapping[str, Path] | None = None,
        skip_bad_files: bool = False,
    ) -> Flickr30kReader:
        """The dataset at ``root`` (see :func:`find_annotations`), its split lists in the
        folder ``splits``; ``files`` is not used (the layout's annotations are not split into
        files)."""
        return cls(
            AnnotationArchive(find_annotations(root)),
            read_split_lists(splits),
            skip_bad_files=skip_bad_files,
        )

    def __len__(self) -> int:
        return len(self.files)

    def __iter__(self) -> Iterator[ImageRecord]:
        for files in self.files:
            try:
                yield parse_files(files, self._split_of.get(files.image_id))
            except FormatError as error:
                if not self.skip_bad_files:
                    raise
                self.skipped.append(Skipped(error.source, error.reason, error.line))
