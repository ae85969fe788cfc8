"""Records -> the parse stage's tables, the same way for every dataset format.

The tables (all keyed by ``image_id``, a string; columns in :mod:`grounding.schemas`):

- ``images``: ``image_id, file_name, width, height, split, has_file`` (``split`` is
  ``train``, ``val``, ``test`` or ``none``);
- ``captions``: ``image_id, caption_index, text, n_phrases`` (plain text);
- ``phrases``: ``phrase_id, image_id, caption_index, phrase_index, chain_id, types,
  first_type, text, first_word, has_box`` -- every phrase; ``chain_id`` is its entity,
  ``types`` is ``/``-joined (``vehicles/scene``; empty where the format has none),
  ``has_box`` says whether its entity has a box;
- ``boxes``: ``image_id, box_id, x1, y1, x2, y2`` -- every annotated box, canonical form;
- ``chain_boxes``: ``image_id, chain_id, box_id`` -- the many-to-many link between entities
  and boxes (a box shared by two chains has two rows, a chain with three boxes three);
- ``chains``: ``image_id, chain_id, n_boxes, nobndbox, scene`` -- every entity.

A phrase whose chain its image's annotation never names (no box, and not flagged as a no-box
or scene object) has no row in ``chains`` and ``has_box`` False, like a no-box phrase, and is
counted as ``phrases_with_unknown_chain``: the official annotations have none, so one is more
likely a mistyped chain id than a phrase without a box.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from grounding.boxes import BOX_COLUMNS
from grounding.data.records import NOT_VISUAL, ImageRecord, Skipped
from grounding.schemas import (
    BOXES,
    CAPTIONS,
    CHAIN_BOXES,
    CHAINS,
    IMAGES,
    NO_SPLIT,
    PARSED,
    PHRASES,
    SPLITS,
    TableSchema,
)


@dataclass
class ParsedDataset:
    """The parse stage's tables and what the reader left out."""

    images: pd.DataFrame
    captions: pd.DataFrame
    phrases: pd.DataFrame
    boxes: pd.DataFrame
    chain_boxes: pd.DataFrame
    chains: pd.DataFrame
    skipped: list[Skipped] = field(default_factory=list)
    duplicate_split_ids: list[Skipped] = field(default_factory=list)

    def tables(self) -> dict[str, pd.DataFrame]:
        """The tables by name (``images``, ``captions``, ...)."""
        return {schema.name: getattr(self, schema.name) for schema in PARSED}

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
            "duplicate_split_ids": len(self.duplicate_split_ids),
            "phrases_with_unknown_chain": int(self._unknown_chain().sum()),
            **{f"images_{split}": int((self.images["split"] == split).sum()) for split in SPLITS},
            f"images_{NO_SPLIT}": int((self.images["split"] == NO_SPLIT).sum()),
        }

    def examples(self, limit: int = 10) -> dict[str, list[dict]]:
        """Up to ``limit`` of what the counts ``duplicate_split_ids`` and
        ``phrases_with_unknown_chain`` counted: the split list lines (``source, reason,
        line``) and the phrases (``image_id, caption_index, chain_id, text``)."""
        phrases = self.phrases[self._unknown_chain()].head(limit)
        columns = ["image_id", "caption_index", "chain_id", "text"]
        return {
            "duplicate_split_ids": [vars(line) for line in self.duplicate_split_ids[:limit]],
            "phrases_with_unknown_chain": phrases[columns].to_dict("records"),
        }

    def _unknown_chain(self) -> pd.Series:
        """Per phrase: its chain is not visual's and has no row in ``chains``."""
        known = pd.MultiIndex.from_frame(self.chains[["image_id", "chain_id"]])
        named = pd.MultiIndex.from_frame(self.phrases[["image_id", "chain_id"]]).isin(known)
        return pd.Series(
            ~named & (self.phrases["chain_id"] != NOT_VISUAL).to_numpy(), index=self.phrases.index
        )


def build_tables(
    records: Iterable[ImageRecord],
    present_files: set[str],
    skipped: list[Skipped] | None = None,
    duplicate_split_ids: list[Skipped] | None = None,
) -> ParsedDataset:
    """The tables of ``records``. ``present_files`` holds the file names (relative to the
    images folder) that exist: it sets ``has_file``. ``skipped`` is what the reader left out
    and ``duplicate_split_ids`` the split list lines it counted once (both read after
    ``records`` is exhausted, since a reader fills them while it is iterated)."""
    rows: dict[str, list[tuple]] = {schema.name: [] for schema in PARSED}
    for record in records:
        _add(rows, record)
    images = _frame(IMAGES, rows["images"])
    images["has_file"] = images["file_name"].isin(present_files)
    phrases = _frame(PHRASES, rows["phrases"])
    phrases["phrase_id"] = np.arange(len(phrases), dtype=np.int64)
    boxes = _frame(BOXES, rows["boxes"])
    boxes[BOX_COLUMNS] = boxes[BOX_COLUMNS].astype("float32")
    return ParsedDataset(
        images=images,
        captions=_frame(CAPTIONS, rows["captions"]),
        phrases=phrases,
        boxes=boxes,
        chain_boxes=_frame(CHAIN_BOXES, rows["chain_boxes"]),
        chains=_frame(CHAINS, rows["chains"]),
        skipped=list(skipped or []),
        duplicate_split_ids=list(duplicate_split_ids or []),
    )


def _frame(schema: TableSchema, rows: list[tuple]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=list(schema.columns))


def _add(rows: dict[str, list[tuple]], record: ImageRecord) -> None:
    image_id = record.image_id
    split = record.split if record.split is not None else NO_SPLIT
    rows["images"].append((image_id, record.file_name, record.width, record.height, split, False))
    rows["boxes"].extend(
        (image_id, box_id, box.x1, box.y1, box.x2, box.y2)
        for box_id, box in enumerate(record.boxes)
    )
    with_box = set()
    for entity in sorted(record.entities, key=lambda e: e.entity_id):
        rows["chain_boxes"].extend((image_id, entity.entity_id, b) for b in entity.box_ids)
        rows["chains"].append(
            (image_id, entity.entity_id, len(entity.box_ids), entity.nobndbox, entity.scene)
        )
        if entity.box_ids:
            with_box.add(entity.entity_id)
    for caption_index, caption in enumerate(record.captions):
        rows["captions"].append((image_id, caption_index, caption.text, len(caption.phrases)))
        rows["phrases"].extend(
            (
                0,  # phrase_id: numbered over the whole dataset at the end
                image_id,
                caption_index,
                phrase_index,
                phrase.entity_id,
                "/".join(phrase.types),
                phrase.types[0] if phrase.types else "",
                phrase.text,
                phrase.first_word,
                phrase.entity_id in with_box,
            )
            for phrase_index, phrase in enumerate(caption.phrases)
        )
