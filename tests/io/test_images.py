"""Images: the one decoder (errors name the file or row), the files present, ImageFolder."""

from __future__ import annotations

import io as bytes_io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import jpeg_bytes, png_header
from PIL import Image

from grounding import io
from grounding.errors import DataError
from grounding.io import images
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


def jpeg_with_orientation(orientation: int, scale: int = 1) -> bytes:
    """A 40x20 JPEG (times ``scale``) as stored, red on the left half, blue on the right,
    EXIF-tagged."""
    image = Image.new("RGB", (40 * scale, 20 * scale), (255, 0, 0))
    image.paste((0, 0, 255), (20 * scale, 0, 40 * scale, 20 * scale))
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


# --- hostile files: devices, FIFOs, byte cap, decoding no larger than needed ------------------


def _read_in_a_child(path: Path) -> subprocess.CompletedProcess[str]:
    """``read_image(path)`` in a child process of at most 1 GB and 60 s: reading ``/dev/zero``
    whole, or waiting on a FIFO for a writer, fails the test instead of hanging it."""
    program = (
        "import resource, sys; from pathlib import Path; "
        "resource.setrlimit(resource.RLIMIT_AS, (2**30, 2**30)); "
        "from grounding import io; from grounding.errors import run; "
        f"run(lambda argv: io.read_image(Path({str(path)!r})))"
    )
    try:
        return subprocess.run(
            [sys.executable, "-c", program], capture_output=True, text=True, timeout=60
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"reading {path} did not end within 60 s")


@pytest.mark.parametrize("kind", ["device", "symlink to a device", "fifo"])
def test_a_file_that_is_not_a_regular_file_is_refused_before_it_is_read(
    tmp_path: Path, kind: str
) -> None:
    path = tmp_path / "images" / "1.jpg"
    path.parent.mkdir()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink to a device":
        path.symlink_to("/dev/zero")
    else:
        path = Path("/dev/zero")
    done = _read_in_a_child(path)
    assert done.returncode == 1, done.stderr
    assert done.stderr == (
        f"error: {path}: not a regular file (a device, FIFO or socket); an image must be a file\n"
    )
    # the features stage reads images through ImageFolder, the same way
    if kind != "device":
        images = pd.DataFrame({"image_id": ["1"], "file_name": ["1.jpg"]})
        with pytest.raises(DataError, match="not a regular file"):
            io.ImageFolder(path.parent, images)("1")


def test_an_image_file_over_the_byte_cap_is_refused_unread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(images, "MAX_IMAGE_BYTES", 100)
    path = tmp_path / "big.png"
    path.write_bytes(png_bytes("RGB", (64, 64)) + bytes(200))
    message = r"image file is \d+ bytes; at most 100 accepted"
    with pytest.raises(DataError, match=rf"^{path}: {message}$"):
        io.read_image(path)
    with pytest.raises(DataError, match=rf"^row 2: {message}$"):
        io.decode_image(path.read_bytes(), "row 2")


def test_an_error_never_shows_a_stream_object() -> None:
    for data in (b"not an image", png_bytes("RGB", (64, 64))[:60]):
        with pytest.raises(DataError) as raised:
            io.decode_image(data, "row 0")
        assert "<_io." not in str(raised.value) and "0x" not in str(raised.value)


def test_max_side_decodes_no_larger_than_needed(tmp_path: Path) -> None:
    picture = Image.new("RGB", (2000, 1000), (200, 10, 10))
    picture.paste((10, 10, 200), (1000, 0, 2000, 1000))  # right half blue
    for name in ("wide.jpg", "wide.png"):
        picture.save(tmp_path / name)
        image = io.read_image(tmp_path / name, max_side=448)
        # JPEG: drafted at 1/4 (500 px); PNG: reduced by 4 (2000 // 448)
        assert image.size == (500, 250) and image.info["full_size"] == (2000, 1000)
        left, right = np.asarray(image)[100, 100], np.asarray(image)[100, 400]
        assert left[0] > 180 > left[2] and right[2] > 180 > right[0]
        assert io.read_image(tmp_path / name).size == (2000, 1000)  # no max_side: full size
    small = io.read_image(tmp_path / "wide.png", max_side=1000)  # 2000 // 1000: by 2
    assert small.size == (1000, 500)
    assert "full_size" not in io.read_image(tmp_path / "wide.png", max_side=1500).info
    turned = io.decode_image(jpeg_with_orientation(6, scale=10), "phone.jpg", max_side=100)
    assert turned.size == (50, 100) and turned.info["full_size"] == (200, 400)  # drafted by 4
    # never shrunk below 32 pixels a side, which a grounder needs
    thin = io.decode_image(jpeg_with_orientation(6), "phone.jpg", max_side=16)
    assert thin.size == (20, 40) and "full_size" not in thin.info


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


def test_a_huge_png_decoded_for_a_model_holds_one_full_size_copy_at_most(tmp_path: Path) -> None:
    # 7700x7700 (59.3 Mpx, under the cap) in a 0.2 MB file: decoded whole it is 237 MB (4 bytes
    # a pixel); an EXIF copy and an RGB copy beside it made each request hold three times that
    path = tmp_path / "huge.png"
    Image.new("RGB", (7700, 7700), (120, 160, 200)).save(path)
    program = (
        "import resource; from pathlib import Path; from grounding import io; "
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
        f"image = io.read_image(Path({str(path)!r}), max_side=448); "
        "grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before; "
        "print(image.size, image.info['full_size'], grown // 1024)"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    *shown, grown_mb = done.stdout.split()
    assert " ".join(shown) == "(453, 453) (7700, 7700)"  # reduced by 17, full size kept
    assert int(grown_mb) < 400  # one 237 MB copy, not three


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
