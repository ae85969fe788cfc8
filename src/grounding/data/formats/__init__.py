"""Dataset formats: each one a reader that yields :class:`~grounding.data.records.ImageRecord`,
and a writer for the formats that can be written.

A format is one entry of :data:`FORMATS`; adding one is one new module and one line here. The
parse stage names it with ``data.format``; nothing after parse knows which format the data
came from. ``grounding convert`` reads with one format and writes with another.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from grounding.data.formats import flickr30k, labelstudio, mdetr, odvg
from grounding.data.formats.grounded import Written
from grounding.data.records import ImageRecord, RecordReader
from grounding.errors import ConfigError


class Opener(Protocol):
    """How every format's reader opens a dataset at ``root``: ``splits`` is the folder of
    Flickr30k's split lists, ``files`` each split's annotation file (relative to ``root``) for
    the formats whose split is the file; each reader uses the one its layout has."""

    def __call__(
        self,
        root: Path,
        *,
        splits: Path,
        files: Mapping[str, Path],
        skip_bad_files: bool = False,
    ) -> RecordReader: ...


@dataclass(frozen=True)
class DatasetFormat:
    """``open`` gives the reader of a dataset (see :class:`Opener`); ``write`` turns records
    into each split's file text (None: the format is read-only); ``types`` are the entity
    types its phrases may carry (None: any text, or none)."""

    name: str
    open: Opener
    write: Callable[[Iterable[ImageRecord]], Written] | None
    types: tuple[str, ...] | None


FORMATS: dict[str, DatasetFormat] = {
    "flickr30k": DatasetFormat("flickr30k", flickr30k.Flickr30kReader.open, None, flickr30k.TYPES),
    "odvg": DatasetFormat("odvg", odvg.OdvgReader.open, odvg.write, None),
    "mdetr": DatasetFormat("mdetr", mdetr.MdetrReader.open, mdetr.write, None),
    "labelstudio": DatasetFormat(
        "labelstudio", labelstudio.LabelStudioReader.open, labelstudio.write, None
    ),
}


def dataset_format(name: str) -> DatasetFormat:
    """The format called ``name``; :class:`ConfigError` listing the known ones otherwise."""
    try:
        return FORMATS[name]
    except KeyError:
        raise ConfigError(f"unknown dataset format {name!r}; known: {sorted(FORMATS)}") from None
