"""The Label Studio format: a project's JSON export <-> records, and tasks with predictions.

A project labelled with the shipped config (:data:`CONFIG`, ``labelstudio.xml``: a
``<Rectangle>`` per thing and a ``<TextArea perRegion="true">`` holding the phrases that name
it) exports one JSON list of tasks per project (``data.labelstudio``: one file per split)::

    [{"id": 7, "data": {"image": "/data/local-files/?d=1000092795.jpg"},
      "annotations": [{"id": 3, "was_cancelled": false, "ground_truth": false, "result": [
        {"id": "r1", "type": "rectangle", "from_name": "box", "to_name": "image",
         "original_width": 333, "original_height": 500,
         "value": {"x": 0.6, "y": 9.2, "width": 45.0, "height": 86.6, "rotation": 0}},
        {"id": "r1", "type": "textarea", "from_name": "phrase", "to_name": "image",
         "original_width": 333, "original_height": 500,
         "value": {"x": 0.6, "y": 9.2, "width": 45.0, "height": 86.6, "rotation": 0,
                   "text": ["Two young guys"]}}]}],
      "predictions": []}]

How the export is read:

- A task is one image. Its file name (relative to the dataset's images folder) is its
  ``data.file_name`` when it has one (the tasks :func:`write` makes do), else it comes from
  ``data.image``: the ``d`` of a local-files URL (``/data/local-files/?d=photos/b.jpg``, a
  path under ``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT``: make that folder the dataset's root
  and images folder, ``data.images: .``), the original name of an upload
  (``/data/upload/3/8f3a2b1c-b.jpg`` -> ``b.jpg``), else the URL's last part.
- The labels are the task's one submitted annotation; a task with several (several annotators)
  takes the one marked ground truth. ``predictions`` are not read: they are what a model
  proposed, not labels.
- A region is a ``rectangle`` (or ``rectanglelabels``) result and the ``textarea`` result with
  the same ``id``. Its box is converted once, here: ``x, y, width, height`` are percents of
  ``original_width`` x ``original_height``, so the canonical box is ``(x W / 100, y H / 100,
  (x + width) W / 100, (y + height) H / 100)``, rounded to a thousandth of a pixel (the
  percents written by :func:`write` read back to their pixels).
- Each distinct text of the regions is one phrase; a phrase typed on several regions names all
  their boxes (ANY-box). The caption is the phrases as a prompt (``"a dog . the red ball ."``);
  phrases carry no entity type.

Everything else is an error naming the file and the task (its ``id``): a task without a
submitted annotation (export only annotated tasks, or pass ``--skip-bad-files``), a cancelled
(skipped) task, several annotations none of which is ground truth, a rotated box, a box
without a phrase or a phrase without a box, a result of another type, two tasks of one image.

:func:`write` writes records as tasks whose ``predictions`` pre-annotate them for review.
"""

from __future__ import annotations

import json
import re
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from grounding.data.formats.grounded import (
    BadRecord,
    GroundedCaption,
    GroundedPhrase,
    SplitFiles,
    SplitFilesReader,
    Written,
    check_box,
    json_list,
    json_object,
    numbers,
    prompt,
    required,
    text,
    whole_number,
)
from grounding.data.records import Box, ImageRecord, Skipped
from grounding.errors import FormatError
from grounding.schemas import SPLITS

#: The labelling config of a phrase grounding project (package data).
CONFIG = Path(__file__).with_name("labelstudio.xml")
#: The config's names: the image's task data key (``$image``), the rectangle and the text tags.
IMAGE, BOX, PHRASE = "image", "box", "phrase"
BOX_TYPES = ("rectangle", "rectanglelabels")
PHRASE_TYPE = "textarea"
#: The task data key of an image's file name relative to the dataset's images folder.
FILE_NAME = "file_name"
#: How Label Studio serves a file under ``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT``.
LOCAL_FILES = "/data/local-files/"
#: The folder, under the document root, of the images of the tasks :func:`write` makes (it
#: must be a subfolder: Label Studio serves no file from the root itself).
IMAGES_FOLDER = "images"
#: Decimals of a pixel kept when percents become pixels.
PIXEL_DECIMALS = 3
#: ``model_version`` of the predictions :func:`write` gives.
MODEL_VERSION = "grounding convert"

