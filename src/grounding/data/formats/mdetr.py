"""The MDETR format: the COCO-style grounding files of MDETR, GLIP and mmdetection.

One JSON file per split (``data.mdetr``), e.g. MDETR's ``final_flickr_separateGT_train.json``
or ``final_refcoco_val.json``. Each ``images[]`` entry is one caption of a photo::

    {"id": 0, "file_name": "1000092795.jpg", "height": "500", "width": "333",
     "caption": "Two young guys with shaggy hair look at their hands .",
     "tokens_positive_eval": [[[0, 14]], [[20, 31]]], "sentence_id": 0,
     "original_img_id": 1000092795}

and each ``annotations[]`` entry one box of a caption: ``{"image_id": 0, "bbox": [x, y, w, h],
"tokens_positive": [[0, 14]], "category_id": 1, ...}``.

How the files are read, as MDETR's own loader and evaluator read them:

- The captions of one photo are the entries with the same ``file_name`` (which
  ``original_img_id`` or ``original_id`` also group); they form one image record, whose id
  is the file name without its suffix, as in every format. The entries must agree on the
  photo's size (``height``/``width`` may be numbers or strings). Captions keep their order in
  ``images[]``.
- Boxes are COCO's ``[x, y, w, h]``: the canonical box is ``(x, y, x + w, y + h)``, which MDETR
  clips to the image. One exception: MDETR's Flickr30k files (entries with ``"dataset_name":
  "flickr"``, written by its ``flickr_combined.py``) copy the XML's 1-based ``xmin, ymin`` into
  ``x, y`` and ``xmax - xmin`` into ``w``, so their box is ``(x - 1, y - 1, x + w, y + h)``:
  exactly the box the Flickr30k reader makes of the XML. The annotations of one photo's
  captions repeat its boxes; equal boxes are one box, in order of first appearance in
  ``annotations[]``.
- Phrases are caption spans. Each ``tokens_positive_eval`` item (a list of spans) is one
  phrase, the phrases MDETR evaluates; an annotation's box belongs to every such phrase whose
  spans are among its ``tokens_positive``, so a phrase named by several annotations has several
  boxes (ANY-box) and one without an annotation has none. The spans of an annotation that no
  evaluated phrase takes are one more phrase (the only phrases of files without
  ``tokens_positive_eval``, such as the RefCOCO ones, where they mark the referring
  expression's head noun). An annotation with no ``tokens_positive`` is a box of the photo
  that no phrase names. Phrases are in caption order.
- ``category_id``, ``phrase_ids``, ``sentence_id``, ``iscrowd`` are not read: phrases carry no
  entity type.

:func:`write` writes canonical COCO boxes (and no ``dataset_name``).
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grounding.data.formats.grounded import (
    BadRecord,
    CaptionWords,
    GroundedCaption,
    GroundedPhrase,
    PendingImage,
    SplitFiles,
    SplitFilesReader,
    Written,
    check_box,
    coordinate,
    image_size,
    json_list,
    json_object,
    numbers,
    parse_json,
    phrase_span,
    required,
    shown,
    span_text,
    spans,
    text,
)
from grounding.data.records import Box, ImageRecord, Skipped
from grounding.errors import FormatError
from grounding.schemas import SPLITS

#: ``dataset_name`` of the files whose ``x, y`` are the Flickr30k XML's 1-based pixel indices.
ONE_BASED_DATASETS: tuple[str, ...] = ("flickr",)
#: The one category :func:`write` gives every box (MDETR's own Flickr30k files do the same).
CATEGORIES = ({"supercategory": "object", "id": 1, "name": "object"},)

Spans = tuple[tuple[int, int], ...]


@dataclass
class _Entry:
    """One ``images[]`` entry: a caption of a photo (its words), its evaluated phrases, its
    boxes."""

    image: PendingImage
    words: CaptionWords
    one_based: bool
    evaluated: tuple[Spans, ...]
    annotations: list[tuple[Box, Spans]] = field(default_factory=list)

    def grounded(self) -> GroundedCaption:
        """The caption with its phrases (see the module docstring), in caption order.

        The evaluated phrases are indexed by their first span, so an annotation is matched
        against the phrases that start with one of its spans, not against every phrase."""
        boxes: dict[Spans, list[Hashable]] = {phrase: [] for phrase in self.evaluated}
        starting_with: dict[tuple[int, int], list[Spans]] = {}
        for phrase in self.evaluated:
            starting_with.setdefault(phrase[0], []).append(phrase)
        for box, named in self.annotations:
            taken: set[tuple[int, int]] = set()
            named_set = set(named)
            for span in named_set:
                for phrase in starting_with.get(span, ()):
                    if named_set.issuperset(phrase):
                        boxes[phrase].append(box)
                        taken.update(phrase)
            rest = tuple(span for span in named if span not in taken)
            if rest:
                boxes.setdefault(rest, []).append(box)
        caption = self.words.caption
        phrases = [
            GroundedPhrase(
                span_text(caption, phrase), self.words.words_before(phrase[0][0]), tuple(b)
            )
            for phrase, b in sorted(boxes.items(), key=lambda item: item[0][0])
        ]
        return GroundedCaption(caption, tuple(phrases))


@dataclass(frozen=True)
class Files(SplitFiles):
    """``data.mdetr`` in ``params.yaml``: each split's file, relative to the dataset's root."""

    train: Path | None = Path("final_flickr_separateGT_train.json")
    val: Path | None = Path("final_flickr_separateGT_val.json")
    test: Path | None = Path("final_flickr_separateGT_test.json")


class MdetrReader(SplitFilesReader):
    """The records of an MDETR-style dataset: ``files`` maps each split to its JSON file.

    The files are read when the reader is made; iterating yields one
    :class:`~grounding.data.records.ImageRecord` per photo, sorted by image id. A record that
    breaks the format raises :class:`FormatError` naming the file and the record
    (``images[3]``, ``annotations[17]``), or, with ``skip_bad_files``, is left out and listed
    in :attr:`skipped` (with the annotations of a left-out caption).
    """

    format_name = "MDETR"

    def __init__(self, files: Mapping[str, Path], *, skip_bad_files: bool = False) -> None:
        self._entries: list[_Entry] = []
        super().__init__(files, skip_bad_files=skip_bad_files)
        for entry in self._entries:
            entry.image.captions.append(entry.grounded())

    def __iter__(self) -> Iterator[ImageRecord]:
        for image in self._images.in_order():
            yield image.record()

    def read_file(self, path: Path, split: str) -> None:
        try:
            top = self._top(path)
            images = json_list(required(top, "images"), "images")
            annotations = json_list(required(top, "annotations"), "annotations")
        except FormatError as error:
            self._bad(error.source, error.reason, error.line)
            return
        except BadRecord as error:
            self._bad(str(path), str(error))
            return
        entries: dict[Hashable, _Entry] = {}
        left_out: set[Hashable] = set()
        for index, value in enumerate(images):
            where = f"images[{index}]"
            try:
                entry_id, entry = self._entry(value, split, f"{path} {where}", entries)
            except BadRecord as error:
                self._bad(str(path), f"{where}: {error}")
                if isinstance(value, dict) and isinstance(value.get("id"), int | str):
                    left_out.add(value["id"])
                continue
            entries[entry_id] = entry
            self._entries.append(entry)
        for index, value in enumerate(annotations):
            where = f"annotations[{index}]"
            try:
                annotation = json_object(value, "the annotation")
                image_id = required(annotation, "image_id")
                if not isinstance(image_id, int | str):
                    raise BadRecord(f"image_id is not a number or a string: {shown(image_id)}")
                if image_id in left_out:
                    self.skipped.append(
                        Skipped(
                            str(path),
                            f"{where}: its images[] entry (id {shown(image_id)}) is left out",
                        )
                    )
                    continue
                if image_id not in entries:
                    raise BadRecord(
                        f"image_id {shown(image_id)} is not the id of an images[] entry"
                    )
                entry = entries[image_id]
                box, named = _annotation(annotation, entry)
            except BadRecord as error:
                self._bad(str(path), f"{where}: {error}")
                continue
            entry.annotations.append((box, named))
            entry.image.boxes.setdefault(box, box)

    def _entry(
        self, value: Any, split: str, where: str, earlier: Mapping[Hashable, _Entry]
    ) -> tuple[Hashable, _Entry]:
        """One ``images[]`` entry, checked, its photo made or found; ``earlier``: the file's
        earlier entries by id."""
        entry = json_object(value, "the entry")
        entry_id = required(entry, "id")
        if not isinstance(entry_id, int | str) or isinstance(entry_id, bool):
            raise BadRecord(f"id is not a number or a string: {shown(entry_id)}")
        if entry_id in earlier:
            raise BadRecord(f"id {shown(entry_id)} is the id of an earlier entry")
        file_name = text(required(entry, "file_name"), "file_name")
        if not file_name:
            raise BadRecord("file_name is empty")
        width, height = image_size(entry)
        words = CaptionWords(text(required(entry, "caption"), "caption"))
        evaluated: dict[Spans, None] = {}  # in order, each once
        for index, phrase in enumerate(
            json_list(entry.get("tokens_positive_eval") or [], "tokens_positive_eval")
        ):
            phrase_spans = spans(phrase, words, f"tokens_positive_eval[{index}]")
            if not phrase_spans:
                raise BadRecord(f"tokens_positive_eval[{index}] has no span")
            evaluated[phrase_spans] = None
        image = self._images.get(file_name, width, height, split, where)
        one_based = entry.get("dataset_name") in ONE_BASED_DATASETS
        return entry_id, _Entry(image, words, one_based, tuple(evaluated))

    def _top(self, path: Path) -> dict[str, Any]:
        """The file's top JSON object; :class:`FormatError` naming the line where one is
        known, :class:`BadRecord` otherwise (nested too deeply, a number too long, ...)."""
        data = path.read_bytes()
        try:
            text = data.decode("utf-8").removeprefix("\ufeff")
        except UnicodeDecodeError as error:
            line = data.count(b"\n", 0, error.start) + 1
            reason = f"not UTF-8 text ({error.reason} at byte {error.start})"
            raise FormatError(str(path), reason, line) from None
        try:
            content = json.loads(text)
        except json.JSONDecodeError as error:
            raise FormatError(str(path), f"malformed JSON: {error.msg}", error.lineno) from None
        except (RecursionError, ValueError):
            content = parse_json(text)  # raises BadRecord saying why
        return json_object(content, "the file")

    def _bad(self, source: str, reason: str, line: int | None = None) -> None:
        """A bad record (or a whole file) of ``source``: an error, or left out and listed with
        ``skip_bad_files``."""
        if not self.skip_bad_files:
            raise FormatError(source, reason, line)
        self.skipped.append(Skipped(source, reason, line))


def _annotation(annotation: dict[str, Any], entry: _Entry) -> tuple[Box, Spans]:
    x, y, w, h = numbers(required(annotation, "bbox"), "bbox [x, y, w, h]")
    x1, y1 = (x - 1, y - 1) if entry.one_based else (x, y)
    box = check_box(x1, y1, x + w, y + h, entry.image.width, entry.image.height)
    named = spans(required(annotation, "tokens_positive"), entry.words, "tokens_positive")
    return box, named


# --- writing ---------------------------------------------------------------------------------


def write(records: Iterable[ImageRecord]) -> Written:
    """Each split's JSON: an ``images[]`` entry per caption, whose ``tokens_positive_eval``
    holds every phrase of the caption (a phrase without a box has no annotation), and an
    ``annotations[]`` entry per (caption, box) naming the caption's phrases of that box.

    Annotations are listed box by box, so that a reader keeps the image's box order; a box
    that no phrase names is an annotation of the image's first caption with no
    ``tokens_positive``. ``sentence_id`` is the caption's index, ``original_img_id`` the image
    id (a number when it is one). Left out, and counted in :attr:`Written.left_out`: images in
    no split or without a caption, phrases that are not where their first word says (they have
    no span).
    """
    files = {split: {"images": [], "annotations": []} for split in SPLITS}
    written = Written(texts={}, images=dict.fromkeys(SPLITS, 0))
    for record in records:
        if record.split is None:
            written.leave_out("images in no split")
            continue
        if not record.captions:
            written.leave_out("images without a caption")
            continue
        written.images[record.split] += 1
        images, annotations = files[record.split]["images"], files[record.split]["annotations"]
        boxes_of = {entity.entity_id: entity.box_ids for entity in record.entities}
        named: dict[int, dict[int, list[list[int]]]] = {}  # box -> entry id -> spans
        first_entry = len(images)
        for index, caption in enumerate(record.captions):
            entry_id = len(images)
            evaluated = []
            words = CaptionWords(caption.text)
            for phrase in caption.phrases:
                span = phrase_span(words, phrase)
                if span is None:
                    written.leave_out("phrases not found in their caption")
                    continue
                evaluated.append([list(span)])
                for box_id in boxes_of.get(phrase.entity_id, ()):
                    named.setdefault(box_id, {}).setdefault(entry_id, []).append(list(span))
            images.append(
                {
                    "id": entry_id,
                    "file_name": record.file_name,
                    "height": record.height,
                    "width": record.width,
                    "caption": caption.text,
                    "tokens_positive_eval": evaluated,
                    "sentence_id": index,
                    "original_img_id": (
                        int(record.image_id) if record.image_id.isdigit() else record.image_id
                    ),
                }
            )
        for box_id, box in enumerate(record.boxes):
            for entry_id, box_spans in named.get(box_id, {first_entry: []}).items():
                w, h = box.x2 - box.x1, box.y2 - box.y1
                annotations.append(
                    {
                        "id": len(annotations),
                        "image_id": entry_id,
                        "bbox": [coordinate(v) for v in (box.x1, box.y1, w, h)],
                        "area": coordinate(w * h),
                        "iscrowd": 0,
                        "category_id": CATEGORIES[0]["id"],
                        "tokens_positive": box_spans,
                    }
                )
    written.texts = {
        split: json.dumps({**content, "categories": CATEGORIES}, ensure_ascii=False) + "\n"
        for split, content in files.items()
    }
    return written
