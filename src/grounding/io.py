"""Files: the one module that knows where and how artifacts are stored.

Tables are parquet, arrays ``.npy``, summaries JSON; every write goes to a temporary file in
the target folder and is renamed into place, so a stage that dies never leaves a half-written
output behind. Reading the Flickr30k Entities layout (``annotations.zip`` or unpacked
``Annotations/`` + ``Sentences/``, ``images/<id>.jpg``, ``train.txt``/``val.txt``/``test.txt``)
also lives here; what the files *mean* is :mod:`grounding.flickr30k`'s business.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from grounding.errors import DataError
from grounding.parse import SPLITS, AnnotationFiles, SplitList, read_split_list
from grounding.proposals import ProposalSettings, propose

IMAGE_SUFFIX = ".jpg"


# --- atomic writes -------------------------------------------------------------------------


@contextmanager
def _atomic(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs are ordinary files
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes(content: bytes, path: Path) -> None:
    with _atomic(path) as tmp:
        tmp.write_bytes(content)


def write_text(text: str, path: Path) -> None:
    write_bytes(text.encode("utf-8"), path)


def write_json(obj: Any, path: Path) -> None:
    write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", path)


def read_json(path: Path) -> Any:
    _require(path)
    return json.loads(path.read_text(encoding="utf-8"))


def write_table(table: pd.DataFrame, path: Path) -> None:
    with _atomic(path) as tmp:
        table.to_parquet(tmp, index=False)


def read_table(path: Path) -> pd.DataFrame:
    _require(path)
    return pd.read_parquet(path)


def write_csv(table: pd.DataFrame, path: Path) -> None:
    """A small table as CSV (DVC plots read it)."""
    write_text(table.to_csv(index=False), path)


def read_csv(path: Path) -> pd.DataFrame:
    _require(path)
    return pd.read_csv(path)


def write_png(figure: Any, path: Path) -> None:
    """Save a matplotlib figure as PNG."""
    write_figure(figure, path, "png")


FIGURE_FORMATS = ("png", "jpg", "jpeg", "pdf", "svg")


def write_figure(figure: Any, path: Path, format: str | None = None) -> None:
    """Save a matplotlib figure in ``format``, by default the one ``path``'s suffix names."""
    format = format or path.suffix.lstrip(".").lower()
    if format not in FIGURE_FORMATS:
        raise DataError(f"{path}: cannot write a picture as {format!r}; use {FIGURE_FORMATS}")
    with _atomic(path) as tmp:
        figure.savefig(tmp, format=format, dpi=100)


def write_tables(tables: Mapping[str, pd.DataFrame], folder: Path) -> None:
    """Write each table as ``<folder>/<name>.parquet``."""
    for name, table in tables.items():
        write_table(table, folder / f"{name}.parquet")


def read_tables(folder: Path, names: tuple[str, ...]) -> dict[str, pd.DataFrame]:
    """Read ``<folder>/<name>.parquet`` for each name."""
    return {name: read_table(folder / f"{name}.parquet") for name in names}


def write_array(array: np.ndarray, path: Path) -> None:
    with _atomic(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array, allow_pickle=False)


def read_array(path: Path, mmap: bool = False) -> np.ndarray:
    _require(path)
    return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)


def write_files(files: Mapping[str, bytes], root: Path) -> None:
    """Write ``relative path -> content`` under ``root``."""
    for relative, content in files.items():
        write_bytes(content, root / relative)


def _require(path: Path) -> None:
    if not path.exists():
        raise DataError(f"{path}: missing; run the stage that writes it (`dvc repro`)")


# --- the Flickr30k Entities layout ---------------------------------------------------------


def find_annotations(root: Path) -> Path:
    """The annotations under ``root``: ``annotations.zip`` if present, else ``root`` itself
    when it holds ``Annotations/`` and ``Sentences/``."""
    archive = root / "annotations.zip"
    if archive.is_file():
        return archive
    if (root / "Annotations").is_dir() and (root / "Sentences").is_dir():
        return root
    raise DataError(
        f"{root}: no Flickr30k Entities annotations: expected annotations.zip or the folders "
        "Annotations/ and Sentences/"
    )


