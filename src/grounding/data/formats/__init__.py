"""Dataset formats: each one a reader that yields :class:`~grounding.data.records.ImageRecord`,
and a writer for the formats that can be written.

A format is one entry of :data:`FORMATS` (``data.format``), with the dataclass of its settings
(``data.<name>`` in ``params.yaml``: for a format whose split is its file, each split's file);
adding one is one new module and one registration here. Nothing after parse knows which format
the data came from. ``grounding convert`` reads with one format and writes with another.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from grounding.data.formats import flickr30k, labelstudio, mdetr, odvg
from grounding.data.formats.grounded import SplitFiles, Written
from grounding.data.records import ImageRecord, RecordReader
from grounding.registry import Registry


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
    types its phrases may carry (None: any text, or none); ``files``: each split's file from
    its settings (empty for a format whose split is not its file)."""

    name: str
    open: Opener
    write: Callable[[Iterable[ImageRecord]], Written] | None
    types: tuple[str, ...] | None
    files: Mapping[str, Path] = field(default_factory=dict)


def _format(
    name: str,
    open: Opener,
    write: Callable[[Iterable[ImageRecord]], Written] | None,
    types: tuple[str, ...] | None,
    settings: SplitFiles | None = None,
) -> DatasetFormat:
    return DatasetFormat(name, open, write, types, settings.named() if settings else {})


#: The dataset formats ``data.format`` may name, their settings under ``data.<name>``.
FORMATS: Registry[DatasetFormat] = Registry("dataset format", "data.format", "data")
FORMATS.add(
    "flickr30k",
    partial(_format, "flickr30k", flickr30k.Flickr30kReader.open, None, flickr30k.TYPES),
)
FORMATS.add(
    "odvg", partial(_format, "odvg", odvg.OdvgReader.open, odvg.write, None), settings=odvg.Files
)
FORMATS.add(
    "mdetr",
    partial(_format, "mdetr", mdetr.MdetrReader.open, mdetr.write, None),
    settings=mdetr.Files,
)
FORMATS.add(
    "labelstudio",
    partial(_format, "labelstudio", labelstudio.LabelStudioReader.open, labelstudio.write, None),
    settings=labelstudio.Files,
)


def dataset_format(name: str, sections: Mapping[str, Any] | None = None) -> DatasetFormat:
    """The format called ``name`` with its settings from ``sections`` (``data``'s format
    sections; its defaults when absent); :class:`ConfigError` listing the known ones otherwise."""
    return FORMATS.build(name, sections)


def writable_formats() -> list[str]:
    """The formats ``grounding convert`` can write."""
    return [name for name in FORMATS.plain_names() if dataset_format(name).write is not None]
