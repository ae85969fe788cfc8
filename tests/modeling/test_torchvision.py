"""torchvision models through their weights API, offline: ``torchvision:<builder>`` as a
candidate generator (:mod:`grounding.candidates.detection`) and as a backbone, loaded from a
temporary ``TORCH_HOME`` where each test puts random weights under the file name torchvision
gives them. No test may download: any attempt is recorded and fails as it would offline."""

from __future__ import annotations

import contextlib
import json
import os
import urllib.error
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
import yaml
from conftest import REPO_ROOT, write_dataset
from PIL import Image
from torchvision.ops import box_iou, roi_align

from grounding import candidates
from grounding.candidates.detection import Detector, Settings, class_agnostic
from grounding.cli import main as cli_main
from grounding.errors import ConfigError, DataError
from grounding.inference.grounder import grounder_weights
from grounding.io import write_weights
from grounding.modeling.backbones import load_backbone
from grounding.modeling.head import HeadConfig, MatchingHead
from grounding.modeling.pooling import RegionPooling
from grounding.modeling.scoring import TrainedHead
from grounding.modeling.torchvision_models import cached_file, read_state_dict, weights_entry
from grounding.schemas import FeaturesMeta

FASTER_RCNN = "fasterrcnn_mobilenet_v3_large_320_fpn"
SSDLITE = "ssdlite320_mobilenet_v3_large"
RESNET = "resnet18"
SAMPLE_IMAGE = REPO_ROOT / "data" / "sample" / "images" / "100000001.jpg"


