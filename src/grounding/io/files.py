"""Files: how artifacts are stored.

Tables are parquet, arrays ``.npy``, summaries JSON, small tables for plots CSV; every write
goes to a temporary file in the target folder and is renamed into place, so a stage that dies
never leaves a half-written output behind. A full device ends the write with a
:class:`~grounding.errors.DataError` (``no space left on device writing <path> ...``) and
removes the temporary file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from grounding.errors import DataError
from grounding.schemas import FeaturesMeta

if TYPE_CHECKING:  # pandas costs about 0.5 s to import: predict with an ONNX export needs none
    import pandas as pd

# --- atomic writes -------------------------------------------------------------------------


MB = 1_000_000


def no_space(path: Path, needed: int | None = None, free: int | None = None) -> DataError:
    """The error of a write to ``path`` that its device has no room for: ``needed`` bytes
    (when known) against ``free`` bytes (by default, what the device has free now)."""
    if free is None:
        free = shutil.disk_usage(path.parent).free
    needs = f"needs ~{needed / MB:,.1f} MB, " if needed is not None else ""
    return DataError(f"no space left on device writing {path} ({needs}{free / MB:,.1f} MB free)")


@contextmanager
def atomic(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    The temporary file is removed whatever happens; a write that fills the device
    (``ENOSPC``) raises :func:`no_space`.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs are ordinary files
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        os.remove(tmp)  # first, so that the free space reported counts it
        raise no_space(path) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def reserve(path: Path, size: int, target: Path) -> None:
    """Allocate the first ``size`` bytes of the file ``path`` on its device now, or raise
    :func:`no_space` for ``target`` if the device cannot hold them.

    Writing through a memory map to a file whose pages the device cannot hold kills the
    process with SIGBUS, which Python cannot catch; reserving first turns that into an error.
    Where the file system cannot reserve space, the free space is checked instead.
    """
    held = os.stat(path).st_blocks * 512  # a sparse file holds fewer blocks than its size
    free = shutil.disk_usage(path.parent).free + held
    fallocate = getattr(os, "posix_fallocate", None)  # not on macOS
    if fallocate is not None:
        fd = os.open(path, os.O_RDWR)
        try:
            fallocate(fd, 0, size)
            return
        except OSError as error:
            if error.errno == errno.ENOSPC:
                raise no_space(target, size, free) from None
            if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
        finally:
            os.close(fd)
    if free < size:
        raise no_space(target, size, free)


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
    import pandas as pd

    return pd.read_parquet(path, columns=list(columns) if columns else None)


def write_csv(table: pd.DataFrame, path: Path) -> None:
    """A small table as CSV (DVC plots read it)."""
    write_text(table.to_csv(index=False), path)


def read_csv(path: Path) -> pd.DataFrame:
    require(path)
    import pandas as pd

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
    written beside its target, then all are renamed into place); a folder this call made is
    removed again if the writing fails."""
    new_folder = not folder.exists()
    try:
        with contextlib.ExitStack() as stack:
            temporary = {
                name: stack.enter_context(atomic(folder / f"{name}.parquet")) for name in tables
            }
            for name, table in tables.items():
                table.to_parquet(temporary[name], index=False)
    except BaseException:
        if new_folder and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        raise


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
    import pandas as pd

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


#: Room reserved for an ``.npy`` header (numpy pads it to a multiple of 64 bytes).
NPY_HEADER_ROOM = 4096


def write_array(array: np.ndarray, path: Path) -> None:
    """``array`` as ``.npy``; its space is reserved first (numpy's write to a full device
    fails without saying why)."""
    with atomic(path) as tmp:
        reserve(tmp, array.nbytes + NPY_HEADER_ROOM, path)
        with open(tmp, "r+b") as handle:
            np.save(handle, array, allow_pickle=False)
            handle.truncate()  # the unused rest of the header room


def read_array(path: Path, mmap: bool = False) -> np.ndarray:
    require(path)
    return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)


def write_files(files: Mapping[str, bytes], root: Path) -> None:
    """Write ``relative path -> content`` under ``root``."""
    for relative, content in files.items():
        write_bytes(content, root / relative)


