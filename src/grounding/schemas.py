"""The columns of every table the pipeline writes, in one place.

Each :class:`TableSchema` is used twice: by the code that builds the table (its column order)
and by the Great Expectations suite that checks it (the exact column set, the key that must be
unique, the columns that must not be null). Boxes are four numeric columns ``x1, y1, x2, y2``
in the canonical form of :mod:`grounding.boxes`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from grounding.boxes import BOX_COLUMNS
from grounding.errors import DataError

#: The splits a dataset may assign an image to, and the mark of an image in none.
SPLITS: tuple[str, ...] = ("train", "val", "test")
NO_SPLIT = "none"
#: The largest value of the tables' integer columns (int64): a reader refuses a larger id or
#: size where it reads it, naming the file and line, rather than fail when the table is written.
INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class TableSchema:
    """A table's name, its columns in order, and the columns whose values are unique together
    (empty: no key)."""

    name: str
    columns: tuple[str, ...]
    key: tuple[str, ...] = ()

    def extended(self, name: str, *columns: str) -> TableSchema:
        """This schema with ``columns`` appended, under another name."""
        return TableSchema(name, (*self.columns, *columns), self.key)


IMAGES = TableSchema(
    "images", ("image_id", "file_name", "width", "height", "split", "has_file"), ("image_id",)
)
CAPTIONS = TableSchema(
    "captions", ("image_id", "caption_index", "text", "n_phrases"), ("image_id", "caption_index")
)
PHRASES = TableSchema(
    "phrases",
    (
        "phrase_id",
        "image_id",
        "caption_index",
        "phrase_index",
        "chain_id",
        "types",
        "first_type",
        "text",
        "first_word",
        "has_box",
    ),
    ("phrase_id",),
)
BOXES = TableSchema("boxes", ("image_id", "box_id", *BOX_COLUMNS), ("image_id", "box_id"))
CHAIN_BOXES = TableSchema(
    "chain_boxes", ("image_id", "chain_id", "box_id"), ("image_id", "chain_id", "box_id")
)
CHAINS = TableSchema(
    "chains", ("image_id", "chain_id", "n_boxes", "nobndbox", "scene"), ("image_id", "chain_id")
)
#: The tables of the parse stage, in the order it writes them.
PARSED: tuple[TableSchema, ...] = (IMAGES, CAPTIONS, PHRASES, BOXES, CHAIN_BOXES, CHAINS)

CANDIDATES = TableSchema(
    "candidates", ("region_id", "image_id", *BOX_COLUMNS, "source"), ("region_id",)
)
GROUND_TRUTH = TableSchema("ground_truth", ("phrase_id", "image_id", *BOX_COLUMNS))
PAIRS = TableSchema(
    "pairs", ("phrase_id", "region_id", "image_id", "iou", "label"), ("phrase_id", "region_id")
)
#: The tables of the pair stage (its ``phrases`` are parse's, restricted to the paired ones).
PAIRED: tuple[TableSchema, ...] = (CANDIDATES, PHRASES, GROUND_TRUTH, PAIRS)

#: Scored test pairs (the report stage).
PREDICTIONS = PAIRS.extended("predictions", "score", "predicted")
#: Each paired phrase's row among the distinct phrase embeddings (the features stage).
PHRASE_ROWS = TableSchema("phrase_rows", ("phrase_id", "row"), ("phrase_id",))


@dataclass(frozen=True)
class FeaturesMeta:
    """How the features stage made its features, and their shapes: written beside the
    features, saved with every model trained on them, and what the grounder rebuilds its
    backbone and text encoder from.

    ``region_dim`` is the width of a region's row (visual channels, twice with ``context``,
    then the box geometry); ``regions`` and ``phrases`` count the rows.
    """

    backbone: str
    backbone_weights: str | None
    text_encoder: str
    image_size: int
    context: bool
    region_dim: int
    phrase_dim: int
    regions: int
    phrases: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> FeaturesMeta:
        """From :meth:`to_dict`'s output; :class:`DataError` naming what is missing."""
        names = [field.name for field in fields(cls)]
        missing = [name for name in names if name not in values]
        if missing:
            raise DataError(f"features metadata lacks {missing}: rerun the features stage")
        return cls(**{name: values[name] for name in names})
