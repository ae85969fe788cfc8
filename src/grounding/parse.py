"""parse: Flickr30k Entities annotation files -> tables of images, captions, phrases and boxes.

The tables (all keyed by ``image_id``, a string):

- ``images``: ``image_id, width, height, split, has_file`` (``split`` is ``train``, ``val``,
  ``test`` or ``none`` for an image in no split list);
- ``captions``: ``image_id, caption_index, text, n_phrases`` (plain text, brackets removed);
- ``phrases``: ``phrase_id, image_id, caption_index, phrase_index, chain_id, types,
  first_type, text, first_word, has_box`` -- every bracketed mention; ``types`` is
  ``/``-joined (``vehicles/scene``), ``has_box`` says whether its chain has a box;
- ``boxes``: ``image_id, box_id, x1, y1, x2, y2`` -- one row per ``<bndbox>``, canonical form;
- ``chain_boxes``: ``image_id, chain_id, box_id`` -- the many-to-many link between chains
  and boxes (a box shared by two chains has two rows, a chain with three boxes three);
- ``chains``: ``image_id, chain_id, n_boxes, nobndbox, scene`` -- every chain the XML names.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import pandas as pd

from grounding.flickr30k import (
    FormatError,
    check_boxes,
    parse_annotation,
    parse_sentences,
)

SPLITS: tuple[str, ...] = ("train", "val", "test")
NO_SPLIT = "none"
TABLES: tuple[str, ...] = ("images", "captions", "phrases", "boxes", "chain_boxes", "chains")


@dataclass(frozen=True)
class AnnotationFiles:
    """The raw files of one image: its XML and its captions, with names for error messages."""

    image_id: str
    xml: bytes
    xml_source: str
    sentences: bytes
    sentences_source: str


@dataclass(frozen=True)
class SplitList:
    """One split list: its name (``train``), its file name for messages, and its ids in order."""

    split: str
    source: str
    image_ids: Sequence[str]


@dataclass(frozen=True)
class Skipped:
    """A file left out, with why: recorded, counted and reported, never dropped silently."""

    source: str
    reason: str
    line: int | None = None


@dataclass
class ParsedDataset:
    """The tables of :mod:`grounding.parse` and the files that were skipped."""

    images: pd.DataFrame
    captions: pd.DataFrame
    phrases: pd.DataFrame
    boxes: pd.DataFrame
    chain_boxes: pd.DataFrame
    chains: pd.DataFrame
    skipped: list[Skipped] = field(default_factory=list)

    def tables(self) -> dict[str, pd.DataFrame]:
        """The tables by name (``images``, ``captions``, ...)."""
        return {name: getattr(self, name) for name in TABLES}

    def counts(self) -> dict[str, int]:
        """The summary counts of the dataset (what ``reports/parse.json`` holds)."""
        return {
            "images": len(self.images),
            "captions": len(self.captions),
            "phrases": len(self.phrases),
            "phrases_with_box": int(self.phrases["has_box"].sum()),
            "boxes": len(self.boxes),
            "chains": len(self.chains),
            "images_with_file": int(self.images["has_file"].sum()),
            "skipped_files": len(self.skipped),
            **{f"images_{split}": int((self.images["split"] == split).sum()) for split in SPLITS},
            f"images_{NO_SPLIT}": int((self.images["split"] == NO_SPLIT).sum()),
        }


class _Tables:
    """Row accumulators, one list of tuples per table, turned into DataFrames at the end."""

    def __init__(self) -> None:
        self.images: list[tuple] = []
        self.captions: list[tuple] = []
        self.phrases: list[tuple] = []
        self.boxes: list[tuple] = []
        self.chain_boxes: list[tuple] = []
        self.chains: list[tuple] = []

    def add(self, files: AnnotationFiles) -> None:
        """Parse one image's files and append its rows (all or nothing)."""
        image_id = files.image_id
        annotation = parse_annotation(files.xml, files.xml_source)
        check_boxes(annotation, files.xml_source)
        captions = parse_sentences(files.sentences, files.sentences_source)

        boxes, chain_boxes = [], []
        chain_flags: dict[int, list] = {}
        for obj in annotation.objects:
            if obj.box is not None:
                box_id = len(boxes)
                boxes.append((image_id, box_id, obj.box.x1, obj.box.y1, obj.box.x2, obj.box.y2))
                chain_boxes.extend((image_id, chain, box_id) for chain in obj.chain_ids)
            for chain in obj.chain_ids:
                flags = chain_flags.setdefault(chain, [0, False, False])
                flags[0] += obj.box is not None
                flags[1] |= obj.nobndbox
                flags[2] |= obj.scene
        chains_with_box = {chain for chain, (n_boxes, _, _) in chain_flags.items() if n_boxes}

        phrases = []
        for caption_index, caption in enumerate(captions):
            for phrase_index, mention in enumerate(caption.mentions):
                phrases.append(
                    (
                        image_id,
                        caption_index,
                        phrase_index,
                        mention.chain_id,
                        "/".join(mention.types),
                        mention.types[0],
                        mention.text,
                        mention.first_word,
                        mention.chain_id in chains_with_box,
                    )
                )
        self.images.append((image_id, annotation.width, annotation.height))
        self.captions.extend(
            (image_id, index, caption.text, len(caption.mentions))
            for index, caption in enumerate(captions)
        )
        self.phrases.extend(phrases)
        self.boxes.extend(boxes)
        self.chain_boxes.extend(chain_boxes)
        self.chains.extend(
            (image_id, chain, n_boxes, nobndbox, scene)
            for chain, (n_boxes, nobndbox, scene) in sorted(chain_flags.items())
        )


