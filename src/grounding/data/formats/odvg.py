"""The ODVG format: JSON Lines as Open-GroundingDino and MM-Grounding-DINO read and write them.

One JSON object a line, one file per split (``data.odvg``). A *grounding* record is one caption
of an image and its regions::

    {"filename": "1000092795.jpg", "height": 500, "width": 333,
     "grounding": {"caption": "Two young guys with shaggy hair look at their hands .",
                   "regions": [{"bbox": [2, 46, 152, 479], "phrase": "Two young guys",
                                "tokens_positive": [[0, 14]]}]}}

A *detection* record lists boxes by category, ``{"detection": {"instances": [{"bbox", "label",
"category"}]}}``: each distinct category becomes a phrase of a caption made of the categories
(``"person . dog ."``, the prompt the detectors train on), with the category as its type.

How the records are read, as the field writes them:

- Boxes ``bbox`` are ``[x1, y1, x2, y2]`` in absolute pixels of the original image, which is
  the package's canonical form: Open-GroundingDino's ``coco2odvg.py`` writes a COCO box as
  ``[x, y, x + w, y + h]``, and both projects' readers take the four numbers as they are. A
  region's ``bbox`` may also be a list of such boxes (MM-Grounding-DINO's ``goldg2odvg.py``
  gathers the boxes of one phrase). Converters from the Flickr30k XML disagree by a pixel:
  Open-GroundingDino's ``flickr30ke2odvg.py`` subtracts 1 from all four 1-based coordinates
  (so its boxes end one pixel short on the right and bottom), MM-Grounding-DINO's, made from
  MDETR's files, keeps their 1-based ``x1, y1``. Nothing in a file says which converter wrote
  it, so boxes are read as written.
- A phrase is placed in its caption by ``tokens_positive`` (character spans) when the region
  has them; regions with the same spans are one phrase with several boxes (ANY-box). Without
  spans, regions with the same ``phrase`` text in a caption are one phrase (as
  Open-GroundingDino's reader gives them one label), placed at the first caption word where
  the text starts (``first_word`` -1 when it is not in the caption). ``phrase`` may be a list of
  strings (joined by spaces). Phrases are in caption order.
- Several lines may name one image (one line per caption); they must agree on its size and
  split. The image id is the file name without its suffix.
- Two keys that ``grounding convert`` writes and other tools ignore: a region's ``box_id``, the
  box's index among its image's boxes, so that a box named on several lines is one box and the
  boxes keep their order (without it, boxes with the same coordinates are one box, in order of
  first appearance); and a record's ``other_boxes``, ``[{"bbox", "box_id"}]``, the image's
  boxes that no phrase names (candidates all the same).

Grounding records carry no entity types; records are otherwise as
:mod:`grounding.data.formats.grounded` builds them. :func:`write` writes grounding records.
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
    prompt,
    required,
    span_text,
    spans,
    text,
    whole_number,
)
from grounding.data.records import Box, ImageRecord, Skipped
from grounding.errors import FormatError
from grounding.schemas import SPLITS


@dataclass(frozen=True, order=True)
class _BoxId:
    """The key of a box that its file numbers (``box_id``)."""

    number: int


@dataclass
class _Phrase:
    text: str
    first_word: int
    order: int
    boxes: list[Hashable] = field(default_factory=list)


@dataclass(frozen=True)
class _Line:
    """One record, checked, before it joins its image."""

    file_name: str
    width: int
    height: int
    caption: GroundedCaption | None  # None: a detection record without instances
    boxes: dict[Hashable, Box]


@dataclass(frozen=True)
class Files(SplitFiles):
    """``data.odvg`` in ``params.yaml``: each split's file, relative to the dataset's root."""

    train: Path | None = Path("train.jsonl")
    val: Path | None = Path("val.jsonl")
    test: Path | None = Path("test.jsonl")


class OdvgReader(SplitFilesReader):
    """The records of an ODVG dataset: ``files`` maps each split to its JSON Lines file.

    The files are read when the reader is made (the lines of one image may lie anywhere);
    iterating yields one :class:`~grounding.data.records.ImageRecord` per image, sorted by
    image id. A line that breaks the format raises :class:`FormatError` naming the file and the
    line, or, with ``skip_bad_files``, is left out and listed in :attr:`skipped`.
    """

    format_name = "ODVG"

    def __iter__(self) -> Iterator[ImageRecord]:
        for image in self._images.in_order():
            yield image.record(_numbered_first(image.boxes))

    def read_file(self, path: Path, split: str) -> None:
        with path.open("rb") as handle:
            for number, raw in enumerate(handle, start=1):
                try:
                    self._read_line(raw, split, f"{path}:{number}")
                except BadRecord as error:
                    if not self.skip_bad_files:
                        raise FormatError(str(path), str(error), number) from None
                    self.skipped.append(Skipped(str(path), str(error), number))

    def _read_line(self, raw: bytes, split: str, where: str) -> None:
        try:
            line = raw.decode("utf-8").removeprefix("\ufeff")  # a byte order mark: ignored
        except UnicodeDecodeError as error:
            raise BadRecord(f"not UTF-8 text ({error.reason})") from None
        if not line.strip():
            return
        record = _parse_record(parse_json(line))
        image = self._images.get(record.file_name, record.width, record.height, split, where)
        _check_box_ids(image, record.boxes)
        for key, box in record.boxes.items():
            image.boxes.setdefault(key, box)
        if record.caption is not None:
            image.captions.append(record.caption)


def _parse_record(value: Any) -> _Line:
    """One line's JSON value, checked; :class:`BadRecord` saying what is wrong."""
    record = json_object(value, "the line")
    file_name = text(required(record, "filename"), "filename")
    if not file_name:
        raise BadRecord("filename is empty")
    width, height = image_size(record)
    if "grounding" in record:
        caption, boxes = _grounding(record["grounding"], width, height)
    elif "detection" in record:
        caption, boxes = _detection(record["detection"], width, height)
    else:
        raise BadRecord("the record has neither 'grounding' nor 'detection'")
    for index, other in enumerate(json_list(record.get("other_boxes") or [], "other_boxes")):
        try:
            _add_boxes(json_object(other, "the box"), width, height, boxes)
        except BadRecord as error:
            raise BadRecord(f"other_boxes[{index}]: {error}") from None
    return _Line(file_name, width, height, caption, boxes)


