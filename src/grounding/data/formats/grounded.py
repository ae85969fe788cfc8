"""What the ODVG and MDETR formats share: captions whose phrases carry their own boxes.

Both formats list, per caption of an image, its phrases and each phrase's boxes; neither says
which phrases of two captions name the same object, and both repeat a box on every caption
that names it. :func:`image_record` makes one neutral record of an image's captions:

- the image's boxes are the distinct boxes its reader found (the reader decides when two are
  one box, and their order);
- an *entity* is a distinct set of boxes: phrases of any caption that name the same boxes
  refer to one entity. Entities are numbered from 1 in order of first mention (0 is
  :data:`~grounding.data.records.NOT_VISUAL`, which these formats cannot express); a phrase
  without a box is an entity of its own, without boxes.

The JSON values are checked here: a bad value raises :class:`BadRecord`, which the reader turns
into a :class:`~grounding.errors.FormatError` naming the file and the line or record. Boxes
leave in the canonical form (0-based absolute pixels, exclusive ends); a box that overshoots
its image by at most :data:`CLIP_TOLERANCE` pixels is clipped to it, as MDETR, GLIP and
mmdetection clip every box (``x + w`` of a converted box can land a fraction past the edge).

The writers share :func:`phrase_span` (where a phrase sits in its caption) and :class:`Written`
(each split's file text and what the format could not hold).
"""

from __future__ import annotations

import bisect
import contextlib
import json
import math
import re
import reprlib
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar, Self

from grounding.data.records import Box, Caption, Entity, ImageRecord, Phrase, Skipped
from grounding.errors import DataError
from grounding.schemas import INT64_MAX, SPLITS

#: Pixels a box may overshoot its image and be clipped to it rather than rejected.
CLIP_TOLERANCE = 1.0

_WORD = re.compile(r"\S+")
#: How a bad value is shown in a message: a 4,000-digit number or a 10 MB string is cut short.
_SHOWN = reprlib.Repr()  # keyword arguments only from Python 3.12
_SHOWN.maxlevel, _SHOWN.maxstring, _SHOWN.maxlong, _SHOWN.maxother = 3, 60, 40, 60


class BadRecord(Exception):
    """A value that breaks its format; the reader adds the file and the line or record."""


@dataclass(frozen=True)
class GroundedPhrase:
    """One phrase as the file gives it: its text, the index of its first word among the
    caption's words (-1: the phrase is not in its caption), the keys of its boxes among the
    image's boxes, and its types (a detection category; empty elsewhere)."""

    text: str
    first_word: int
    boxes: tuple[Hashable, ...]
    types: tuple[str, ...] = ()


@dataclass(frozen=True)
class GroundedCaption:
    text: str
    phrases: tuple[GroundedPhrase, ...]


def image_record(
    *,
    image_id: str,
    file_name: str,
    width: int,
    height: int,
    split: str | None,
    boxes: Mapping[Hashable, Box],
    captions: Sequence[GroundedCaption],
) -> ImageRecord:
    """The record of one image: ``boxes`` (in their order) keyed as the phrases name them,
    entities made of the distinct sets of boxes the phrases name (see the module docstring)."""
    box_id = {key: index for index, key in enumerate(boxes)}
    entity_of: dict[tuple[int, ...], int] = {}
    entities: list[Entity] = []
    records = []
    for caption in captions:
        phrases = []
        for phrase in caption.phrases:
            box_ids = tuple(sorted({box_id[key] for key in phrase.boxes}))
            entity_id = entity_of.get(box_ids) if box_ids else None
            if entity_id is None:
                entity_id = len(entities) + 1
                entities.append(Entity(entity_id, box_ids))
                if box_ids:
                    entity_of[box_ids] = entity_id
            phrases.append(Phrase(phrase.text, entity_id, phrase.types, phrase.first_word))
        records.append(Caption(caption.text, tuple(phrases)))
    return ImageRecord(
        image_id=image_id,
        file_name=file_name,
        width=width,
        height=height,
        boxes=tuple(boxes.values()),
        entities=tuple(entities),
        captions=tuple(records),
        split=split,
    )


