"""Files: atomic writes of tables, arrays, JSON and figures; the features folder."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from grounding import io
from grounding.errors import DataError
from grounding.schemas import FeaturesMeta

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


def test_write_tables_is_all_or_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "parsed"
    old = {"images": pd.DataFrame({"image_id": ["1"]}), "boxes": pd.DataFrame({"x1": [0.0]})}
    io.write_tables(old, folder)
    new = {
        "images": pd.DataFrame({"image_id": ["1", "2"]}),
        "boxes": pd.DataFrame({"mixed": [1, "x"]}),  # pyarrow refuses mixed types
    }
    with pytest.raises(ValueError, match=r"Conversion failed|convert"):
        io.write_tables(new, folder)
    # the images table, written before boxes failed, was not renamed into place either
    kept = io.read_tables(folder, ("images", "boxes"))
    for name, table in old.items():
        pd.testing.assert_frame_equal(kept[name], table)
    assert sorted(p.name for p in folder.iterdir()) == ["boxes.parquet", "images.parquet"]


def test_write_tables_failing_midway_into_a_new_folder_leaves_no_folder(tmp_path: Path) -> None:
    tables = {
        "images": pd.DataFrame({"image_id": ["1"]}),
        "chains": pd.DataFrame({"chain_id": [1, 12345678901234567890123]}),  # beyond int64
        "boxes": pd.DataFrame({"x1": [0.0]}),
    }
    with pytest.raises(OverflowError):
        io.write_tables(tables, tmp_path / "data" / "parsed")
    assert list((tmp_path / "data").iterdir()) == []  # no parsed/, no table, no temp file


def test_csv_and_text_round_trip(tmp_path: Path) -> None:
    table = pd.DataFrame({"threshold": [0.25, 0.5], "recall": [0.9, 0.7]})
    io.write_csv(table, tmp_path / "plots" / "pr.csv")
    assert (tmp_path / "plots" / "pr.csv").read_text() == "threshold,recall\n0.25,0.9\n0.5,0.7\n"
    pd.testing.assert_frame_equal(io.read_csv(tmp_path / "plots" / "pr.csv"), table)
    io.write_files({"a/b.txt": "café".encode(), "c.bin": b"\0\1"}, tmp_path / "files")
    assert (tmp_path / "files" / "a" / "b.txt").read_text(encoding="utf-8") == "café"
    assert (tmp_path / "files" / "c.bin").read_bytes() == b"\0\1"


class RecordingFigure:
    """A figure that writes the format it was asked for."""

    def savefig(self, path: Path, *, format: str, dpi: int) -> None:
        Path(path).write_text(f"{format} at {dpi} dpi")


@pytest.mark.parametrize(("name", "written"), [("f.svg", "svg"), ("f.JPG", "jpg")])
def test_write_figure_takes_the_format_from_the_suffix(
    tmp_path: Path, name: str, written: str
) -> None:
    io.write_figure(RecordingFigure(), tmp_path / name)
    assert (tmp_path / name).read_text() == f"{written} at 100 dpi"


def test_write_figure_refuses_a_format_it_cannot_write(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"f\.gif: cannot write a picture as 'gif'"):
        io.write_figure(RecordingFigure(), tmp_path / "f.gif")
    assert list(tmp_path.iterdir()) == []


def test_reading_missing_json_or_array_names_it(tmp_path: Path) -> None:
    for read, name in [(io.read_json, "summary.json"), (io.read_array, "a.npy")]:
        with pytest.raises(DataError, match=rf"^{tmp_path}/{name}: missing"):
            read(tmp_path / name)


# --- the features folder ----------------------------------------------------------------------

META = FeaturesMeta(
    backbone="efficientnet-lite0",
    backbone_weights=None,
    text_encoder="all-minilm-l6-v2",
    image_size=448,
    context=False,
    region_dim=3,
    phrase_dim=2,
    regions=4,
    phrases=2,
)


def test_features_round_trip_with_their_metadata(tmp_path: Path) -> None:
    regions = np.arange(12, dtype=np.float32).reshape(4, 3)
    with io.region_features_writer(tmp_path, (4, 3)) as array:
        assert array.shape == (4, 3) and array.dtype == np.float32
        array[:] = regions
    phrases = np.array([[0.6, 0.8], [1.0, 0.0]], dtype=np.float32)
    phrase_rows = pd.DataFrame({"phrase_id": [5, 7, 9], "row": [0, 1, 0]})
    io.write_features(tmp_path, phrases, phrase_rows, META)
    stored = io.read_features(tmp_path)
    np.testing.assert_array_equal(stored.regions, regions)
    np.testing.assert_array_equal(stored.phrases, phrases)
    pd.testing.assert_frame_equal(stored.phrase_rows, phrase_rows)
    assert stored.meta == META
    assert isinstance(stored.regions, np.memmap)  # a large dataset's features are not loaded


def test_failed_region_features_leave_no_file(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), io.region_features_writer(tmp_path, (4, 3)) as array:
        array[0] = 1.0
        raise RuntimeError("backbone died")
    assert list(tmp_path.iterdir()) == []


def test_features_written_without_metadata_keys_are_named(tmp_path: Path) -> None:
    with io.region_features_writer(tmp_path, (1, 3)):
        pass
    io.write_features(tmp_path, np.ones((1, 2), np.float32), pd.DataFrame(), META)
    stale = {k: v for k, v in META.to_dict().items() if k != "region_dim"}
    io.write_json(stale, tmp_path / "features.json")
    with pytest.raises(DataError, match=r"lacks \['region_dim'\]"):
        io.read_features(tmp_path)


# --- a full device -------------------------------------------------------------------------

MB = 1_000_000


def full_device(monkeypatch: pytest.MonkeyPatch, free: int) -> None:
    """Make the device report ``free`` bytes free and refuse to reserve any space."""

    def posix_fallocate(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", posix_fallocate, raising=False)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=free))


def test_region_features_on_a_full_device_name_the_sizes_and_leave_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    full_device(monkeypatch, free=3 * MB)
    with pytest.raises(DataError) as caught, io.region_features_writer(tmp_path, (1000, 1280)):
        pytest.fail("the block must not run: its rows could not be written")
    assert str(caught.value) == (
        f"no space left on device writing {tmp_path / 'regions.npy'} (needs ~5.1 MB, 3.0 MB free)"
    )
    assert list(tmp_path.iterdir()) == []


def test_an_array_on_a_full_device_is_refused_before_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    full_device(monkeypatch, free=MB // 2)
    with pytest.raises(DataError, match=r"phrases\.npy \(needs ~4\.0 MB, 0\.5 MB free\)$"):
        io.write_array(np.zeros((1000, 1000), np.float32), tmp_path / "phrases.npy")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("free, fits", [(MB, False), (10 * MB, True)])
def test_without_space_reservation_the_free_space_is_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, free: int, fits: bool
) -> None:
    def posix_fallocate(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    monkeypatch.setattr(os, "posix_fallocate", posix_fallocate, raising=False)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=free))
    if fits:
        with io.region_features_writer(tmp_path, (1000, 1280)) as array:
            array[:] = 1.0
        assert io.read_array(tmp_path / "regions.npy").sum() == 1000 * 1280
    else:
        with pytest.raises(DataError, match=r"needs ~5\.1 MB, 1\.0 MB free"):
            io.write_array(np.ones((1000, 1280), np.float32), tmp_path / "regions.npy")
        assert list(tmp_path.iterdir()) == []


def test_any_write_that_fills_the_device_is_a_data_error_without_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def to_parquet(self: pd.DataFrame, path: Path, **kwargs: object) -> None:
        Path(path).write_bytes(b"PAR1 half")
        raise OSError(errno.ENOSPC, "Error writing bytes to file")  # what pyarrow raises

    monkeypatch.setattr(pd.DataFrame, "to_parquet", to_parquet)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=0))
    with pytest.raises(
        DataError, match=r"^no space left on device writing .*pairs\.parquet \(0\.0 MB free\)$"
    ):
        io.write_table(pd.DataFrame({"a": [1]}), tmp_path / "pairs.parquet")
    assert list(tmp_path.iterdir()) == []


def test_write_array_leaves_no_reserved_room_behind(tmp_path: Path) -> None:
    io.write_array(np.arange(12.0).reshape(3, 4), tmp_path / "a.npy")
    assert (tmp_path / "a.npy").stat().st_size == 128 + 12 * 8  # header + data, no more


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MB tmpfs (needs root and a kernel that lets this process mount one)."""
    full = tmp_path / "full"
    full.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(full)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield full
    finally:
        subprocess.run(["umount", str(full)], check=False)


