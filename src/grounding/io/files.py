"""Files: how artifacts are stored.

Tables are parquet, arrays ``.npy``, summaries JSON, small tables for plots CSV; every write
goes to a temporary file in the target folder and is renamed into place, so a stage that dies
never leaves a half-written output behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from grounding.errors import DataError
from grounding.schemas import FeaturesMeta

# --- atomic writes -------------------------------------------------------------------------


@contextmanager
def atomic(path: Path) -> Iterator[Path]:
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
    with atomic(path) as tmp:
        tmp.write_bytes(content)


def write_text(text: str, path: Path) -> None:
    write_bytes(text.encode("utf-8"), path)


def write_json(obj: Any, path: Path) -> None:
    write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", path)


def read_json(path: Path) -> Any:
    require(path)
    return json.loads(path.read_text(encoding="utf-8"))


def write_table(table: pd.DataFrame, path: Path) -> None:
    with atomic(path) as tmp:
        table.to_parquet(tmp, index=False)


def read_table(path: Path, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """A parquet table (only ``columns``, if given)."""
    require(path)
    return pd.read_parquet(path, columns=list(columns) if columns else None)


def write_csv(table: pd.DataFrame, path: Path) -> None:
    """A small table as CSV (DVC plots read it)."""
    write_text(table.to_csv(index=False), path)


def read_csv(path: Path) -> pd.DataFrame:
    require(path)
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
    with atomic(path) as tmp:
        figure.savefig(tmp, format=format, dpi=100)


def write_tables(tables: Mapping[str, pd.DataFrame], folder: Path) -> None:
    """Write each table as ``<folder>/<name>.parquet``: all of them or none (each is first
    written beside its target, then all are renamed into place)."""
    with contextlib.ExitStack() as stack:
        temporary = {
            name: stack.enter_context(atomic(folder / f"{name}.parquet")) for name in tables
        }
        for name, table in tables.items():
            table.to_parquet(temporary[name], index=False)


class TableWriter:
    """Writes one parquet table in parts (each part one row group or more), so a table larger
    than memory can be written; made by :func:`table_writers`. Every part is cast to the first
    part's column types."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows = 0
        self._writer: Any = None

    def write(self, part: pd.DataFrame) -> None:
        """Append ``part`` (the same columns as every other part)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pandas(part, preserve_index=False)
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.path, table.schema)
        else:
            table = table.cast(self._writer.schema)
        self._writer.write_table(table)
        self.rows += len(part)

    def close(self, empty: pd.DataFrame) -> None:
        """Finish the file; with no part written, write ``empty`` (the columns, no rows)."""
        if self._writer is None:
            empty.to_parquet(self.path, index=False)
        else:
            self._writer.close()

    def abort(self) -> None:
        """Close the file without finishing the table (it is then removed)."""
        if self._writer is not None:
            self._writer.close()


@contextmanager
def table_writers(
    folder: Path, empty: Mapping[str, pd.DataFrame]
) -> Iterator[dict[str, TableWriter]]:
    """A :class:`TableWriter` for each ``<folder>/<name>.parquet`` of ``empty`` (name -> the
    table's columns with no rows, written when no part is): all of the tables or none appear,
    as with :func:`write_tables`."""
    with contextlib.ExitStack() as stack:
        writers = {
            name: TableWriter(stack.enter_context(atomic(folder / f"{name}.parquet")))
            for name in empty
        }
        try:
            yield writers
        except BaseException:
            for writer in writers.values():
                writer.abort()
            raise
        for name, writer in writers.items():
            writer.close(empty[name])


def table_rows(path: Path) -> int:
    """The number of rows of a parquet table, from its metadata."""
    import pyarrow.parquet as pq

    require(path)
    return int(pq.ParquetFile(path).metadata.num_rows)


def empty_table(path: Path) -> pd.DataFrame:
    """A parquet table's columns and types, with no rows (read from its schema)."""
    import pyarrow.parquet as pq

    require(path)
    return pq.read_schema(path).empty_table().to_pandas()


def read_table_parts(
    path: Path, columns: Sequence[str] | None = None, rows: int = 1 << 20
) -> Iterator[pd.DataFrame]:
    """A parquet table in consecutive parts of at most ``rows`` rows (only ``columns``, if
    given): memory bounded by a part."""
    import pyarrow.parquet as pq

    require(path)
    table = pq.ParquetFile(path)
    for batch in table.iter_batches(batch_size=rows, columns=list(columns) if columns else None):
        yield batch.to_pandas()


def read_image_parts(
    path: Path, columns: Sequence[str] | None = None, rows: int = 1 << 20
) -> Iterator[pd.DataFrame]:
    """A parquet table whose rows come image by image (each image's rows consecutive), in
    parts of whole images of about ``rows`` rows (more when one image has more): for work
    that needs all of an image's rows at once. ``columns`` must include ``image_id``.
    :class:`DataError` when an image's rows are not consecutive."""
    seen: set[str] = set()
    carry: pd.DataFrame | None = None
    for part in read_table_parts(path, columns, rows):
        if carry is not None:
            part = pd.concat([carry, part], ignore_index=True)
        images = part["image_id"].to_numpy()
        last = images[-1] if len(images) else None
        tail = np.flatnonzero(images != last)
        cut = int(tail[-1]) + 1 if len(tail) else 0
        head, carry = part.iloc[:cut].reset_index(drop=True), part.iloc[cut:]
        if len(head):
            yield _whole_images(head, seen, path)
    if carry is not None and len(carry):
        yield _whole_images(carry.reset_index(drop=True), seen, path)


def _whole_images(part: pd.DataFrame, seen: set[str], path: Path) -> pd.DataFrame:
    images = part["image_id"].to_numpy()
    starts = np.r_[True, images[1:] != images[:-1]]
    first_rows = images[starts]
    if len(set(first_rows)) < len(first_rows) or not seen.isdisjoint(first_rows):
        raise DataError(
            f"{path}: an image's rows are not consecutive; rerun the stage that wrote it"
        )
    seen.update(first_rows)
    return part


def read_tables(folder: Path, names: tuple[str, ...]) -> dict[str, pd.DataFrame]:
    """Read ``<folder>/<name>.parquet`` for each name."""
    return {name: read_table(folder / f"{name}.parquet") for name in names}


def write_array(array: np.ndarray, path: Path) -> None:
    with atomic(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array, allow_pickle=False)


def read_array(path: Path, mmap: bool = False) -> np.ndarray:
    require(path)
    return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)