@dataclass
class PendingImage:
    """One image while its file is read: what its first record said (and where: ``path:line``
    or ``path images[3]``), its boxes by key in order of first appearance, its captions."""

    file_name: str
    width: int
    height: int
    split: str
    where: str
    boxes: dict[Hashable, Box] = field(default_factory=dict)
    captions: list[GroundedCaption] = field(default_factory=list)

    def record(self, boxes: Mapping[Hashable, Box] | None = None) -> ImageRecord:
        """This image's record, with ``boxes`` (default: :attr:`boxes`) in their order."""
        return image_record(
            image_id=image_id_of(self.file_name),
            file_name=self.file_name,
            width=self.width,
            height=self.height,
            split=self.split,
            boxes=self.boxes if boxes is None else boxes,
            captions=self.captions,
        )


class PendingImages:
    """A dataset's images, keyed by image id, as its records are read (in any order)."""

    def __init__(self) -> None:
        self._images: dict[str, PendingImage] = {}

    def __len__(self) -> int:
        return len(self._images)

    def get(self, file_name: str, width: int, height: int, split: str, where: str) -> PendingImage:
        """The image of ``file_name``, made on its first record; :class:`BadRecord` when this
        record disagrees with the first on the image's size or split."""
        image_id = image_id_of(file_name)
        image = self._images.setdefault(
            image_id, PendingImage(file_name, width, height, split, where)
        )
        if image.file_name != file_name:
            raise BadRecord(
                f"file {file_name!r} has the image id {image_id!r} of {image.file_name!r} "
                f"({image.where})"
            )
        if (image.width, image.height) != (width, height):
            raise BadRecord(
                f"image {file_name} is {width}x{height} here but "
                f"{image.width}x{image.height} at {image.where}"
            )
        if image.split != split:
            raise BadRecord(f"image {file_name} is also in the {image.split} split ({image.where})")
        return image

    def in_order(self) -> list[PendingImage]:
        """The images sorted by image id (the order of every reader's records)."""
        return [self._images[image_id] for image_id in sorted(self._images)]


@dataclass(frozen=True)
class SplitFiles:
    """The settings of a format whose split is its file (``data.<format>`` in
    ``params.yaml``): each split's annotation file, relative to the dataset's root (None: the
    dataset has no such split). Each format subclasses it with its own default file names."""

    train: Path | None = None
    val: Path | None = None
    test: Path | None = None

    def named(self) -> dict[str, Path]:
        """``{split: file}`` for the splits that have a file."""
        files = {split: getattr(self, split) for split in SPLITS}
        return {split: name for split, name in files.items() if name is not None}


class SplitFilesReader:
    """What the readers of a format whose split is its file share: one file per split, read
    when the reader is made into :class:`PendingImages`; :meth:`read_file` is the format's."""

    format_name: ClassVar[str]

    def __init__(self, files: Mapping[str, Path], *, skip_bad_files: bool = False) -> None:
        self.skip_bad_files = skip_bad_files
        self.skipped: list[Skipped] = []
        self.duplicate_split_ids: list[Skipped] = []  # the split is the file: none
        self._images = PendingImages()
        for split, path in files.items():
            if split not in SPLITS:
                raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
            if path.exists() and not path.is_file():  # a folder, a device, a FIFO
                raise DataError(
                    f"{path}: not a regular file (the {split} split of an {self.format_name} "
                    "dataset)"
                )
            if not path.is_file():
                raise DataError(
                    f"{path}: no such file (the {split} split of an {self.format_name} dataset)"
                )
            self.read_file(path, split)

    @classmethod
    def open(
        cls,
        root: Path,
        *,
        files: Mapping[str, Path],
        splits: Path | None = None,
        skip_bad_files: bool = False,
    ) -> Self:
        """The dataset whose split files ``files`` (relative to ``root``) hold it; ``splits``
        is not used (the split of a record is its file)."""
        return cls(
            {split: root / name for split, name in files.items()}, skip_bad_files=skip_bad_files
        )

    def __len__(self) -> int:
        return len(self._images)

    def read_file(self, path: Path, split: str) -> None:
        """Add the records of ``path`` (the file of ``split``) to the pending images."""
        raise NotImplementedError


def image_id_of(file_name: str) -> str:
    """An image's id: its file name without the suffix (``flickr30k/12.jpg`` -> ``flickr30k/12``),
    the same whichever format names the file."""
    return str(PurePosixPath(file_name).with_suffix(""))


# --- JSON values ------------------------------------------------------------------------------


