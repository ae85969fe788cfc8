"""Image files in, RGB images out: the one decoder of the package (the pipeline, predict and
the server all read images through it), with every failure a :class:`DataError` naming the
file or request row.

An image is decoded as a viewer shows it: its EXIF orientation applied (the pixels turned, the
tag's value kept in ``image.info["orientation"]``), and 16-bit greyscale scaled to 8 bits by
its value range (``>> 8``), not clipped. The pixel count is checked from the file's header,
before any pixel is decoded; a file is read only when it is a regular file of at most
:data:`MAX_IMAGE_BYTES`, and may be decoded no larger than a model needs (``max_side``).
"""

from __future__ import annotations

import io as bytes_io
import math
import os
import re
import stat
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from grounding.errors import DataError

if TYPE_CHECKING:
    import pandas as pd

#: The most pixels an image may have: larger ones are almost certainly a mistake (or an
#: attack). Below Pillow's own bomb limit (``Image.MAX_IMAGE_PIXELS``, 89 Mpx), so Pillow
#: never decodes an image this refuses.
MAX_IMAGE_PIXELS = 60_000_000
#: The smallest image side a grounder accepts (the backbone's stride is 32 pixels): an image
#: decoded shrunk (``max_side``) keeps at least this many pixels on each side.
MIN_IMAGE_SIDE = 32
#: The most bytes an image file may have: 4 bytes a pixel of the largest image accepted (an
#: uncompressed RGBA file), and room for its header and metadata.
MAX_IMAGE_BYTES = 4 * MAX_IMAGE_PIXELS + 16_000_000
#: Modes that ``Image.reduce`` takes (others are made RGB first).
_REDUCIBLE = frozenset({"L", "LA", "La", "RGB", "RGBA", "RGBa", "I", "F"})
#: How Pillow names a stream in its messages.
_STREAM = re.compile(r" ?<_io\.\w+ (?:object at 0x[0-9a-f]+|name=[^>]*)>")
#: The EXIF tag of the orientation, and the values that swap width and height.
ORIENTATION = 0x0112
SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})
#: Modes of one 16-bit channel (Pillow opens 16-bit greyscale PNGs and TIFFs so).
_SIXTEEN_BIT = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


def read_image(path: Path, *, max_side: int | None = None) -> Image.Image:
    """Load an image file as RGB (see :func:`decode_image`, also for ``max_side``); a
    missing, truncated, huge or non-image file raises :class:`DataError` naming it.

    Only a regular file is read (a device such as ``/dev/zero``, a FIFO or a socket, also
    behind a symlink, is refused before a byte is read), one of at most
    :data:`MAX_IMAGE_BYTES`; Pillow reads it from its header on, as far as decoding needs."""
    try:
        # O_NONBLOCK: opening a FIFO does not wait for a writer; reads of a file ignore it
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise DataError(f"{path}: image file missing") from None
    except IsADirectoryError:
        raise DataError(f"{path}: a folder, not an image file") from None
    except OSError as error:
        raise DataError(f"{path}: unreadable image ({error.strerror})") from None
    try:
        kind = os.fstat(fd)
        if stat.S_ISDIR(kind.st_mode):
            raise DataError(f"{path}: a folder, not an image file")
        if not stat.S_ISREG(kind.st_mode):
            raise DataError(
                f"{path}: not a regular file (a device, FIFO or socket); an image must be a file"
            )
        check_bytes(kind.st_size, str(path))
    except DataError:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as handle:
        return decode_image(handle, str(path), max_side=max_side)


