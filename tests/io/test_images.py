"""Images: the one decoder (errors name the file or row), the files present, ImageFolder."""

from __future__ import annotations

import io as bytes_io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import jpeg_bytes, png_header
from PIL import Image

from grounding import io
from grounding.errors import DataError
from grounding.io.images import MAX_IMAGE_PIXELS, size_disagreement


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
    with pytest.raises(
        DataError, match=r"^big\.png: image too large; at most 100 pixels accepted \("
    ):
        io.decode_image(png_bytes("RGB", (20, 20)), "big.png")


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_a_16_bit_greyscale_image_is_scaled_by_its_value_range_not_clipped(fmt: str) -> None:
    # 0, 256, ..., 65280 across: a viewer shows a ramp from black to white
    ramp = np.tile((np.arange(256, dtype=np.uint16) << 8), (4, 1))
    stored = Image.fromarray(ramp)
    assert stored.mode == "I;16"
    buffer = bytes_io.BytesIO()
    stored.save(buffer, format=fmt)
    image = io.decode_image(buffer.getvalue(), f"ramp.{fmt.lower()}")
    pixels = np.asarray(image)
    assert image.mode == "RGB" and image.size == (256, 4)
    assert pixels[0, :, 0].tolist() == list(range(256))  # value >> 8; clipping gave 255 from 1 on
    assert (pixels[..., 0] == pixels[..., 2]).all()


def test_32_bit_integer_pixels_of_16_bit_values_are_scaled_and_others_refused() -> None:
    def tiff(values: np.ndarray) -> bytes:
        buffer = bytes_io.BytesIO()
        Image.fromarray(values.astype(np.int32)).save(buffer, format="TIFF")
        return buffer.getvalue()

    image = io.decode_image(tiff(np.full((4, 4), 0x8000)), "mid.tif")
    assert np.asarray(image)[0, 0].tolist() == [128, 128, 128]
    with pytest.raises(DataError, match=r"^wide\.tif: 32-bit integer pixels"):
        io.decode_image(tiff(np.full((4, 4), 70_000)), "wide.tif")


def jpeg_with_orientation(orientation: int) -> bytes:
    """A 40x20 JPEG as stored, red on the left half, blue on the right, EXIF-tagged."""
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = bytes_io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif.tobytes(), quality=95)
    return buffer.getvalue()


def test_the_exif_orientation_is_applied_as_a_viewer_shows_the_image() -> None:
    image = io.decode_image(jpeg_with_orientation(6), "phone.jpg")  # 6: turn 90 clockwise
    assert image.size == (20, 40) and image.info["orientation"] == 6
    top, bottom = np.asarray(image)[5, 10], np.asarray(image)[35, 10]
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]  # the left side is on top
    upright = io.decode_image(jpeg_with_orientation(1), "upright.jpg")
    assert upright.size == (40, 20) and "orientation" not in upright.info


def test_a_size_turned_by_exif_is_explained() -> None:
    turned = io.decode_image(jpeg_with_orientation(8), "phone.jpg")
    message = size_disagreement(turned, (40, 20))
    assert message is not None
    assert message.startswith("the file is 20x40 pixels but its annotation says 40x20")
    assert "EXIF orientation (8)" in message
    assert size_disagreement(turned, (20, 40)) is None
    plain = io.decode_image(jpeg_bytes(20, 40), "plain.jpg")
    assert "EXIF" not in (size_disagreement(plain, (40, 20)) or "")


@pytest.mark.parametrize(
    "size, message",
    [
        ((10_000, 7_000), r"image is 10000x7000 = 70,000,000 pixels; at most 60,000,000"),
        ((12_000, 12_000), r"image too large; at most 60,000,000 pixels accepted"),  # > Pillow's
    ],
)
def test_the_pixel_cap_is_checked_from_the_header_before_decoding(
    size: tuple[int, int], message: str
) -> None:
    # decoding these truncated pixels would fail as "unreadable": refused before that
    with pytest.raises(DataError, match=rf"^huge\.png: {message}"):
        io.decode_image(png_header(*size), "huge.png")
    assert MAX_IMAGE_PIXELS < Image.MAX_IMAGE_PIXELS  # Pillow never decodes what we refuse


def test_pillows_bomb_warning_is_a_refusal_not_a_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)  # warns above 300, raises above 600
    with pytest.raises(DataError, match=r"^big\.png: image too large; at most 300 pixels"):
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


# --- find_images: files, folders, globs, lists ----------------------------------------------


def test_find_images_takes_files_folders_globs_and_lists_in_order_each_once(
    tmp_path: Path,
) -> None:
    from grounding.io.images import find_images

    photos = tmp_path / "photos"
    (photos / "deeper").mkdir(parents=True)
    for name in ("b.JPG", "a.png", "notes.txt", "deeper/c.jpg"):
        (photos / name).write_bytes(b"")
    listed = tmp_path / "list.txt"
    listed.write_text("# a comment\n\nphotos/deeper/c.jpg\n" + str(photos / "a.png") + "\n")
    found = find_images(
        [
            str(photos / "missing.jpg"),
            str(photos),
            str(photos / "**" / "*.jpg"),
            f"@{listed}",
        ]
    )
    assert found == [
        photos / "missing.jpg",
        photos / "a.png",
        photos / "b.JPG",
        photos / "deeper/c.jpg",
    ]


@pytest.mark.parametrize(
    "source, message",
    [
        ("empty", "a folder with no image file"),
        ("empty/*.jpg", "the pattern matches no image file"),
        ("@absent.txt", "cannot read the list of images"),
    ],
)
def test_find_images_refuses_a_source_that_names_nothing(
    tmp_path: Path, source: str, message: str
) -> None:
    from grounding.io.images import find_images

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("")
    source = f"@{tmp_path / source[1:]}" if source.startswith("@") else str(tmp_path / source)
    with pytest.raises(DataError, match=message):
        find_images([source])


def test_write_picture_writes_the_suffix_format_and_refuses_others(tmp_path: Path) -> None:
    from grounding.io.images import write_picture

    image = Image.new("RGB", (8, 6), (10, 200, 30))
    write_picture(image, tmp_path / "a.jpg")
    assert Image.open(tmp_path / "a.jpg").format == "JPEG"
    write_picture(image, tmp_path / "a.png")
    assert Image.open(tmp_path / "a.png").getpixel((0, 0)) == (10, 200, 30)
    with pytest.raises(DataError, match="cannot write a picture as 'pdf'"):
        write_picture(image, tmp_path / "a.pdf")