def write_files(files: Mapping[str, bytes], root: Path) -> None:
    """Write ``relative path -> content`` under ``root``."""
    for relative, content in files.items():
        write_bytes(content, root / relative)


def require(path: Path) -> None:
    if not path.exists():
        raise DataError(f"{path}: missing; run the stage that writes it (`dvc repro`)")


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
    with atomic(folder / REGION_FEATURES) as tmp:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
        yield array
        array.flush()
        del array


def write_features(
    folder: Path, phrases: np.ndarray, phrase_rows: pd.DataFrame, meta: FeaturesMeta
) -> None:
    """Phrase embeddings, ``phrase_id -> row`` and what made the features (``meta``:
    backbone, text encoder, sizes); the region features come from
    :func:`region_features_writer`."""
    write_array(phrases, folder / PHRASE_FEATURES)
    write_table(phrase_rows, folder / PHRASE_ROWS)
    write_json(meta.to_dict(), folder / FEATURES_META)


def read_features(folder: Path) -> tuple[np.ndarray, np.ndarray, pd.DataFrame, FeaturesMeta]:
    """What :func:`write_features` wrote; the arrays are memory-mapped."""
    return (
        read_array(folder / REGION_FEATURES, mmap=True),
        read_array(folder / PHRASE_FEATURES, mmap=True),
        read_table(folder / PHRASE_ROWS),
        FeaturesMeta.from_dict(read_json(folder / FEATURES_META)),
    )
