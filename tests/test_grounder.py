"""Grounding phrases in new images: proposals, their cache, the grounder, the pyfunc table,
and `grounding predict`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import jpeg_bytes
from PIL import Image, ImageDraw

from grounding import grounder as grounder_module
from grounding.boxes import box_iou
from grounding.cli import main as cli_main
from grounding.errors import DataError
from grounding.features import image_features
from grounding.grounder import (
    Found,
    Grounder,
    Grounding,
    check_image,
    check_phrases,
    grounder_bundle,
    phrases_from_caption,
)
from grounding.io import ProposalCache, write_checkpoint
from grounding.model import HeadConfig, MatchingHead, head_state
from grounding.proposals import ProposalSettings, dedupe, propose
from grounding.serving import decode_image, encode_image, predict_table

SETTINGS = ProposalSettings(mode="fast", max_side=300, min_size=8, dedupe_iou=0.7, max_proposals=50)


def two_shapes() -> Image.Image:
    """A grey image with a red and a blue rectangle: what any proposal method must find."""
    image = Image.new("RGB", (240, 160), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    draw.rectangle((20, 30, 89, 119), fill=(220, 30, 30))  # box (20, 30, 90, 120)
    draw.rectangle((140, 50, 219, 99), fill=(30, 30, 220))  # box (140, 50, 220, 100)
    return image


# --- proposals ---------------------------------------------------------------------------


def test_proposals_cover_the_shapes_and_respect_the_settings() -> None:
    image = two_shapes()
    boxes = propose(image, SETTINGS)
    assert boxes.dtype == np.float32 and boxes.shape[1] == 4
    assert 2 <= len(boxes) <= SETTINGS.max_proposals
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 240).all() and (boxes[:, 3] <= 160).all()
    assert (np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) >= 8).all()
    truth = np.array([[20, 30, 90, 120], [140, 50, 220, 100]])
    assert (box_iou(boxes, truth).max(axis=0) >= 0.7).all()
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    assert (np.diff(areas) <= 0).all()  # largest first
    assert box_iou(boxes, boxes)[np.triu_indices(len(boxes), 1)].max() < 0.7  # deduped


def test_proposals_of_a_downscaled_image_are_in_original_pixels() -> None:
    small = two_shapes()
    large = small.resize((960, 640), Image.Resampling.NEAREST)
    boxes = propose(large, SETTINGS)  # searched at 300 px, scaled back by 3.2
    truth = np.array([[80, 120, 360, 480], [560, 200, 880, 400]])
    assert (box_iou(boxes, truth).max(axis=0) >= 0.7).all()


def test_no_proposal_survives_a_min_size_larger_than_the_image() -> None:
    settings = ProposalSettings("fast", 300, min_size=500, dedupe_iou=0.7, max_proposals=10)
    assert propose(two_shapes(), settings).shape == (0, 4)


def test_dedupe_by_hand() -> None:
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 9], [20, 20, 30, 30], [0, 0, 10, 10]])
    assert dedupe(boxes, max_iou=0.7, limit=10).tolist() == [0, 2]
    assert dedupe(boxes, max_iou=1.0, limit=10).tolist() == [0, 1, 2]  # exact duplicate only
    assert dedupe(boxes, max_iou=0.7, limit=1).tolist() == [0]


@pytest.mark.parametrize(
    "change", [{"mode": "slow"}, {"max_side": 8}, {"max_proposals": 0}, {"dedupe_iou": 0.0}]
)
def test_bad_proposal_settings_are_refused(change: dict) -> None:
    values = {
        "mode": "fast",
        "max_side": 300,
        "min_size": 8,
        "dedupe_iou": 0.7,
        "max_proposals": 10,
        **change,
    }
    with pytest.raises(ValueError):
        ProposalSettings(**values)


def test_cache_computes_once_per_image_and_settings(tmp_path: Path) -> None:
    cache, calls = ProposalCache(tmp_path), []

    def compute() -> np.ndarray:
        calls.append(1)
        return np.array([[1, 2, 3, 4]], dtype=np.float32)

    image = two_shapes()
    first = cache.get(image, SETTINGS, compute)
    again = cache.get(image.copy(), SETTINGS, compute)
    np.testing.assert_array_equal(first, again)
    assert len(calls) == 1
    other = ProposalSettings("fast", 300, 8, 0.7, max_proposals=5)
    cache.get(image, other, compute)  # other settings: computed again
    edited = image.copy()
    edited.putpixel((0, 0), (0, 0, 0))
    cache.get(edited, SETTINGS, compute)  # other pixels: computed again
    assert len(calls) == 3
    damaged = tmp_path / f"{ProposalCache.key(image, SETTINGS)}.npy"
    damaged.write_bytes(b"not an array")
    cache.get(image, SETTINGS, compute)
    assert len(calls) == 4


# --- phrases and images ------------------------------------------------------------------


def test_phrases_from_captions_plain_and_flickr30k_form() -> None:
    assert phrases_from_caption("[A man] in [a red shirt] runs") == ["A man", "a red shirt"]
    flickr = "[/EN#12/people A man] in [/EN#13/clothing/other a red shirt] ."
    assert phrases_from_caption(flickr) == ["A man", "a red shirt"]


@pytest.mark.parametrize(
    "caption, message",
    [
        ("[A man in a shirt", "unclosed"),
        ("A man] in a shirt", "unbalanced"),
        ("[A [man]]", "nested"),
        ("A man in a shirt", "no \\[bracketed\\] phrase"),
    ],
)
def test_bad_captions_are_refused(caption: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        phrases_from_caption(caption)


def test_empty_phrases_are_refused() -> None:
    assert check_phrases([" a dog "]) == ["a dog"]
    with pytest.raises(DataError, match="no phrase"):
        check_phrases([])
    with pytest.raises(DataError, match="phrase 2 of 2 is empty"):
        check_phrases(["a dog", "  "])


def test_tiny_and_huge_images_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataError, match="at least 32"):
        check_image(Image.new("RGB", (20, 200)))
    monkeypatch.setattr(grounder_module, "MAX_IMAGE_PIXELS", 10_000)
    with pytest.raises(DataError, match="at most 10,000"):
        check_image(Image.new("RGB", (200, 200)))
    assert check_image(Image.new("L", (64, 64))).mode == "RGB"


# --- the grounder ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle() -> dict:
    """An untrained head on the packaged models' features: the plumbing, not the quality."""
    features = {
        "backbone": "efficientnet-lite0",
        "backbone_weights": None,
        "text_encoder": "all-minilm-l6-v2",
        "image_size": 224,
        "context": True,
    }
    with torch.random.fork_rng():
        torch.manual_seed(0)
        head = MatchingHead(HeadConfig(2 * 1280 + 7, 384, 16, 0.0)).eval()
    return grounder_bundle({**head_state(head), "features": features}, 0.5, SETTINGS)


