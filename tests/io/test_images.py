"""Images: the one decoder (errors name the file or row), the files present, ImageFolder."""

from __future__ import annotations

import io as bytes_io
from pathlib import Path

import pandas as pd
import pytest
from conftest import jpeg_bytes
from PIL import Image

from grounding import io
from grounding.errors import DataError


def png_bytes(mode: str, size: tuple[int, int]) -> bytes:
    buffer = bytes_io.BytesIO()
    Image.new(mode, size).save(buffer, format="PNG")
    return buffer.getvalue()


# --- read_image -----------------------------------------------------------------------------


def test_read_image_gives_rgb(tmp_path: Path) -> None:
    (tmp_path / "5.jpg").write_bytes(jpeg_bytes(32, 24))
    image = io.read_image(tmp_path / "5.jpg")
    assert image.mode == "RGB" and image.size == (32, 24)


def test_read_image_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=rf"^{tmp_path}/6\.jpg: image file missing$"):
        io.read_image(tmp_path / "6.jpg")


def test_read_image_of_a_folder_is_named(tmp_path: Path) -> None:
    (tmp_path / "7.jpg").mkdir()
    with pytest.raises(DataError, match=rf"^{tmp_path}/7\.jpg: a folder, not an image file"):
        io.read_image(tmp_path / "7.jpg")


def test_read_image_truncated_jpeg_is_named(tmp_path: Path) -> None:
    content = jpeg_bytes(64, 48)
    (tmp_path / "8.jpg").write_bytes(content[: len(content) // 2])
    with pytest.raises(DataError, match=rf"^{tmp_path}/8\.jpg: unreadable image \("):
        io.read_image(tmp_path / "8.jpg")


def test_read_image_non_image_is_named(tmp_path: Path) -> None:
    (tmp_path / "9.jpg").write_text("<html>not an image</html>", encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{tmp_path}/9\.jpg: unreadable image \("):
        io.read_image(tmp_path / "9.jpg")


# --- decode_image ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_decode_image_converts_to_rgb(mode: str) -> None:
    image = io.decode_image(png_bytes(mode, (5, 3)), "upload.png")
    assert image.mode == "RGB" and image.size == (5, 3)


def test_decode_image_error_starts_with_the_name_it_is_given() -> None:
    with pytest.raises(DataError, match=r"^row 3: unreadable image \("):
        io.decode_image(b"GIF89a but no more", "row 3")
    with pytest.raises(DataError, match=r"^row 0: unreadable image \("):
        io.decode_image(b"", "row 0")


def test_decode_image_refuses_a_decompression_bomb(monkeypatch: pytest.MonkeyPatch) -> None:
    # Pillow raises (not warns) above twice MAX_IMAGE_PIXELS
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(DataError, match=r"^big\.png: image too large \("):
        io.decode_image(png_bytes("RGB", (20, 20)), "big.png")


# --- present_files and ImageFolder ----------------------------------------------------------


def test_present_files_are_relative_names_at_any_depth(tmp_path: Path) -> None:
    assert io.present_files(tmp_path / "absent") == set()
    for name in ["1.jpg", "3.png", "train/22.jpg", "train/deep/4.jpg.txt"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "empty").mkdir()
    assert io.present_files(tmp_path) == {
        "1.jpg",
        "3.png",
        "train/22.jpg",
        "train/deep/4.jpg.txt",
    }


def test_image_folder_reads_an_image_by_id_through_its_file_name(tmp_path: Path) -> None:
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "b.jpg").write_bytes(jpeg_bytes(20, 10))
    images = pd.DataFrame({"image_id": ["1", "2"], "file_name": ["a.jpg", "val/b.jpg"]})
    folder = io.ImageFolder(tmp_path, images)
    assert folder.path("2") == tmp_path / "val" / "b.jpg"
    assert folder("2").size == (20, 10)
    # an image of the table whose file is gone: named by its path
    with pytest.raises(DataError, match=rf"^{tmp_path}/a\.jpg: image file missing"):
        folder("1")
