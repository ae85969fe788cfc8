"""Files: the dataset layout (zip or folders), atomic writes, and image loading."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import TINY_IMAGES, jpeg_bytes, write_dataset

from grounding import io
from grounding.errors import DataError
from grounding.parse import SplitList


def records(reader: io.AnnotationReader) -> list[tuple[str, bytes, bytes]]:
    return [(files.image_id, files.xml, files.sentences) for files in reader]


# --- the layout -----------------------------------------------------------------------------


def test_zip_and_folders_yield_the_same_records(tmp_path: Path) -> None:
    zipped = io.AnnotationReader(io.find_annotations(write_dataset(tmp_path / "z")))
    folders = io.AnnotationReader(
        io.find_annotations(write_dataset(tmp_path / "f", layout="folders"))
    )
    assert len(zipped) == len(folders) == 5
    expected = [(im.image_id, im.xml, im.sentences) for im in TINY_IMAGES]
    assert records(zipped) == records(folders) == expected


def test_sources_name_the_file_in_the_zip_or_folder(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "z")
    first = next(iter(io.AnnotationReader(root / "annotations.zip")))
    assert first.xml_source == f"{root}/annotations.zip!Annotations/100.xml"
    assert first.sentences_source == f"{root}/annotations.zip!Sentences/100.txt"
    root = write_dataset(tmp_path / "f", layout="folders")
    first = next(iter(io.AnnotationReader(root)))
    assert first.xml_source == f"{root}/Annotations/100.xml"
    assert first.sentences_source == f"{root}/Sentences/100.txt"


def test_reader_is_sorted_by_image_id_and_ignores_other_files(tmp_path: Path) -> None:
    root = write_dataset(tmp_path, TINY_IMAGES[::-1], layout="folders")
    (root / "Annotations" / ".DS_Store").write_bytes(b"\0")
    (root / "Sentences" / "README").write_text("notes", encoding="utf-8")
    reader = io.AnnotationReader(root)
    assert [files.image_id for files in reader] == ["100", "200", "300", "400", "500"]


def test_zip_with_a_top_folder_is_read(tmp_path: Path) -> None:
    archive = tmp_path / "annotations.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("flickr30k/Annotations/7.xml", TINY_IMAGES[0].xml)
        handle.writestr("flickr30k/Sentences/7.txt", TINY_IMAGES[0].sentences)
    assert records(io.AnnotationReader(archive)) == [
        ("7", TINY_IMAGES[0].xml, TINY_IMAGES[0].sentences)
    ]


def test_xml_without_sentences_in_folders_is_named(tmp_path: Path) -> None:
    root = write_dataset(tmp_path, layout="folders")
    (root / "Sentences" / "300.txt").unlink()
    with pytest.raises(DataError) as caught:
        io.AnnotationReader(root)
    assert str(caught.value).startswith(f"{root}/Annotations/300.xml: has no matching file")
    assert "Sentences/" in str(caught.value)


def test_xml_without_sentences_in_a_zip_is_named(tmp_path: Path) -> None:
    archive = tmp_path / "annotations.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for image in TINY_IMAGES:
            handle.writestr(f"Annotations/{image.image_id}.xml", image.xml)
            if image.image_id != "200":
                handle.writestr(f"Sentences/{image.image_id}.txt", image.sentences)
    with pytest.raises(DataError, match=r"annotations\.zip!Annotations/200\.xml: has no matching"):
        io.AnnotationReader(archive)


def test_sentences_without_xml_is_named(tmp_path: Path) -> None:
    root = write_dataset(tmp_path, layout="folders")
    (root / "Annotations" / "500.xml").unlink()
    with pytest.raises(DataError, match=r"Sentences/500\.txt: has no matching file in Annotations"):
        io.AnnotationReader(root)


def test_corrupt_zip_is_a_data_error_naming_it(tmp_path: Path) -> None:
    archive = tmp_path / "annotations.zip"
    archive.write_bytes(b"PK\x03\x04 cut short by an interrupted download")
    with pytest.raises(DataError, match=rf"^{archive}"):
        io.AnnotationReader(io.find_annotations(tmp_path))


def test_find_annotations_prefers_the_zip(tmp_path: Path) -> None:
    root = write_dataset(tmp_path)
    assert io.find_annotations(root) == root / "annotations.zip"
    (root / "Annotations").mkdir()
    (root / "Sentences").mkdir()
    assert io.find_annotations(root) == root / "annotations.zip"
    (root / "annotations.zip").unlink()
    assert io.find_annotations(root) == root


@pytest.mark.parametrize("present", [[], ["Annotations"], ["Sentences"]])
def test_find_annotations_without_either_layout_is_a_data_error(
    tmp_path: Path, present: list[str]
) -> None:
    for name in present:
        (tmp_path / name).mkdir()
    with pytest.raises(DataError, match=rf"^{tmp_path}: no Flickr30k Entities annotations"):
        io.find_annotations(tmp_path)


def test_read_split_lists_reads_the_lists_that_exist(tmp_path: Path) -> None:
    (tmp_path / "train.txt").write_text("1\n2\n\n", encoding="utf-8")
    (tmp_path / "test.txt").write_text("3\n", encoding="utf-8")
    assert io.read_split_lists(tmp_path) == [
        SplitList("train", str(tmp_path / "train.txt"), ["1", "2"]),
        SplitList("test", str(tmp_path / "test.txt"), ["3"]),
    ]


def test_list_image_ids(tmp_path: Path) -> None:
    assert io.list_image_ids(tmp_path / "absent") == set()
    for name in ["1.jpg", "22.jpg", "3.png", "4.jpg.txt"]:
        (tmp_path / name).write_bytes(b"")
    assert io.list_image_ids(tmp_path) == {"1", "22"}


# --- atomic writes --------------------------------------------------------------------------


def test_writes_round_trip_and_leave_no_temp_file(tmp_path: Path) -> None:
    table = pd.DataFrame({"image_id": ["a", "b"], "x1": np.array([0.5, 1.0], np.float32)})
    io.write_tables({"boxes": table}, tmp_path / "tables")
    pd.testing.assert_frame_equal(io.read_tables(tmp_path / "tables", ("boxes",))["boxes"], table)
    io.write_json({"café": 1, "n": [1, 2]}, tmp_path / "deep" / "summary.json")
    assert io.read_json(tmp_path / "deep" / "summary.json") == {"café": 1, "n": [1, 2]}
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    io.write_array(array, tmp_path / "a.npy")
    np.testing.assert_array_equal(io.read_array(tmp_path / "a.npy"), array)
    names = sorted(p.name for p in tmp_path.rglob("*"))
    assert names == ["a.npy", "boxes.parquet", "deep", "summary.json", "tables"]


class FailingFigure:
    """A figure whose ``savefig`` dies half-way through writing."""

    def savefig(self, path: Path, **kwargs: object) -> None:
        Path(path).write_bytes(b"half a fig")
        raise RuntimeError("disk full")


def test_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "figure.png"
    target.write_bytes(b"old figure")
    with pytest.raises(RuntimeError, match="disk full"):
        io.write_png(FailingFigure(), target)
    assert target.read_bytes() == b"old figure"
    assert [p.name for p in tmp_path.iterdir()] == ["figure.png"]


def test_failed_table_write_keeps_the_old_table(tmp_path: Path) -> None:
    target = tmp_path / "t.parquet"
    old = pd.DataFrame({"a": [1, 2]})
    io.write_table(old, target)
    unwritable = pd.DataFrame({"mixed": [1, "x", 2.5]})  # pyarrow refuses mixed types
    with pytest.raises(ValueError, match=r"Conversion failed|convert"):  # pyarrow.ArrowInvalid
        io.write_table(unwritable, target)
    pd.testing.assert_frame_equal(io.read_table(target), old)
    assert [p.name for p in tmp_path.iterdir()] == ["t.parquet"]


def test_failed_write_of_a_new_file_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        io.write_png(FailingFigure(), tmp_path / "new.png")
    assert list(tmp_path.iterdir()) == []


def test_reading_a_missing_artifact_names_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=rf"^{tmp_path}/pairs\.parquet: missing; .*dvc repro"):
        io.read_table(tmp_path / "pairs.parquet")


# --- images ---------------------------------------------------------------------------------


def test_load_image_gives_rgb(tmp_path: Path) -> None:
    (tmp_path / "5.jpg").write_bytes(jpeg_bytes(32, 24))
    image = io.load_image(tmp_path, "5")
    assert image.mode == "RGB" and image.size == (32, 24)
    assert io.image_path(tmp_path, "5") == tmp_path / "5.jpg"


def test_load_image_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=rf"^{tmp_path}/6\.jpg: image file missing"):
        io.load_image(tmp_path, "6")


def test_load_image_truncated_jpeg_is_named(tmp_path: Path) -> None:
    content = jpeg_bytes(64, 48)
    (tmp_path / "7.jpg").write_bytes(content[: len(content) // 2])
    with pytest.raises(DataError, match=rf"^{tmp_path}/7\.jpg: unreadable image"):
        io.load_image(tmp_path, "7")


def test_load_image_non_image_is_named(tmp_path: Path) -> None:
    (tmp_path / "8.jpg").write_text("<html>not an image</html>", encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{tmp_path}/8\.jpg: unreadable image"):
        io.load_image(tmp_path, "8")
