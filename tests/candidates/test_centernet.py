"""CenterNet proposals: the selection by hand, the proposer on a tiny ONNX model of the same
signature built here, and (slow) the model ``tools/centernet.py`` converts against the boxes
TensorFlow.js gives on a shipped image.

The converted model is taken from ``$CENTERNET_ONNX`` (default ``models/centernet.onnx``), or
converted by ``tools/centernet.py`` into a temporary folder when the converter's venv
(``$CENTERNET_VENV``, default ``/opt/centernet-venv``) and the npm package's model
(``$CENTERNET_TFJS``, default ``/opt/centernet/package/models/centernet.json``) are there, as
``.ci/run`` installs them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image
from stand_ins import SETTINGS, two_shapes

from grounding.boxes import box_iou
from grounding.candidates import build_proposer, settings_of
from grounding.candidates.centernet import SIDE, CenterNetProposer, detector_input, select
from grounding.candidates.selective_search import propose
from grounding.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[2]
SAMPLE_IMAGE = REPO / "data" / "sample" / "images" / "100000002.jpg"
CONVERTED = Path(os.environ.get("CENTERNET_ONNX", REPO / "models" / "centernet.onnx"))
VENV = Path(os.environ.get("CENTERNET_VENV", "/opt/centernet-venv"))
MODEL_JSON = Path(os.environ.get("CENTERNET_TFJS", "/opt/centernet/package/models/centernet.json"))

#: The five best rows TensorFlow.js 4.22 (WASM backend) gives for SAMPLE_IMAGE through
#: ``detector_input``, from the npm package's own files (benchmarks/centernet_tfjs.cjs).
TFJS_TOP5 = np.array(
    [
        [141.457, 55.781, 328.683, 240.084, 0.314, 64],
        [316.859, 309.607, 419.108, 411.456, 0.277, 32],
        [141.457, 55.781, 328.683, 240.084, 0.272, 29],
        [315.805, 309.690, 419.234, 411.691, 0.236, 29],
        [70.948, 297.102, 235.772, 463.762, 0.207, 73],
    ]
)

#: The tiny model's detections before the image counts: row 1 scores highest, row 0 has a
#: score of 0 plus the image's mean red / 255, row 3 leaves the 512 px square, row 4 has no
#: area once clipped.
ROWS = np.zeros((100, 6), dtype=np.float32)
ROWS[:5] = [
    [0, 0, 256, 512, 0.0, 0],
    [128, 128, 384, 384, 0.9, 2],
    [0, 256, 64, 320, 0.5, 7],
    [-20, -10, 600, 100, 0.4, 1],
    [520, 0, 600, 50, 0.3, 1],
]


def tiny_detector(path: Path, *, side: int = SIDE) -> Path:
    """An ONNX model with CenterNet's signature: ``images (1, side, side, 3)`` ->
    ``detections (1, 100, 6)`` = :data:`ROWS`, row 0's score raised by the mean of the first
    channel / 255 (so it tells whether the input is RGB in 0-255)."""
    mask = np.zeros((1, 100, 6), dtype=np.float32)
    mask[0, 0, 4] = 1.0 / 255.0
    graph = helper.make_graph(
        [
            helper.make_node("Slice", ["images", "start", "end", "axis"], ["red"]),
            helper.make_node("ReduceMean", ["red"], ["mean"], keepdims=0),
            helper.make_node("Mul", ["mean", "mask"], ["raise"]),
            helper.make_node("Add", ["rows", "raise"], ["detections"]),
        ],
        "tiny_centernet",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, side, side, 3])],
        [helper.make_tensor_value_info("detections", TensorProto.FLOAT, [1, 100, 6])],
        initializer=[
            onnx.numpy_helper.from_array(np.array([0], dtype=np.int64), "start"),
            onnx.numpy_helper.from_array(np.array([1], dtype=np.int64), "end"),
            onnx.numpy_helper.from_array(np.array([3], dtype=np.int64), "axis"),
            onnx.numpy_helper.from_array(mask, "mask"),
            onnx.numpy_helper.from_array(ROWS[None], "rows"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return tiny_detector(tmp_path / "tiny.onnx")


def test_select_scales_clips_orders_and_filters_by_hand() -> None:
    boxes, scores = select(ROWS, 1024, 256, max_proposals=10, min_score=0.1)
    # x * 1024 / 512 = 2x, y * 256 / 512 = y / 2; row 3 clipped; row 4 (x1 = 1040) has no area
    np.testing.assert_allclose(
        boxes, [[256, 64, 768, 192], [0, 128, 128, 160], [0, 0, 1024, 50]], atol=1e-9
    )
    np.testing.assert_allclose(scores, [0.9, 0.5, 0.4], atol=1e-6)
    assert boxes.dtype == np.float64
    capped, _ = select(ROWS, 512, 512, max_proposals=2, min_score=0.0)
    np.testing.assert_allclose(capped, [[128, 128, 384, 384], [0, 256, 64, 320]])
    everything, all_scores = select(ROWS, 512, 512, max_proposals=100, min_score=0.0)
    assert len(everything) == 4 and (np.diff(all_scores) <= 0).all()  # only row 4 dropped


def test_detector_input_is_the_stretched_rgb_picture() -> None:
    picture = Image.new("L", (100, 40), 200)
    square = detector_input(picture)
    assert square.shape == (SIDE, SIDE, 3) and square.dtype == np.float32
    assert (square == 200).all()  # grey -> RGB, values 0-255, not rescaled to 0-1


def test_proposer_feeds_rgb_0_255_and_returns_boxes_in_image_pixels(tiny: Path) -> None:
    red = Image.new("RGB", (1024, 256), (255, 0, 0))
    boxes, scores = CenterNetProposer(tiny, max_proposals=3, min_score=0.45).propose(red)
    # row 0 scores 0 + 255 / 255 = 1.0: first; then rows 1 and 2
    np.testing.assert_allclose(boxes, [[0, 0, 512, 256], [256, 64, 768, 192], [0, 128, 128, 160]])
    np.testing.assert_allclose(scores, [1.0, 0.9, 0.5], atol=1e-5)
    blue = Image.new("RGB", (1024, 256), (0, 0, 255))
    _, blue_scores = CenterNetProposer(tiny, max_proposals=3, min_score=0.45).propose(blue)
    np.testing.assert_allclose(blue_scores, [0.9, 0.5], atol=1e-5)  # row 0 stays at 0


def test_detect_returns_the_raw_rows(tiny: Path) -> None:
    rows = CenterNetProposer(tiny, max_proposals=5, min_score=0.0).detect(Image.new("RGB", (9, 9)))
    np.testing.assert_allclose(rows, ROWS)


@pytest.mark.parametrize(
    ("max_proposals", "min_score", "message"),
    [(0, 0.1, "max_proposals"), (10, -0.1, "min_score"), (10, 1.0, "min_score")],
)
def test_settings_out_of_range_are_refused(
    tiny: Path, max_proposals: int, min_score: float, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        CenterNetProposer(tiny, max_proposals, min_score)


def test_a_missing_file_says_how_to_make_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"tools/centernet\.py"):
        CenterNetProposer(tmp_path / "absent.onnx", 10, 0.1)


def test_another_model_is_refused_with_its_signature(tmp_path: Path) -> None:
    other = tiny_detector(tmp_path / "small.onnx", side=256)
    with pytest.raises(DataError, match=r"not the CenterNet.*256"):
        CenterNetProposer(other, 10, 0.1)
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(DataError, match="cannot load"):
        CenterNetProposer(tmp_path / "junk.onnx", 10, 0.1)


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if CONVERTED.is_file():
        return CONVERTED
    if not (VENV / "bin" / "python").is_file() or not MODEL_JSON.is_file():
        pytest.skip(
            f"no converted CenterNet at {CONVERTED} ($CENTERNET_ONNX), nor a converter venv at "
            f"{VENV} ($CENTERNET_VENV) and {MODEL_JSON} ($CENTERNET_TFJS): make them as "
            "docs/offline-detector.md says (python tools/centernet.py --help)"
        )
    out = tmp_path_factory.mktemp("centernet") / "centernet.onnx"
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    subprocess.run(
        [
            str(VENV / "bin" / "python"),
            str(REPO / "tools" / "centernet.py"),
            str(MODEL_JSON),
            str(out),
        ],
        check=True,
        env=env,
        stdout=sys.stderr,
    )
    return out


@pytest.mark.slow
def test_the_converted_model_gives_the_boxes_tensorflow_js_gives(converted: Path) -> None:
    image = Image.open(SAMPLE_IMAGE)
    proposer = CenterNetProposer(converted, max_proposals=5, min_score=0.0)
    rows = proposer.detect(image)
    assert rows.shape == (100, 6)
    top = rows[np.argsort(-rows[:, 4], kind="stable")[:5]]
    np.testing.assert_allclose(top[:, :4], TFJS_TOP5[:, :4], atol=0.05)
    np.testing.assert_allclose(top[:, 4], TFJS_TOP5[:, 4], atol=2e-3)
    np.testing.assert_array_equal(top[:, 5], TFJS_TOP5[:, 5])
    boxes, scores = proposer.propose(image)
    scale = np.array([image.width, image.height] * 2) / SIDE
    np.testing.assert_allclose(boxes, TFJS_TOP5[:, :4] * scale, atol=0.05)
    assert (np.diff(scores) <= 0).all()


# --- the `centernet` generator: CenterNet's best boxes, then selective search ------------------


def test_the_generator_leads_with_the_detector_s_boxes_then_fills_with_selective_search(
    tiny: Path,
) -> None:
    image = two_shapes()
    settings = {"model": str(tiny), "detector_boxes": 2, "max_proposals": 6}
    boxes = build_proposer("centernet", settings).propose(image)
    detector, _ = CenterNetProposer(tiny, max_proposals=2, min_score=0.0).propose(image)
    np.testing.assert_allclose(boxes[:2], detector, atol=1e-4)  # the detector's best two first
    assert 2 < len(boxes) <= 6  # then selective search's largest, near-duplicates dropped
    filled = propose(image, **{**SETTINGS, "max_proposals": 100, "min_size": 16})
    assert all(box_iou(box[None], filled).max() > 0.999 for box in boxes[2:])
    assert box_iou(boxes, boxes)[np.triu_indices(len(boxes), 1)].max() < 0.7


def test_the_generator_without_detector_boxes_is_selective_search(tiny: Path) -> None:
    image = two_shapes()
    boxes = build_proposer(
        "centernet", {"model": str(tiny), "detector_boxes": 0, "max_proposals": 5}
    ).propose(image)
    np.testing.assert_array_equal(boxes, propose(image, **{**SETTINGS, "min_size": 16})[:5])


def test_the_generator_s_settings_name_their_key(tiny: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"candidates\.centernet: expected 0 <= detector_boxes"):
        build_proposer("centernet", {"model": str(tiny), "detector_boxes": 101})
    with pytest.raises(DataError, match=r"no such ONNX file; make it with tools/centernet.py"):
        build_proposer("centernet", {"model": str(tmp_path / "none.onnx")})
    assert settings_of("centernet")["model"] == "models/centernet.onnx"  # JSON-ready
