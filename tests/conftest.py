"""Hand-written Flickr30k Entities fixtures: XML and caption snippets, and a tiny dataset.

The tiny dataset has five images that carry every quirk of the format between them; its
counts below are counted by hand from the files, not computed by the package.

==========  =====  ========  ==========================================================
image id    split  has file  quirks
==========  =====  ========  ==========================================================
100         train  yes       chain 1 owns two boxes; one box shared by chains 2 and 3;
                             ``<nobndbox>1`` (chain 4) and ``<scene>1`` (chain 5) objects;
                             a phrase with two types; a not-visual phrase (chain 0); a
                             caption with no phrase; non-ASCII text (``café``)
200         val    yes       chains 7 and 8 have boxes with the same coordinates
300         test   yes       chain 12 lists the same coordinates twice
400         train  no        its JPEG is missing
500         (none) yes       in no split list
==========  =====  ========  ==========================================================
"""

from __future__ import annotations

import io
import os
import struct
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image
from repository import REPO as REPO_ROOT
from repository import SHARED_DATA

from grounding.data.formats.flickr30k import AnnotationFiles, Flickr30kReader, SplitList
from grounding.data.tables import ParsedDataset, build_tables
from grounding.numerics import use_numerics

# the pipeline's default CPU kernels for every test, fixed before any test loads torch (a stage
# called in this process refuses to run on kernels its runtime.numerics did not choose)
use_numerics("portable")

__all__ = ["REPO_ROOT", "SHARED_DATA"]

XmlBox = tuple[int, int, int, int]  # (xmin, ymin, xmax, ymax), 1-based inclusive, as in the XML


# --- snippets -------------------------------------------------------------------------------


def object_xml(
    names: Sequence[int | str],
    box: XmlBox | None = None,
    *,
    nobndbox: int | None = None,
    scene: int | None = None,
) -> str:
    """One ``<object>`` laid out as in the official files (tabs, one element a line)."""
    lines = ["\t<object>", *(f"\t\t<name>{name}</name>" for name in names)]
    if scene is not None:
        lines.append(f"\t\t<scene>{scene}</scene>")
    if nobndbox is not None:
        lines.append(f"\t\t<nobndbox>{nobndbox}</nobndbox>")
    if box is not None:
        xmin, ymin, xmax, ymax = box
        lines += [
            "\t\t<bndbox>",
            f"\t\t\t<xmin>{xmin}</xmin>",
            f"\t\t\t<ymin>{ymin}</ymin>",
            f"\t\t\t<xmax>{xmax}</xmax>",
            f"\t\t\t<ymax>{ymax}</ymax>",
            "\t\t</bndbox>",
        ]
    lines.append("\t</object>")
    return "\n".join(lines)


def annotation_xml(image_id: str, width: int, height: int, objects: Sequence[str]) -> bytes:
    """A whole ``Annotations/<id>.xml`` file. Line numbers: ``<annotation>`` is line 1,
    ``<width>`` line 4, ``<height>`` line 5, and the first ``<object>`` line 8."""
    lines = [
        "<annotation>",
        f"\t<filename>{image_id}.jpg</filename>",
        "\t<size>",
        f"\t\t<width>{width}</width>",
        f"\t\t<height>{height}</height>",
        "\t\t<depth>3</depth>",
        "\t</size>",
        *objects,
        "</annotation>",
    ]
    return ("\n".join(lines) + "\n").encode("utf-8")


def sentences_text(lines: Sequence[str]) -> bytes:
    """A whole ``Sentences/<id>.txt`` file: one caption a line, UTF-8, final newline."""
    return ("\n".join(lines) + "\n").encode("utf-8")


def jpeg_bytes(width: int, height: int, colour: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    """A real JPEG of the given size (with some structure, so that it is not tiny)."""
    image = Image.new("RGB", (width, height), colour)
    for x in range(0, width, 4):
        for y in range(0, height, 3):
            image.putpixel((x, y), ((x * 7) % 256, (y * 5) % 256, (x * y) % 256))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width x height`` RGB pixels but holds a few bytes of them."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 100))
        + chunk(b"IEND", b"")
    )


# --- the tiny dataset -----------------------------------------------------------------------


