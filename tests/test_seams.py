"""One shape for every seam: a stand-in of each kind (dataset format, candidate generator,
proposal and feature engines, backbone, text encoder, head, export format), registered from
this file alone with its own settings, runs the sample pipeline (every stage as ``dvc.yaml``
runs it, in this process), then ``grounding predict`` and ``grounding export``."""

from __future__ import annotations

import contextlib
import json
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import REPO_ROOT
from PIL import Image
from stand_ins import pooling_backbone, registered, word_encoder

from grounding import cli
from grounding.candidates import GENERATORS
from grounding.candidates import engines as proposal_engines
from grounding.data.formats import FORMATS, DatasetFormat
from grounding.data.formats.flickr30k import Flickr30kReader
from grounding.inference.grounder import Grounder
from grounding.inference.onnx_grounder import EXPORT_FORMATS
from grounding.modeling import engines as feature_engines
from grounding.modeling.backbones import BACKBONES
from grounding.modeling.head import HEADS, HeadConfig, MatchingHead
from grounding.modeling.text import TEXT_ENCODERS

SAMPLE = REPO_ROOT / "data" / "sample"


# --- a stand-in of each kind, with settings of its own ---------------------------------------


@dataclass(frozen=True)
class FirstImages:
    """``data.first_images``: keep the first ``limit`` images of the sample."""

    limit: int = 1000

    def __post_init__(self) -> None:
        if self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")


class FirstImagesReader:
    """Flickr30k's reader, cut to its first ``limit`` records."""

    def __init__(self, reader: Flickr30kReader, limit: int) -> None:
        self.reader, self.limit = reader, limit
        self.skipped = reader.skipped
        self.duplicate_split_ids = reader.duplicate_split_ids

    def __iter__(self) -> Iterator[Any]:
        for index, record in enumerate(self.reader):
            if index == self.limit:
                return
            yield record


def first_images_format(settings: FirstImages) -> DatasetFormat:
    def open(root: Path, *, splits: Path, files: Any, skip_bad_files: bool = False) -> Any:
        reader = Flickr30kReader.open(root, splits=splits, skip_bad_files=skip_bad_files)
        return FirstImagesReader(reader, settings.limit)

    return DatasetFormat("first_images", open, None, None)


@dataclass(frozen=True)
class GridSettings:
    """``candidates.grid``: a ``cells`` x ``cells`` grid of boxes, then the whole image."""

    cells: int = 2


@dataclass(frozen=True)
class Grid:
    settings: GridSettings
    version: int = 1

    def propose(self, image: Image.Image) -> np.ndarray:
        n, (width, height) = self.settings.cells, image.size
        xs, ys = np.linspace(0, width, n + 1), np.linspace(0, height, n + 1)
        cells = [[xs[i], ys[j], xs[i + 1], ys[j + 1]] for j in range(n) for i in range(n)]
        return np.array([*cells, [0, 0, width, height]], dtype=np.float32)


@dataclass(frozen=True)
class WideSettings:
    """``heads.wide``: the matching head at ``width``, without dropout."""

    width: int = 4


@dataclass(frozen=True)
class WideConfig:
    region_dim: int
    phrase_dim: int
    width: int


class WideHead(MatchingHead):
    name = "wide"

    def __init__(self, config: WideConfig) -> None:
        super().__init__(HeadConfig(config.region_dim, config.phrase_dim, config.width, 0.0))
        self.config = config


class Counted:
    """An engine that runs the local one and counts its calls."""

    calls: ClassVar[dict[str, int]] = {}

    def __init__(self, name: str, local: Any) -> None:
        self.name, self.local = name, local

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls[self.name] = self.calls.get(self.name, 0) + 1
        return self.local(*args, **kwargs)