def write_all(texts: Mapping[str, str], folder: Path, what: str) -> list[Path]:
    """Write each ``relative path -> text`` under ``folder``, all of them or none, and return
    their paths: every target is checked first (:func:`check_writable_file`; ``what`` names
    ``folder`` in the message), the texts are written into a temporary folder inside
    ``folder`` and only then renamed into place, replacing what is there. The temporary folder
    is removed whatever happens."""
    check_writable_folder(folder, what)
    targets = {relative: folder / relative for relative in texts}
    for path in targets.values():
        check_writable_file(path, what)
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder, prefix=".staging-"))
    try:
        for relative, text in texts.items():
            staged = staging / relative
            staged.parent.mkdir(parents=True, exist_ok=True)
            try:
                staged.write_bytes(text.encode("utf-8"))
            except OSError as error:
                if error.errno != errno.ENOSPC:
                    raise
                raise no_space(targets[relative]) from None
        for relative, path in targets.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / relative, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return list(targets.values())


def require(path: Path) -> None:
    if not path.exists():
        raise DataError(f"{path}: missing; run the stage that writes it (`dvc repro`)")


def check_writable_file(path: Path, what: str) -> None:
    """:class:`DataError` naming ``what`` (an option, ``--out``) unless a file can be written
    at ``path``: it is not a folder and the folder it goes in is (or can be made) writable.
    Creates nothing: for checking a command's outputs before the work that fills them."""
    if path.is_dir():
        raise DataError(f"{what} {path}: a folder, not a file")
    _check_can_create_in(path.parent, what, path)


def check_writable_folder(path: Path, what: str) -> None:
    """:class:`DataError` naming ``what`` (``--cache``) unless files can be written in the
    folder ``path`` (which need not exist yet). Creates nothing."""
    if path.exists() and not path.is_dir():
        raise DataError(f"{what} {path}: a file, not a folder")
    _check_can_create_in(path, what, path)


def _check_can_create_in(folder: Path, what: str, path: Path) -> None:
    """Whether the nearest existing folder at or above ``folder`` takes a new file (a probe,
    removed at once: permission bits say nothing for root or a read-only mount)."""
    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise DataError(f"{what} {path}: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise DataError(f"{what} {path}: cannot write in {existing} ({error.strerror})") from None


# --- features and checkpoints ----------------------------------------------------------------

REGION_FEATURES = "regions.npy"
PHRASE_FEATURES = "phrases.npy"
PHRASE_ROWS = "phrase_rows.parquet"
FEATURES_META = "features.json"


@contextmanager
def region_features_writer(folder: Path, shape: tuple[int, int]) -> Iterator[np.ndarray]:
    """A memory-mapped float32 array ``shape`` to fill with region features (row =
    ``region_id``); it becomes ``<folder>/regions.npy`` only if the block succeeds, so the
    features of a large dataset never have to fit in memory at once. The file's space is
    reserved before the first row is written (see :func:`reserve`): a device too small for it
    is a :class:`DataError` naming the size, not a crash."""
    path = folder / REGION_FEATURES
    with atomic(path) as tmp:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
        try:
            reserve(tmp, os.path.getsize(tmp), path)
        except DataError:
            del array  # unmapped before the temporary file is removed
            raise
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


@dataclass(frozen=True)
class StoredFeatures:
    """The features stage's folder: ``regions (R, region_dim)`` (row ``region_id``),
    ``phrases (P, phrase_dim)`` (distinct texts), ``phrase_rows`` (``phrase_id, row`` into
    ``phrases``) and how they were made (``meta``)."""

    regions: np.ndarray
    phrases: np.ndarray
    phrase_rows: pd.DataFrame
    meta: FeaturesMeta


def read_features(folder: Path) -> StoredFeatures:
    """What :func:`write_features` wrote; the arrays are memory-mapped."""
    return StoredFeatures(
        read_array(folder / REGION_FEATURES, mmap=True),
        read_array(folder / PHRASE_FEATURES, mmap=True),
        read_table(folder / PHRASE_ROWS),
        FeaturesMeta.from_dict(read_json(folder / FEATURES_META)),
    )
