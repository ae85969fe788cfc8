"""Grounding phrases in new images: phrases and images checked, the grounder's scores, its
top boxes, and its weights. The fast tests ground with stand-in models; the slow one with the
packaged backbone and text encoder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import stand_ins
import torch
from PIL import Image
from stand_ins import SETTINGS, TWO_SHAPES, two_shapes

from grounding.boxes import box_iou
from grounding.candidates.selective_search import propose
from grounding.errors import DataError
from grounding.inference import grounder as grounder_module
from grounding.inference.grounder import (
    Found,
    Grounder,
    Grounding,
    check_image,
    check_phrases,
    grounder_weights,
    phrases_from_caption,
)
from grounding.io import ProposalCache, read_weights, write_weights
from grounding.modeling.region_features import image_features
from grounding.modeling.text import encode_phrases

PHRASES = ["a red box", "a blue box", "grey"]
BOXES = np.array([[20, 30, 90, 120], [140, 50, 220, 100], [0, 0, 240, 160], [100, 0, 130, 40]])


def by_hand(grounder: Grounder, image: Image.Image, boxes: np.ndarray, phrases: list[str]):
    """Each (phrase, box) scored alone: ``(P, N)`` probabilities."""
    scorer = grounder.scorer
    meta, head = grounder.features, scorer.trained.head
    regions = image_features(
        scorer.backbone, image, boxes, image_size=meta.image_size, context=meta.context
    )
    texts = encode_phrases(scorer.encoder, phrases)
    with torch.inference_mode():
        return np.array(
            [
                [
                    float(
                        torch.sigmoid(
                            head.score(
                                head.embed_regions(torch.from_numpy(regions[n : n + 1])),
                                head.embed_phrases(torch.from_numpy(texts[p : p + 1])),
                            )
                        )[0]
                    )
                    for n in range(len(boxes))
                ]
                for p in range(len(phrases))
            ]
        )


def refuse(_: Image.Image) -> np.ndarray:
    raise AssertionError("proposed boxes for input that should have been refused")


# --- phrases and images ------------------------------------------------------------------


def test_phrases_from_captions_plain_and_flickr30k_form() -> None:
    assert phrases_from_caption("[A man] in [a red shirt] runs") == ["A man", "a red shirt"]
    flickr = "[/EN#12/people A man] in [/EN#13/clothing/other a red shirt] ."
    assert phrases_from_caption(flickr) == ["A man", "a red shirt"]
    assert phrases_from_caption("[ un café ] .") == ["un café"]


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
    assert check_phrases([" a dog ", "a cat"]) == ["a dog", "a cat"]
    with pytest.raises(DataError, match="no phrase"):
        check_phrases([])
    with pytest.raises(DataError, match="phrase 2 of 2 is empty"):
        check_phrases(["a dog", "  "])


def test_tiny_and_huge_images_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataError, match="image is 20x200 pixels; at least 32"):
        check_image(Image.new("RGB", (20, 200)))
    assert check_image(Image.new("RGB", (32, 32))).size == (32, 32)
    monkeypatch.setattr(grounder_module, "MAX_IMAGE_PIXELS", 10_000)
    with pytest.raises(DataError, match="at most 10,000"):
        check_image(Image.new("RGB", (200, 200)))
    assert check_image(Image.new("L", (64, 64))).mode == "RGB"


# --- the grounder, with stand-in models --------------------------------------------------


@pytest.fixture
def grounder() -> Grounder:
    return stand_ins.grounder()


def test_grounder_scores_every_phrase_with_every_box_as_the_head_does(grounder: Grounder) -> None:
    image = two_shapes()
    scores = grounder.score(image, BOXES, PHRASES)
    assert scores.shape == (3, 4)
    np.testing.assert_allclose(scores, by_hand(grounder, image, BOXES, PHRASES), rtol=1e-5)
    assert grounder.features == stand_ins.features_meta()


def test_ground_returns_the_top_k_boxes_best_first(grounder: Grounder) -> None:
    image = two_shapes()
    scores = grounder.score(image, BOXES, PHRASES)
    grounder.threshold = float(np.median(scores))  # some boxes above it, some below
    found = grounder.ground(image, PHRASES, top_k=3, proposals=lambda _: BOXES)
    assert [grounding.phrase for grounding in found] == PHRASES
    for grounding, row in zip(found, scores, strict=True):
        best = np.argsort(-row)[:3]
        assert [box.box for box in grounding.boxes] == [tuple(map(float, BOXES[i])) for i in best]
        assert [box.score for box in grounding.boxes] == pytest.approx(row[best].tolist())
        assert [b.above_threshold for b in grounding.boxes] == [
            bool(s >= grounder.threshold) for s in row[best]
        ]
        assert grounding.reason is None
    flags = [box.above_threshold for grounding in found for box in grounding.boxes]
    assert any(flags) and not all(flags)


def test_ground_returns_every_box_when_top_k_exceeds_them(grounder: Grounder) -> None:
    [grounding] = grounder.ground(two_shapes(), ["a box"], top_k=10, proposals=lambda _: BOXES)
    assert len(grounding.boxes) == 4


def test_ground_proposes_with_the_grounders_generator(grounder: Grounder) -> None:
    image = two_shapes()
    [grounding] = grounder.ground(image, ["a red box"], top_k=50)
    proposed = propose(image, **SETTINGS)
    assert len(grounding.boxes) == len(proposed)
    assert {box.box for box in grounding.boxes} == {tuple(map(float, b)) for b in proposed}
    assert (box_iou(proposed, TWO_SHAPES).max(axis=0) >= 0.7).all()


def test_the_grounders_proposer_uses_a_cache(grounder: Grounder, tmp_path: Path) -> None:
    boxes = grounder.proposer(ProposalCache(tmp_path))(two_shapes())
    np.testing.assert_array_equal(boxes, propose(two_shapes(), **SETTINGS))
    assert len(list(tmp_path.glob("*.npy"))) == 1


def test_an_image_without_candidates_gives_empty_results_with_a_reason(grounder: Grounder) -> None:
    found = grounder.ground(two_shapes(), ["a dog", "a cat"], proposals=lambda _: np.empty((0, 4)))
    assert [g.phrase for g in found] == ["a dog", "a cat"]
    assert all(g.boxes == [] for g in found)
    assert "no candidate survived" in found[0].reason and "selective_search" in found[0].reason


def test_bad_input_is_refused_before_any_box_is_proposed(grounder: Grounder) -> None:
    with pytest.raises(DataError, match=r"top_k must be in 1..1000"):
        grounder.ground(two_shapes(), ["x"], top_k=0, proposals=refuse)
    with pytest.raises(DataError, match="phrase 1 of 1 is empty"):
        grounder.ground(two_shapes(), [" "], proposals=refuse)
    with pytest.raises(DataError, match="at least 32"):
        grounder.ground(Image.new("RGB", (16, 16)), ["x"], proposals=refuse)


def test_grounding_to_dict_is_plain_data() -> None:
    grounding = Grounding("a dog", [Found((1.0, 2.0, 3.0, 4.0), 0.75, True)])
    assert grounding.to_dict() == {
        "phrase": "a dog",
        "boxes": [{"box": (1.0, 2.0, 3.0, 4.0), "score": 0.75, "above_threshold": True}],
        "reason": None,
    }


# --- the grounder's weights --------------------------------------------------------------


def test_grounder_weights_hold_the_head_threshold_and_generator() -> None:
    trained = stand_ins.trained_head()
    tensors, config = grounder_weights(
        trained, threshold=0.25, candidates="selective_search", settings=SETTINGS
    )
    assert config["threshold"] == 0.25
    assert config["candidates"] == {"name": "selective_search", "settings": SETTINGS}
    assert config["features"] == trained.features.to_dict()
    assert config["head"]["name"] == "matching"
    assert set(tensors) == set(trained.head.state_dict())


def test_a_grounder_round_trips_through_its_weights_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stand_ins.install(monkeypatch)
    original = stand_ins.grounder(threshold=0.3)
    path = tmp_path / "grounder.safetensors"
    write_weights(
        *grounder_weights(
            original.scorer.trained,
            threshold=0.3,
            candidates="selective_search",
            settings=SETTINGS,
        ),
        path,
    )
    rebuilt = Grounder.from_weights(*read_weights(path))
    assert (rebuilt.threshold, rebuilt.candidates, rebuilt.settings) == (
        0.3,
        "selective_search",
        SETTINGS,
    )
    assert rebuilt.features == original.features
    assert (
        rebuilt.scorer.backbone.name == stand_ins.POOLING
        and rebuilt.scorer.encoder.name == stand_ins.WORDS
    )
    image = two_shapes()
    np.testing.assert_array_equal(
        rebuilt.score(image, BOXES, PHRASES), original.score(image, BOXES, PHRASES)
    )


def _weights(**changes: object) -> tuple[dict, dict]:
    tensors, config = grounder_weights(
        stand_ins.trained_head(), threshold=0.5, candidates="selective_search", settings=SETTINGS
    )
    return tensors, {**config, **changes}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"candidates": None}, "not a grounder of this project"),
        ({"threshold": None}, "not a grounder of this project"),
        ({"candidates": {"name": "annotated", "settings": {}}}, "cannot be rebuilt here.*needs"),
        ({"candidates": {"name": "edge_boxes", "settings": {}}}, "cannot be rebuilt here"),
        (
            {"candidates": {"name": "selective_search", "settings": {**SETTINGS, "max_side": 1}}},
            "cannot be rebuilt here.*max_side",
        ),
        (
            {"features": {**stand_ins.features_meta().to_dict(), "backbone": "vgg-nonexistent"}},
            "cannot be rebuilt here.*unknown backbone 'vgg-nonexistent'",
        ),
        (
            {"features": {**stand_ins.features_meta().to_dict(), "text_encoder": "no-encoder"}},
            "cannot be rebuilt here.*unknown text encoder 'no-encoder'",
        ),
        ({"head": None}, "not a trained head of this project"),
    ],
    ids=[
        "no generator",
        "no threshold",
        "annotated",
        "unknown generator",
        "bad settings",
        "unknown backbone",
        "unknown encoder",
        "no head",
    ],
)
def test_weights_that_cannot_be_a_grounder_here_are_refused(
    change: dict, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    stand_ins.install(monkeypatch)
    tensors, config = _weights(**change)
    config = {key: value for key, value in config.items() if value is not None}
    with pytest.raises(DataError, match=message):
        Grounder.from_weights(tensors, config)


def test_a_head_file_is_not_a_grounder(monkeypatch: pytest.MonkeyPatch) -> None:
    stand_ins.install(monkeypatch)
    with pytest.raises(DataError, match="not a grounder of this project"):
        Grounder.from_weights(*stand_ins.trained_head().to_weights())


# --- with the packaged models ------------------------------------------------------------


@pytest.mark.slow
def test_a_grounder_of_the_packaged_models_rebuilds_and_grounds(tmp_path: Path) -> None:
    """An untrained head on the packaged models' features: the plumbing, not the quality."""
    trained = stand_ins.packaged_head()
    meta = trained.features
    path = tmp_path / "grounder.safetensors"
    write_weights(
        *grounder_weights(trained, threshold=0.5, candidates="selective_search", settings=SETTINGS),
        path,
    )
    grounder = Grounder.from_weights(*read_weights(path))
    assert (grounder.scorer.backbone.name, grounder.scorer.encoder.name) == (
        meta.backbone,
        meta.text_encoder,
    )
    image = two_shapes()
    boxes = grounder.proposer()(image)
    scores = grounder.score(image, boxes, PHRASES)
    assert scores.shape == (3, len(boxes))
    np.testing.assert_allclose(
        scores, by_hand(grounder, image, boxes, PHRASES), rtol=1e-4, atol=1e-6
    )
    found = grounder.ground(image, PHRASES, top_k=2)
    assert [len(g.boxes) for g in found] == [2, 2, 2]
    assert all(g.boxes[0].score >= g.boxes[1].score for g in found)
