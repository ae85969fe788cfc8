"""``hf:`` CLIP and SigLIP: the image tower as a backbone, the text tower as a text encoder, both
as a zero-training grounder for ``grounding predict``. The models are tiny, randomly
initialised and saved into tmp_path with ``save_pretrained``: nothing is downloaded."""

from __future__ import annotations

import contextlib
import json
import pickle
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO_ROOT, write_dataset
from PIL import Image

from grounding.errors import DataError
from grounding.modeling.backbones import load_backbone
from grounding.modeling.region_features import region_features
from grounding.modeling.text import encode_phrases, load_text_encoder
from tests.modeling.image_text_models import CLIP_MEAN, FAMILIES, PATCH, WIDTH, save_tiny

SAMPLE_IMAGE = REPO_ROOT / "data" / "sample" / "images" / "100000001.jpg"


def pooled(features: object) -> torch.Tensor:
    """``get_*_features``' embeddings: the tensor itself before transformers 5, its
    ``pooler_output`` since."""
    return getattr(features, "pooler_output", features)  # type: ignore[return-value]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny models' folders by family."""
    root = tmp_path_factory.mktemp("tiny")
    return {family: save_tiny(root / family, family) for family in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_the_backbone_maps_patches_of_any_padded_size(tiny: dict[str, Path], family: str) -> None:
    from transformers import AutoModel

    backbone = load_backbone(f"hf:{tiny[family]}")
    assert (backbone.stride, backbone.channels) == (PATCH, WIDTH)
    assert backbone.mean == (CLIP_MEAN if family == "clip" else (0.5, 0.5, 0.5))
    images = torch.randn(2, 3, 6 * PATCH, 3 * PATCH)  # not the tower's 32 px square
    with torch.inference_mode():
        maps = backbone.trunk(images)
        tower = AutoModel.from_pretrained(tiny[family]).vision_model
        states = tower(pixel_values=images, interpolate_pos_encoding=True).last_hidden_state
    assert maps.shape == (2, WIDTH, 6, 3)
    # the patch of row 4, column 2 is token 4 * 3 + 2 (after CLIP's class token)
    first = 1 if family == "clip" else 0
    torch.testing.assert_close(maps[:, :, 4, 2], states[:, first + 4 * 3 + 2])


@pytest.mark.parametrize("family", FAMILIES)
def test_region_features_of_an_image_whose_sides_are_not_multiples_of_the_patch(
    tiny: dict[str, Path], family: str
) -> None:
    backbone = load_backbone(f"hf:{tiny[family]}")
    image = Image.open(SAMPLE_IMAGE).convert("RGB").resize((101, 67))
    boxes = np.array([[0, 0, 101, 67], [10, 5, 60, 40], [70, 30, 100, 66]], dtype=np.float32)
    features = region_features(backbone, image, boxes, image_size=100)
    assert features.shape == (3, WIDTH)
    assert np.isfinite(features).all()
    assert not np.allclose(features[1], features[2])


@pytest.mark.parametrize("family", FAMILIES)
def test_phrase_embeddings_are_the_towers_own_unit_norm_and_deterministic(
    tiny: dict[str, Path], family: str
) -> None:
    from transformers import AutoModel

    texts = ["a dog", "a man in a red shirt", "a dog"]
    encoder = load_text_encoder(f"hf:{tiny[family]}")
    embeddings = encode_phrases(encoder, texts)
    again = encode_phrases(load_text_encoder(f"hf:{tiny[family]}"), ["a dog"])
    assert embeddings.shape == (3, 16 if family == "clip" else WIDTH)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)
    assert embeddings[0].tobytes() == embeddings[2].tobytes()
    # a phrase longer than the tower's 40 positions is cut, not an error
    assert np.isfinite(encode_phrases(encoder, ["a very long phrase " * 20])).all()
    # the same with or without a longer phrase in the batch (padding does not leak in)
    np.testing.assert_allclose(again[0], embeddings[0], atol=1e-6)
    # what transformers' own get_text_features gives, padded as the family is fed
    model = AutoModel.from_pretrained(tiny[family])
    padding = {"padding": "max_length", "max_length": 40} if family == "siglip" else {}
    tokens = encoder.tokenizer(["a dog"], return_tensors="pt", **padding)
    with torch.inference_mode():
        inputs = {"input_ids": tokens["input_ids"]}
        if family == "clip":
            inputs["attention_mask"] = tokens["attention_mask"]
        expected = pooled(model.get_text_features(**inputs))
    expected = torch.nn.functional.normalize(expected, dim=1).numpy()
    np.testing.assert_allclose(embeddings[0], expected[0], atol=1e-5)