class AnnotationReader:
    """Every image's ``(xml, sentences)`` pair from a zip or from unpacked folders.

    ``len()`` is known before reading (for progress bars); iterating yields
    :class:`~grounding.parse.AnnotationFiles` sorted by image id. An image with an XML file
    but no captions (or the reverse) raises :class:`DataError` naming the file.
    """

    def __init__(self, location: Path) -> None:
        self.location = location
        try:
            self._zip = zipfile.ZipFile(location) if location.suffix == ".zip" else None
        except zipfile.BadZipFile:
            raise DataError(f"{location}: not a readable zip archive") from None
        if self._zip is not None:
            names = self._zip.namelist()
        else:
            names = [f"Annotations/{n}" for n in os.listdir(location / "Annotations")] + [
                f"Sentences/{n}" for n in os.listdir(location / "Sentences")
            ]
        xml = {_stem(n): n for n in names if _in_folder(n, "Annotations", ".xml")}
        txt = {_stem(n): n for n in names if _in_folder(n, "Sentences", ".txt")}
        for present, missing, mine, theirs in (
            ("Annotations", "Sentences", xml, txt),
            ("Sentences", "Annotations", txt, xml),
        ):
            orphans = sorted(set(mine) - set(theirs))
            if orphans:
                raise DataError(
                    f"{self._source(mine[orphans[0]])}: has no matching file in {missing}/ "
                    f"({len(orphans)} such file(s) in {present}/)"
                )
        self._names = [(image_id, xml[image_id], txt[image_id]) for image_id in sorted(xml)]

    def __len__(self) -> int:
        return len(self._names)

    def __iter__(self) -> Iterator[AnnotationFiles]:
        for image_id, xml_name, txt_name in self._names:
            yield AnnotationFiles(
                image_id=image_id,
                xml=self._read(xml_name),
                xml_source=self._source(xml_name),
                sentences=self._read(txt_name),
                sentences_source=self._source(txt_name),
            )

    def _read(self, name: str) -> bytes:
        if self._zip is not None:
            return self._zip.read(name)
        return (self.location / name).read_bytes()

    def _source(self, name: str) -> str:
        return f"{self.location}/{name}" if self._zip is None else f"{self.location}!{name}"


def _in_folder(name: str, folder: str, suffix: str) -> bool:
    parts = name.split("/")
    return len(parts) >= 2 and parts[-2] == folder and parts[-1].endswith(suffix)


def _stem(name: str) -> str:
    return name.rsplit("/", 1)[-1].rsplit(".", 1)[0]


def read_split_lists(folder: Path) -> list[SplitList]:
    """The split lists ``<folder>/{train,val,test}.txt`` that exist."""
    return [
        read_split_list(path.read_text(encoding="utf-8"), split, str(path))
        for split in SPLITS
        if (path := folder / f"{split}.txt").is_file()
    ]


def list_image_ids(images: Path) -> set[str]:
    """Ids of the ``<id>.jpg`` files in ``images`` (empty if the folder does not exist)."""
    if not images.is_dir():
        return set()
    return {
        name[: -len(IMAGE_SUFFIX)] for name in os.listdir(images) if name.endswith(IMAGE_SUFFIX)
    }


def image_path(images: Path, image_id: str) -> Path:
    return images / f"{image_id}{IMAGE_SUFFIX}"


def load_image(images: Path, image_id: str) -> Image.Image:
    """Load ``<images>/<id>.jpg`` as RGB; a missing, truncated or non-image file raises
    :class:`DataError` naming it."""
    return read_image(image_path(images, image_id))