@pytest.fixture(scope="module")
def grounder(bundle: dict) -> Grounder:
    return Grounder.from_bundle(bundle)


def test_grounder_scores_every_phrase_with_every_proposal_as_the_head_does(
    grounder: Grounder,
) -> None:
    image = two_shapes()
    boxes = grounder.propose(image)
    phrases = ["a red box", "a blue box", "grey"]
    scores = grounder.score(image, boxes, phrases)
    assert scores.shape == (3, len(boxes))
    # the same numbers as the head on explicit (region, phrase) pairs
    from grounding.features import encode_phrases

    regions = torch.from_numpy(
        image_features(grounder.backbone, image, boxes, image_size=224, context=True)
    )
    texts = torch.from_numpy(encode_phrases(grounder.encoder, phrases))
    pairwise = torch.sigmoid(
        grounder.head(
            regions[None].expand(3, -1, -1).reshape(-1, regions.shape[1]),
            texts[:, None].expand(-1, len(boxes), -1).reshape(-1, texts.shape[1]),
        )
    )
    np.testing.assert_allclose(scores.reshape(-1), pairwise.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_ground_returns_the_top_k_boxes_best_first(grounder: Grounder) -> None:
    found = grounder.ground(two_shapes(), ["a red box", "a blue box"], top_k=3)
    assert [g.phrase for g in found] == ["a red box", "a blue box"]
    for grounding in found:
        scores = [box.score for box in grounding.boxes]
        assert len(scores) == 3 and scores == sorted(scores, reverse=True)
        assert all(box.above_threshold == (box.score >= 0.5) for box in grounding.boxes)
    with pytest.raises(DataError, match="top_k"):
        grounder.ground(two_shapes(), ["x"], top_k=0)


def test_an_image_without_proposals_gives_empty_results_with_a_reason(grounder: Grounder) -> None:
    found = grounder.ground(two_shapes(), ["a dog"], proposals=lambda _: np.empty((0, 4)))
    assert found == [Grounding("a dog", [], found[0].reason)]
    assert "no proposal survived" in found[0].reason


def test_a_bundle_from_elsewhere_is_refused(bundle: dict) -> None:
    with pytest.raises(DataError, match="not a grounder bundle"):
        Grounder.from_bundle({"head": {}})
    unknown = {**bundle, "features": {**bundle["features"], "backbone": "vgg-nonexistent"}}
    with pytest.raises(DataError, match="cannot be rebuilt here"):
        Grounder.from_bundle(unknown)


# --- the pyfunc table --------------------------------------------------------------------


class RecordingGrounder:
    """Stands in for a :class:`Grounder`: records its calls, answers a fixed box."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[int, int], list[str]]] = []

    def ground(self, image: Image.Image, phrases: list[str], *, top_k: int) -> list[Grounding]:
        self.calls.append((image.size, phrases))
        return [
            Grounding(p, [Found((1.0, 2.0, 3.0, 4.0), 0.9 - r / 10, True) for r in range(top_k)])
            for p in phrases
        ]


def test_predict_table_grounds_the_phrases_of_one_image_together() -> None:
    red, blue = encode_image(jpeg_bytes(64, 48)), encode_image(jpeg_bytes(80, 40, (0, 0, 200)))
    table = pd.DataFrame({"image": [red, blue, red], "phrase": ["a man", "a dog", "a hat"]})
    stand_in = RecordingGrounder()
    result = predict_table(stand_in, table, top_k=2)  # type: ignore[arg-type]
    assert stand_in.calls == [((64, 48), ["a man", "a hat"]), ((80, 40), ["a dog"])]
    assert result["row"].tolist() == [0, 0, 1, 1, 2, 2]
    assert result["rank"].tolist() == [1, 2, 1, 2, 1, 2]
    assert result.loc[0, ["x1", "y1", "x2", "y2"]].tolist() == [1.0, 2.0, 3.0, 4.0]
    assert result["reason"].isna().all()


def test_decode_image_names_the_bad_row() -> None:
    with pytest.raises(DataError, match="row 3: image is not base64"):
        decode_image("not base64!", 3)
    with pytest.raises(DataError, match="row 0: not a readable image"):
        decode_image(encode_image(b"plain text"), 0)
    truncated = jpeg_bytes(64, 64)[:300]
    with pytest.raises(DataError, match="row 1: not a readable image"):
        decode_image(encode_image(truncated), 1)


def test_predict_table_needs_its_columns() -> None:
    with pytest.raises(DataError, match="missing \\['phrase'\\]"):
        predict_table(RecordingGrounder(), pd.DataFrame({"image": ["x"]}), top_k=1)  # type: ignore[arg-type]


# --- grounding predict -------------------------------------------------------------------


def test_predict_command_prints_json_and_draws(
    bundle: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, image, out = tmp_path / "grounder.pt", tmp_path / "shapes.jpg", tmp_path / "out.png"
    write_checkpoint(bundle, model)
    two_shapes().save(image)
    phrases = tmp_path / "phrases.txt"
    phrases.write_text("a blue box\n\n")
    argv = [
        "predict",
        str(image),
        "--model",
        str(model),
        "--phrase",
        "a red box",
        "--caption",
        "[the grey background] behind [a shape]",
        "--phrases-file",
        str(phrases),
        "--out",
        str(out),
        "--cache",
        str(tmp_path / "cache"),
    ]
    cli_main(argv)
    result = json.loads(capsys.readouterr().out)
    assert [p["phrase"] for p in result["phrases"]] == [
        "a red box",
        "the grey background",
        "a shape",
        "a blue box",
    ]
    assert all(len(p["boxes"]) == 1 for p in result["phrases"])
    assert Image.open(out).size[0] > 0
    cli_main(argv)  # again: the proposals come from the cache
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1


@pytest.mark.parametrize(
    "setup, extra, message",
    [
        (lambda d: None, ["--phrase", "a dog"], "image file missing"),
        (
            lambda d: (d / "x.jpg").write_bytes(b"text, not a picture"),
            ["--phrase", "a"],
            "unreadable image",
        ),
        (
            lambda d: (d / "x.jpg").write_bytes(jpeg_bytes(64, 64)[:200]),
            ["--phrase", "a"],
            "unreadable image",
        ),
        (
            lambda d: (d / "x.jpg").write_bytes(jpeg_bytes(64, 64)),
            ["--phrase", " "],
            "phrase 1 of 1 is empty",
        ),
        (lambda d: (d / "x.jpg").write_bytes(jpeg_bytes(64, 64)), [], "no phrase given"),
        (
            lambda d: (d / "x.jpg").write_bytes(jpeg_bytes(64, 64)),
            ["--caption", "[a dog"],
            "unclosed",
        ),
        (
            lambda d: (d / "x.jpg").write_bytes(jpeg_bytes(64, 64)),
            ["--phrase", "a", "--model", "nowhere.pt"],
            "no model here",
        ),
        (
            lambda d: (d / "x.jpg").write_bytes(jpeg_bytes(64, 64)),
            ["--phrase", "a", "--out", "boxes.gif"],
            "the picture must be one of",
        ),
        (
            lambda d: (d / "x.jpg").write_bytes(jpeg_bytes(64, 64)),
            ["--phrase", "a", "--model", "runs:/0123456789abcdef/grounder"],
            "cannot load the model",
        ),
    ],
)
def test_predict_command_reports_user_mistakes_in_one_line(
    setup,
    extra: list[str],
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    setup(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["predict", str(tmp_path / "x.jpg"), *extra])
    assert exit_info.value.code == 1
    error = capsys.readouterr().err
    last = error.strip().splitlines()[-1]  # MLflow may log INFO lines before it
    assert last.startswith("error: ") and message in last, error
