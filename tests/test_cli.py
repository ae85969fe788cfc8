"""`grounding predict`: phrases from options, captions and a file, JSON out, a picture, the
proposal cache, and user mistakes as one line of error. The grounder is a weights file of
the stand-in models."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import stand_ins
import torch
from conftest import jpeg_bytes
from PIL import Image

from grounding import cli
from grounding.cli import main as cli_main
from grounding.inference import grounder as grounder_module


@pytest.fixture
def model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    stand_ins.install(monkeypatch)
    return stand_ins.write_grounder(tmp_path / "grounder.safetensors")


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
    assert result["threshold"] == 0.5 and result["model"]["source"] == str(model)
    assert [p["phrase"] for p in result["phrases"]] == [
        "a red box",
        "the grey background",
        "a shape",
        "a blue box",
    ]
    for grounding in result["phrases"]:
        scores = [box["score"] for box in grounding["boxes"]]
        assert len(scores) == 2 and scores[0] >= scores[1]
        assert all(isinstance(v, int) for box in grounding["boxes"] for v in box["box"])
    assert result["out"] == str(out) and Image.open(out).size[0] > 0
    assert len(list(cache.glob("*.npy"))) == 1
    cli_main(argv)  # again: the proposals come from the cache, the answer is the same
    assert json.loads(capsys.readouterr().out)["phrases"] == result["phrases"]
    assert len(list(cache.glob("*.npy"))) == 1


def test_predict_boxes_are_in_the_upright_pixels_of_an_exif_turned_photo(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # stored a quarter turn anticlockwise, tagged "turn it clockwise" (6): as phones write
    stored = stand_ins.two_shapes().transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    image = tmp_path / "phone.jpg"
    stored.save(image, exif=exif.tobytes(), quality=95)
    assert Image.open(image).size == (160, 240)
    cli_main(["predict", str(image), "--model", str(model), "--phrase", "a red box", "--no-cache"])
    result = json.loads(capsys.readouterr().out)
    assert result["size"] == [240, 160]
    [box] = result["phrases"][0]["boxes"]
    x1, y1, x2, y2 = box["box"]
    assert 0 <= x1 < x2 <= 240 and 0 <= y1 < y2 <= 160


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
            "nowhere.safetensors: no such file or folder",
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
    assert path.is_file(), "build it with `python -m release.pretrained`"


def test_predict_on_the_cpu_is_the_default_on_a_machine_without_a_gpu(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    image = tmp_path / "shapes.png"
    stand_ins.two_shapes().save(image)
    argv = ["predict", str(image), "--model", str(model), "--phrase", "a red box", "--no-cache"]
    found = []
    for device in ([], ["--device", "cpu"]):
        cli_main([*argv, *device])
        found.append(json.loads(capsys.readouterr().out)["phrases"])
    assert found[0] == found[1] and found[0][0]["boxes"]


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("cuda", "error: --device cuda: CUDA is not available on this machine"),
        ("cuda:1", "error: --device cuda:1: CUDA is not available on this machine"),
        ("gpu", "error: --device: 'gpu' is not one of auto, cpu, cuda, cuda:N"),
    ],
)
def test_predict_on_a_device_this_machine_lacks_is_one_line(
    device: str,
    message: str,
    model: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    image = tmp_path / "shapes.png"
    stand_ins.two_shapes().save(image)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(
            ["predict", str(image), "--model", str(model), "--phrase", "a", "--device", device]
        )
    assert exit_info.value.code == 1
    error = capsys.readouterr().err
    assert error.startswith(message) and error.count("\n") == 1, error


def test_a_phrases_file_with_a_byte_order_mark_and_any_line_ends(tmp_path: Path) -> None:
    from grounding.cli import _read_phrases

    phrases = tmp_path / "phrases.txt"
    phrases.write_bytes(b"\xef\xbb\xbfa red box\r\ra blue box\r\nthe grey background\n")
    assert _read_phrases(phrases) == ["a red box", "a blue box", "the grey background"]
    # U+2028 (and form feed, U+0085) end a line for str.splitlines, not in a phrases file
    phrases.write_text("a man\u2028in red\na dog\x0cbarking\u0085loudly\n", encoding="utf-8")
    assert _read_phrases(phrases) == ["a man\u2028in red", "a dog\x0cbarking\u0085loudly"]


@pytest.mark.parametrize("kind", ["device", "folder", "not utf-8"])
def test_a_phrases_file_that_cannot_be_read_is_one_line(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "x.jpg").write_bytes(jpeg_bytes(64, 64))
    phrases = {"device": Path("/dev/zero"), "folder": tmp_path}.get(kind, tmp_path / "p.txt")
    (tmp_path / "p.txt").write_bytes(b"a man\n\xff\n")
    argv = ["predict", str(tmp_path / "x.jpg"), "--phrases-file", str(phrases)]
    message = "not UTF-8 text" if kind == "not utf-8" else "cannot read phrases"
    assert message in _fails(argv, capsys)


@pytest.mark.parametrize("size", [(1, 1), (1, 50_000), (31, 64)])
def test_an_image_too_small_to_ground_is_refused_before_the_model_loads(
    size: tuple[int, int], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = tmp_path / "thin.png"
    Image.new("RGB", size).save(image)
    # the model does not exist: were it loaded first, that would be the error
    argv = ["predict", str(image), "--phrase", "a", "--model", str(tmp_path / "none.safetensors")]
    width, height = size
    assert f"{image} is {width}x{height} pixels; at least 32 on each side" in _fails(argv, capsys)


# --- the checks that come before any model is loaded or any phrase grounded ------------------


def _fails(argv: list[str], capsys: pytest.CaptureFixture[str], status: int = 1) -> str:
    """Run the CLI, expecting it to stop with ``status``; its last stderr line, checked to be
    one ``error:`` line and no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    assert exit_info.value.code == status
    error = capsys.readouterr().err
    assert "Traceback" not in error, error
    last = error.strip().splitlines()[-1]
    assert "error: " in last, error
    return last