def parse_json(text: str) -> Any:
    """The JSON value of ``text``; :class:`BadRecord` saying why it is not one, also for what
    Python's parser refuses beyond the grammar: nesting deeper than its recursion limit, an
    integer of more than 4,300 digits."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise BadRecord(f"malformed JSON: {error.msg} (column {error.colno})") from None
    except RecursionError:
        raise BadRecord("malformed JSON: nested too deeply") from None
    except ValueError as error:  # "Exceeds the limit (4300 digits) for integer string conversion"
        raise BadRecord(f"malformed JSON: {str(error).split(';')[0]}") from None


def shown(value: Any) -> str:
    """``repr(value)``, cut short (see :data:`_SHOWN`)."""
    return _SHOWN.repr(value)


def json_object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadRecord(f"{what} is not a JSON object")
    return value


def json_list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise BadRecord(f"{what} is not a list")
    return value


def required(record: Mapping[str, Any], name: str) -> Any:
    """``record[name]``; :class:`BadRecord` naming the missing field."""
    if name not in record:
        raise BadRecord(f"missing field {name!r}")
    return record[name]


def text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise BadRecord(f"{what} is not a string: {shown(value)}")
    return value


def whole_number(value: Any, what: str) -> int:
    """An integer given as a number or a string of digits (MDETR's Flickr30k files write the
    image size as strings)."""
    number: float = math.nan
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT64_MAX:
        raise BadRecord(f"{what} is too large: {shown(value)}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        with contextlib.suppress(ValueError):  # not a number: reported below
            number = float(value)
    if not number.is_integer():
        raise BadRecord(f"{what} is not a whole number: {shown(value)}")
    if abs(number) > INT64_MAX:  # as a float: 2**63 and above
        raise BadRecord(f"{what} is too large: {shown(value)}")
    return int(number)


def image_size(record: Mapping[str, Any]) -> tuple[int, int]:
    """``(width, height)`` of a record's image: whole numbers of at least 1."""
    width = whole_number(required(record, "width"), "width")
    height = whole_number(required(record, "height"), "height")
    if width < 1 or height < 1:
        raise BadRecord(f"image size {width}x{height} is empty")
    return width, height


def numbers(value: Any, what: str) -> tuple[float, float, float, float]:
    """Four finite numbers (a box's coordinates; an integer too large for a float is not
    finite)."""
    if (
        not isinstance(value, list)
        or len(value) != 4
        or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
        or not all(_finite(v) for v in value)
    ):
        raise BadRecord(f"{what} is not four numbers: {shown(value)}")
    return float(value[0]), float(value[1]), float(value[2]), float(value[3])


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def check_box(x1: float, y1: float, x2: float, y2: float, width: int, height: int) -> Box:
    """The canonical box ``(x1, y1, x2, y2)`` inside a ``width x height`` image, clipped to it
    when it overshoots by at most :data:`CLIP_TOLERANCE`; :class:`BadRecord` when it has no
    area or lies further out."""
    corners = f"(x1, y1, x2, y2) = ({x1:g}, {y1:g}, {x2:g}, {y2:g})"
    if x2 <= x1 or y2 <= y1:
        raise BadRecord(f"box {corners} has zero area")
    t = CLIP_TOLERANCE
    beyond = x1 < -t or y1 < -t or x2 > width + t or y2 > height + t
    if beyond or x1 >= width or y1 >= height or x2 <= 0 or y2 <= 0:
        raise BadRecord(f"box {corners} lies outside the {width}x{height} image")
    return Box(max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height)))


def spans(value: Any, words: CaptionWords, what: str) -> tuple[tuple[int, int], ...]:
    """Character spans ``[[start, end], ...]`` of the caption of ``words``, sorted; each inside
    it and not blank."""
    result = []
    length = len(words.caption)
    for item in json_list(value, what):
        if (
            not isinstance(item, list)
            or len(item) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in item)
        ):
            raise BadRecord(f"{what}: span {shown(item)} is not [start, end]")
        start, end = item
        if not 0 <= start < end <= length:
            raise BadRecord(
                f"{what}: span {shown(item)} lies outside the {length}-character caption"
            )
        if words.blank(start, end):
            raise BadRecord(f"{what}: span {item} of the caption is blank")
        result.append((start, end))
    return tuple(sorted(result))


def span_text(caption: str, phrase_spans: Sequence[tuple[int, int]]) -> str:
    """The words of ``caption`` that the spans cover (non-contiguous spans joined by a space)."""
    return " ".join(caption[start:end].strip() for start, end in phrase_spans)


