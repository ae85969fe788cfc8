"""End to end: the parse, pair and split stages on the tiny dataset written into tmp_path."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from conftest import REPO_ROOT, TINY_COUNTS, TINY_IMAGES, write_dataset

from grounding.errors import run
from stages import pair as pair_stage
from stages import parse as parse_stage
from stages import split as split_stage

PAIR_SUMMARY = {
    "images": 5,
    "images_paired": 4,
    "images_left_out_no_file": 1,
    "images_left_out_no_candidate": 0,
    "phrases": 36,
    "phrases_paired": 28,
    "phrases_left_out_no_file": 5,
    "phrases_left_out_not_visual": 1,
    "phrases_left_out_no_box": 2,
    "candidates": 10,
    "candidates_per_image": 2.5,
    "pairs": 66,
    "positives": 30,
    "positive_share": 0.4545,
}

SPLIT_SUMMARY = {
    # image 100: 5 phrases x 4 regions, 7 positives -> oversampled to 13 of 26
    "train": {
        "images": 1,
        "phrases": 5,
        "pairs": 26,
        "positives": 13,
        "negatives": 13,
        "positive_share": 0.5,
    },
    "val": {
        "images": 1,
        "phrases": 7,
        "pairs": 14,
        "positives": 7,
        "negatives": 7,
        "positive_share": 0.5,
    },
    "test": {
        "images": 1,
        "phrases": 6,
        "pairs": 12,
        "positives": 6,
        "negatives": 6,
        "positive_share": 0.5,
    },
    "none": {"images": 1},  # image 500 is paired but in no split list
}


def write_params(path: Path, root: Path | str, **sections: dict[str, Any]) -> Path:
    """The repo's params.yaml with ``data.root`` (and any given keys) changed."""
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text(encoding="utf-8"))
    params["data"]["root"] = str(root)
    for section, values in sections.items():
        params[section].update(values)
    path.write_text(yaml.safe_dump(params), encoding="utf-8")
    return path


def parse_argv(work: Path) -> list[str]:
    return [
        "--params",
        str(work / "params.yaml"),
        "--out",
        str(work / "data" / "parsed"),
        "--summary",
        str(work / "reports" / "parse.json"),
        "--validation",
        str(work / "reports" / "validation" / "parse.json"),
    ]


def pair_argv(work: Path) -> list[str]:
    return [
        "--params",
        str(work / "params.yaml"),
        "--parsed",
        str(work / "data" / "parsed"),
        "--out",
        str(work / "data" / "pairs"),
        "--summary",
        str(work / "reports" / "pair.json"),
        "--validation",
        str(work / "reports" / "validation" / "pair.json"),
    ]


def split_argv(work: Path) -> list[str]:
    return [
        "--params",
        str(work / "params.yaml"),
        "--parsed",
        str(work / "data" / "parsed"),
        "--pairs",
        str(work / "data" / "pairs"),
        "--out",
        str(work / "data" / "split"),
        "--summary",
        str(work / "reports" / "split.json"),
        "--validation",
        str(work / "reports" / "validation" / "split.json"),
    ]


