"""The stages on ODVG, MDETR and Label Studio data made by `grounding convert`: the parse
stage's counts and skipped records, and (slow) the whole pipeline on the shipped sample as
Flickr30k, ODVG and MDETR giving the Flickr30k run's test metrics (``reports/metrics.json``
and the details, ``test.json``)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO_ROOT, TINY_COUNTS, write_dataset

from grounding.cli import main as grounding
from grounding.errors import run
from stages import pair, parse, split

PARAMS = REPO_ROOT / "params.yaml"


def write_params(work: Path, data: dict[str, Any], **sections: dict[str, Any]) -> Path:
    """The repo's params.yaml with ``data`` keys (and any section's keys) changed."""
    params = yaml.safe_load(PARAMS.read_text(encoding="utf-8"))
    params["data"].update(data)
    for section, values in sections.items():
        params[section].update(values)
    path = work / "params.yaml"
    work.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(params), encoding="utf-8")
    return path


def options(**named: str | Path) -> list[str]:
    """Command-line options: ``parsed_dir=x`` -> ``["--parsed-dir", "x"]``."""
    return [
        item for key, value in named.items() for item in (f"--{key.replace('_', '-')}", str(value))
    ]


def stage_options(work: Path) -> dict[str, list[str]]:
    """Each stage's options, as dvc.yaml gives them, for ``work/params.yaml`` and outputs in
    ``work``, in the order the stages run."""
    r = work / "reports"
    parsed, pairs, split_dir, features_dir = (
        work / n for n in ("parsed", "pairs", "split", "features")
    )
    model, grounder = work / "head.safetensors", work / "grounder.safetensors"
    trained = {"split": split_dir, "features": features_dir, "model": model}
    named: dict[str, dict[str, Path]] = {
        "parse": {"out": parsed},
        "pair": {"parsed": parsed, "out": pairs},
        "split": {"parsed": parsed, "pairs": pairs, "out": split_dir},
        "features": {"parsed": parsed, "pairs": pairs, "out": features_dir},
        "train": {**trained, "history": r / "train.csv", "plot": r / "train.png"},
        "sweep": {
            **trained,
            "curve": r / "sweep.csv",
            "plot": r / "sweep.png",
            "grounder": grounder,
        },
        "report": {
            **trained,
            "parsed": parsed,
            "pairs": pairs,
            "grounder": grounder,
            "sweep": r / "sweep.json",
            "history": r / "train.csv",
            "summaries": r / "parse.json",
            "metrics": r / "metrics.json",
            "details": r / "test.json",
            "predictions": r / "predictions.parquet",
            "confusion": r / "confusion.csv",
            "pr_curve": r / "precision_recall.csv",
            "gallery": r / "gallery.png",
            "report": r / "report.md",
        },
    }
    summaries = {name: r / f"{name}.json" for name in ("parse", "pair", "split", "train", "sweep")}
    checked = {"parse", "pair", "split", "features", "report"}
    return {
        name: options(
            params=work / "params.yaml",
            **values,
            **({"summary": summaries[name]} if name in summaries else {}),
            **({"validation": r / "validation" / f"{name}.json"} if name in checked else {}),
        )
        for name, values in named.items()
    }


def data_stages(work: Path) -> None:
    """parse, pair and split, in this process."""
    argv = stage_options(work)
    for name, stage in (("parse", parse), ("pair", pair), ("split", split)):
        stage.main(argv[name])


def pipeline(work: Path) -> None:
    """Every stage, each in a process of its own as DVC runs them (a stage may set process-wide
    state, such as torch's threads, that would change the numbers of the next)."""
    for name, argv in stage_options(work).items():
        extra = ["--no-mlflow"] if name == "report" else []
        run_command([sys.executable, str(REPO_ROOT / "stages" / f"{name}.py"), *argv, *extra])


def run_command(args: list[str]) -> None:
    done = subprocess.run(args, capture_output=True, text=True, cwd=REPO_ROOT)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def convert(target: str, dataset: Path, out: Path) -> None:
    command = ["convert", "--from", "flickr30k", "--to", target, str(dataset), str(out)]
    grounding([*command, *options(params=PARAMS)])


@pytest.mark.parametrize("name", ["odvg", "mdetr"])
def test_the_data_stages_read_each_format_with_the_same_counts(tmp_path: Path, name: str) -> None:
    dataset = write_dataset(tmp_path / "flickr30k")
    convert(name, dataset, dataset)  # beside the images, as docs/formats.md does
    with contextlib.chdir(tmp_path):
        write_params(tmp_path / name, {"format": name, "root": str(dataset)})
        data_stages(tmp_path / name)
    counts = read_json(tmp_path / name / "reports" / "parse.json")
    # image 500 is in no split list, so in no split file; ODVG has no box-less phrase and
    # MDETR none that is not visual; MDETR merges boxes that repeat coordinates
    assert counts == {
        **TINY_COUNTS,
        "images": 4,
        "captions": 20,
        "phrases": 23 if name == "odvg" else 26,
        "phrases_with_box": 23,
        "boxes": 11 if name == "odvg" else 9,
        # entities are distinct sets of boxes: 100 has 3, 200 3 (2 in MDETR: chains 7 and 8
        # share coordinates), 300 2, 400 1; in MDETR 100's 3 box-less phrases are 3 more
        "chains": 9 if name == "odvg" else 11,
        "images_with_file": 3,
        "images_none": 0,
        "skipped": [],
        "examples": {"duplicate_split_ids": [], "phrases_with_unknown_chain": []},
    }
    paired = read_json(tmp_path / name / "reports" / "pair.json")
    # the Flickr30k run's 28 phrases, 10 candidates, 66 pairs less image 500's 10, 2 and 20
    assert (paired["phrases_paired"], paired["candidates"], paired["pairs"]) == (18, 8, 46)
    assert read_json(tmp_path / name / "reports" / "validation" / "pair.json")["success"]


def test_the_data_stages_read_reviewed_labelstudio_tasks(tmp_path: Path) -> None:
    dataset = write_dataset(tmp_path / "flickr30k")
    convert("labelstudio", dataset, dataset)
    for name in ("train", "val", "test"):  # a reviewer submits every prediction unchanged
        path = dataset / f"labelstudio_{name}.json"
        tasks = read_json(path)
        for task in tasks:
            task["annotations"] = [{"result": p["result"]} for p in task.pop("predictions")]
        path.write_text(json.dumps(tasks), encoding="utf-8")
    with contextlib.chdir(tmp_path):
        write_params(tmp_path / "ls", {"format": "labelstudio", "root": str(dataset)})
        data_stages(tmp_path / "ls")
    counts = read_json(tmp_path / "ls" / "reports" / "parse.json")
    # one caption per image made of its distinct boxed phrases (100: 5, 200: 4, 300: 4,
    # 400: 5); every box a region, 200's two boxes with one set of coordinates too
    assert counts["images"] == 4 and counts["captions"] == 4
    assert counts["phrases"] == counts["phrases_with_box"] == 18
    assert (counts["boxes"], counts["chains"], counts["images_with_file"]) == (11, 9, 3)
    paired = read_json(tmp_path / "ls" / "reports" / "pair.json")
    # the 3 images with a file: 13 phrases (100: 5, 200: 4, 300: 4) x their distinct boxes
    # (4, 2, 2): 5 x 4 + 4 x 2 + 4 x 2 = 36 pairs
    assert (paired["phrases_paired"], paired["candidates"], paired["pairs"]) == (13, 8, 36)
    assert read_json(tmp_path / "ls" / "reports" / "validation" / "pair.json")["success"]


def test_parse_lists_the_records_skip_bad_files_left_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dataset = write_dataset(tmp_path / "flickr30k")
    convert("odvg", dataset, dataset)
    train_file = dataset / "train.jsonl"
    lines = train_file.read_text(encoding="utf-8").splitlines()
    bad = json.loads(lines[1])
    bad["grounding"]["regions"][0]["bbox"] = [0, 0, 500, 10]
    lines[1] = json.dumps(bad)
    train_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    work = tmp_path / "odvg"
    with contextlib.chdir(tmp_path):
        write_params(work, {"format": "odvg", "root": str(dataset)})
        p = str(work / "params.yaml")
        argv = options(
            params=p,
            out=work / "parsed",
            summary=work / "parse.json",
            validation=work / "validation.json",
        )
        with pytest.raises(SystemExit):
            run(parse.main, argv)
        assert (
            capsys.readouterr()
            .err.splitlines()[-1]
            .startswith(
                f"error: {train_file}:2: regions[0]: box (x1, y1, x2, y2) = (0, 0, 500, 10) lies"
            )
        )
        write_params(work, {"format": "odvg", "root": str(dataset)}, parse={"skip_bad_files": True})
        parse.main(argv)
    summary = read_json(work / "parse.json")
    assert summary["skipped_files"] == 1 and summary["captions"] == 20 - 1
    (skipped,) = summary["skipped"]
    assert skipped["source"] == str(train_file) and skipped["line"] == 2
    assert skipped["reason"].endswith("lies outside the 100x80 image")


@pytest.mark.slow
def test_the_sample_in_each_format_gives_the_flickr30k_run_s_metrics(tmp_path: Path) -> None:
    sample, images = REPO_ROOT / "data" / "sample", REPO_ROOT / "data" / "sample" / "images"
    # a shorter run than params.yaml's (the same for the three): equality is the point
    shrunk = {"features": {"image_size": 224}, "train": {"epochs": 8}}
    metrics = {}
    for name in ("flickr30k", "odvg", "mdetr"):
        root = sample
        if name != "flickr30k":
            root = tmp_path / f"sample-{name}"
            convert(name, sample, root)
        work = tmp_path / name
        with contextlib.chdir(tmp_path):
            data = {"format": name, "root": str(root), "images": str(images)}
            write_params(work, data, paths={"proposals": str(tmp_path / "proposals")}, **shrunk)
        pipeline(work)
        reports = work / "reports"
        metrics[name] = {**read_json(reports / "metrics.json"), **read_json(reports / "test.json")}
    typed = metrics["flickr30k"]
    assert set(typed["recall_at_1_by_type"]) == {"other", "scene"}  # the sample's types
    untyped = {key: value for key, value in typed.items() if key != "recall_at_1_by_type"}
    assert untyped["phrases"] > 300 and untyped["recall_at_1"] > 0.5
    # the split is the file: the same official split, the same phrases and boxes
    assert metrics["odvg"] == untyped
    assert metrics["mdetr"] == untyped
