"""Image files in, RGB images out: the one decoder of the package (the pipeline, predict and
the server all read images through it), with every failure a :class:`DataError` naming the
file or request row."""

from __future__ import annotations

import io as bytes_io
import os
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, UnidentifiedImageError

from grounding.errors import DataError

if TYPE_CHECKING:
    import pandas as pd


def read_image(path: Path) -> Image.Image:
    """Load an image file as RGB; a missing, truncated, huge or non-image file raises
    :class:`DataError` naming it."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise DataError(f"{path}: image file missing") from None
    except IsADirectoryError:
        raise DataError(f"{path}: a folder, not an image file") from None
    except OSError as error:
        raise DataError(f"{path}: unreadable image ({error})") from None
    return decode_image(data, str(path))


def decode_image(data: bytes, name: str) -> Image.Image:
    """An image file's bytes as an RGB image; :class:`DataError` starting with ``name`` (a
    path, or ``row 3`` of a request) if they are not a readable image."""
    try:
        with Image.open(bytes_io.BytesIO(data)) as image:
            return image.convert("RGB")
    except Image.DecompressionBombError as error:
        raise DataError(f"{name}: image too large ({error})") from None
    except (UnidentifiedImageError, OSError) as error:
        raise DataError(f"{name}: unreadable image ({error})") from None


def present_files(folder: Path) -> set[str]:
    """The files below ``folder`` as paths relative to it (``a/b.jpg``); empty if the folder
    does not exist."""
    found: set[str] = set()
    for directory, _, names in os.walk(folder):
        relative = Path(directory).relative_to(folder)
        found.update((relative / name).as_posix() for name in names)
    return found


class ImageFolder:
    """The images of a dataset by id: ``folder / file_name`` of the ``images`` table's row
    (``image_id, file_name``), read with :func:`read_image`."""

    def __init__(self, folder: Path, images: pd.DataFrame) -> None:
        self.folder = folder
        self._file_of = dict(zip(images["image_id"], images["file_name"], strict=True))

    def path(self, image_id: str) -> Path:
        return self.folder / self._file_of[image_id]

    def __call__(self, image_id: str) -> Image.Image:
        return read_image(self.path(image_id))