def test_the_zero_training_scores_are_cosines_of_crop_and_phrase(tiny: dict[str, Path]) -> None:
    from transformers import AutoModel

    from grounding.inference.loading import load_grounder

    grounder = load_grounder(f"hf:{tiny['clip']}", "cpu")
    image = Image.open(SAMPLE_IMAGE).convert("RGB")
    boxes = np.array([[0, 0, 100, 120], [50, 40, 200, 210]], dtype=np.float32)
    scores = grounder.score(image, boxes, ["a red circle", "a blue square"])
    model = AutoModel.from_pretrained(tiny["clip"])
    crop = image.crop((50, 40, 200, 210)).resize((32, 32), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.array(crop)).permute(2, 0, 1)[None].float() / 255
    pixels = (pixels - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        (0.26862954, 0.26130258, 0.27577711)
    ).view(1, 3, 1, 1)
    tokens = grounder.scorer.encoder.tokenizer(["a blue square"], return_tensors="pt")
    with torch.inference_mode():
        image_embedding = pooled(model.get_image_features(pixel_values=pixels))
        text_embedding = pooled(model.get_text_features(**tokens))
    expected = torch.nn.functional.cosine_similarity(image_embedding, text_embedding).item()
    assert scores.shape == (2, 2)
    assert scores[1, 1] == pytest.approx(expected, abs=1e-5)
    assert (grounder.threshold, grounder.candidates) == (0.25, "selective_search")


def test_a_family_other_than_clip_and_siglip_is_refused_naming_them(tmp_path: Path) -> None:
    from transformers import BertConfig

    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"'bert' model; as a backbone .* clip, siglip"):
        load_backbone(f"hf:{tmp_path}")
    with pytest.raises(ValueError, match=r"'hf:/no/such/model': no such Hugging Face model folder"):
        load_backbone("hf:/no/such/model")


