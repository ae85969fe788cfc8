"""Many images through one loaded grounder: each image's answer as a plain record, a bad image
a :class:`Skipped` item instead of an error, so that one broken file never stops a batch.

Reading and writing stay with the caller: :func:`ground_images` takes the image reader (a
``path -> image`` function, :func:`grounding.io.read_image` in ``grounding predict``) and
yields results in the order of the paths.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from PIL import Image

from grounding.candidates import Propose
from grounding.data.formats import labelstudio
from grounding.data.records import Box
from grounding.errors import DataError
from grounding.inference.grounder import Grounder, Grounding


@dataclass(frozen=True)
class ImageGrounding:
    """One image's answer: its ``path``, ``size`` ``(width, height)`` in pixels as grounded
    (upright), the ``threshold`` that decided ``above_threshold``, each phrase's groundings,
    and the ``image`` itself (for a picture; not part of the record)."""

    path: Path
    size: tuple[int, int]
    threshold: float
    groundings: list[Grounding]
    image: Image.Image

    def record(self, model: Any) -> dict[str, Any]:
        """The JSON Lines record of this image: the ``model`` that grounded it (its
        ``Grounder.model_info()``: where it came from, what it was trained on), the image's
        path and size, the threshold and per phrase its boxes as integer pixels
        ``[x1, y1, x2, y2]`` (rounded) with their scores."""
        return {
            "model": model,
            "image": str(self.path),
            "size": list(self.size),
            "threshold": self.threshold,
            "phrases": [
                {
                    "phrase": grounding.phrase,
                    "boxes": [
                        {
                            "box": [round(value) for value in found.box],
                            "score": found.score,
                            "above_threshold": found.above_threshold,
                        }
                        for found in grounding.boxes
                    ],
                    "reason": grounding.reason,
                }
                for grounding in self.groundings
            ],
        }

    def labelstudio_task(self, root: Path, *, model_version: str) -> dict[str, Any]:
        """This image as a Label Studio task pre-annotated with the answer, for a reviewer to
        correct: each box above the threshold once, with every phrase that chose it as its
        text; the prediction's score is the weakest of those boxes' (Label Studio sorts on it).
        The image is served from Label Studio's local files as its path relative to ``root``
        (its ``LOCAL_FILES_DOCUMENT_ROOT``); :class:`DataError` if it lies outside."""
        try:
            relative = self.path.resolve().relative_to(root.resolve())
        except ValueError:
            raise DataError(f"{self.path}: not inside the Label Studio root {root}") from None
        chosen: dict[tuple[int, ...], list[str]] = {}
        scores = []
        for grounding in self.groundings:
            for found in grounding.boxes:
                if found.above_threshold:
                    chosen.setdefault(tuple(found.box), []).append(grounding.phrase)
                    scores.append(found.score)
        width, height = self.size
        return labelstudio.task(
            relative.name,
            width,
            height,
            [(Box(*box), phrases) for box, phrases in chosen.items()],
            images=relative.parent.as_posix(),
            model_version=model_version,
            score=min(scores) if scores else None,
        )


@dataclass(frozen=True)
class Skipped:
    """An image that could not be grounded: its ``path`` and the one-line ``error``."""

    path: Path
    error: str


def with_threshold(groundings: Sequence[Grounding], threshold: float) -> list[Grounding]:
    """``groundings`` with every box's ``above_threshold`` decided by ``threshold`` instead of
    the grounder's (scores unchanged)."""
    return [
        replace(
            grounding,
            boxes=[
                replace(found, above_threshold=found.score >= threshold)
                for found in grounding.boxes
            ],
        )
        for grounding in groundings
    ]


def check_threshold(threshold: float) -> float:
    """``threshold`` if it is a probability in ``[0, 1]``; :class:`DataError` otherwise."""
    if not 0.0 <= threshold <= 1.0:
        raise DataError(f"threshold {threshold} is not between 0 and 1")
    return float(threshold)


def ground_images(
    grounder: Grounder,
    paths: Iterable[Path],
    phrases: Sequence[str],
    *,
    read: Callable[[Path], Image.Image],
    top_k: int = 1,
    threshold: float | None = None,
    proposals: Propose | None = None,
) -> Iterator[ImageGrounding | Skipped]:
    """Ground ``phrases`` in each image of ``paths`` (read with ``read``), in order: an
    :class:`ImageGrounding`, or a :class:`Skipped` with the message of the
    :class:`DataError` that reading or grounding it raised (a missing, unreadable, too small
    or too large image). ``threshold`` (default: the grounder's) decides ``above_threshold``;
    ``proposals`` computes or fetches each image's candidate boxes (default: the grounder's
    generator, uncached)."""
    threshold = grounder.threshold if threshold is None else check_threshold(threshold)
    for path in paths:
        try:
            image = read(path)
            found = grounder.ground(image, phrases, top_k=top_k, proposals=proposals)
        except DataError as error:
            message = str(error)
            yield Skipped(path, message if message.startswith(str(path)) else f"{path}: {message}")
            continue
        yield ImageGrounding(path, image.size, threshold, with_threshold(found, threshold), image)


def picture_names(paths: Sequence[Path], suffix: str = ".png") -> dict[Path, str]:
    """A file name for each image's picture, unique within one folder: the image's stem with
    ``suffix`` (``a.jpg`` -> ``a.png``), ``-2``, ``-3``, ... added to a stem seen before
    (``x/a.jpg`` and ``y/a.jpg`` -> ``a.png``, ``a-2.png``)."""
    names: dict[Path, str] = {}
    taken: set[str] = set()
    for path in paths:
        name, number = f"{path.stem}{suffix}", 1
        while name.lower() in taken:
            number += 1
            name = f"{path.stem}-{number}{suffix}"
        taken.add(name.lower())
        names[path] = name
    return names