def features_argv(work: Path) -> list[str]:
    return [
        "--params",
        str(work / "params.yaml"),
        "--parsed",
        str(work / "data" / "parsed"),
        "--pairs",
        str(work / "data" / "pairs"),
        "--out",
        str(work / "data" / "features"),
        "--validation",
        str(work / "reports" / "validation" / "features.json"),
    ]


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working folder where parse, pair and split have run on the tiny dataset."""
    work = tmp_path_factory.mktemp("pipeline")
    root = write_dataset(work / "dataset")
    write_params(work / "params.yaml", root)
    with contextlib.chdir(work):
        parse_stage.main(parse_argv(work))
        pair_stage.main(pair_argv(work))
        split_stage.main(split_argv(work))
    return work


def test_parse_stage_outputs(work: Path) -> None:
    assert read_json(work / "reports" / "parse.json") == {
        **TINY_COUNTS,
        "skipped": [],
        "examples": {"duplicate_split_ids": [], "phrases_with_unknown_chain": []},
    }
    tables = {
        path.stem: pd.read_parquet(path) for path in (work / "data" / "parsed").glob("*.parquet")
    }
    assert {name: len(table) for name, table in tables.items()} == {
        "images": 5,
        "captions": 25,
        "phrases": 36,
        "boxes": 13,
        "chain_boxes": 14,
        "chains": 14,
    }
    assert tables["images"]["has_file"].tolist() == [True, True, True, False, True]
    assert tables["captions"].loc[2, "text"] == "A café in the street ."
    report = read_json(work / "reports" / "validation" / "parse.json")
    assert report["success"] is True and len(report["checks"]) > 20


def test_pair_stage_outputs(work: Path) -> None:
    assert read_json(work / "reports" / "pair.json") == PAIR_SUMMARY
    pairs = pd.read_parquet(work / "data" / "pairs" / "pairs.parquet")
    assert (len(pairs), int(pairs["label"].sum())) == (66, 30)
    candidates = pd.read_parquet(work / "data" / "pairs" / "candidates.parquet")
    assert len(candidates) == 10 and "400" not in set(candidates["image_id"])
    assert read_json(work / "reports" / "validation" / "pair.json")["success"] is True


def test_split_stage_outputs(work: Path) -> None:
    assert read_json(work / "reports" / "split.json") == SPLIT_SUMMARY
    tables = {
        name: pd.read_parquet(work / "data" / "split" / f"{name}.parquet")
        for name in ("train", "val", "test")
    }
    assert {name: set(t["image_id"]) for name, t in tables.items()} == {
        "train": {"100"},
        "val": {"200"},
        "test": {"300"},
    }
    assert [len(t) for t in tables.values()] == [26, 14, 12]
    assert read_json(work / "reports" / "validation" / "split.json")["success"] is True


def test_no_temp_files_are_left(work: Path) -> None:
    assert [p for p in work.rglob("*") if p.name.endswith(".tmp")] == []


def test_skip_bad_files_lists_the_file_and_split_stops_on_the_empty_split(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = TINY_IMAGES[2].xml.replace(b"</size>", b"</sise>")  # image 300, the test split
    root = write_dataset(tmp_path / "dataset", replace={"Annotations/300.xml": bad})
    write_params(tmp_path / "params.yaml", root, parse={"skip_bad_files": True})
    parse_stage.main(parse_argv(tmp_path))
    summary = read_json(tmp_path / "reports" / "parse.json")
    # the bad file only: its id in test.txt is not reported again as an image without files
    assert summary["images"] == 4 and summary["skipped_files"] == 1
    [skipped] = summary["skipped"]
    assert skipped["source"] == f"{root}/annotations.zip!Annotations/300.xml"
    assert skipped["line"] == 7
    pair_stage.main(pair_argv(tmp_path))
    capsys.readouterr()
    with pytest.raises(SystemExit) as caught:
        run(split_stage.main, split_argv(tmp_path))
    assert caught.value.code == 1
    assert capsys.readouterr().err.startswith("error: the test split has no pairs")
    assert not (tmp_path / "data" / "split").exists()


def test_pair_stage_with_selective_search_caches_the_proposals(
    work: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DVC_ROOT", raising=False)  # the cache is under the working folder
    write_params(
        tmp_path / "params.yaml", work / "dataset", pair={"candidates": "selective_search"}
    )
    argv = pair_argv(tmp_path)
    argv[argv.index("--parsed") + 1] = str(work / "data" / "parsed")
    with contextlib.chdir(tmp_path):
        pair_stage.main(argv)
        cached = sorted((tmp_path / "data" / "proposals").glob("*.npy"))
        first = pd.read_parquet(tmp_path / "data" / "pairs" / "candidates.parquet")
        pair_stage.main(argv)  # again: from the cache
    assert sorted((tmp_path / "data" / "proposals").glob("*.npy")) == cached
    assert len(cached) == 4  # one per image with a file: 100, 200, 300, 500
    candidates = pd.read_parquet(tmp_path / "data" / "pairs" / "candidates.parquet")
    pd.testing.assert_frame_equal(candidates, first)
    assert set(candidates["source"]) == {"selective_search"}
    assert candidates["region_id"].tolist() == list(range(len(candidates)))
    assert "400" not in set(candidates["image_id"])  # its file is missing
    summary = read_json(tmp_path / "reports" / "pair.json")
    assert summary["candidates"] == len(candidates)
    pairs = pd.read_parquet(tmp_path / "data" / "pairs" / "pairs.parquet")
    assert summary["pairs"] == len(pairs)
    assert set(pairs["region_id"]) <= set(candidates["region_id"])
    assert read_json(tmp_path / "reports" / "validation" / "pair.json")["success"] is True


BAD_SETTINGS = {
    "mode": "fast",
    "max_side": 8,
    "min_size": 16,
    "dedupe_iou": 0.7,
    "max_proposals": 100,
}


@pytest.mark.parametrize(
    "sections, stage, message",
    [
        ({"data": {"format": "coco"}}, "parse", "unknown dataset format 'coco'"),
        ({"pair": {"candidates": "proposals"}}, "pair", "unknown candidate generator 'proposals'"),
        ({"pair": {"engine": "spark"}}, "pair", "pair.engine: unknown engine 'spark'"),
        ({"features": {"engine": "spark"}}, "features", "features.engine: unknown engine 'spark'"),
        (
            {
                "pair": {"candidates": "selective_search"},
                "candidates": {"selective_search": BAD_SETTINGS},
            },
            "pair",
            "candidates.selective_search: selective search needs max_side >= 16",
        ),
        (
            {"features": {"backbone": "resnet-9000"}},
            "features",
            "features.backbone: unknown backbone",
        ),
    ],
    ids=["format", "generator", "pair-engine", "features-engine", "settings", "backbone"],
)
def test_an_unknown_name_or_bad_setting_exits_with_status_1_before_writing(
    work: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    sections: dict[str, dict[str, Any]],
    stage: str,
    message: str,
) -> None:
    from stages import features as features_stage

    write_params(tmp_path / "params.yaml", work / "dataset", **sections)
    module, argv = {
        "parse": (parse_stage, parse_argv),
        "pair": (pair_stage, pair_argv),
        "features": (features_stage, features_argv),
    }[stage]
    arguments = argv(tmp_path)
    for option, folder in (("--parsed", "parsed"), ("--pairs", "pairs")):
        if option in arguments:  # read the module's outputs: only `stage` runs here
            arguments[arguments.index(option) + 1] = str(work / "data" / folder)
    with contextlib.chdir(tmp_path), pytest.raises(SystemExit) as caught:
        run(module.main, arguments)
    assert caught.value.code == 1
    error = capsys.readouterr().err
    assert error.startswith("error: ") and message in error, error
    assert not (tmp_path / "data").exists() and not (tmp_path / "reports").exists()


def test_config_error_exits_with_status_1_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_params(tmp_path / "params.yaml", tmp_path, parse={"skip_bad_file": True})
    with pytest.raises(SystemExit) as caught:
        run(parse_stage.main, parse_argv(tmp_path))
    assert caught.value.code == 1
    assert "parse.skip_bad_file" in capsys.readouterr().err


def test_malformed_xml_exits_with_status_1_naming_the_file(tmp_path: Path) -> None:
    bad = TINY_IMAGES[1].xml.replace(b"<name>8</name>", b"<name>8</nme>")  # line 18
    write_dataset(tmp_path / "dataset", replace={"Annotations/200.xml": bad})
    write_params(tmp_path / "params.yaml", "dataset")  # relative to the working folder
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(REPO_ROOT / "src"), str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]
        ),
    }
    argv = [
        "--params",
        "params.yaml",
        "--out",
        "data/parsed",
        "--summary",
        "reports/parse.json",
        "--validation",
        "reports/validation/parse.json",
    ]
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "stages" / "parse.py"), *argv],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1
    assert errors[0].startswith(
        "error: dataset/annotations.zip!Annotations/200.xml:18: malformed XML: "
    )
    assert "tag mismatch" in errors[0]
    assert not (tmp_path / "data").exists() and not (tmp_path / "reports").exists()


def run_parse(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """Run the parse stage in ``tmp_path`` as ``dvc repro`` would; its stderr (exit 1)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as caught:
        run(parse_stage.main, parse_argv(tmp_path))
    assert caught.value.code == 1
    return capsys.readouterr().err