def random_weights(builder: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A randomly initialised ``builder``'s ``state_dict`` as torchvision ships its weights:
    a detection model's without the batch-norm counters (its pretrained norms are frozen)."""
    torch.manual_seed(seed)
    detection = builder in torchvision.models.list_models(module=torchvision.models.detection)
    extra = {"weights_backbone": None} if detection else {}
    state = torchvision.models.get_model(builder, weights=None, **extra).state_dict()
    if detection:
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    return state


def place_weights(builder: str, seed: int = 0) -> Path:
    """Save :func:`random_weights` where torchvision looks for ``builder``'s DEFAULT weights."""
    path = cached_file(weights_entry(builder))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(random_weights(builder, seed), path)
    return path


@pytest.fixture(autouse=True)
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """An empty ``TORCH_HOME`` for each test, and a network that fails: the URLs that a
    download was attempted from."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    attempts: list[str] = []

    def download(url: str, *args: object, **kwargs: object) -> None:
        attempts.append(url)
        raise urllib.error.URLError("no network in the tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    return attempts


def sample_image() -> Image.Image:
    return Image.open(SAMPLE_IMAGE).convert("RGB")


# --- the candidate generator -----------------------------------------------------------------


def test_class_agnostic_clips_drops_and_dedupes_best_first() -> None:
    boxes = torch.tensor(
        [
            [10.0, 10.0, 50.0, 50.0],  # 0.5
            [10.0, 10.0, 50.0, 51.0],  # 0.9: IoU 40*40/(40*41) = 0.976 with the next best one
            [-5.0, 0.0, 30.0, 120.0],  # 0.7: clipped to (0, 0, 30, 100)
            [60.0, 60.0, 60.5, 90.0],  # 0.8: half a pixel wide, dropped
            [70.0, 10.0, 90.0, 30.0],  # 0.5: a tie with the first, after it
        ]
    )
    scores = torch.tensor([0.5, 0.9, 0.7, 0.8, 0.5])
    kept, kept_scores = class_agnostic(boxes, scores, size=(100, 100), dedupe_iou=0.9, limit=10)
    assert kept.tolist() == [
        [10.0, 10.0, 50.0, 51.0],
        [0.0, 0.0, 30.0, 100.0],
        [70.0, 10.0, 90.0, 30.0],
    ]
    assert kept_scores.tolist() == pytest.approx([0.9, 0.7, 0.5])
    # a looser dedupe keeps the near-duplicate; the limit cuts after the best
    kept, _ = class_agnostic(boxes, scores, size=(100, 100), dedupe_iou=0.99, limit=2)
    assert kept.tolist() == [[10.0, 10.0, 50.0, 51.0], [0.0, 0.0, 30.0, 100.0]]


def assert_valid(boxes: np.ndarray, image: Image.Image) -> None:
    assert boxes.dtype == np.float32 and boxes.ndim == 2 and boxes.shape[1] == 4
    assert (boxes[:, 2] - boxes[:, 0] >= 1).all() and (boxes[:, 3] - boxes[:, 1] >= 1).all()
    assert (boxes[:, :2] >= 0).all()
    assert (boxes[:, 2] <= image.width).all() and (boxes[:, 3] <= image.height).all()


@pytest.mark.slow  # runs a detection model
def test_an_untrained_faster_rcnn_gives_the_budget_of_valid_boxes_best_first(
    offline: list[str],
) -> None:
    place_weights(FASTER_RCNN)
    image = sample_image()
    detector = candidates.build_proposer(f"torchvision:{FASTER_RCNN}", {"max_proposals": 30})
    assert isinstance(detector, Detector) and detector.version == 1
    boxes, scores = detector.propose_scored(image)
    assert len(boxes) == 30  # random weights score every box near 1/91: no floor cuts them
    assert_valid(boxes, image)
    assert (np.diff(scores) <= 0).all()
    iou = box_iou(torch.from_numpy(boxes), torch.from_numpy(boxes)).fill_diagonal_(0)
    assert iou.max() <= 0.9  # one box per object, whatever its classes
    np.testing.assert_array_equal(detector.propose(image), boxes)
    assert offline == []


@pytest.mark.slow  # runs a detection model
def test_the_budget_only_cuts_the_list_and_a_detector_gives_what_it_has(
    offline: list[str],
) -> None:
    place_weights(SSDLITE)
    image = sample_image()
    few = candidates.build_proposer(f"torchvision:{SSDLITE}", {"max_proposals": 10})
    many = candidates.build_proposer(f"torchvision:{SSDLITE}", {"max_proposals": 1000})
    few_boxes, many_boxes = few.propose(image), many.propose(image)
    assert len(few_boxes) == 10
    assert 10 < len(many_boxes) < 1000  # fewer distinct boxes than the budget: all of them
    np.testing.assert_array_equal(many_boxes[:10], few_boxes)
    assert_valid(many_boxes, image)
    assert offline == []


@pytest.mark.slow  # runs a detection model
def test_candidate_regions_and_the_table_name_the_scheme(tmp_path: Path) -> None:
    place_weights(FASTER_RCNN)
    name = f"torchvision:{FASTER_RCNN}"
    images = pd.DataFrame({"image_id": ["a", "b"]})
    pictures = {"a": sample_image(), "b": sample_image().rotate(90, expand=True)}
    regions = candidates.candidate_regions(
        name,
        {"torchvision": {"max_proposals": 5}, "selective_search": {}},
        images,
        pd.DataFrame(columns=["image_id", "x1", "y1", "x2", "y2"]),
        pictures.__getitem__,
    )
    assert sorted(regions) == ["a", "b"] and all(len(r) == 5 for r in regions.values())
    assert_valid(regions["b"], pictures["b"])
    table = candidates.candidates_table(regions, name)
    assert len(table) == 10 and set(table["source"]) == {name}


def test_refusals_name_the_setting_and_list_what_is_known(offline: list[str]) -> None:
    with pytest.raises(ConfigError, match=rf"pair.candidates: .*'{RESNET}'.*{FASTER_RCNN}"):
        candidates.build_proposer(f"torchvision:{RESNET}")  # a classifier proposes nothing
    with pytest.raises(ConfigError, match=r"candidates.torchvision.weights: .*'COCO_V9'.*COCO_V1"):
        candidates.build_proposer(f"torchvision:{FASTER_RCNN}", {"weights": "COCO_V9"})
    with pytest.raises(ConfigError, match=r"candidates.torchvision: max_proposals must be >= 1"):
        candidates.build_proposer(f"torchvision:{FASTER_RCNN}", {"max_proposals": 0})
    assert offline == []


def test_absent_weights_offline_are_one_error_naming_file_and_folder(offline: list[str]) -> None:
    path = cached_file(weights_entry(FASTER_RCNN))
    with pytest.raises(DataError) as caught:
        candidates.build_proposer(f"torchvision:{FASTER_RCNN}")
    message = str(caught.value)
    assert f"place the file {path.name} in {path.parent}" in message
    assert "no network in the tests" in message
    assert offline == [weights_entry(FASTER_RCNN).url]  # one attempt, where torchvision would
    assert not path.exists()  # nothing half-written left in the cache


class _Payload:
    """What a malicious checkpoint pickles: making a folder when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.mkdir, (str(self.marker),)


def test_a_pickle_that_is_not_plain_weights_is_refused_before_it_runs(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = cached_file(weights_entry(FASTER_RCNN))
    path.parent.mkdir(parents=True)
    torch.save({**random_weights(FASTER_RCNN), "payload": _Payload(marker)}, path)
    with pytest.raises(DataError, match=r"refused: not plain weights \(it pickles posix.mkdir"):
        candidates.build_proposer(f"torchvision:{FASTER_RCNN}")
    with pytest.raises(ValueError, match=r"refused: not plain weights"):
        load_backbone(f"torchvision:{FASTER_RCNN}")
    assert not marker.exists()


def test_weights_of_another_model_are_refused_with_the_keys(tmp_path: Path) -> None:
    path = cached_file(weights_entry(FASTER_RCNN))
    path.parent.mkdir(parents=True)
    torch.save(random_weights(SSDLITE), path)
    with pytest.raises(DataError, match=rf"not a state_dict of '{FASTER_RCNN}': Missing key"):
        candidates.build_proposer(f"torchvision:{FASTER_RCNN}")
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    with pytest.raises(DataError, match=r"list\.pth: not a state_dict \(a mapping"):
        read_state_dict(tmp_path / "list.pth")
    with pytest.raises(DataError, match=r"absent\.pth: not a PyTorch weights file"):
        read_state_dict(tmp_path / "absent.pth")


def test_settings_defaults() -> None:
    assert Settings() == Settings(weights="DEFAULT", max_proposals=100, dedupe_iou=0.9)


# --- the backbone ----------------------------------------------------------------------------


@pytest.mark.slow  # runs a detection model
def test_a_detection_backbone_pools_its_stride_16_level_from_the_cached_weights() -> None:
    saved = place_weights(SSDLITE)
    backbone = load_backbone(f"torchvision:{SSDLITE}")
    assert backbone.name == f"torchvision:{SSDLITE}"
    assert (backbone.stride, backbone.channels) == (16, 672)
    assert backbone.mean == (0.5, 0.5, 0.5) and backbone.std == (0.5, 0.5, 0.5)  # SSDlite's own
    assert not backbone.trunk.training
    state = read_state_dict(saved)
    torch.testing.assert_close(
        backbone.trunk.backbone.state_dict()["features.0.0.0.weight"],
        state["backbone.features.0.0.0.weight"],
    )
    images = torch.randn(1, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    rois = torch.tensor([[0.0, 8.0, 8.0, 72.0, 56.0]])
    with torch.inference_mode():
        level = backbone.trunk.backbone(images)[backbone.trunk.level]
        pooled = RegionPooling(backbone.trunk, backbone.stride)(images, rois)
    assert level.shape == (1, 672, 6, 8)
    expected = roi_align(level, rois, 1, 1 / 16, 0, aligned=True).flatten(1)
    torch.testing.assert_close(pooled, expected)


@pytest.mark.slow  # runs a detection model
def test_an_fpn_backbone_gives_one_level() -> None:
    place_weights(FASTER_RCNN)
    backbone = load_backbone(f"torchvision:{FASTER_RCNN}")
    assert backbone.channels == 256 and backbone.stride in (16, 32)
    with torch.inference_mode():
        maps = backbone.trunk(torch.zeros(1, 3, 64, 96))
    assert maps.shape == (1, 256, 64 // backbone.stride, 96 // backbone.stride)


def test_a_classifier_without_a_checkpoint_loads_through_the_cache(
    tmp_path: Path, offline: list[str]
) -> None:
    saved = place_weights(RESNET, seed=1)
    backbone = load_backbone(f"torchvision:{RESNET}")
    assert (backbone.stride, backbone.channels) == (32, 512)
    torch.testing.assert_close(
        backbone.trunk.state_dict()["0.weight"], read_state_dict(saved)["conv1.weight"]
    )
    # a local checkpoint still wins over the cache
    local = tmp_path / "mine.pth"
    torch.save(random_weights(RESNET, seed=2), local)
    mine = load_backbone(f"torchvision:{RESNET}", local)
    torch.testing.assert_close(
        mine.trunk.state_dict()["0.weight"], read_state_dict(local)["conv1.weight"]
    )
    assert offline == []


def test_a_backbone_without_cached_weights_offline_says_where_to_put_them(
    offline: list[str],
) -> None:
    path = cached_file(weights_entry(RESNET))
    with pytest.raises(ValueError, match=rf"place the file {path.name} in "):
        load_backbone(f"torchvision:{RESNET}")
    with pytest.raises(ConfigError, match="no classification architecture or detection builder"):
        load_backbone("torchvision:resnet9000")
    assert offline == [weights_entry(RESNET).url]


# --- end to end: the pipeline's stages and `grounding predict` ------------------------------


def stage_argv(work: Path, stage: str, *paths: str) -> list[str]:
    """The arguments dvc.yaml gives ``stage``: the params file, ``paths`` (option names and
    paths under ``work``, in pairs) and its validation report."""
    options = [arg if arg.startswith("--") else str(work / arg) for arg in paths]
    validation = str(work / "reports" / "validation" / f"{stage}.json")
    return ["--params", str(work / "params.yaml"), *options, "--validation", validation]


@pytest.mark.slow
def test_pair_and_features_stages_run_a_detector_and_its_backbone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offline: list[str]
) -> None:
    from stages import features as features_stage
    from stages import pair as pair_stage
    from stages import parse as parse_stage

    place_weights(FASTER_RCNN)
    monkeypatch.delenv("DVC_ROOT", raising=False)  # the proposal cache under the working folder
    work = tmp_path / "work"
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text(encoding="utf-8"))
    params["data"]["root"] = str(write_dataset(work / "dataset"))
    params["pair"]["candidates"] = f"torchvision:{FASTER_RCNN}"
    params["candidates"]["torchvision"] = {"max_proposals": 8}
    params["features"].update(backbone=f"torchvision:{FASTER_RCNN}", image_size=224)
    work.mkdir(exist_ok=True)
    (work / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    with contextlib.chdir(work):
        parse_stage.main(
            stage_argv(work, "parse", "--out", "data/parsed", "--summary", "reports/parse.json")
        )
        pair_stage.main(
            stage_argv(
                work,
                "pair",
                "--parsed",
                "data/parsed",
                "--out",
                "data/pairs",
                "--summary",
                "reports/pair.json",
            )
        )
        features_stage.main(
            stage_argv(
                work,
                "features",
                "--parsed",
                "data/parsed",
                "--pairs",
                "data/pairs",
                "--out",
                "data/features",
            )
        )
    table = pd.read_parquet(work / "data" / "pairs" / "candidates.parquet")
    assert set(table["source"]) == {f"torchvision:{FASTER_RCNN}"}
    assert table.groupby("image_id").size().tolist() == [8, 8, 8, 8]  # the images with a file
    assert len(list((work / "data" / "proposals").glob("*.npy"))) == 4
    for stage in ("pair", "features"):
        report = json.loads((work / "reports" / "validation" / f"{stage}.json").read_text())
        assert report["success"] is True, stage
    meta = json.loads((work / "data" / "features" / "features.json").read_text())
    assert meta["backbone"] == f"torchvision:{FASTER_RCNN}" and meta["regions"] == 32
    assert offline == []


@pytest.mark.slow
def test_predict_grounds_with_a_detector_and_its_backbone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], offline: list[str]
) -> None:
    place_weights(FASTER_RCNN)
    channels = 256
    meta = FeaturesMeta(
        backbone=f"torchvision:{FASTER_RCNN}",
        backbone_weights=None,
        text_encoder="all-minilm-l6-v2",
        image_size=224,
        context=True,
        region_dim=2 * channels + 7,
        phrase_dim=384,
        regions=0,
        phrases=0,
    )
    torch.manual_seed(0)
    head = MatchingHead(HeadConfig(meta.region_dim, meta.phrase_dim, 16, 0.0)).eval()
    name = f"torchvision:{FASTER_RCNN}"
    weights = grounder_weights(
        TrainedHead(head, meta), threshold=0.5, candidates=name, settings={"max_proposals": 12}
    )
    model = tmp_path / "grounder.safetensors"
    write_weights(*weights, model)
    argv = ["predict", str(SAMPLE_IMAGE), "--model", str(model), "--phrase", "a red shape"]
    cli_main([*argv, "--top-k", "12", "--no-cache"])
    result = json.loads(capsys.readouterr().out)
    boxes = result["phrases"][0]["boxes"]
    assert len(boxes) == 12  # every candidate the detector kept, scored
    width, height = Image.open(SAMPLE_IMAGE).size
    for found in boxes:
        x1, y1, x2, y2 = found["box"]
        assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
    assert offline == []


def test_a_grounder_builds_its_detector_once_for_many_images(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from grounding.candidates import detection
    from grounding.inference.grounder import Grounder

    built: list[str] = []

    class CountedDetector:
        version = 1

        def __init__(self, builder: str, settings: Settings, *, device: object = None) -> None:
            built.append(builder)

        def propose(self, image: Image.Image) -> np.ndarray:
            return np.array([[0, 0, 20, 20], [10, 10, 40, 30]], dtype=np.float32)

    class ZeroScorer:
        def score(self, image: Image.Image, boxes: np.ndarray, phrases: list[str]) -> np.ndarray:
            return np.zeros((len(phrases), len(boxes)))

    monkeypatch.setattr(detection, "Detector", CountedDetector)
    grounder = Grounder(
        ZeroScorer(),  # type: ignore[arg-type]
        threshold=0.5,
        candidates=f"torchvision:{FASTER_RCNN}",
        settings={"max_proposals": 2},
    )
    for _ in range(3):
        assert grounder.ground(sample_image(), ["a shape"])[0].box == (0, 0, 20, 20)
    assert built == [FASTER_RCNN]
    grounder.settings = {"max_proposals": 1}  # other settings: another detector
    grounder.ground(sample_image(), ["a shape"])
    assert built == [FASTER_RCNN, FASTER_RCNN]
