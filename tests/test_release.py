"""release/pretrained.py: the packaged grounder's experiment file is what the committed report
was built with, a bad experiment file is an `error:` line, and the build (a fresh clone, `dvc
exp run -n NAME -S ...` with one thread) writes the same bytes twice, on a subset of the shipped
sample with the experiment's own settings."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from repository import REPO

from release import pretrained

PARAMS = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
SAMPLE = REPO / "data" / "sample"


def test_the_experiment_is_the_one_the_packaged_grounder_was_built_with() -> None:
    name, overrides = pretrained.read_experiment(pretrained.EXPERIMENT, PARAMS)
    report = json.loads((REPO / "reports" / "pretrained-flickr30k.json").read_text())
    assert name == report["experiment"] == "pretrained-flickr30k"
    assert overrides == report["settings"]
    assert overrides["runtime.threads"] == 1  # the bytes depend on the thread count


def test_overrides_become_dvc_set_params() -> None:
    assert pretrained.set_params({"train.epochs": 10, "split.strategy": "random"}) == [
        "-S",
        "train.epochs=10",
        "-S",
        "split.strategy=random",
    ]
    assert pretrained.set_params({"features.context": True}) == ["-S", "features.context=true"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("name: x\nparams:\n  train.epoch: 3\n", "params.yaml has no `train.epoch`"),
        ("name: x\nparams:\n  train: {epochs: 3}\n", "`train` must be a single value"),
        ("params:\n  train.epochs: 3\n", "needs exactly the keys `name` and `params`"),
        ("name: ''\nparams: {}\n", "`name` must be a non-empty string"),
    ],
)
def test_a_bad_experiment_file_is_refused(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "experiment.yaml"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        pretrained.read_experiment(path, PARAMS)


def test_a_bad_experiment_file_is_an_error_line(tmp_path: Path) -> None:
    path = tmp_path / "experiment.yaml"
    path.write_text("name: x\nparams:\n  train.epoch: 3\n")
    done = subprocess.run(
        [
            *(sys.executable, "-m", "release.pretrained", "--data", str(SAMPLE)),
            *("--experiment", str(path), "--out", str(tmp_path / "g.safetensors")),
            *("--reports", str(tmp_path)),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1
    assert done.stderr.strip() == f"error: {path}: params.yaml has no `train.epoch`"
    assert not (tmp_path / "g.safetensors").exists()


def sample_subset(target: Path, per_split: int) -> Path:
    """The first ``per_split`` images of each of the sample's split lists, in its layout."""
    for folder in ("Annotations", "Sentences", "images"):
        (target / folder).mkdir(parents=True)
    for split in ("train", "val", "test"):
        ids = (SAMPLE / f"{split}.txt").read_text().split()[:per_split]
        (target / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        for image_id in ids:
            shutil.copy2(SAMPLE / "Annotations" / f"{image_id}.xml", target / "Annotations")
            shutil.copy2(SAMPLE / "Sentences" / f"{image_id}.txt", target / "Sentences")
            shutil.copy2(SAMPLE / "images" / f"{image_id}.jpg", target / "images")
    return target


@pytest.mark.slow
def test_the_build_writes_the_same_bytes_twice(tmp_path: Path) -> None:
    data = sample_subset(tmp_path / "data", per_split=5)
    proposals = tmp_path / "proposals"
    digests = []
    for attempt in ("first", "second"):  # the second reuses the first's proposal cache
        out, reports = tmp_path / attempt / "grounder.safetensors", tmp_path / attempt / "reports"
        pretrained.main(
            [
                *("--data", str(data), "--proposals", str(proposals)),
                *("--out", str(out), "--reports", str(reports)),
                *("--work", str(tmp_path / attempt / "repo")),
            ]
        )
        summary = json.loads((reports / "pretrained-flickr30k.json").read_text())
        assert summary["md5"] == hashlib.md5(out.read_bytes()).hexdigest()
        digests.append(summary["md5"])
        assert summary["experiment"] == "pretrained-flickr30k"
        assert summary["images"] == 15
        assert 0.0 <= summary["metrics"]["recall_at_1"] <= summary["metrics"]["upper_bound"] <= 1
        # a named DVC experiment of the clone, with the settings applied
        work = tmp_path / attempt / "repo"
        shown = subprocess.run(
            [sys.executable, "-m", "dvc", "exp", "list", "--name-only"],
            cwd=work,
            capture_output=True,
            text=True,
            check=True,
        )
        assert shown.stdout.split() == ["pretrained-flickr30k"]
        params = yaml.safe_load((work / "params.yaml").read_text())
        assert params["train"]["head"] == "matching_prior"
        assert params["split"]["strategy"] == "random"
    assert any(proposals.iterdir()), "the build did not use the proposal cache"
    assert digests[0] == digests[1]