def test_a_chain_id_too_large_for_int64_is_one_located_error_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    huge = b"12345678901234567890123"
    image = TINY_IMAGES[0]  # 100: chain 1 is named on line 9 of its XML, in its first caption
    replace = {
        "Annotations/100.xml": image.xml.replace(
            b"<name>1</name>", b"<name>" + huge + b"</name>", 1
        ),
        "Sentences/100.txt": image.sentences.replace(b"/EN#1/", b"/EN#" + huge + b"/", 1),
    }
    root = write_dataset(tmp_path / "dataset", replace=replace)
    write_params(tmp_path / "params.yaml", root)
    error = run_parse(tmp_path, capsys)
    assert error.splitlines()[-1] == (
        f"error: {root}/annotations.zip!Annotations/100.xml:9: chain id {huge.decode()} "
        "is not in 0..2^63-1"
    )
    assert not (tmp_path / "data").exists() and not (tmp_path / "reports").exists()


@pytest.mark.parametrize("end", [b"\r", b"\r\n"], ids=["CR", "CRLF"])
def test_old_mac_line_ends_and_byte_order_marks_parse_as_the_plain_files(
    tmp_path: Path, work: Path, end: bytes
) -> None:
    bom = b"\xef\xbb\xbf"
    replace = {
        f"Sentences/{image.image_id}.txt": bom + image.sentences.replace(b"\n", end)
        for image in TINY_IMAGES
    }
    root = write_dataset(tmp_path / "dataset", replace=replace)
    for split_list in root.glob("*.txt"):
        split_list.write_bytes(bom + split_list.read_bytes().replace(b"\n", end))
    write_params(tmp_path / "params.yaml", root)
    parse_stage.main(parse_argv(tmp_path))
    assert read_json(tmp_path / "reports" / "parse.json") == read_json(
        work / "reports" / "parse.json"
    )
    for name in ("images", "captions", "phrases"):
        pd.testing.assert_frame_equal(
            pd.read_parquet(tmp_path / "data" / "parsed" / f"{name}.parquet"),
            pd.read_parquet(work / "data" / "parsed" / f"{name}.parquet"),
        )