_UPLOAD_PREFIX = re.compile(r"^[0-9a-f]{8}-")


@dataclass(frozen=True)
class Files(SplitFiles):
    """``data.labelstudio`` in ``params.yaml``: each split's file, relative to the root."""

    train: Path | None = Path("labelstudio_train.json")
    val: Path | None = Path("labelstudio_val.json")
    test: Path | None = Path("labelstudio_test.json")


class LabelStudioReader(SplitFilesReader):
    """The records of Label Studio JSON exports: ``files`` maps each split to its export.

    The files are read when the reader is made; iterating yields one
    :class:`~grounding.data.records.ImageRecord` per task, sorted by image id. A task that
    breaks the format raises :class:`FormatError` naming the file and the task, or, with
    ``skip_bad_files``, is left out and listed in :attr:`skipped`.
    """

    format_name = "Label Studio"

    def __init__(self, files: Mapping[str, Path], *, skip_bad_files: bool = False) -> None:
        self._task_of: dict[str, str] = {}  # file name -> where its task is
        super().__init__(files, skip_bad_files=skip_bad_files)

    def __iter__(self) -> Iterator[ImageRecord]:
        for image in self._images.in_order():
            yield image.record()

    def read_file(self, path: Path, split: str) -> None:
        try:
            data = path.read_bytes()
            content = json.loads(data.decode("utf-8").removeprefix("\ufeff"))
        except UnicodeDecodeError as error:
            line = data.count(b"\n", 0, error.start) + 1
            reason = f"not UTF-8 text ({error.reason} at byte {error.start})"
            raise FormatError(str(path), reason, line) from None
        except json.JSONDecodeError as error:
            raise FormatError(str(path), f"malformed JSON: {error.msg}", error.lineno) from None
        if not isinstance(content, list):
            raise FormatError(str(path), "not a Label Studio JSON export (a list of tasks)")
        for index, value in enumerate(content):
            where = _task_name(value, index)
            try:
                self._read_task(value, split, f"{path} {where}")
            except BadRecord as error:
                if not self.skip_bad_files:
                    raise FormatError(str(path), f"{where}: {error}") from None
                self.skipped.append(Skipped(str(path), f"{where}: {error}"))

    def _read_task(self, value: Any, split: str, where: str) -> None:
        task = json_object(value, "the task")
        data = json_object(required(task, "data"), "data")
        if FILE_NAME in data:
            file_name = text(data[FILE_NAME], FILE_NAME).strip("/")
            if not file_name:
                raise BadRecord(f"{FILE_NAME} is empty")
        else:
            file_name = file_name_of(text(required(data, IMAGE), IMAGE))
        if file_name in self._task_of:
            raise BadRecord(f"image {file_name} is also {self._task_of[file_name]}")
        (width, height), regions = _regions(_labels(task))
        image = self._images.get(file_name, width, height, split, where)
        phrases: dict[str, list[Hashable]] = {}
        for region_id, (box, texts) in regions.items():
            image.boxes[region_id] = box
            for phrase in texts:
                phrases.setdefault(phrase, []).append(region_id)
        caption, first_words = prompt(list(phrases))
        image.captions.append(
            GroundedCaption(
                caption,
                tuple(
                    GroundedPhrase(phrase, first_word, tuple(region_ids))
                    for (phrase, region_ids), first_word in zip(
                        phrases.items(), first_words, strict=True
                    )
                ),
            )
        )
        self._task_of[file_name] = where


def _task_name(value: Any, index: int) -> str:
    """How an error names a task: ``task 7`` (its id), else ``tasks[3]`` (its place)."""
    task_id = value.get("id") if isinstance(value, dict) else None
    if isinstance(task_id, int | str) and not isinstance(task_id, bool):
        return f"task {task_id}"
    return f"tasks[{index}]"