def _split_of_images(
    image_ids: set[str], split_lists: Iterable[SplitList], skip_bad: bool, skipped: list[Skipped]
) -> dict[str, str]:
    """Map image id -> split from the lists; an unknown id or an id in two lists is an error."""
    split_of: dict[str, str] = {}
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
            split_of[image_id] = split_list.split
    return split_of


def parse_dataset(
    annotation_files: Iterable[AnnotationFiles],
    split_lists: Iterable[SplitList],
    image_files: set[str],
    *,
    skip_bad_files: bool = False,
) -> ParsedDataset:
    """Parse every image's annotation files into the tables described in the module docstring.

    ``image_files`` holds the ids whose image file exists (it sets ``has_file``). A file that
    breaks the format raises :class:`~grounding.flickr30k.FormatError` naming it, or, with
    ``skip_bad_files``, leaves its image out and is listed in ``ParsedDataset.skipped``.
    """
    tables = _Tables()
    skipped: list[Skipped] = []
    for files in annotation_files:
        try:
            tables.add(files)
        except FormatError as error:
            if not skip_bad_files:
                raise
            skipped.append(Skipped(error.source, error.reason, error.line))

    images = pd.DataFrame(tables.images, columns=["image_id", "width", "height"])
    split_of = _split_of_images(set(images["image_id"]), split_lists, skip_bad_files, skipped)
    images["split"] = images["image_id"].map(split_of).fillna(NO_SPLIT)
    images["has_file"] = images["image_id"].isin(image_files)

    phrases = pd.DataFrame(
        tables.phrases,
        columns=[
            "image_id",
            "caption_index",
            "phrase_index",
            "chain_id",
            "types",
            "first_type",
            "text",
            "first_word",
            "has_box",
        ],
    )
    phrases.insert(0, "phrase_id", range(len(phrases)))
    boxes = pd.DataFrame(tables.boxes, columns=["image_id", "box_id", "x1", "y1", "x2", "y2"])
    boxes[["x1", "y1", "x2", "y2"]] = boxes[["x1", "y1", "x2", "y2"]].astype("float32")
    return ParsedDataset(
        images=images,
        captions=pd.DataFrame(
            tables.captions, columns=["image_id", "caption_index", "text", "n_phrases"]
        ),
        phrases=phrases,
        boxes=boxes,
        chain_boxes=pd.DataFrame(tables.chain_boxes, columns=["image_id", "chain_id", "box_id"]),
        chains=pd.DataFrame(
            tables.chains, columns=["image_id", "chain_id", "n_boxes", "nobndbox", "scene"]
        ),
        skipped=skipped,
    )


def read_split_list(text: str, split: str, source: str) -> SplitList:
    """A split list file's text (one image id per line) as a :class:`SplitList`."""
    return SplitList(split, source, [line.strip() for line in text.splitlines() if line.strip()])