def read_image(path: Path) -> Image.Image:
    """Load an image file as RGB; a missing, truncated, huge or non-image file raises
    :class:`DataError` naming it."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"{path}: image file missing") from None
    except IsADirectoryError:
        raise DataError(f"{path}: a folder, not an image file") from None
    except Image.DecompressionBombError as error:
        raise DataError(f"{path}: image too large ({error})") from None
    except (UnidentifiedImageError, OSError) as error:
        raise DataError(f"{path}: unreadable image ({error})") from None


# --- features and checkpoints ----------------------------------------------------------------

REGION_FEATURES = "regions.npy"
PHRASE_FEATURES = "phrases.npy"
PHRASE_ROWS = "phrase_rows.parquet"
FEATURES_META = "features.json"


@contextmanager
def region_features_writer(folder: Path, shape: tuple[int, int]) -> Iterator[np.ndarray]:
    """A memory-mapped float32 array ``shape`` to fill with region features (row =
    ``region_id``); it becomes ``<folder>/regions.npy`` only if the block succeeds, so the
    features of a large dataset never have to fit in memory at once."""
    with _atomic(folder / REGION_FEATURES) as tmp:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
        yield array
        array.flush()
        del array


def write_features(
    folder: Path,
    phrases: np.ndarray,
    phrase_rows: pd.DataFrame,
    meta: Mapping[str, Any],
) -> None:
    """Phrase embeddings, ``phrase_id -> row`` and what made the features (``meta``:
    backbone, text encoder, sizes); the region features come from
    :func:`region_features_writer`."""
    write_array(phrases, folder / PHRASE_FEATURES)
    write_table(phrase_rows, folder / PHRASE_ROWS)
    write_json(dict(meta), folder / FEATURES_META)


def read_features(folder: Path) -> tuple[np.ndarray, np.ndarray, pd.DataFrame, dict[str, Any]]:
    """What :func:`write_features` wrote; the arrays are memory-mapped."""
    return (
        read_array(folder / REGION_FEATURES, mmap=True),
        read_array(folder / PHRASE_FEATURES, mmap=True),
        read_table(folder / PHRASE_ROWS),
        read_json(folder / FEATURES_META),
    )


def write_checkpoint(state: Mapping[str, Any], path: Path) -> None:
    """A model checkpoint (``torch.save`` of plain containers and tensors)."""
    import torch

    with _atomic(path) as tmp:
        torch.save(dict(state), tmp)


def read_checkpoint(path: Path) -> dict[str, Any]:
    import torch

    if not path.exists():
        raise DataError(f"{path}: no model here; train one with `dvc repro train`")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (
        RuntimeError,
        EOFError,
        ValueError,
        pickle.UnpicklingError,
        zipfile.BadZipFile,
    ) as error:
        raise DataError(f"{path}: not a model checkpoint of this project ({error})") from None


# --- proposal cache --------------------------------------------------------------------------


class ProposalCache:
    """Proposals of each image on disk, computed once: ``<folder>/<key>.npy`` where the key
    hashes the image's pixels and the settings that made them, so an edited image or other
    settings never read stale boxes. Safe to delete; safe to share between processes (writes
    are atomic)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def get(
        self, image: Image.Image, settings: object, compute: Callable[[], np.ndarray]
    ) -> np.ndarray:
        """The cached boxes of ``image`` under ``settings``, else ``compute()``'s, then cached."""
        path = self.folder / f"{self.key(image, settings)}.npy"
        if path.exists():
            try:
                return read_array(path)
            except (OSError, ValueError):
                pass  # a damaged entry is recomputed
        boxes = compute()
        write_array(boxes, path)
        return boxes

    def proposals(self, image: Image.Image, settings: ProposalSettings) -> np.ndarray:
        """:func:`~grounding.proposals.propose` of ``image``, computed once per image and
        settings."""
        return self.get(image, settings, partial(propose, image, settings))

    @staticmethod
    def key(image: Image.Image, settings: object) -> str:
        digest = hashlib.sha256(repr(settings).encode())
        digest.update(f"{image.mode} {image.size}".encode())
        digest.update(image.tobytes())
        return digest.hexdigest()[:32]