def file_name_of(url: str) -> str:
    """The image file name a task's ``data.image`` names (see the module docstring)."""
    parts = urlsplit(url)
    if parts.path == LOCAL_FILES or parts.path == LOCAL_FILES.rstrip("/"):
        names = parse_qs(parts.query).get("d", [])
        if len(names) != 1 or not names[0].strip("/"):
            raise BadRecord(f"image {url!r} is a local-files URL without one file (?d=...)")
        return names[0].strip("/")
    name = unquote(PurePosixPath(parts.path).name)
    if parts.path.startswith("/data/upload/"):
        name = _UPLOAD_PREFIX.sub("", name)
    if not name:
        raise BadRecord(f"image {url!r} names no file")
    return name


def _labels(task: dict[str, Any]) -> list[Any]:
    """The result of the task's one submitted annotation (or of its ground truth)."""
    annotations = [
        json_object(a, "the annotation")
        for a in json_list(task.get("annotations") or [], "annotations")
    ]
    submitted = [a for a in annotations if not a.get("was_cancelled")]
    if not submitted:
        raise BadRecord(
            "was skipped by its annotator" if annotations else "has no annotation (not labelled)"
        )
    if len(submitted) > 1:
        truth = [a for a in submitted if a.get("ground_truth")]
        if len(truth) != 1:
            raise BadRecord(
                f"has {len(submitted)} annotations and {len(truth)} marked ground truth: mark "
                "the one to train on as ground truth in Label Studio"
            )
        submitted = truth
    return json_list(required(submitted[0], "result"), "result")


def _regions(
    result: Sequence[Any],
) -> tuple[tuple[int, int], dict[str, tuple[Box, list[str]]]]:
    """The image size and each region's box and phrases, by region id in result order."""
    boxes: dict[str, Box] = {}
    texts: dict[str, list[str]] = {}
    size: tuple[int, int] | None = None
    for index, value in enumerate(result):
        try:
            item = json_object(value, "the item")
            kind = text(required(item, "type"), "type")
            region_id = text(required(item, "id"), "id")
            if kind not in (*BOX_TYPES, PHRASE_TYPE):
                raise BadRecord(
                    f"type {kind!r} is not a box ({', '.join(BOX_TYPES)}) or its phrase "
                    f"({PHRASE_TYPE}): label with {CONFIG.name}"
                )
            item_size = _image_size(item)
            if size is not None and item_size != size:
                raise BadRecord(
                    f"the image is {item_size[0]}x{item_size[1]} here but "
                    f"{size[0]}x{size[1]} in an earlier item"
                )
            size = item_size
            item_value = json_object(required(item, "value"), "value")
            if kind == PHRASE_TYPE:
                entries = json_list(required(item_value, "text"), "text")
                texts.setdefault(region_id, []).extend(
                    text(entry, "text").strip() for entry in entries
                )
            elif region_id in boxes:
                raise BadRecord(f"region {region_id!r} has two boxes")
            else:
                boxes[region_id] = percent_box(item_value, *item_size)
        except BadRecord as error:
            raise BadRecord(f"result[{index}]: {error}") from None
    if size is None:
        raise BadRecord("its annotation has no region (and so no image size)")
    regions = {}
    for region_id, box in boxes.items():
        phrases = list(dict.fromkeys(t for t in texts.get(region_id, []) if t))
        if not phrases:
            raise BadRecord(f"region {region_id!r} has a box but no phrase")
        regions[region_id] = (box, phrases)
    orphans = sorted(texts.keys() - boxes.keys())
    if orphans:
        raise BadRecord(f"region {orphans[0]!r} has a phrase but no box")
    return size, regions


def _image_size(item: dict[str, Any]) -> tuple[int, int]:
    width = whole_number(required(item, "original_width"), "original_width")
    height = whole_number(required(item, "original_height"), "original_height")
    if width < 1 or height < 1:
        raise BadRecord(f"image size {width}x{height} is empty")
    return width, height


def percent_box(value: dict[str, Any], width: int, height: int) -> Box:
    """The canonical box of a rectangle's ``value`` (``x, y, width, height`` in percent of the
    ``width x height`` image, as Label Studio stores it): 0-based absolute pixels, exclusive
    ends, rounded to :data:`PIXEL_DECIMALS`; :class:`BadRecord` for a rotated or bad box."""
    rotation = value.get("rotation") or 0
    if not isinstance(rotation, int | float) or rotation % 360:
        raise BadRecord(f"the box is rotated ({rotation!r} degrees): draw it upright")
    x, y, w, h = numbers(
        [value.get(key) for key in ("x", "y", "width", "height")], "value x, y, width, height"
    )
    return check_box(
        round(x * width / 100, PIXEL_DECIMALS),
        round(y * height / 100, PIXEL_DECIMALS),
        round((x + w) * width / 100, PIXEL_DECIMALS),
        round((y + h) * height / 100, PIXEL_DECIMALS),
        width,
        height,
    )


