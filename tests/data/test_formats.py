"""The registry of dataset formats: each name opens its reader; unknown names are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import TINY_IMAGES, write_dataset

from grounding.data.formats import FORMATS, dataset_format
from grounding.data.formats.flickr30k import TYPES, Flickr30kReader
from grounding.errors import ConfigError


def test_flickr30k_is_registered_with_its_entity_types() -> None:
    chosen = dataset_format("flickr30k")
    assert chosen is FORMATS["flickr30k"]
    assert chosen.name == "flickr30k"
    assert chosen.types == TYPES
    assert "people" in chosen.types and "notvisual" in chosen.types


def test_every_format_is_registered_under_its_own_name() -> None:
    assert all(entry.name == name for name, entry in FORMATS.items())


def test_flickr30k_opens_a_dataset_at_its_root(tmp_path: Path) -> None:
    root = write_dataset(tmp_path)
    # every format is opened the same way; flickr30k reads its split lists, not split files
    reader = dataset_format("flickr30k").open(root, splits=root, files={}, skip_bad_files=False)
    assert isinstance(reader, Flickr30kReader)
    assert [record.image_id for record in reader] == [image.image_id for image in TINY_IMAGES]
    assert reader.skipped == []


def test_unknown_format_is_a_config_error_naming_the_known_ones() -> None:
    with pytest.raises(ConfigError) as caught:
        dataset_format("coco")
    message = str(caught.value)
    assert message.startswith("unknown dataset format 'coco'; known: [")
    assert all(repr(name) in message for name in FORMATS)
    assert "'flickr30k'" in message