NOT_A_GROUNDER = """
import mlflow.pyfunc
from mlflow.models import set_model


class Echo(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input


set_model(Echo())
"""


def _save_echo_model(folder: Path) -> None:
    """An MLflow pyfunc model (from code) in ``folder / "m"`` that is not a grounder."""
    import mlflow

    (folder / "echo.py").write_text(NOT_A_GROUNDER, encoding="utf-8")
    mlflow.pyfunc.save_model(str(folder / "m"), python_model=str(folder / "echo.py"))


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: (d / "m").mkdir(), "m: a folder without an MLmodel file or grounder.json"),
        (lambda d: (d / "m").write_text("a note"), "m: not a model file of this project"),
        (_save_echo_model, "m: a model from code whose code is not this project's (echo.py)"),
    ],
)
def test_a_model_that_is_not_a_grounder_is_one_line(
    setup, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.jpg").write_bytes(jpeg_bytes(64, 64))
    setup(tmp_path)
    capsys.readouterr()
    last = _fails(["predict", "x.jpg", "--phrase", "a", "--model", "m"], capsys)
    assert last.startswith(f"error: {message}"), last


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--out", "boxes.png"], "--out boxes.png: a folder, not a file"),
        (["--out", "notes.txt/boxes.png"], "notes.txt is a file, not a folder"),
        (["--cache", "notes.txt"], "--cache notes.txt: a file, not a folder"),
        (["--cache", "notes.txt/cache"], "notes.txt is a file, not a folder"),
    ],
)
def test_outputs_are_checked_before_the_model_is_loaded(
    extra: list[str],
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.jpg").write_bytes(jpeg_bytes(64, 64))
    (tmp_path / "boxes.png").mkdir()
    (tmp_path / "notes.txt").write_text("a note")
    # the model does not exist: checked later, it would be the error
    argv = ["predict", "x.jpg", "--phrase", "a", "--model", "nowhere.safetensors", *extra]
    assert message in _fails(argv, capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["boxes.png", "notes.txt", "x.jpg"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes in any folder")
def test_an_unwritable_cache_folder_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.jpg").write_bytes(jpeg_bytes(64, 64))
    (tmp_path / "locked").mkdir(mode=0o555)
    argv = ["predict", "x.jpg", "--phrase", "a", "--cache", "locked/cache"]
    assert "--cache locked/cache: cannot write in" in _fails(argv, capsys)


@pytest.mark.parametrize(
    "value", ["0", "-2", "two", "1001", "1000000000000", "9" * 5000], ids=lambda v: v[:13]
)
def test_top_k_outside_1_to_1000_is_refused_before_anything_is_loaded(
    value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["predict", str(tmp_path / "absent.jpg"), "--phrase", "a", "--top-k", value]
    assert "argument --top-k" in _fails(argv, capsys, status=2)  # argparse's usage error


@pytest.mark.parametrize("uri", ["models:/phrase-grounder/1", "runs:/0123456789abcdef/grounder"])
def test_an_mlflow_uri_outside_the_repository_creates_no_store_and_names_it(
    uri: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.jpg").write_bytes(jpeg_bytes(64, 64))
    last = _fails(["predict", "x.jpg", "--phrase", "a", "--model", uri], capsys)
    assert f"no MLflow store at {tmp_path / 'mlflow.db'}" in last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.jpg"]


def test_a_model_missing_from_an_existing_store_names_the_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    store = f"sqlite:///{tmp_path / 'other.db'}"
    mlflow.MlflowClient(store).search_experiments()  # creates the store's tables
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.jpg").write_bytes(jpeg_bytes(64, 64))
    last = _fails(
        ["predict", "x.jpg", "--phrase", "a", "--model", "models:/phrase-grounder/1"], capsys
    )
    assert f"cannot load the model in the store {store}" in last and "not found" in last


def test_a_separate_registry_is_named_and_the_tracking_uri_stays_a_uri(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    store, registry = (f"sqlite:///{tmp_path / name}" for name in ("runs.db", "registry.db"))
    for uri in (store, registry):
        mlflow.MlflowClient(uri).search_experiments()  # creates the store's tables
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", registry)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.jpg").write_bytes(jpeg_bytes(64, 64))
    last = _fails(
        ["predict", "x.jpg", "--phrase", "a", "--model", "models:/phrase-grounder/1"], capsys
    )
    assert f"in the store {store} (registry {registry})" in last and "not found" in last
    assert mlflow.get_tracking_uri() == store


def test_predict_many_images_loads_once_skips_bad_ones_and_writes_records_and_pictures(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    stand_ins.two_shapes().save(photos / "a.png")
    stand_ins.two_shapes().transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(photos / "b.jpg")
    (photos / "broken.jpg").write_bytes(b"not a picture")
    listed = tmp_path / "more.txt"
    listed.write_text("photos/a.png\nphotos/gone.png\n")
    loads = []
    monkeypatch.setattr(
        cli,
        "load_grounder",
        lambda name, *args, real=cli.load_grounder, **kwargs: (
            loads.append(name) or real(name, *args, **kwargs)
        ),
    )
    out = tmp_path / "out"
    argv = ["predict", str(photos), f"@{listed}", "--model", str(model), "--phrase", "a red box"]
    cli_main([*argv, "--out-dir", str(out), "--no-cache", "--threshold", "0"])
    captured = capsys.readouterr()
    assert loads == [str(model)]
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["image"] for r in records] == [str(photos / "a.png"), str(photos / "b.jpg")]
    for record in records:
        assert record["model"]["source"] == str(model) and record["size"] == [240, 160]
        assert record["threshold"] == 0.0
        [box] = record["phrases"][0]["boxes"]
        assert all(isinstance(v, int) for v in box["box"]) and box["above_threshold"]
        assert Image.open(record["picture"]).size == (240, 160)
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png", "predictions.jsonl"]
    skipped = [line for line in captured.err.splitlines() if line.startswith("skipped: ")]
    assert len(skipped) == 2
    assert skipped[1] == f"skipped: {tmp_path / 'photos/gone.png'}: image file missing"
    assert skipped[0].startswith(f"skipped: {photos / 'broken.jpg'}: unreadable image")
    assert "grounded 2 of 4 images, skipped 2" in captured.err
    assert captured.out == ""


def test_predict_many_without_out_dir_prints_json_lines(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("a.png", "b.png", "c.png"):
        stand_ins.two_shapes().save(tmp_path / name)
    listed = tmp_path / "list.txt"
    listed.write_text("c.png\n")
    argv = ["predict", str(tmp_path / "[ab].png"), "--list", str(listed), "--model", str(model)]
    cli_main([*argv, "--phrase", "a", "--no-cache"])
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["image"] for line in lines] == [
        str(tmp_path / "a.png"),
        str(tmp_path / "b.png"),
        str(tmp_path / "c.png"),
    ]


def test_predict_fails_only_when_no_image_was_grounded(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a.jpg").write_bytes(b"x")
    (tmp_path / "b.jpg").write_bytes(b"y")
    with pytest.raises(SystemExit) as exit:
        cli_main(["predict", str(tmp_path), "--model", str(model), "--phrase", "a", "--no-cache"])
    assert exit.value.code == 1
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == "error: no image could be grounded (2 skipped)"
    assert sum(line.startswith("skipped: ") for line in err) == 2


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--threshold", "1.5"], "threshold 1.5 is not between 0 and 1"),
        (
            ["--out", "one.png"],
            "--out names the picture of one image; with several, pass --out-dir",
        ),
    ],
)
def test_predict_many_reports_option_mistakes_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    stand_ins.two_shapes().save(tmp_path / "a.png")
    with pytest.raises(SystemExit):
        cli_main(["predict", str(tmp_path), "--phrase", "a", "--no-cache", *extra])
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: {message}"


def test_predict_one_image_with_a_threshold_override(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = tmp_path / "shapes.png"
    stand_ins.two_shapes().save(image)
    argv = ["predict", str(image), "--model", str(model), "--phrase", "a red box", "--no-cache"]
    cli_main([*argv, "--top-k", "3", "--threshold", "1"])
    result = json.loads(capsys.readouterr().out)
    assert result["threshold"] == 1.0
    boxes = result["phrases"][0]["boxes"]
    assert [b["above_threshold"] for b in boxes] == [b["score"] >= 1.0 for b in boxes]
    cli_main([*argv, "--top-k", "3", "--threshold", "0"])
    assert all(
        b["above_threshold"] for b in json.loads(capsys.readouterr().out)["phrases"][0]["boxes"]
    )


def test_demo_without_gradio_says_how_to_get_it_before_loading_a_model(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real(name, *a)
    )
    monkeypatch.setattr(cli, "load_grounder", lambda *_, **__: pytest.fail("loaded a model"))
    with pytest.raises(SystemExit):
        cli_main(["demo", "--model", "nowhere.safetensors"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: grounding demo needs gradio, which is not installed")


def test_an_unreachable_tracking_server_is_named_without_its_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://ann:s3cret@127.0.0.1:9")  # nothing listens
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    (tmp_path / "x.jpg").write_bytes(jpeg_bytes(64, 64))
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["predict", str(tmp_path / "x.jpg"), "--phrase", "a", "--model", "models:/m/1"])
    assert exit_info.value.code == 1
    captured = capsys.readouterr()
    last = captured.err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "http://ann:***@127.0.0.1:9" in last, last
    assert "s3cret" not in captured.err + captured.out


def test_predict_writes_label_studio_pre_annotations_of_its_answers(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dataclasses import astuple

    from grounding.data.formats.labelstudio import percent_box

    photos = tmp_path / "photos"
    photos.mkdir()
    stand_ins.two_shapes().save(photos / "a.png")
    stand_ins.two_shapes().transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(photos / "b.png")
    out = tmp_path / "out"
    argv = ["predict", str(photos), "--model", str(model), "--no-cache", "--out-dir", str(out)]
    # two phrases that pick one box each: with --threshold 0 both are pre-annotations
    phrases = ["--phrase", "a red box", "--phrase", "a blue box", "--threshold", "0"]
    cli_main([*argv, *phrases, "--labelstudio", str(tmp_path)])
    assert f"{out / 'labelstudio.json'}: 2 Label Studio tasks" in capsys.readouterr().err
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    tasks = json.loads((out / "labelstudio.json").read_text())
    assert len(tasks) == len(records) == 2
    for record, task in zip(records, tasks, strict=True):
        assert task["data"]["file_name"] == Path(record["image"]).name
        assert task["data"]["image"].endswith("?d=photos/" + Path(record["image"]).name)
        [prediction] = task["predictions"]
        chosen: dict[tuple, list[str]] = {}
        for phrase in record["phrases"]:
            for found in phrase["boxes"]:
                chosen.setdefault(tuple(found["box"]), []).append(phrase["phrase"])
        boxes = [r for r in prediction["result"] if r["type"] == "rectangle"]
        texts = {
            r["id"]: r["value"]["text"] for r in prediction["result"] if r["type"] == "textarea"
        }
        read_back = {
            tuple(round(v) for v in astuple(percent_box(r["value"], *record["size"]))): texts[
                r["id"]
            ]
            for r in boxes
        }
        assert read_back == chosen
        scores = [f["score"] for p in record["phrases"] for f in p["boxes"]]
        assert prediction["score"] == min(scores)


def test_predict_label_studio_needs_out_dir_and_images_inside_its_root(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "load_grounder", lambda *_, **__: pytest.fail("loaded a model"))
    (tmp_path / "x.jpg").write_bytes(jpeg_bytes(64, 64))
    argv = ["predict", str(tmp_path / "x.jpg"), "--phrase", "a", "--labelstudio", str(tmp_path)]
    last = _fails(argv, capsys)
    assert last == "error: --labelstudio writes OUT/labelstudio.json: pass --out-dir OUT too"
    elsewhere = tmp_path / "root"
    elsewhere.mkdir()
    argv = [*argv[:-1], str(elsewhere), "--out-dir", str(tmp_path / "out")]
    last = _fails(argv, capsys)
    assert last.startswith(f"error: --labelstudio {elsewhere}: {tmp_path / 'x.jpg'} is not inside")