def _grounding(value: Any, width: int, height: int) -> tuple[GroundedCaption, dict[Hashable, Box]]:
    grounding = json_object(value, "grounding")
    caption = text(required(grounding, "caption"), "caption")
    words = CaptionWords(caption)
    boxes: dict[Hashable, Box] = {}
    phrases: dict[Hashable, _Phrase] = {}
    for index, region in enumerate(json_list(required(grounding, "regions"), "regions")):
        try:
            _add_region(json_object(region, "the region"), words, width, height, boxes, phrases)
        except BadRecord as error:
            raise BadRecord(f"regions[{index}]: {error}") from None
    ordered = sorted(phrases.values(), key=_caption_order)
    return GroundedCaption(
        caption, tuple(GroundedPhrase(p.text, p.first_word, tuple(p.boxes)) for p in ordered)
    ), boxes


def _add_region(
    region: dict[str, Any],
    words: CaptionWords,
    width: int,
    height: int,
    boxes: dict[Hashable, Box],
    phrases: dict[Hashable, _Phrase],
) -> None:
    keys = _add_boxes(region, width, height, boxes)
    if region.get("tokens_positive"):  # missing, null or []: placed by the phrase's text
        phrase_spans = spans(region["tokens_positive"], words, "tokens_positive")
        if phrase_spans not in phrases:  # its text is made once, however many regions name it
            phrases[phrase_spans] = _Phrase(
                span_text(words.caption, phrase_spans),
                words.words_before(phrase_spans[0][0]),
                len(phrases),
            )
        phrase = phrases[phrase_spans]
    else:
        phrase_text = _phrase_text(required(region, "phrase"))
        if not phrase_text:
            raise BadRecord("the phrase is empty")
        if phrase_text not in phrases:
            phrases[phrase_text] = _Phrase(phrase_text, words.locate(phrase_text), len(phrases))
        phrase = phrases[phrase_text]
    phrase.boxes.extend(keys)


def _add_boxes(
    item: dict[str, Any], width: int, height: int, boxes: dict[Hashable, Box]
) -> list[Hashable]:
    """Check the ``bbox`` (and ``box_id``) of a region or of an other box, add the boxes to
    ``boxes`` and return their keys."""
    item_boxes = [check_box(*numbers(b, "bbox"), width, height) for b in _boxes(item)]
    keys: list[Hashable] = list(item_boxes)
    if item.get("box_id") is not None:
        number = whole_number(item["box_id"], "box_id")
        if number < 0 or len(item_boxes) != 1:
            raise BadRecord("box_id must be a number >= 0 and go with a single bbox")
        keys = [_BoxId(number)]
        if boxes.get(keys[0], item_boxes[0]) != item_boxes[0]:
            raise BadRecord(f"box_id {number} is given two sets of coordinates")
    boxes.update(zip(keys, item_boxes, strict=True))
    return keys


def _boxes(region: dict[str, Any]) -> list[Any]:
    """A region's ``bbox``: one box, or a list of boxes."""
    value = required(region, "bbox")
    if isinstance(value, list) and value and all(isinstance(v, list) for v in value):
        return value
    return [value]