@dataclass(frozen=True)
class TinyImage:
    image_id: str
    width: int
    height: int
    split: str | None  # None: in no split list
    has_file: bool
    xml: bytes
    sentences: bytes


TINY_IMAGES: tuple[TinyImage, ...] = (
    TinyImage(
        "100",
        100,
        80,
        "train",
        True,
        annotation_xml(
            "100",
            100,
            80,
            [
                object_xml([1], (1, 1, 50, 40)),  # box 0 -> (0, 0, 50, 40)
                object_xml([1], (51, 1, 100, 40)),  # box 1 -> (50, 0, 100, 40)
                object_xml([2, 3], (11, 41, 30, 80)),  # box 2 -> (10, 40, 30, 80), two chains
                object_xml([4], nobndbox=1, scene=0),
                object_xml([5], nobndbox=0, scene=1),
                object_xml([6], (1, 41, 10, 80)),  # box 3 -> (0, 40, 10, 80)
            ],
        ),
        sentences_text(
            [
                "[/EN#1/people Two men] stand near [/EN#2/vehicles/scene a red car] .",
                "[/EN#3/other It] is [/EN#0/notvisual very] old near [/EN#6/other a pole] .",
                "A café in [/EN#5/scene the street] .",
                "Nothing to see here .",
                "[/EN#4/other A sign] and [/EN#1/people the men] .",
            ]
        ),
    ),
    TinyImage(
        "200",
        60,
        60,
        "val",
        True,
        annotation_xml(
            "200",
            60,
            60,
            [
                object_xml([7], (1, 1, 30, 30)),
                object_xml([8], (1, 1, 30, 30)),  # same coordinates as chain 7's box
                object_xml([9], (31, 31, 60, 60)),
            ],
        ),
        sentences_text(
            [
                "[/EN#7/animals A dog] chases [/EN#9/animals a cat] .",
                "[/EN#8/animals The puppy] runs .",
                "[/EN#7/animals A dog] plays .",
                "[/EN#9/animals A cat] sits .",
                "[/EN#7/animals A dog] and [/EN#9/animals a cat] .",
            ]
        ),
    ),
    TinyImage(
        "300",
        50,
        40,
        "test",
        True,
        annotation_xml(
            "300",
            50,
            40,
            [
                object_xml([11], (1, 1, 25, 40)),
                object_xml([12], (26, 1, 50, 40)),
                object_xml([12], (26, 1, 50, 40)),  # the same chain lists its box twice
            ],
        ),
        sentences_text(
            [
                "[/EN#11/people A woman] holds [/EN#12/instruments a guitar] .",
                "[/EN#11/people Someone] plays .",
                "[/EN#12/instruments The guitar] is brown .",
                "[/EN#11/people A woman] sings .",
                "[/EN#11/people A woman] is happy .",
            ]
        ),
    ),
    TinyImage(
        "400",
        40,
        40,
        "train",
        False,
        annotation_xml("400", 40, 40, [object_xml([21], (1, 1, 40, 40))]),
        sentences_text(
            [
                "[/EN#21/people A child] smiles .",
                "[/EN#21/people A kid] laughs .",
                "[/EN#21/people The child] is happy .",
                "[/EN#21/people A small child] grins .",
                "[/EN#21/people A boy] smiles .",
            ]
        ),
    ),
    TinyImage(
        "500",
        30,
        30,
        None,
        True,
        annotation_xml(
            "500",
            30,
            30,
            [object_xml([31], (1, 1, 15, 15)), object_xml([32], (16, 16, 30, 30))],
        ),
        sentences_text(["[/EN#31/clothing A hat] and [/EN#32/clothing a scarf] ."] * 5),
    ),
)

#: Counted by hand from the files above.
TINY_COUNTS: dict[str, int] = {
    "images": 5,
    "captions": 25,
    "phrases": 8 + 7 + 6 + 5 + 10,
    # 100: chains 1 (x2), 2, 3, 6 have boxes; 0 (not visual), 4 (nobndbox), 5 (scene) do not
    "phrases_with_box": 5 + 7 + 6 + 5 + 10,
    "boxes": 4 + 3 + 3 + 1 + 2,
    "chains": 6 + 3 + 2 + 1 + 2,
    "images_with_file": 4,
    "skipped_files": 0,
    "duplicate_split_ids": 0,
    "phrases_with_unknown_chain": 0,
    "images_train": 2,
    "images_val": 1,
    "images_test": 1,
    "images_none": 1,
}