class _Trap:
    """Unpickling this writes the file ``path``: the proof that a pickle was read."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return Path.touch, (str(self.path),)  # type: ignore[return-value]


@pytest.fixture
def pickled(tmp_path: Path, tiny: dict[str, Path]) -> tuple[Path, Path]:
    """A CLIP folder whose weights are only a ``pytorch_model.bin`` that, if unpickled,
    creates the returned sentinel file."""
    folder = tmp_path / "pickled"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((tiny["clip"] / name).read_bytes())
    sentinel = tmp_path / "unpickled"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(sentinel)))
    return folder, sentinel


def test_pickled_weights_are_refused_without_being_read(pickled: tuple[Path, Path]) -> None:
    from grounding.inference.loading import load_grounder

    folder, sentinel = pickled
    for load in (load_backbone, load_text_encoder):
        with pytest.raises(ValueError, match=r"pytorch_model\.bin.*never loaded"):
            load(f"hf:{folder}")
    with pytest.raises(DataError, match=r"no safetensors weights"):
        load_grounder(f"hf:{folder}", "cpu")
    assert not sentinel.exists()


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "grounding.cli", *args], capture_output=True, text=True, check=False
    )


@pytest.mark.slow
def test_predict_grounds_with_a_tiny_clip_and_refuses_a_pickle(
    tiny: dict[str, Path], pickled: tuple[Path, Path], tmp_path: Path
) -> None:
    done = run_cli(
        "predict",
        str(SAMPLE_IMAGE),
        "--model",
        f"hf:{tiny['siglip']}",
        "--phrase",
        "a red circle",
        "--phrase",
        "a square",
        "--top-k",
        "3",
        "--cache",
        str(tmp_path / "cache"),
    )
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["model"]["source"] == f"hf:{tiny['siglip']}"
    assert [phrase["phrase"] for phrase in answer["phrases"]] == ["a red circle", "a square"]
    for phrase in answer["phrases"]:
        scores = [box["score"] for box in phrase["boxes"]]
        assert len(scores) == 3 and scores == sorted(scores, reverse=True)
        assert all(-1.0 <= score <= 1.0 for score in scores)
    folder, sentinel = pickled
    refused = run_cli("predict", str(SAMPLE_IMAGE), "--model", f"hf:{folder}", "--phrase", "x")
    assert refused.returncode == 1
    assert refused.stderr.startswith("error: ") and "Traceback" not in refused.stderr
    assert "pytorch_model.bin" in refused.stderr
    assert not sentinel.exists()


def stage_argv(stage: str, params: dict) -> list[str]:
    """The arguments ``dvc.yaml`` gives stage ``stage`` (its ``${...}`` filled from
    ``params``), after ``python stages/<stage>.py``."""
    command = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"][stage]

    def value(match: re.Match[str]) -> str:
        found = params
        for key in match.group(1).split("."):
            found = found[key]
        return str(found)

    words = shlex.split(re.sub(r"\$\{([\w.]+)\}", value, command["cmd"]))
    assert words[:2] == ["python", f"stages/{stage}.py"]
    return words[2:]


@pytest.mark.slow
def test_the_pipeline_trains_on_clip_features_and_predict_rebuilds_them(
    tiny: dict[str, Path], tmp_path: Path
) -> None:
    """parse, pair, split, features (``hf:`` backbone and text encoder), train (one epoch)
    and sweep on the tiny dataset, run as dvc.yaml runs them; then ``grounding predict`` with
    the grounder they wrote (which rebuilds the same CLIP towers) and with its ONNX export:
    the same boxes and scores."""
    from stages import features, pair, parse, split, sweep, train

    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text(encoding="utf-8"))
    params["data"]["root"] = str(write_dataset(tmp_path / "dataset"))
    model = f"hf:{tiny['clip']}"
    params["features"].update(backbone=model, text_encoder=model, image_size=64)
    params["train"].update(epochs=1)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    with contextlib.chdir(tmp_path):
        for stage in (parse, pair, split, features, train, sweep):
            stage.main(stage_argv(stage.__name__.rpartition(".")[2], params))
    meta = json.loads((tmp_path / params["paths"]["features"] / "features.json").read_text())
    assert (meta["backbone"], meta["text_encoder"]) == (model, model)
    assert (meta["region_dim"], meta["phrase_dim"]) == (WIDTH + 7, 16)
    grounder = tmp_path / params["paths"]["grounder"]
    export = tmp_path / "onnx"
    exported = run_cli("export", "--model", str(grounder), "--out", str(export))
    assert exported.returncode == 0, exported.stderr
    answers = []
    for model_path in (grounder, export):  # torch, then onnxruntime on the exported graphs
        done = run_cli(
            "predict",
            str(SAMPLE_IMAGE),
            "--model",
            str(model_path),
            "--top-k",
            "3",
            "--phrase",
            "a red circle",
            "--phrase",
            "two squares",
            "--no-cache",
        )
        assert done.returncode == 0, done.stderr
        answers.append([phrase["boxes"] for phrase in json.loads(done.stdout)["phrases"]])
    torch_boxes, onnx_boxes = answers
    assert [len(boxes) for boxes in torch_boxes] == [3, 3]
    for expected, found in zip(torch_boxes, onnx_boxes, strict=True):
        assert [box["box"] for box in found] == [box["box"] for box in expected]
        scores = [
            (box["score"], other["score"]) for box, other in zip(found, expected, strict=True)
        ]
        assert all(abs(a - b) < 1e-4 for a, b in scores)