def decode_image(data: bytes | BinaryIO, name: str, *, max_side: int | None = None) -> Image.Image:
    """An image file's bytes (or an open binary file) as an RGB image, as a viewer shows it
    (see the module docstring); :class:`DataError` starting with ``name`` (a path, or
    ``row 3`` of a request) if they are not a readable image, have more than
    :data:`MAX_IMAGE_PIXELS` pixels (refused from the header, before decoding) or more than
    :data:`MAX_IMAGE_BYTES` bytes.

    ``max_side``: decode no larger than needed for a longer side of at least ``max_side``
    pixels: a JPEG is decoded at 1/2, 1/4 or 1/8 of its size (Pillow's ``draft``), any image
    then shrunk by a whole factor (``reduce``, the mean of each block of pixels). A shrunk
    image holds the size it was shrunk from, as displayed, in ``image.info["full_size"]``."""
    if isinstance(data, bytes):
        check_bytes(len(data), name)
        data = bytes_io.BytesIO(data)
    try:
        with warnings.catch_warnings():
            # Pillow warns, and decodes, up to twice its limit: here that is an error. (Not
            # thread-safe before Python 3.14; a race only leaves or drops this one filter.)
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(data)  # reads the header only
        check_pixels(image.size, name)
        orientation = image.getexif().get(ORIENTATION, 1)
        width, height = image.size
        if max_side is not None:
            shrink = max(max_side / max(width, height), MIN_IMAGE_SIDE / min(width, height))
            image.draft("RGB", (math.ceil(width * shrink), math.ceil(height * shrink)))
        # each step makes a new image only when it changes the pixels: one full-size copy
        if orientation != 1:
            image = ImageOps.exif_transpose(image)
        image = _eight_bit(image, name)
        if max_side is not None:
            image = _reduced(image, max_side)
        displayed = image if image.mode == "RGB" else image.convert("RGB")
        displayed.load()  # before the file is closed
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        limit = min(MAX_IMAGE_PIXELS, Image.MAX_IMAGE_PIXELS or MAX_IMAGE_PIXELS)
        raise DataError(
            f"{name}: image too large; at most {limit:,} pixels accepted ({error})"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DataError(f"{name}: unreadable image ({_without_object(error)})") from None
    if orientation != 1:
        displayed.info["orientation"] = orientation
    full = (height, width) if orientation in SWAPPING_ORIENTATIONS else (width, height)
    if displayed.size != full:
        displayed.info["full_size"] = full
    return displayed


def _reduced(image: Image.Image, max_side: int) -> Image.Image:
    """``image`` shrunk by the largest whole factor that keeps its longer side at least
    ``max_side`` and its shorter side at least :data:`MIN_IMAGE_SIDE` (itself when that
    factor is 1)."""
    factor = min(max(image.size) // max_side, min(image.size) // MIN_IMAGE_SIDE)
    if factor < 2:
        return image
    if image.mode not in _REDUCIBLE:
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    return image.reduce(factor)


def _without_object(error: Exception) -> str:
    """Pillow's message without the ``<_io.BytesIO object at 0x...>`` it names a stream by."""
    return _STREAM.sub("", str(error)).strip()


def check_bytes(size: int, name: str) -> None:
    """:class:`DataError` starting with ``name`` if an image file of ``size`` bytes is larger
    than :data:`MAX_IMAGE_BYTES`, or empty."""
    if size == 0:
        raise DataError(f"{name}: unreadable image (an empty file)")
    if size > MAX_IMAGE_BYTES:
        raise DataError(
            f"{name}: image file is {size:,} bytes; at most {MAX_IMAGE_BYTES:,} accepted"
        )


def check_pixels(size: tuple[int, int], name: str) -> None:
    """:class:`DataError` starting with ``name`` if an image of ``size`` ``(width, height)``
    has more than :data:`MAX_IMAGE_PIXELS` pixels."""
    width, height = size
    if width * height > MAX_IMAGE_PIXELS:
        raise DataError(
            f"{name}: image is {width}x{height} = {width * height:,} pixels; at most "
            f"{MAX_IMAGE_PIXELS:,} accepted (shrink it first)"
        )


def _eight_bit(image: Image.Image, name: str) -> Image.Image:
    """A 16-bit greyscale image (``I;16*``, or ``I`` whose values fit 16 bits) as 8-bit ``L``
    by its value range (``value >> 8``: 65535 is white, 32768 mid-grey); any other image as it
    is (Pillow already reads 16-bit RGB(A) PNGs as 8-bit by value range)."""
    if image.mode not in _SIXTEEN_BIT and image.mode != "I":
        return image
    values = np.asarray(image).astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > 0xFFFF):
        raise DataError(
            f"{name}: 32-bit integer pixels ({values.min()} to {values.max()}) have no standard "
            "value range; save the image with 8 or 16 bits per channel"
        )
    return Image.fromarray((values >> 8).astype(np.uint8))  # mode L


def size_disagreement(image: Image.Image, annotated: tuple[int, int]) -> str | None:
    """Why ``image`` (as :func:`decode_image` gave it) does not have its ``annotated``
    ``(width, height)``, or ``None`` if it has. Says so when the file's EXIF orientation is
    what turned it: the annotation was then made on the stored, unturned pixels."""
    if image.size == annotated:
        return None
    width, height = image.size
    message = (
        f"the file is {width}x{height} pixels but its annotation says {annotated[0]}x{annotated[1]}"
    )
    orientation = image.info.get("orientation")
    if orientation in SWAPPING_ORIENTATIONS and (height, width) == annotated:
        message += (
            f": its EXIF orientation ({orientation}) turns the stored {height}x{width} pixels "
            "a quarter turn, as a viewer shows them, so the boxes were drawn on the stored "
            "pixels; reset the tag (exiftool -Orientation=1 -n FILE) to keep them"
        )
    return message


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


#: The file suffixes taken as images when a folder or a glob is given (lower case).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
#: The formats a picture (an annotated image) is written in, by the file's suffix.
PICTURE_FORMATS = ("png", "jpg", "jpeg", "webp")
_GLOB_CHARACTERS = frozenset("*?[")


def find_images(sources: Sequence[str]) -> list[Path]:
    """The image files that ``sources`` name, in order, each once: a file (kept as given, even
    missing, so that reading it reports it), a folder (its files with an image suffix, sorted;
    not its subfolders), a glob (``photos/*.jpg``, ``**`` descends; sorted) or ``@list.txt`` (a
    text file of such sources, one per line, blank lines and ``#`` comments skipped, relative
    paths taken from the list's folder). :class:`DataError` for a folder or glob that names
    no image, an unreadable list, or no source at all."""
    found: dict[Path, None] = {}
    for source in sources:
        for path in _source_images(source):
            found.setdefault(path, None)
    if not found:
        raise DataError("no image given")
    return list(found)


def read_image_list(path: Path) -> list[str]:
    """The sources listed in the text file ``path`` (see :func:`find_images`), relative ones
    joined to the list's folder; :class:`DataError` if the file cannot be read."""
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: cannot read the list of images ({error})") from None
    sources = [line.strip() for line in lines]
    return [
        str(Path(path).parent / source) if not Path(source).is_absolute() else source
        for source in sources
        if source and not source.startswith("#")
    ]


def _source_images(source: str) -> list[Path]:
    if source.startswith("@"):
        return [
            path for listed in read_image_list(Path(source[1:])) for path in _source_images(listed)
        ]
    path = Path(source)
    if path.is_dir():
        images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise DataError(
                f"{source}: a folder with no image file ({', '.join(sorted(IMAGE_SUFFIXES))})"
            )
        return images
    if _GLOB_CHARACTERS & set(source) and not path.exists():
        root = Path(path.anchor) if path.is_absolute() else Path()
        pattern = str(path.relative_to(root)) if path.is_absolute() else source
        images = sorted(
            p for p in root.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not images:
            raise DataError(f"{source}: the pattern matches no image file")
        return images
    return [path]


def write_picture(image: Image.Image, path: Path) -> None:
    """Save ``image`` in the format ``path``'s suffix names (one of :data:`PICTURE_FORMATS`),
    atomically; :class:`DataError` for another suffix."""
    from grounding.io.files import atomic

    format = path.suffix.lstrip(".").lower()
    if format not in PICTURE_FORMATS:
        raise DataError(f"{path}: cannot write a picture as {format!r}; use {PICTURE_FORMATS}")
    with atomic(path) as tmp:
        image.save(tmp, format="JPEG" if format == "jpg" else format.upper())