def _phrase_text(value: Any) -> str:
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return " ".join(v.strip() for v in value).strip()
    return text(value, "phrase").strip()


def _caption_order(phrase: _Phrase) -> tuple[float, int]:
    """Phrases in the order of their first word; those not in the caption last."""
    return (phrase.first_word if phrase.first_word >= 0 else float("inf"), phrase.order)


def _detection(
    value: Any, width: int, height: int
) -> tuple[GroundedCaption | None, dict[Hashable, Box]]:
    detection = json_object(value, "detection")
    boxes: dict[Hashable, Box] = {}
    by_category: dict[str, list[Hashable]] = {}
    for index, item in enumerate(json_list(required(detection, "instances"), "instances")):
        try:
            instance = json_object(item, "the instance")
            box = check_box(*numbers(required(instance, "bbox"), "bbox"), width, height)
            category = text(required(instance, "category"), "category").strip()
            if not category:
                raise BadRecord("the category is empty")
        except BadRecord as error:
            raise BadRecord(f"instances[{index}]: {error}") from None
        boxes[box] = box
        by_category.setdefault(category, []).append(box)
    if not by_category:
        return None, boxes
    caption, first_words = prompt(list(by_category))
    phrases = [
        GroundedPhrase(category, first_word, tuple(keys), (category,))
        for (category, keys), first_word in zip(by_category.items(), first_words, strict=True)
    ]
    return GroundedCaption(caption, tuple(phrases)), boxes


def _check_box_ids(image: PendingImage, boxes: Mapping[Hashable, Box]) -> None:
    for key, box in boxes.items():
        if isinstance(key, _BoxId) and image.boxes.get(key, box) != box:
            raise BadRecord(
                f"box_id {key.number} of image {image.file_name} has other coordinates on an "
                "earlier line"
            )


def _numbered_first(boxes: Mapping[Hashable, Box]) -> dict[Hashable, Box]:
    """The boxes numbered by ``box_id`` in that order, then the others as they came."""
    numbered = sorted(key for key in boxes if isinstance(key, _BoxId))
    others = [key for key in boxes if not isinstance(key, _BoxId)]
    return {key: boxes[key] for key in [*numbered, *others]}


# --- writing ---------------------------------------------------------------------------------


def write(records: Iterable[ImageRecord]) -> Written:
    """Each split's JSON Lines text: one grounding record per caption, one region per
    (phrase, box) with the phrase's ``tokens_positive`` and the box's ``box_id``.

    The boxes that no phrase names go to the image's first line, as ``other_boxes``. What ODVG
    cannot hold is counted in :attr:`Written.left_out`: images in no split or without a
    caption, phrases without a box. Entity types are not written (ODVG's grounding records have
    none).
    """
    lines: dict[str, list[str]] = {split: [] for split in SPLITS}
    written = Written(texts={}, images=dict.fromkeys(SPLITS, 0))
    for record in records:
        if record.split is None:
            written.leave_out("images in no split")
            continue
        if not record.captions:
            written.leave_out("images without a caption")
            continue
        written.images[record.split] += 1
        boxes_of = {entity.entity_id: entity.box_ids for entity in record.entities}
        named: set[int] = set()
        image_lines = []
        for caption in record.captions:
            regions = []
            words = CaptionWords(caption.text)
            for phrase in caption.phrases:
                box_ids = boxes_of.get(phrase.entity_id, ())
                if not box_ids:
                    written.leave_out("phrases without a box")
                    continue
                span = phrase_span(words, phrase)
                for box_id in box_ids:
                    box = record.boxes[box_id]
                    region: dict[str, Any] = {"bbox": _corners(box), "phrase": phrase.text}
                    if span is not None:
                        region["tokens_positive"] = [list(span)]
                    region["box_id"] = box_id
                    regions.append(region)
                named.update(box_ids)
            image_lines.append(
                {
                    "filename": record.file_name,
                    "height": record.height,
                    "width": record.width,
                    "grounding": {"caption": caption.text, "regions": regions},
                }
            )
        others = [
            {"bbox": _corners(box), "box_id": box_id}
            for box_id, box in enumerate(record.boxes)
            if box_id not in named
        ]
        if others:
            image_lines[0]["other_boxes"] = others
        lines[record.split] += [json.dumps(line, ensure_ascii=False) for line in image_lines]
    written.texts = {split: "".join(f"{line}\n" for line in lines[split]) for split in SPLITS}
    return written


def _corners(box: Box) -> list[int | float]:
    return [coordinate(v) for v in (box.x1, box.y1, box.x2, box.y2)]
