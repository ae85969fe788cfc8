"""The neutral record of one annotated image: what every dataset format reader yields.

A format reader (:mod:`grounding.data.formats`) turns its files into :class:`ImageRecord`
objects, with boxes already in the package's canonical form (``x1, y1, x2, y2`` absolute
pixels, 0-based, exclusive ends); :mod:`grounding.data.tables` builds the tables from them,
the same way for every format.

An *entity* is what a phrase refers to: a coreference chain in Flickr30k Entities; in ODVG and
MDETR files, which do not link the phrases of different captions, a distinct set of boxes that
phrases name (:mod:`grounding.data.formats.grounded`). Its boxes are the phrase's ground truth
(several boxes: the ANY-box protocol); an entity without a box gives phrases that cannot be
grounded, counted but not paired.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from dataclasses import dataclass
from typing import Protocol

#: Entity 0 marks a phrase that is not visual (Flickr30k Entities' chain 0): never a box.
NOT_VISUAL = 0


@dataclass(frozen=True)
class Box:
    """A box in canonical form: 0-based absolute pixels, exclusive ends."""

    x1: float
    y1: float
    x2: float
    y2: float


@dataclass(frozen=True)
class Entity:
    """What phrases refer to: ``box_ids`` index :attr:`ImageRecord.boxes`; ``nobndbox`` and
    ``scene`` are Flickr30k Entities' flags of a box-less object (False elsewhere)."""

    entity_id: int
    box_ids: tuple[int, ...]
    nobndbox: bool = False
    scene: bool = False


@dataclass(frozen=True)
class Phrase:
    """One phrase of a caption: its text, the entity it names, its entity types (empty where
    the format has none) and the index of its first word among the caption's words (-1: not in
    its caption, which an ODVG region's phrase may be)."""

    text: str
    entity_id: int
    types: tuple[str, ...]
    first_word: int


@dataclass(frozen=True)
class Caption:
    """One caption: its plain text and its phrases in order."""

    text: str
    phrases: tuple[Phrase, ...]


@dataclass(frozen=True)
class ImageRecord:
    """One annotated image. ``file_name`` is relative to the dataset's images folder;
    ``split`` is the split the dataset puts it in (None: in no split)."""

    image_id: str
    file_name: str
    width: int
    height: int
    boxes: tuple[Box, ...]
    entities: tuple[Entity, ...]
    captions: tuple[Caption, ...]
    split: str | None = None


@dataclass(frozen=True)
class Skipped:
    """A file or record left out, with why: recorded, counted and reported, never dropped
    silently."""

    source: str
    reason: str
    line: int | None = None


class RecordReader(Sized, Protocol):
    """What a format reader is: ``len()`` (for progress bars; may be an estimate of the work)
    and iteration over the records, with what it left out in ``skipped`` once iterated;
    ``duplicate_split_ids`` are the lines of a split list that name an image the list already
    named (counted once; always empty for formats whose split is the file)."""

    skipped: list[Skipped]
    duplicate_split_ids: list[Skipped]

    def __iter__(self) -> Iterator[ImageRecord]: ...