def tiny_annotation_files(images: Sequence[TinyImage] = TINY_IMAGES) -> list[AnnotationFiles]:
    return [
        AnnotationFiles(
            image_id=image.image_id,
            xml=image.xml,
            xml_source=f"Annotations/{image.image_id}.xml",
            sentences=image.sentences,
            sentences_source=f"Sentences/{image.image_id}.txt",
        )
        for image in images
    ]


def tiny_split_lists(images: Sequence[TinyImage] = TINY_IMAGES) -> list[SplitList]:
    return [
        SplitList(split, f"{split}.txt", [im.image_id for im in images if im.split == split])
        for split in ("train", "val", "test")
    ]


def tiny_image_files(images: Sequence[TinyImage] = TINY_IMAGES) -> set[str]:
    """The file names (``<id>.jpg``) of the images whose file exists."""
    return {f"{image.image_id}.jpg" for image in images if image.has_file}


def parse_dataset(
    annotation_files: Sequence[AnnotationFiles],
    split_lists: Sequence[SplitList],
    image_files: set[str],
    *,
    skip_bad_files: bool = False,
) -> ParsedDataset:
    """What the parse stage does with a Flickr30k Entities dataset, on files in memory."""
    reader = Flickr30kReader(list(annotation_files), split_lists, skip_bad_files=skip_bad_files)
    return build_tables(reader, image_files, reader.skipped, reader.duplicate_split_ids)


def write_dataset(
    root: Path,
    images: Sequence[TinyImage] = TINY_IMAGES,
    *,
    layout: str = "zip",
    replace: dict[str, bytes] | None = None,
) -> Path:
    """Write ``images`` under ``root`` in the Flickr30k Entities layout and return ``root``.

    ``layout`` is ``zip`` (``annotations.zip``) or ``folders`` (``Annotations/`` and
    ``Sentences/``); ``replace`` maps a relative name (``Annotations/100.xml``) to the bytes to
    write instead of the image's own.
    """
    files: dict[str, bytes] = {}
    for image in images:
        files[f"Annotations/{image.image_id}.xml"] = image.xml
        files[f"Sentences/{image.image_id}.txt"] = image.sentences
    files.update(replace or {})
    root.mkdir(parents=True, exist_ok=True)
    if layout == "zip":
        with zipfile.ZipFile(root / "annotations.zip", "w") as archive:
            archive.writestr("Annotations/", b"")
            archive.writestr("Sentences/", b"")
            for name, content in files.items():
                archive.writestr(name, content)
    elif layout == "folders":
        for name, content in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(content)
    else:
        raise ValueError(layout)
    for split in ("train", "val", "test"):
        ids = [image.image_id for image in images if image.split == split]
        (root / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")
    (root / "images").mkdir(exist_ok=True)
    for image in images:
        if image.has_file:
            (root / "images" / f"{image.image_id}.jpg").write_bytes(
                jpeg_bytes(image.width, image.height)
            )
    return root


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_parsed() -> ParsedDataset:
    """The tiny dataset parsed (do not modify its tables: copy them)."""
    return parse_dataset(tiny_annotation_files(), tiny_split_lists(), tiny_image_files())


# --- one local Ray for the tests of the ray engines ------------------------------------------


@pytest.fixture(scope="session")
def local_ray() -> Iterator[None]:
    """A local Ray of 2 workers for the whole test run (it takes seconds to start); the
    engines' ``connect`` finds it running. Skipped when Ray is not installed."""
    ray = pytest.importorskip("ray")
    address = os.environ.pop("RAY_ADDRESS", None)
    # the workers import the stand-ins (tests/) and this checkout's package (src/)
    paths = [str(REPO_ROOT / "tests"), str(REPO_ROOT / "src"), os.environ.get("PYTHONPATH", "")]
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, paths))}},
    )
    yield
    ray.shutdown()
    if address is not None:
        os.environ["RAY_ADDRESS"] = address
