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
    assert chosen.name == "flickr30k"
    assert chosen.types == TYPES
    assert "people" in chosen.types and "notvisual" in chosen.types
    assert chosen.files == {}  # its split lists are a folder (data.splits), not files


def test_every_format_is_registered_under_its_own_name() -> None:
    assert all(dataset_format(name).name == name for name in FORMATS.plain_names())


def test_each_split_file_format_names_its_files_from_its_settings() -> None:
    assert dataset_format("odvg").files == {
        "train": Path("train.jsonl"),
        "val": Path("val.jsonl"),
        "test": Path("test.jsonl"),
    }
    assert dataset_format("mdetr").files["test"] == Path("final_flickr_separateGT_test.json")
    no_val = dataset_format("odvg", {"odvg": {"val": None}})  # a dataset without a val split
    assert set(no_val.files) == {"train", "test"}
    with pytest.raises(ConfigError, match=r"data\.odvg\.dev"):
        dataset_format("odvg", {"odvg": {"dev": "dev.jsonl"}})
    with pytest.raises(ConfigError, match=r"data\.odvgg: no dataset format is called 'odvgg'"):
        FORMATS.check_section({"odvgg": {"train": "t.jsonl"}})


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
    assert message.startswith("data.format: unknown dataset format 'coco'; known: ")
    assert all(name in message for name in FORMATS)
    assert "flickr30k" in message