class CaptionWords:
    """The words of one caption (runs of non-space characters), found once so that placing
    each of its phrases costs about the phrase's length, not the caption's: a file with many
    regions in a long caption is read in time linear in its size.

    Words are what ``str.split()`` gives; a word's index counts the words before it."""

    #: Phrases of one word are looked up by their first this many characters.
    PREFIX = 16

    def __init__(self, caption: str) -> None:
        self.caption = caption
        found = list(_WORD.finditer(caption))
        self.starts = [word.start() for word in found]
        self.ends = [word.end() for word in found]
        self._words = [word.group() for word in found]
        self._first_of: dict[int, dict[str, int]] = {}
        self._all_of: dict[int, dict[str, list[int]]] = {}
        self._located: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.starts)

    def words_before(self, offset: int) -> int:
        """How many words start before character ``offset``."""
        return bisect.bisect_left(self.starts, offset)

    def blank(self, start: int, end: int) -> bool:
        """Whether the characters ``[start, end)`` are all white space."""
        after = bisect.bisect_right(self.ends, start)  # the first word ending after start
        return after == len(self.starts) or self.starts[after] >= end

    def locate(self, phrase: str) -> int:
        """The index of the first word at which ``phrase`` starts; -1 when it starts at none."""
        if phrase not in self._located:
            self._located[phrase] = self._first_start(phrase)
        return self._located[phrase]

    def _first_start(self, phrase: str) -> int:
        """See :meth:`locate`: the phrase's first word is looked up, not searched for. A
        phrase of several words starts at a caption word equal to its first word (white space
        follows it in the phrase); a phrase of one word at a caption word that starts with it,
        found by its first :attr:`PREFIX` characters."""
        first = phrase.split(maxsplit=1)
        if not first or phrase[0].isspace():
            return -1
        if len(first[0]) < len(phrase):
            candidates = self._index(0).get(first[0], [])
        elif len(phrase) < self.PREFIX:
            return self._first_index(len(phrase)).get(phrase, -1)
        else:
            candidates = self._index(self.PREFIX).get(phrase[: self.PREFIX], [])
        return next((i for i in candidates if self.caption.startswith(phrase, self.starts[i])), -1)

    def _first_index(self, size: int) -> dict[str, int]:
        """The first ``size`` characters of the words of at least that length -> the index of
        the first such word."""
        if size not in self._first_of:
            words = list(enumerate(self._words))
            self._first_of[size] = {w[:size]: i for i, w in reversed(words) if len(w) >= size}
        return self._first_of[size]

    def _index(self, size: int) -> dict[str, list[int]]:
        """The first ``size`` characters of the words of at least that length (0: the whole
        word) -> the indices of those words, ascending."""
        if size not in self._all_of:
            index: dict[str, list[int]] = {}
            for i, word in enumerate(self._words):
                if len(word) >= size:
                    index.setdefault(word[:size] if size else word, []).append(i)
            self._all_of[size] = index
        return self._all_of[size]


def prompt(phrases: Sequence[str]) -> tuple[str, list[int]]:
    """A caption made of ``phrases`` as the detectors' prompts write them (``"a dog . the red
    ball ."``) and the index of each phrase's first word in it: the caption of a format whose
    phrases come without one (ODVG detection records, Label Studio regions)."""
    caption = " . ".join(phrases) + " ."
    words = CaptionWords(caption)
    first_words, offset = [], 0
    for phrase in phrases:
        first_words.append(words.words_before(offset))
        offset += len(phrase) + len(" . ")
    return caption, first_words


# --- writing ---------------------------------------------------------------------------------


def phrase_span(words: CaptionWords, phrase: Phrase) -> tuple[int, int] | None:
    """Where ``phrase`` sits in the caption of ``words``: the characters from its first word
    on, if its text is there (None otherwise, e.g. a phrase whose file did not place it)."""
    if not 0 <= phrase.first_word < len(words):
        return None
    start = words.starts[phrase.first_word]
    end = start + len(phrase.text)
    return (start, end) if words.caption.startswith(phrase.text, start) else None


def coordinate(value: float) -> int | float:
    """A coordinate as JSON writes it best: ``12`` rather than ``12.0``."""
    return int(value) if float(value).is_integer() else value


@dataclass
class Written:
    """A writer's output: each split's file text (every split, empty ones included), how many
    images each holds, and what the format could not hold, counted by reason."""

    texts: dict[str, str]
    images: dict[str, int]
    left_out: dict[str, int] = field(default_factory=dict)

    def leave_out(self, reason: str, count: int = 1) -> None:
        if count:
            self.left_out[reason] = self.left_out.get(reason, 0) + count
