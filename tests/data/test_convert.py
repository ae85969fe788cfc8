"""`grounding convert` between the formats, on the tiny Flickr30k Entities dataset: what each
format keeps, the coordinates each writes, and the one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import REPO_ROOT, write_dataset

from grounding.cli import main
from grounding.data.formats import dataset_format
from grounding.data.tables import ParsedDataset, build_tables

PARAMS = REPO_ROOT / "params.yaml"
FILES = {"odvg": "train.jsonl", "mdetr": "final_flickr_separateGT_train.json"}


def convert(source: str, target: str, given: Path, out: Path, *extra: str) -> None:
    main(
        [
            "convert",
            "--from",
            source,
            "--to",
            target,
            str(given),
            str(out),
            "--params",
            str(PARAMS),
            *extra,
        ]
    )


def parsed(name: str, root: Path) -> ParsedDataset:
    files = {"train": "train.jsonl", "val": "val.jsonl", "test": "test.jsonl"}
    if name == "mdetr":
        files = {s: f"final_flickr_separateGT_{s}.json" for s in files}
    reader = dataset_format(name).open(
        root, splits=root, files={s: Path(f) for s, f in files.items()}
    )
    return build_tables(reader, {"100.jpg", "200.jpg", "300.jpg", "500.jpg"}, reader.skipped)


@pytest.fixture(scope="module")
def flickr(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("flickr30k"))


def in_a_split(table: pd.DataFrame) -> pd.DataFrame:
    """Rows of the images in a split (image 500 is in none: converters leave it out)."""
    return table[table["image_id"] != "500"].reset_index(drop=True)


def test_odvg_keeps_the_boxes_and_the_phrases_that_have_one(
    flickr: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    convert("flickr30k", "odvg", flickr, tmp_path)
    printed = capsys.readouterr().out.splitlines()
    assert printed == [
        f"{tmp_path}/train.jsonl: 2 images",
        f"{tmp_path}/val.jsonl: 1 images",
        f"{tmp_path}/test.jsonl: 1 images",
        "left out: 3 phrases without a box",  # not visual, nobndbox, scene (image 100)
        "left out: 1 images in no split",
    ]
    before, after = parsed("flickr30k", flickr), parsed("odvg", tmp_path)
    assert after.counts()["images"] == 4 and after.counts()["skipped_files"] == 0
    # box_id keeps every box, even two with the same coordinates, in the XML's order
    assert in_a_split(before.boxes).equals(after.boxes)
    assert in_a_split(before.images).equals(after.images)
    columns = ["image_id", "caption_index", "text", "first_word", "has_box"]
    with_box = in_a_split(before.phrases[before.phrases["has_box"]])
    assert with_box[columns].reset_index(drop=True).equals(after.phrases[columns])
    assert (after.phrases["types"] == "").all()  # ODVG grounding records carry no types
    assert in_a_split(before.captions)["text"].equals(after.captions["text"])


def test_mdetr_keeps_every_phrase_and_each_distinct_box(
    flickr: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    convert("flickr30k", "mdetr", flickr, tmp_path)
    assert capsys.readouterr().out.splitlines()[-1] == "left out: 1 images in no split"
    before, after = parsed("flickr30k", flickr), parsed("mdetr", tmp_path)
    columns = ["image_id", "caption_index", "phrase_index", "text", "first_word", "has_box"]
    assert in_a_split(before.phrases)[columns].equals(after.phrases[columns])
    distinct = in_a_split(before.boxes).drop_duplicates(["image_id", "x1", "y1", "x2", "y2"])
    boxes = ["image_id", "x1", "y1", "x2", "y2"]
    assert distinct[boxes].reset_index(drop=True).equals(after.boxes[boxes])
    assert len(after.boxes) == len(before.boxes) - 2 - 2  # 200 and 300 repeat a box; 500 gone


def test_each_format_writes_its_own_box_convention(flickr: Path, tmp_path: Path) -> None:
    # image 100's box 2 is <xmin>11</xmin><ymin>41</ymin><xmax>30</xmax><ymax>80</ymax>
    # (1-based, inclusive): canonical (10, 40, 30, 80)
    convert("flickr30k", "odvg", flickr, tmp_path)
    convert("flickr30k", "mdetr", flickr, tmp_path)
    lines = [json.loads(line) for line in (tmp_path / FILES["odvg"]).read_text().splitlines()]
    regions = [
        r for line in lines if line["filename"] == "100.jpg" for r in line["grounding"]["regions"]
    ]
    assert {
        "bbox": [10, 40, 30, 80],
        "phrase": "a red car",
        "tokens_positive": [[19, 28]],
        "box_id": 2,
    } in regions
    mdetr = json.loads((tmp_path / FILES["mdetr"]).read_text())
    boxes = {tuple(a["bbox"]) for a in mdetr["annotations"]}
    assert (10, 40, 20, 40) in boxes  # COCO x, y, w, h
    assert "dataset_name" not in mdetr["images"][0]  # so no reader takes the boxes as 1-based


def test_odvg_to_mdetr_and_back_keeps_the_records(flickr: Path, tmp_path: Path) -> None:
    convert("flickr30k", "odvg", flickr, tmp_path / "a")
    convert("odvg", "mdetr", tmp_path / "a", tmp_path / "b")
    convert("mdetr", "odvg", tmp_path / "b", tmp_path / "c")
    first, last = parsed("odvg", tmp_path / "a"), parsed("odvg", tmp_path / "c")
    assert first.images.equals(last.images) and first.captions.equals(last.captions)
    phrases = [c for c in first.phrases.columns if c != "chain_id"]
    assert first.phrases[phrases].equals(last.phrases[phrases])
    # MDETR makes one box of image 200's two boxes with the same coordinates, so "The puppy"
    # (chain 8 in the XML) now names the box of "A dog" (chain 7): one entity
    assert len(last.boxes) == len(first.boxes) - 2
    entity = last.phrases.set_index(["image_id", "text"])["chain_id"]
    assert entity["200", "The puppy"] == entity["200", "A dog"].iloc[0]
    assert first.phrases.set_index(["image_id", "text"])["chain_id"]["200", "The puppy"] != 1


def test_errors_are_one_line(
    flickr: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        convert("odvg", "mdetr", tmp_path / "nothing", tmp_path / "out")
    assert exited.value.code == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: {tmp_path}/nothing/train.jsonl: no such file (the train split of an ODVG dataset)"
    )
    params = yaml.safe_load(PARAMS.read_text())
    params["data"]["odvg"]["val"] = None
    no_val = tmp_path / "params.yaml"
    no_val.write_text(yaml.safe_dump(params))
    args = ["convert", "--from", "flickr30k", "--to", "odvg", str(flickr), str(tmp_path / "x")]
    with pytest.raises(SystemExit):
        main([*args, "--params", str(no_val)])
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: data.odvg.val is null in {no_val}, but 1 images are in the val split"
    )
    assert not (tmp_path / "x").exists()  # nothing written
    with pytest.raises(SystemExit):
        main([*args, "--params", str(tmp_path / "missing.yaml")])
    assert "missing.yaml: no params file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["convert", "--from", "odvg", "--to", "flickr30k", str(flickr), str(tmp_path)])
    assert exited.value.code == 2 and "invalid choice: 'flickr30k'" in capsys.readouterr().err


def test_skip_bad_files_converts_the_rest_and_counts_what_it_left_out(
    flickr: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    convert("flickr30k", "odvg", flickr, tmp_path / "a")
    train = tmp_path / "a" / "train.jsonl"
    train.write_text(train.read_text() + '{"filename": "9.jpg"\n')
    capsys.readouterr()
    with pytest.raises(SystemExit):
        convert("odvg", "mdetr", tmp_path / "a", tmp_path / "b")
    assert capsys.readouterr().err.startswith(f"error: {train}:11: malformed JSON")
    convert("odvg", "mdetr", tmp_path / "a", tmp_path / "b", "--skip-bad-files")
    printed = capsys.readouterr().out
    assert "left out: 1 records that break the format (--skip-bad-files)" in printed
    assert parsed("mdetr", tmp_path / "b").counts()["images"] == 4


def test_labelstudio_tasks_reviewed_as_they_are_read_back_as_the_boxed_phrases(
    flickr: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    convert("flickr30k", "labelstudio", flickr, tmp_path)
    assert capsys.readouterr().out.splitlines() == [
        f"{tmp_path}/labelstudio_train.json: 2 images",
        f"{tmp_path}/labelstudio_val.json: 1 images",
        f"{tmp_path}/labelstudio_test.json: 1 images",
        "left out: 3 phrases without a box",  # not visual, nobndbox, scene (image 100)
        "left out: 1 images in no split",
    ]
    with pytest.raises(SystemExit):  # predictions are not labels
        convert("labelstudio", "odvg", tmp_path, tmp_path / "odvg")
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: {tmp_path}/labelstudio_train.json: tasks[0]: has no annotation (not labelled)"
    )
    for split in ("train", "val", "test"):  # a reviewer submits every prediction unchanged
        path = tmp_path / f"labelstudio_{split}.json"
        tasks = json.loads(path.read_text(encoding="utf-8"))
        for task in tasks:
            task["annotations"] = [{"result": p["result"]} for p in task.pop("predictions")]
        path.write_text(json.dumps(tasks), encoding="utf-8")
    convert("labelstudio", "odvg", tmp_path, tmp_path / "odvg")
    before, after = parsed("flickr30k", flickr), parsed("odvg", tmp_path / "odvg")
    assert in_a_split(before.boxes)[["x1", "y1", "x2", "y2"]].equals(
        after.boxes[["x1", "y1", "x2", "y2"]]
    )
    boxed = in_a_split(before.phrases[before.phrases["has_box"]])
    distinct = boxed.drop_duplicates(["image_id", "text"])
    assert sorted(zip(distinct["image_id"], distinct["text"], strict=True)) == sorted(
        zip(after.phrases["image_id"], after.phrases["text"], strict=True)
    )


def test_convert_writes_every_file_or_none_and_replaces_only_with_force(
    flickr: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    convert("flickr30k", "odvg", flickr, out)
    train = out / "train.jsonl"
    written = {path.name: path.read_bytes() for path in out.iterdir()}
    assert sorted(written) == ["test.jsonl", "train.jsonl", "val.jsonl"]
    train.write_text("older\n")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        convert("flickr30k", "odvg", flickr, out)
    err = capsys.readouterr().err
    assert exited.value.code == 1 and len(err.splitlines()) == 1
    assert err.startswith(f"error: OUT {out}: {train}, {out / 'val.jsonl'}, ")
    assert err.rstrip().endswith("exist(s); pass --force to replace them")
    assert train.read_text() == "older\n"  # not replaced
    convert("flickr30k", "odvg", flickr, out, "--force")
    assert {path.name: path.read_bytes() for path in out.iterdir()} == written  # no staging left

    # a target that is a folder: nothing written, not even the files before it
    fresh = tmp_path / "fresh"
    (fresh / "val.jsonl").mkdir(parents=True)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        convert("flickr30k", "odvg", flickr, fresh, "--force")
    err = capsys.readouterr().err
    assert err == f"error: OUT {fresh / 'val.jsonl'}: a folder, not a file\n"
    assert [path.name for path in fresh.iterdir()] == ["val.jsonl"]

    # OUT itself a file
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(SystemExit):
        convert("flickr30k", "odvg", flickr, tmp_path / "a-file")
    assert capsys.readouterr().err == f"error: OUT {tmp_path / 'a-file'}: a file, not a folder\n"


def test_a_line_python_cannot_parse_is_one_error_line_and_skipped_with_the_option(
    flickr: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    convert("flickr30k", "odvg", flickr, tmp_path / "a")
    train = tmp_path / "a" / "train.jsonl"
    lines = train.read_text().splitlines()
    hostile = ["[" * 100_000 + "]" * 100_000, '{"filename": "9.jpg", "width": ' + "9" * 5000 + "}"]
    train.write_text("\n".join([*lines, *hostile]) + "\n")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        convert("odvg", "mdetr", tmp_path / "a", tmp_path / "b")
    err = capsys.readouterr().err
    assert err == f"error: {train}:{len(lines) + 1}: malformed JSON: nested too deeply\n"
    convert("odvg", "mdetr", tmp_path / "a", tmp_path / "b", "--skip-bad-files")
    assert "left out: 2 records that break the format" in capsys.readouterr().out
