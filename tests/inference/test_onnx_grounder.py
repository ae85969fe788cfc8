"""The ONNX export of a grounder: it scores as the torch grounder does, holds no pickle, and
predicts without importing torch, transformers or mlflow. Exporting runs torch's exporter
(seconds even for the stand-ins), so those tests are slow; the packaged models' one is the
agreement check on a real image."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import stand_ins
from stand_ins import SETTINGS, two_shapes

from grounding.errors import DataError
from grounding.inference.grounder import Grounder
from grounding.inference.onnx_grounder import (
    CONFIG_FILE,
    FORMAT,
    VERSION,
    export_onnx,
    is_onnx_export,
    load_export,
)
from grounding.inference.serving import GrounderModel, encode_image, predict_table
from grounding.io import write_json
from grounding.modeling.backbones import BACKBONES
from grounding.modeling.head import HEADS

PHRASES = ["a red box", "a blue box", "grey", "A RED box"]
BOXES = np.array(
    [[20, 30, 90, 120], [140, 50, 220, 100], [0, 0, 240, 160], [100.5, 0, 130, 40.25]],
    dtype=np.float32,
)
REAL_IMAGES = Path(__file__).resolve().parents[3] / "shared" / "flickr30k_entities" / "images"


def test_a_folder_is_an_export_only_with_its_config(tmp_path: Path) -> None:
    assert not is_onnx_export(tmp_path)
    write_json({"format": FORMAT}, tmp_path / CONFIG_FILE)
    assert is_onnx_export(tmp_path)


@pytest.mark.parametrize(
    "config, message",
    [
        ({"format": "something-else"}, "is not a grounder's ONNX export"),
        (
            {"format": FORMAT, "version": 99},
            f"export version 99; this install reads version {VERSION}",
        ),
        (
            {"format": FORMAT, "version": VERSION},
            "not a grounder's ONNX export \\(no 'candidates'\\)",
        ),
    ],
)
def test_a_folder_that_is_not_a_current_export_is_refused(
    tmp_path: Path, config: dict, message: str
) -> None:
    write_json(config, tmp_path / CONFIG_FILE)
    with pytest.raises(DataError, match=message):
        load_export(tmp_path)


def test_an_export_with_a_missing_graph_is_one_line_error(tmp_path: Path) -> None:
    config = {"format": FORMAT, "version": VERSION, "threshold": 0.5}
    config["candidates"] = {"name": "selective_search", "settings": SETTINGS}
    write_json(config, tmp_path / CONFIG_FILE)
    with pytest.raises(DataError, match="cannot load the ONNX export"):
        load_export(tmp_path)


def test_export_of_a_missing_grounder_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from grounding.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["export", "--model", str(tmp_path / "none.safetensors"), "--out", str(tmp_path)])
    assert exit_.value.code == 1
    assert capsys.readouterr().err.startswith("error: ")
    assert not is_onnx_export(tmp_path)


# --- exported stand-ins --------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Grounder, Path]:
    folder = tmp_path_factory.mktemp("export") / "grounder-onnx"
    grounder = stand_ins.grounder(threshold=0.3)
    export_onnx(grounder, folder)
    return grounder, folder


@pytest.mark.slow
def test_the_export_scores_as_the_torch_grounder(exported: tuple[Grounder, Path]) -> None:
    grounder, folder = exported
    onnx = load_export(folder)
    assert (onnx.threshold, onnx.candidates, onnx.settings) == (0.3, "selective_search", SETTINGS)
    assert onnx.features == grounder.features
    image = two_shapes()
    for boxes in (BOXES, BOXES[:1]):  # the number of boxes is dynamic
        np.testing.assert_allclose(
            onnx.score(image, boxes, PHRASES),
            grounder.score(image, boxes, PHRASES),
            rtol=1e-5,
            atol=1e-6,
        )
    tall = image.transpose(0).rotate(90, expand=True)  # another aspect: a dynamic image size
    np.testing.assert_allclose(
        onnx.score(tall, BOXES[:, [1, 0, 3, 2]], PHRASES[:2]),
        grounder.score(tall, BOXES[:, [1, 0, 3, 2]], PHRASES[:2]),
        rtol=1e-5,
        atol=1e-6,
    )
    expected = grounder.ground(image, PHRASES, top_k=3)
    found = onnx.ground(image, PHRASES, top_k=3)
    assert [[box.box for box in g.boxes] for g in found] == [
        [box.box for box in g.boxes] for g in expected
    ]
    assert [[box.score for box in g.boxes] for g in found] == [
        pytest.approx([box.score for box in g.boxes], rel=1e-5) for g in expected
    ]


@pytest.mark.slow
def test_the_export_holds_graphs_and_json_only(exported: tuple[Grounder, Path]) -> None:
    _, folder = exported
    names = sorted(path.name for path in folder.iterdir())
    assert names == [
        "grounder.json",
        "head.onnx",
        "regions.onnx",
        "text_encoder.onnx",
        "tokenizer.json",
    ]
    config = json.loads((folder / CONFIG_FILE).read_text())
    assert config["threshold"] == 0.3
    assert config["candidates"] == {"name": "selective_search", "settings": SETTINGS}
    assert config["backbone"]["stride"] == 8 and config["features"]["image_size"] == 64


@pytest.mark.slow
def test_the_server_grounds_with_an_export(exported: tuple[Grounder, Path], tmp_path: Path) -> None:
    grounder, folder = exported
    model = GrounderModel()
    model.load_context(SimpleNamespace(artifacts={"grounder": str(folder)}))
    assert model.grounder.source == str(folder)
    with pytest.raises(DataError, match="the grounder is an ONNX export already"):
        export_onnx(model.grounder, tmp_path / "again")
    buffer = io.BytesIO()
    two_shapes().save(buffer, format="PNG")
    image = encode_image(buffer.getvalue())
    table = pd.DataFrame({"image": [image, image], "phrase": ["a red box", "grey"]})
    result = model.predict(None, table, params={"top_k": 2})
    expected = predict_table(grounder, table, top_k=2)
    assert result[["row", "rank", "x1", "y1", "x2", "y2"]].equals(
        expected[["row", "rank", "x1", "y1", "x2", "y2"]]
    )
    np.testing.assert_allclose(
        result["score"].astype(float), expected["score"].astype(float), rtol=1e-5
    )


@pytest.mark.slow
def test_predict_with_an_export_imports_no_torch_nor_pandas(
    exported: tuple[Grounder, Path], tmp_path: Path
) -> None:
    _, folder = exported
    image = tmp_path / "shapes.png"
    two_shapes().save(image)
    script = (
        "import sys, json\n"
        "from grounding.cli import main\n"
        f"main(['predict', {str(image)!r}, '--model', {str(folder)!r}, '--phrase', 'a red box',"
        f" '--cache', {str(tmp_path / 'cache')!r}])\n"
        "heavy = [m for m in ('torch', 'transformers', 'mlflow', 'torchvision', 'pandas')"
        " if m in sys.modules]\n"
        "print(json.dumps(heavy))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    *answer, heavy = done.stdout.strip().splitlines()
    assert json.loads(heavy) == []
    assert json.loads("\n".join(answer))["phrases"][0]["boxes"]


# --- every head and backbone of the registries, and the packaged grounder -------------------

REAL_PHRASES = ["a man", "a woman in a red shirt", "the dog on the left", "a blue car", "the sky"]


def real_images(count: int) -> list:
    """The first ``count`` real Flickr30k photos (the test skips without them)."""
    from grounding.io import read_image

    paths = sorted(REAL_IMAGES.glob("*.jpg"))[:count]
    if not paths:
        pytest.skip(f"real images absent: {REAL_IMAGES}")
    return [read_image(path) for path in paths]


def assert_same_answers(onnx: Grounder, torch_grounder: Grounder, images: list) -> None:
    """The same best boxes and scores (to float rounding) on every image."""
    for image in images:
        boxes = torch_grounder.proposer()(image)
        np.testing.assert_allclose(
            onnx.score(image, boxes, REAL_PHRASES),
            torch_grounder.score(image, boxes, REAL_PHRASES),
            atol=1e-4,
        )
        ours = onnx.ground(image, REAL_PHRASES, top_k=3)
        theirs = torch_grounder.ground(image, REAL_PHRASES, top_k=3)
        assert [g.box for g in ours] == [g.box for g in theirs]
        for found, expected in zip(ours, theirs, strict=True):
            assert [b.score for b in found.boxes] == pytest.approx(
                [b.score for b in expected.boxes], abs=1e-4
            )


@pytest.mark.slow
@pytest.mark.parametrize("backbone_name", BACKBONES.plain_names())
@pytest.mark.parametrize("head_name", HEADS.plain_names())
def test_every_registered_head_and_backbone_exports_and_answers_as_torch(
    head_name: str, backbone_name: str, tmp_path: Path
) -> None:
    """A seeded untrained head of each kind on each packaged backbone (with context, 224 px),
    phrases from the stand-in word encoder: the export's boxes and scores are the torch
    grounder's on real photos."""
    import torch

    from grounding.inference.grounder import TorchScorer
    from grounding.modeling.backbones import load_backbone
    from grounding.modeling.head import build_head
    from grounding.modeling.scoring import TrainedHead

    images = real_images(2)
    try:
        backbone = load_backbone(backbone_name)
    except ModuleNotFoundError as error:  # .ci/run installs every backbone's weights package
        pytest.skip(f"backbone {backbone_name}: {error}")
    meta = stand_ins.features_meta(
        backbone=backbone_name,
        image_size=224,
        region_dim=2 * backbone.channels + 7,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        head = build_head(
            head_name,
            region_dim=meta.region_dim,
            phrase_dim=meta.phrase_dim,
            sections={head_name: {"hidden": 16, "dropout": 0.0}},
        )
    grounder = Grounder(
        TorchScorer(TrainedHead(head.eval(), meta), backbone, stand_ins.word_encoder()),
        threshold=0.5,
        candidates="selective_search",
        settings=SETTINGS,
    )
    export_onnx(grounder, tmp_path / "export")
    onnx = load_export(tmp_path / "export")
    assert_same_answers(onnx, grounder, images)


@pytest.mark.slow
def test_predict_with_the_export_of_the_packaged_grounder_gives_the_torch_boxes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`grounding export` of the packaged grounder (head matching_prior) runs, and `grounding
    predict` with the export answers as with `--model pretrained` on a real photo."""
    from grounding.cli import main
    from grounding.inference.grounder import pretrained_path

    images = sorted(REAL_IMAGES.glob("*.jpg"))[:1]
    if not images:
        pytest.skip(f"real images absent: {REAL_IMAGES}")
    main(["export", "--model", str(pretrained_path()), "--out", str(tmp_path / "export")])
    capsys.readouterr()
    answers = {}
    for model in ("pretrained", str(tmp_path / "export")):
        argv = ["predict", str(images[0]), "--model", model, "--no-cache", "--top-k", "3"]
        main([*argv, *(part for phrase in REAL_PHRASES for part in ("--phrase", phrase))])
        answers[model] = json.loads(capsys.readouterr().out)
    torch_answer, onnx_answer = answers.values()
    assert [[b["box"] for b in p["boxes"]] for p in onnx_answer["phrases"]] == [
        [b["box"] for b in p["boxes"]] for p in torch_answer["phrases"]
    ]
    for ours, theirs in zip(onnx_answer["phrases"], torch_answer["phrases"], strict=True):
        assert [b["score"] for b in ours["boxes"]] == pytest.approx(
            [b["score"] for b in theirs["boxes"]], abs=1e-4
        )
    assert onnx_answer["model"]["trained_on"] == torch_answer["model"]["trained_on"]
    assert torch_answer["model"]["trained_on"]["name"] == "flickr30k_entities"