# --- writing ---------------------------------------------------------------------------------


def box_value(box: Box, width: int, height: int) -> dict[str, float]:
    """A rectangle's ``value`` for a canonical ``box`` in a ``width x height`` image: percents,
    the inverse of :func:`percent_box`."""
    return {
        "x": box.x1 * 100 / width,
        "y": box.y1 * 100 / height,
        "width": (box.x2 - box.x1) * 100 / width,
        "height": (box.y2 - box.y1) * 100 / height,
        "rotation": 0,
    }


def task(
    file_name: str,
    width: int,
    height: int,
    regions: Sequence[tuple[Box, Sequence[str]]],
    *,
    images: str = IMAGES_FOLDER,
    model_version: str = MODEL_VERSION,
    score: float | None = None,
) -> dict[str, Any]:
    """A Label Studio task of the image ``file_name`` (relative to the images folder, served as
    local files from ``images`` under the document root), pre-annotated with ``regions`` (each
    a box and the phrases that name it) as one prediction, which a reviewer corrects and
    submits; no prediction when there is no region."""
    result = []
    for index, (box, phrases) in enumerate(regions):
        common = {
            "id": f"b{index}",
            "to_name": IMAGE,
            "original_width": width,
            "original_height": height,
            "image_rotation": 0,
        }
        value = box_value(box, width, height)
        result.append({**common, "type": "rectangle", "from_name": BOX, "value": value})
        result.append(
            {
                **common,
                "type": PHRASE_TYPE,
                "from_name": PHRASE,
                "value": {**value, "text": list(phrases)},
            }
        )
    url = LOCAL_FILES + "?d=" + quote(f"{images.strip('/')}/{file_name}")
    prediction: dict[str, Any] = {"model_version": model_version, "result": result}
    if score is not None:
        prediction["score"] = score
    data = {IMAGE: url, FILE_NAME: file_name}
    return {"data": data, "predictions": [prediction] if result else []}


def write(records: Iterable[ImageRecord], *, images: str = IMAGES_FOLDER) -> Written:
    """Each split's JSON list of tasks, one per image (see :func:`task`: served from
    ``images`` under the document root), whose prediction holds a region per box with the
    distinct texts of the phrases that name it (in caption order).

    Left out, and counted in :attr:`Written.left_out`: images in no split, boxes that no phrase
    names (the config asks a phrase of every box), phrases without a box. An image without a
    phrase that has a box is a task without a prediction, to be labelled from scratch.
    """
    tasks: dict[str, list[dict[str, Any]]] = {split: [] for split in SPLITS}
    written = Written(texts={}, images=dict.fromkeys(SPLITS, 0))
    for record in records:
        if record.split is None:
            written.leave_out("images in no split")
            continue
        written.images[record.split] += 1
        boxes_of = {entity.entity_id: entity.box_ids for entity in record.entities}
        phrases_of: dict[int, list[str]] = {}
        for caption in record.captions:
            for phrase in caption.phrases:
                box_ids = boxes_of.get(phrase.entity_id, ())
                if not box_ids:
                    written.leave_out("phrases without a box")
                for box_id in box_ids:
                    if phrase.text not in phrases_of.setdefault(box_id, []):
                        phrases_of[box_id].append(phrase.text)
        written.leave_out("boxes that no phrase names", len(record.boxes) - len(phrases_of))
        regions = [(box, phrases_of[i]) for i, box in enumerate(record.boxes) if i in phrases_of]
        tasks[record.split].append(
            task(record.file_name, record.width, record.height, regions, images=images)
        )
    written.texts = {
        split: json.dumps(tasks[split], ensure_ascii=False, indent=1) + "\n" for split in SPLITS
    }
    return written
