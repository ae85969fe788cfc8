"""`grounding predict`: phrases from options, captions and a file, JSON out, a picture, the
proposal cache, and user mistakes as one line of error. The grounder is a weights file of
the stand-in models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import stand_ins
from conftest import jpeg_bytes
from PIL import Image

from grounding.cli import main as cli_main
from grounding.inference import grounder as grounder_module
from grounding.inference.grounder import grounder_weights
from grounding.io import write_weights


@pytest.fixture
def model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    stand_ins.install(monkeypatch)
    path = tmp_path / "grounder.safetensors"
    write_weights(
        *grounder_weights(
            stand_ins.trained_head(),
            threshold=0.5,
            candidates="selective_search",
            settings=stand_ins.SETTINGS,
        ),
        path,
    )
    return path


def test_predict_prints_json_and_draws(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image, out, cache = tmp_path / "shapes.png", tmp_path / "out.png", tmp_path / "cache"
    stand_ins.two_shapes().save(image)
    phrases = tmp_path / "phrases.txt"
    phrases.write_text("a blue box\n\n", encoding="utf-8")
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
        "--top-k",
        "2",
        "--out",
        str(out),
        "--cache",
        str(cache),
    ]
    cli_main(argv)
    result = json.loads(capsys.readouterr().out)
    assert result["image"] == str(image) and result["size"] == [240, 160]
    assert result["threshold"] == 0.5
    assert [p["phrase"] for p in result["phrases"]] == [
        "a red box",
        "the grey background",
        "a shape",
        "a blue box",
    ]
    for grounding in result["phrases"]:
        scores = [box["score"] for box in grounding["boxes"]]
        assert len(scores) == 2 and scores[0] >= scores[1]
    assert result["out"] == str(out) and Image.open(out).size[0] > 0
    assert len(list(cache.glob("*.npy"))) == 1
    cli_main(argv)  # again: the proposals come from the cache, the answer is the same
    assert json.loads(capsys.readouterr().out)["phrases"] == result["phrases"]
    assert len(list(cache.glob("*.npy"))) == 1


def test_predict_without_cache_leaves_none(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = tmp_path / "shapes.png"
    stand_ins.two_shapes().save(image)
    cache = tmp_path / "cache"
    cli_main(
        [
            "predict",
            str(image),
            "--model",
            str(model),
            "--phrase",
            "a box",
            "--no-cache",
            "--cache",
            str(cache),
        ]
    )
    result = json.loads(capsys.readouterr().out)
    assert len(result["phrases"][0]["boxes"]) == 1 and "out" not in result
    assert not cache.exists()


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
            ["--phrase", "a", "--phrases-file", "nowhere.txt"],
            "cannot read phrases",
        ),
        (
            lambda d: (d / "x.jpg").write_bytes(jpeg_bytes(64, 64)),
            ["--phrase", "a", "--model", "nowhere.safetensors"],
            "no model here",
        ),
        (
            lambda d: (d / "x.jpg").write_bytes(jpeg_bytes(64, 64)),
            ["--phrase", "a", "--model", "x.jpg"],
            "not a model file of this project",
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
def test_predict_reports_user_mistakes_in_one_line(
    setup,
    extra: list[str],
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    setup(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["predict", str(tmp_path / "x.jpg"), *extra])
    assert exit_info.value.code == 1
    error = capsys.readouterr().err
    last = error.strip().splitlines()[-1]  # MLflow may log INFO lines before it
    assert last.startswith("error: ") and message in last, error


def test_the_default_model_is_the_trained_grounder_when_there_is_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.jpg").write_bytes(jpeg_bytes(64, 64))
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "grounder.safetensors").write_bytes(b"not weights")
    with pytest.raises(SystemExit):
        cli_main(["predict", "x.jpg", "--phrase", "a"])
    error = capsys.readouterr().err
    assert "models/grounder.safetensors: not a model file" in error
    assert "packaged" not in error


def test_without_a_trained_grounder_predict_uses_the_packaged_one_and_says_so(
    model: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(grounder_module, "pretrained_path", lambda: model)
    stand_ins.two_shapes().save(tmp_path / "shapes.png")
    cli_main(["predict", "shapes.png", "--phrase", "a red box", "--no-cache"])
    captured = capsys.readouterr()
    assert "using the packaged grounder trained on real Flickr30k images" in captured.err
    assert json.loads(captured.out)["phrases"][0]["boxes"]


def test_without_any_grounder_predict_says_how_to_get_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(grounder_module, "pretrained_path", lambda: tmp_path / "absent")
    (tmp_path / "x.jpg").write_bytes(jpeg_bytes(64, 64))
    with pytest.raises(SystemExit):
        cli_main(["predict", "x.jpg", "--phrase", "a"])
    assert "no --model given, no models/grounder.safetensors" in capsys.readouterr().err


def test_the_packaged_grounder_is_package_data() -> None:
    path = grounder_module.pretrained_path()
    assert path.parts[-3:] == ("grounding", "pretrained", "flickr30k.safetensors")
    assert path.is_file(), "build it with `python -m benchmarks.pretrained`"