def write_summary(grounder: Grounder, folder: Path) -> list[Path]:
    """The export format ``summary``: the grounder's model info as JSON."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "summary.json"
    path.write_text(json.dumps({**grounder.model_info(), "described": grounder.describe()}))
    return [path]


@contextlib.contextmanager
def stand_ins() -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for registry, name, make, settings in [
            (FORMATS, "first_images", first_images_format, FirstImages),
            (GENERATORS, "grid", lambda s, *, device=None: Grid(s), GridSettings),
            (
                proposal_engines.ENGINES,
                "counted",
                lambda: Counted("pair", proposal_engines.local_proposals),
                None,
            ),
            (
                feature_engines.ENGINES,
                "counted",
                lambda resources: Counted("features", feature_engines.local_features),
                None,
            ),
            (BACKBONES, "pool", lambda *, weights, device: pooling_backbone(), None),
            (TEXT_ENCODERS, "words", lambda *, device: word_encoder(), None),
            (
                HEADS,
                "wide",
                lambda s, *, region_dim, phrase_dim: WideHead(
                    WideConfig(region_dim, phrase_dim, s.width)
                ),
                WideSettings,
            ),
            (EXPORT_FORMATS, "summary", lambda: write_summary, None),
        ]:
            stack.enter_context(registered(registry, name, make, settings))
        yield


# --- the pipeline, as dvc.yaml runs it -------------------------------------------------------


def stage_commands(params: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """Each stage of dvc.yaml in order: its script's module name and its arguments, with the
    ``${paths.*}`` of ``params``."""
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    commands = []
    for name, stage in stages.items():
        command = stage["cmd"]
        for key, value in params["paths"].items():
            command = command.replace(f"${{paths.{key}}}", str(value))
        python, script, *arguments = shlex.split(command)
        assert python == "python" and script == f"stages/{name}.py", command
        commands.append((name, arguments))
    return commands


def params_with_stand_ins() -> dict[str, Any]:
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text(encoding="utf-8"))
    params["data"].update(format="first_images", root=str(SAMPLE), first_images={"limit": 60})
    params["pair"].update(candidates="grid", engine="counted")
    params["candidates"]["grid"] = {"cells": 3}
    params["features"].update(
        backbone="pool", text_encoder="words", engine="counted", image_size=64
    )
    params["train"].update(head="wide", epochs=2)
    params["heads"]["wide"] = {"width": 6}
    params["runtime"]["device"] = "cpu"
    return params


@pytest.mark.slow
def test_a_stand_in_of_every_kind_runs_the_pipeline_predict_and_export(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import importlib

    params = params_with_stand_ins()
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    Counted.calls.clear()
    with stand_ins():
        for name, arguments in stage_commands(params):
            importlib.import_module(f"stages.{name}").main(arguments)

        parse = json.loads(Path("reports/parse.json").read_text())
        assert parse["images"] == 60  # the format's own setting cut the sample
        candidates = pd.read_parquet("data/pairs/candidates.parquet")
        assert set(candidates["source"]) == {"grid"}
        assert candidates.groupby("image_id").size().eq(3 * 3 + 1).all()  # candidates.grid
        assert Counted.calls == {"pair": 1, "features": 1}
        grounder = Grounder.from_weights(*read_weights(Path(params["paths"]["grounder"])))
        assert (grounder.candidates, grounder.settings) == ("grid", {"cells": 3})
        assert grounder.features.backbone == "pool" and grounder.features.text_encoder == "words"
        head = json.loads(read_config(Path(params["paths"]["model"])))["head"]
        assert head == {
            "name": "wide",
            "config": {"region_dim": 3 + 7, "phrase_dim": 3, "width": 6},  # context: false
        }
        metrics = json.loads(Path("reports/metrics.json").read_text())
        assert 0.0 <= metrics["recall_at_1"] <= 1.0

        image = sorted((SAMPLE / "images").glob("*.jpg"))[0]
        capsys.readouterr()
        grounder_file = params["paths"]["grounder"]
        cli.main(["predict", str(image), "--phrase", "a blue box", "--model", grounder_file])
        answer = json.loads(capsys.readouterr().out)
        assert "a blue box" in json.dumps(answer)
        cli.main(["export", "--model", grounder_file, "--format", "summary", "--out", "out"])
        summary = json.loads(Path("out/summary.json").read_text())
        assert summary["source"].endswith("grounder.safetensors")
    assert "grid" not in GENERATORS and "wide" not in HEADS  # nothing left registered


def read_weights(path: Path) -> tuple[dict, dict]:
    from grounding import io

    return io.read_weights(path)


def read_config(path: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), "np") as weights:
        return weights.metadata()["config"]