def test_a_non_utf8_split_list_is_one_located_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = write_dataset(tmp_path / "dataset")
    (root / "train.txt").write_bytes(b"100\n4\xe900\n")  # Latin-1
    write_params(tmp_path / "params.yaml", root)
    error = run_parse(tmp_path, capsys)
    assert error.splitlines()[-1] == (
        f"error: {root}/train.txt:2: not UTF-8 text (invalid continuation byte at byte 5)"
    )
    assert not (tmp_path / "data").exists()


def test_duplicate_split_ids_and_unknown_chains_are_counted_with_examples(
    tmp_path: Path,
) -> None:
    image = TINY_IMAGES[0]
    unknown = image.sentences.replace(b"/EN#1/", b"/EN#99/", 1)  # chain 99: not in the XML
    root = write_dataset(tmp_path / "dataset", replace={"Sentences/100.txt": unknown})
    (root / "train.txt").write_text("100\n400\n100\n", encoding="utf-8")
    write_params(tmp_path / "params.yaml", root)
    parse_stage.main(parse_argv(tmp_path))
    summary = read_json(tmp_path / "reports" / "parse.json")
    assert summary["images_train"] == 2  # 100 counted once
    assert summary["duplicate_split_ids"] == 1
    assert summary["phrases_with_unknown_chain"] == 1
    assert summary["phrases_with_box"] == TINY_COUNTS["phrases_with_box"] - 1
    assert summary["examples"]["duplicate_split_ids"] == [
        {
            "source": str(root / "train.txt"),
            "reason": "image id 100 is listed again (first on line 1)",
            "line": 3,
        }
    ]
    [phrase] = summary["examples"]["phrases_with_unknown_chain"]
    assert (phrase["image_id"], phrase["chain_id"]) == ("100", 99)
    phrases = pd.read_parquet(tmp_path / "data" / "parsed" / "phrases.parquet")
    assert not phrases.loc[phrases["chain_id"] == 99, "has_box"].any()


def test_features_on_a_full_device_is_one_line_and_leaves_no_temp_file(
    work: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from stand_ins import POOLING, WORDS, install, word_encoder

    from stages import features as features_stage

    install(monkeypatch)
    monkeypatch.setattr(features_stage, "load_text_encoder", lambda name, **_: word_encoder())

    def posix_fallocate(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", posix_fallocate, raising=False)
    write_params(
        tmp_path / "params.yaml",
        work / "dataset",
        features={"backbone": POOLING, "text_encoder": WORDS},
    )
    arguments = features_argv(tmp_path)
    for option, folder in (("--parsed", "parsed"), ("--pairs", "pairs")):
        arguments[arguments.index(option) + 1] = str(work / "data" / folder)
    capsys.readouterr()
    with contextlib.chdir(tmp_path), pytest.raises(SystemExit) as caught:
        run(features_stage.main, arguments)
    assert caught.value.code == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    regions = tmp_path / "data" / "features" / "regions.npy"
    assert re.fullmatch(
        rf"error: no space left on device writing {re.escape(str(regions))} "
        r"\(needs ~0\.0 MB, [\d,]+\.\d MB free\)",
        error,
    ), error
    assert list((tmp_path / "data" / "features").iterdir()) == []


@pytest.mark.slow
def test_the_ray_engine_writes_local_s_features_folder_byte_for_byte(
    work: Path, tmp_path: Path, local_ray: None
) -> None:
    from stages import features as features_stage

    folders = {}
    for engine in ("local", "ray"):
        run_dir = tmp_path / engine
        run_dir.mkdir()
        # 2 images a batch: the tiny dataset's 4 images make 2 blocks, one for each actor
        write_params(run_dir / "params.yaml", work / "dataset",
                     features={"engine": engine, "batch_size": 2, "image_size": 224})  # fmt: skip
        arguments = features_argv(run_dir)
        for option, folder in (("--parsed", "parsed"), ("--pairs", "pairs")):
            arguments[arguments.index(option) + 1] = str(work / "data" / folder)
        with contextlib.chdir(run_dir):
            features_stage.main(arguments)
        folders[engine] = run_dir / "data" / "features"
    names = sorted(p.name for p in folders["local"].iterdir())
    assert names == sorted(p.name for p in folders["ray"].iterdir())  # no shards left
    assert "regions.npy" in names
    for name in names:
        assert (folders["ray"] / name).read_bytes() == (folders["local"] / name).read_bytes(), name