@pytest.mark.slow
def test_region_features_on_a_real_full_device_are_an_error_not_sigbus(tiny_tmpfs: Path) -> None:
    # before issue 13 this process died of SIGBUS (exit -7), leaving a 5 MB temporary file
    script = (
        "from pathlib import Path\n"
        "from grounding import io\n"
        "from grounding.errors import run\n"
        "def main(argv):\n"
        f"    with io.region_features_writer(Path('{tiny_tmpfs}/features'), (1000, 1280)) as a:\n"
        "        a[:] = 1.0\n"
        "run(main)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False, timeout=120
    )
    assert result.returncode == 1, result
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: no space left on device writing {tiny_tmpfs}/features/regions.npy "
        "(needs ~5.1 MB, 1.0 MB free)"
    )
    assert list((tiny_tmpfs / "features").iterdir()) == []


def test_writable_checks_create_nothing_and_name_the_option(tmp_path: Path) -> None:
    io.check_writable_file(tmp_path / "new" / "deeper" / "boxes.png", "--out")
    io.check_writable_folder(tmp_path / "cache" / "proposals", "--cache")
    assert list(tmp_path.iterdir()) == []  # only probed
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match=r"^--out .*/file/a\.png: .*/file is a file, not a folder"):
        io.check_writable_file(tmp_path / "file" / "a.png", "--out")
    with pytest.raises(DataError, match=r"^--cache .*/file: a file, not a folder"):
        io.check_writable_folder(tmp_path / "file", "--cache")
    with pytest.raises(DataError, match=r"^--out .*: a folder, not a file"):
        io.check_writable_file(tmp_path, "--out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


# --- tables in parts --------------------------------------------------------------------------


def image_rows() -> pd.DataFrame:
    images = ["b", "b", "b", "a", "c", "c", "d"]
    return pd.DataFrame({"image_id": images, "value": np.arange(len(images), dtype=np.int64)})


def test_tables_written_in_parts_read_back_whole_and_in_parts(tmp_path: Path) -> None:
    table = image_rows()
    with io.table_writers(tmp_path, {"rows": table.iloc[:0], "none": table.iloc[:0]}) as writers:
        for start in range(0, len(table), 3):
            writers["rows"].write(table.iloc[start : start + 3])
    pd.testing.assert_frame_equal(io.read_table(tmp_path / "rows.parquet"), table)
    assert io.table_rows(tmp_path / "rows.parquet") == len(table)
    assert len(io.read_table(tmp_path / "none.parquet")) == 0  # no part: the empty table
    assert list(io.empty_table(tmp_path / "rows.parquet").columns) == ["image_id", "value"]
    parts = list(io.read_table_parts(tmp_path / "rows.parquet", ["value"], rows=2))
    assert [len(part) for part in parts] == [2, 2, 2, 1]
    # whole images per part, however the rows fall: b's three rows stay together
    whole = list(io.read_image_parts(tmp_path / "rows.parquet", rows=2))
    assert [part["image_id"].tolist() for part in whole] == [
        ["b", "b", "b"],
        ["a"],
        ["c", "c"],
        ["d"],
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["none.parquet", "rows.parquet"]


def test_a_failed_part_writes_no_table(tmp_path: Path) -> None:
    table = image_rows()
    with pytest.raises(RuntimeError), io.table_writers(tmp_path, {"rows": table}) as writers:
        writers["rows"].write(table)
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_image_parts_refuse_an_image_whose_rows_are_apart(tmp_path: Path) -> None:
    table = pd.DataFrame({"image_id": ["a", "b", "a"], "value": [0, 1, 2]})
    io.write_table(table, tmp_path / "rows.parquet")
    with pytest.raises(DataError, match="not consecutive"):
        list(io.read_image_parts(tmp_path / "rows.parquet", rows=1))


def test_write_all_writes_every_file_or_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "b.txt").write_text("old b")
    written = io.write_all({"a.txt": "new a", "sub/b.txt": "new sub b"}, out, "OUT")
    assert written == [out / "a.txt", out / "sub" / "b.txt"]
    assert (out / "sub" / "b.txt").read_text() == "new sub b"
    assert sorted(p.name for p in out.iterdir()) == ["a.txt", "b.txt", "sub"]  # no staging left

    # a write that fails half-way through staging leaves every target as it was
    real_write = Path.write_bytes

    def failing_write(self: Path, data: bytes) -> int:
        if self.name == "b.txt":
            raise OSError(5, "Input/output error")
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", failing_write)
    with pytest.raises(OSError, match="Input/output error"):
        io.write_all({"a.txt": "newer a", "b.txt": "newer b"}, out, "OUT")
    monkeypatch.undo()
    assert (out / "a.txt").read_text() == "new a" and (out / "b.txt").read_text() == "old b"
    assert sorted(p.name for p in out.iterdir()) == ["a.txt", "b.txt", "sub"]

    (out / "c.txt").mkdir()
    with pytest.raises(DataError, match=r"^OUT .*/out/c\.txt: a folder, not a file$"):
        io.write_all({"a.txt": "x", "c.txt": "y"}, out, "OUT")
    assert (out / "a.txt").read_text() == "new a"
