"""The grounder as an MLflow pyfunc model: the input table, the output rows, and bad input as
``INVALID_PARAMETER_VALUE`` (HTTP 400 from `mlflow models serve`), checked over real HTTP
against MLflow's scoring server in this process."""

from __future__ import annotations

import base64
import io
import json
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import stand_ins
import torch
from conftest import jpeg_bytes, png_header
from mlflow.exceptions import MlflowException
from PIL import Image

from grounding.errors import ConfigError, DataError
from grounding.inference.grounder import Found, Grounding
from grounding.inference.serving import (
    CONCURRENCY_VARIABLE,
    DEVICE_VARIABLE,
    OUTPUT_COLUMNS,
    SIGNATURE,
    GrounderModel,
    check_top_k,
    concurrency,
    decode_image,
    encode_image,
    image_text,
    predict_table,
)


class RecordingGrounder:
    """Stands in for a :class:`Grounder`: records its calls, answers a fixed box (none for a
    phrase that starts with "no")."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[int, int], list[str]]] = []

    def describe(self) -> str:
        return "a recording stand-in, trained on nothing"

    def ground(self, image: Image.Image, phrases: list[str], *, top_k: int) -> list[Grounding]:
        self.calls.append((image.size, phrases))
        return [
            Grounding(p, reason="nothing here")
            if p.startswith("no")
            else Grounding(
                p, [Found((1.0, 2.0, 3.0, 4.0), 0.9 - r / 10, r == 0) for r in range(top_k)]
            )
            for p in phrases
        ]


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# --- images in the table -----------------------------------------------------------------


def test_decode_image_reads_what_encode_image_wrote() -> None:
    image = decode_image(encode_image(jpeg_bytes(64, 48)), 0)
    assert image.size == (64, 48) and image.mode == "RGB"


def test_decode_image_names_the_bad_row() -> None:
    with pytest.raises(DataError, match="row 3: image is not base64-encoded"):
        decode_image("not base64!", 3)
    with pytest.raises(DataError, match="row 0: unreadable image"):
        decode_image(encode_image(b"plain text"), 0)
    truncated = jpeg_bytes(64, 64)[:300]
    with pytest.raises(DataError, match="row 1: unreadable image"):
        decode_image(encode_image(truncated), 1)


def test_base64_with_line_breaks_and_a_data_url_prefix_is_accepted() -> None:
    content = jpeg_bytes(64, 48)
    wrapped = base64.encodebytes(content).decode()  # 76 columns, as GNU base64 writes
    assert "\n" in wrapped
    assert decode_image(wrapped, 0).size == (64, 48)
    url = "data:image/jpeg;base64," + encode_image(content)
    assert decode_image(url, 0).size == (64, 48)
    assert image_text("DATA:image/png;charset=x;base64,QUJD\r\nREVG\n") == "QUJDREVG"
    with pytest.raises(DataError, match="row 2: image is not base64-encoded"):
        decode_image("data:image/png,%89PNG", 2)  # a data URL, but not base64


@pytest.mark.parametrize(
    "image, phrase, message",
    [
        (None, "a dog", "row 1: image is null, not a string"),
        (float("nan"), "a dog", "row 1: image is null, not a string"),
        ({}, "a dog", "row 1: image is an object (0 keys), not a string"),
        ("IMAGE", None, "row 1: phrase is null, not a string"),
        ("IMAGE", 5, "row 1: phrase is a number (5), not a string"),
        ("IMAGE", True, "row 1: phrase is a boolean (true), not a string"),
        ("IMAGE", ["a", "b"], "row 1: phrase is a list (2 items), not a string"),
        ("IMAGE", "  ", "row 1: phrase is empty"),
        ("", "a dog", "row 1: image is empty"),
    ],
)
def test_a_row_with_a_null_or_non_string_value_is_refused_by_its_number(
    image: object, phrase: object, message: str
) -> None:
    good = encode_image(jpeg_bytes(64, 48))
    image = good if image == "IMAGE" else image
    table = pd.DataFrame({"image": [good, image], "phrase": ["a cat", phrase]}, dtype=object)
    stand_in = RecordingGrounder()
    with pytest.raises(DataError, match=f"^{re.escape(message)}$"):
        predict_table(stand_in, table, top_k=1)  # type: ignore[arg-type]
    assert stand_in.calls == []  # refused before any grounding


@pytest.mark.parametrize("value", [None, 0, -1, True, "3", 2.0, 1001, 10**12])
def test_top_k_must_be_a_whole_number_from_one_to_a_thousand(value: object) -> None:
    with pytest.raises(DataError, match=r"param top_k is .*; it must be a whole number in 1..1000"):
        check_top_k(value)


def test_top_k_accepts_python_and_numpy_integers() -> None:
    import numpy as np

    assert check_top_k(3) == 3 and check_top_k(np.int64(2)) == 2 and check_top_k(1000) == 1000


# --- predict_table -----------------------------------------------------------------------


def test_predict_table_grounds_the_phrases_of_one_image_together() -> None:
    red, blue = encode_image(jpeg_bytes(64, 48)), encode_image(jpeg_bytes(80, 40, (0, 0, 200)))
    table = pd.DataFrame({"image": [red, blue, red], "phrase": ["a man", "a dog", "a hat"]})
    stand_in = RecordingGrounder()
    result = predict_table(stand_in, table, top_k=2)  # type: ignore[arg-type]
    assert stand_in.calls == [((64, 48), ["a man", "a hat"]), ((80, 40), ["a dog"])]
    assert list(result.columns) == list(OUTPUT_COLUMNS)
    assert result["row"].tolist() == [0, 0, 1, 1, 2, 2]
    assert result["rank"].tolist() == [1, 2, 1, 2, 1, 2]
    assert result["phrase"].tolist() == ["a man", "a man", "a dog", "a dog", "a hat", "a hat"]
    assert result.loc[0, ["x1", "y1", "x2", "y2"]].tolist() == [1.0, 2.0, 3.0, 4.0]
    assert result["score"].tolist() == pytest.approx([0.9, 0.8] * 3)
    assert result["above_threshold"].tolist() == [True, False] * 3
    assert result["reason"].isna().all()
    assert set(result["model"]) == {"a recording stand-in, trained on nothing"}


def test_a_phrase_without_boxes_is_one_row_with_its_reason_and_nulls() -> None:
    image = encode_image(jpeg_bytes(64, 48))
    table = pd.DataFrame({"image": [image, image], "phrase": ["no dog", "a cat"]})
    result = predict_table(RecordingGrounder(), table, top_k=1)  # type: ignore[arg-type]
    assert result["row"].tolist() == [0, 1]
    empty = result.iloc[0].to_dict()
    assert empty["reason"] == "nothing here"
    assert all(empty[name] is None for name in ("rank", "x1", "score", "above_threshold"))


def test_predict_table_needs_its_columns_and_rows() -> None:
    with pytest.raises(DataError, match="missing \\['phrase'\\]"):
        predict_table(RecordingGrounder(), pd.DataFrame({"image": ["x"]}), top_k=1)  # type: ignore[arg-type]
    with pytest.raises(DataError, match="no rows"):
        predict_table(
            RecordingGrounder(),  # type: ignore[arg-type]
            pd.DataFrame({"image": [], "phrase": []}),
            top_k=1,
        )


def test_the_signature_matches_the_table() -> None:
    assert SIGNATURE.inputs.input_names() == ["image", "phrase"]
    assert SIGNATURE.outputs.input_names() == list(OUTPUT_COLUMNS)
    [top_k] = SIGNATURE.params.params
    assert (top_k.name, top_k.default) == ("top_k", 1)


# --- the pyfunc model --------------------------------------------------------------------


def grounder_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A grounder weights file of the stand-in models (made loadable by name)."""
    stand_ins.install(monkeypatch)
    return stand_ins.write_grounder(tmp_path / "grounder.safetensors")


@pytest.fixture
def model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> GrounderModel:
    """The pyfunc model loaded from a grounder weights file of the stand-in models."""
    model = GrounderModel()
    model.load_context(
        SimpleNamespace(artifacts={"grounder": str(grounder_file(tmp_path, monkeypatch))})
    )
    return model


def test_the_served_model_runs_on_the_device_the_environment_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    context = SimpleNamespace(artifacts={"grounder": str(grounder_file(tmp_path, monkeypatch))})
    monkeypatch.setenv(DEVICE_VARIABLE, "cpu")
    GrounderModel().load_context(context)
    monkeypatch.setenv(DEVICE_VARIABLE, "cuda")
    with pytest.raises(ConfigError, match="GROUNDING_DEVICE cuda: CUDA is not available"):
        GrounderModel().load_context(context)


def test_the_model_grounds_the_table_with_the_grounder_file(model: GrounderModel) -> None:
    assert model.grounder.threshold == 0.5
    image = encode_image(png_bytes(stand_ins.two_shapes()))
    table = pd.DataFrame({"image": [image, image], "phrase": ["a red box", "a blue box"]})
    result = model.predict(None, table, params={"top_k": 3})
    assert result["row"].tolist() == [0, 0, 0, 1, 1, 1]
    assert result["rank"].tolist() == [1, 2, 3] * 2
    assert all(
        0 <= row.x1 < row.x2 <= 240 and 0 <= row.y1 < row.y2 <= 160 for row in result.itertuples()
    )
    found = model.grounder.ground(stand_ins.two_shapes(), ["a red box"], top_k=3)[0]
    assert result["score"].tolist()[:3] == pytest.approx([box.score for box in found.boxes])
    assert len(model.predict(None, table)) == 2  # top_k defaults to 1


@pytest.mark.parametrize(
    "image, phrase, message",
    [
        ("not base64!", "a dog", "row 0: image is not base64-encoded"),
        (encode_image(b"GIF89a-not-really"), "a dog", "row 0: unreadable image"),
        (encode_image(jpeg_bytes(64, 64)), "   ", "row 0: phrase is empty"),
        (encode_image(jpeg_bytes(16, 64)), "a dog", "at least 32"),
    ],
)
def test_bad_input_is_an_invalid_parameter(
    model: GrounderModel, image: str, phrase: str, message: str
) -> None:
    with pytest.raises(MlflowException, match=message) as caught:
        model.predict(None, pd.DataFrame({"image": [image], "phrase": [phrase]}))
    assert caught.value.error_code == "INVALID_PARAMETER_VALUE"


def test_a_bug_is_a_500_without_traceback(
    model: GrounderModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("/secret/install/path")

    monkeypatch.setattr(model.grounder, "ground", broken)
    image = encode_image(png_bytes(stand_ins.two_shapes()))
    with pytest.raises(MlflowException) as caught:
        model.predict(None, pd.DataFrame({"image": [image], "phrase": ["a box"]}))
    assert caught.value.get_http_status_code() == 500
    body = caught.value.serialize_as_json()
    assert "RuntimeError" in body and "/secret" not in body and "Traceback" not in body


def test_a_large_image_is_decoded_at_the_size_the_models_need_and_boxes_scaled_back() -> None:
    picture = Image.new("RGB", (2000, 1000), (200, 10, 10))
    table = pd.DataFrame({"image": [encode_image(png_bytes(picture))], "phrase": ["a man"]})
    stand_in = RecordingGrounder()
    result = predict_table(stand_in, table, top_k=1, max_side=448)  # type: ignore[arg-type]
    assert stand_in.calls == [((500, 250), ["a man"])]  # reduced by 2000 // 448 = 4
    assert result.loc[0, ["x1", "y1", "x2", "y2"]].tolist() == [4.0, 8.0, 12.0, 16.0]
    whole = predict_table(RecordingGrounder(), table, top_k=1)  # type: ignore[arg-type]
    assert whole.loc[0, ["x1", "y1", "x2", "y2"]].tolist() == [1.0, 2.0, 3.0, 4.0]


def test_the_model_decodes_at_its_grounder_s_decode_side(model: GrounderModel) -> None:
    assert model.grounder.decode_side == max(
        model.grounder.features.image_size, model.grounder.settings.get("max_side", 0)
    )


def test_at_most_grounding_concurrency_requests_are_grounded_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # MLflow runs each request in a thread of its own: without a bound, eight requests
    # decode eight huge images at once
    monkeypatch.setenv(CONCURRENCY_VARIABLE, "2")
    model = GrounderModel()
    model.load_context(
        SimpleNamespace(artifacts={"grounder": str(grounder_file(tmp_path, monkeypatch))})
    )
    inside, most, lock = [0], [0], threading.Lock()

    def slow_ground(image: Image.Image, phrases: list[str], *, top_k: int) -> list[Grounding]:
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        time.sleep(0.2)
        with lock:
            inside[0] -= 1
        return [Grounding(p, reason="none") for p in phrases]

    monkeypatch.setattr(model.grounder, "ground", slow_ground)
    table = pd.DataFrame({"image": [encode_image(jpeg_bytes(64, 48))], "phrase": ["a man"]})
    threads = [threading.Thread(target=model.predict, args=(None, table)) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert most[0] == 2


@pytest.mark.parametrize(
    "value", ["0", "-1", "two", "", "\u00b2", "9" * 5000], ids=lambda v: repr(v[:6])
)
def test_grounding_concurrency_must_be_a_whole_number_of_at_least_one(value: str) -> None:
    with pytest.raises(ConfigError, match=f"^{CONCURRENCY_VARIABLE}=.*: must be a whole number"):
        concurrency({CONCURRENCY_VARIABLE: value})
    assert concurrency({}) == 2 and concurrency({CONCURRENCY_VARIABLE: "3"}) == 3


# --- over HTTP: MLflow's scoring server (what `mlflow models serve` runs) --------------------


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of MLflow's scoring server app serving the pyfunc model (logged as the
    pipeline logs it: a model from code) of a stand-in grounder, on a loopback port."""
    import mlflow
    import uvicorn
    from mlflow.pyfunc import scoring_server

    from grounding import tracking

    folder = tmp_path_factory.mktemp("served")
    weights = folder / "grounder.safetensors"
    with pytest.MonkeyPatch.context() as patch:
        stand_ins.install(patch)
        stand_ins.write_grounder(weights)
        mlflow.pyfunc.save_model(
            str(folder / "model"),
            python_model=str(tracking._MODEL_CODE),
            artifacts={"grounder": str(weights)},
            signature=SIGNATURE,
            pip_requirements=["grounding"],
        )
        served = mlflow.pyfunc.load_model(str(folder / "model"))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = uvicorn.Config(
        scoring_server.init(served), host="127.0.0.1", port=port, log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=30)


def post(url: str, payload: object) -> tuple[int, str]:
    request = urllib.request.Request(
        f"{url}/invocations",
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


@pytest.fixture(scope="module")
def shapes() -> bytes:
    return png_bytes(stand_ins.two_shapes())


def test_http_grounds_base64_with_line_breaks_and_data_urls(server_url: str, shapes: bytes) -> None:
    images = [
        encode_image(shapes),
        base64.encodebytes(shapes).decode(),
        "data:image/png;base64," + encode_image(shapes),
    ]
    data = [[image, "a red box"] for image in images]
    status, body = post(
        server_url,
        {"dataframe_split": {"columns": ["image", "phrase"], "data": data}, "params": {"top_k": 2}},
    )
    assert status == 200, body
    predictions = json.loads(body)["predictions"]
    assert [p["row"] for p in predictions] == [0, 0, 1, 1, 2, 2]
    assert len({(p["x1"], p["score"]) for p in predictions if p["rank"] == 1}) == 1  # one image


@pytest.mark.parametrize(
    "row, params, message",
    [
        (["IMAGE", "a dog"], {"top_k": None}, "param top_k is null"),
        (["IMAGE", "a dog"], {"top_k": 0}, "param top_k is 0"),
        ([None, "a dog"], {}, "row 1: image is null"),
        ([{}, "a dog"], {}, "row 1: image is an object"),
        (["IMAGE", None], {}, "row 1: phrase is null"),
        (["IMAGE", 5], {}, "row 1: phrase is a number (5)"),
        (["IMAGE", True], {}, "row 1: phrase is a boolean (true)"),
        (["IMAGE", ["a", "b"]], {}, "row 1: phrase is a list (2 items)"),
        (["not base64!", "a dog"], {}, "row 1: image is not base64-encoded"),
        ([encode_image(b"GIF89a-not-really"), "a dog"], {}, "row 1: unreadable image"),
        ([encode_image(png_header(12_000, 12_000)), "a dog"], {}, "row 1: image too large"),
    ],
)
def test_http_bad_input_is_a_400_naming_the_row_without_traceback(
    server_url: str, shapes: bytes, row: list, params: dict, message: str
) -> None:
    image = encode_image(shapes)
    data = [[image, "a red box"], [image if value == "IMAGE" else value for value in row]]
    payload = {"dataframe_split": {"columns": ["image", "phrase"], "data": data}}
    status, body = post(server_url, {**payload, "params": params} if params else payload)
    assert status == 400, body
    answer = json.loads(body)
    assert answer["error_code"] == "INVALID_PARAMETER_VALUE"
    assert message in answer["message"]
    assert "stack_trace" not in answer and "Traceback" not in body and ".py" not in body


@pytest.mark.parametrize(
    "body, message",
    [
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"dataframe_split": ' + b"9" * 5000 + b"}", "Exceeds the limit (4300 digits)"),
        (b'{"dataframe_split": "' + b"A" * 2_000_000 + b'"', "valid JSON"),  # not closed
    ],
    ids=["nested 100,000 deep", "5,000 digits", "2 MB malformed"],
)
def test_http_a_body_python_cannot_parse_is_a_json_400_that_never_echoes_it_whole(
    server_url: str, body: bytes, message: str
) -> None:
    request = urllib.request.Request(
        f"{server_url}/invocations", data=body, headers={"Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=60)
    assert caught.value.code == 400
    answer = caught.value.read().decode()
    assert len(answer) < 3000  # at most ECHO_LIMIT characters of message
    assert json.loads(answer)["error_code"] == "BAD_REQUEST"  # as MLflow answers bad JSON
    assert message in json.loads(answer)["message"]


def test_http_a_huge_top_k_is_refused(server_url: str, shapes: bytes) -> None:
    data = [[encode_image(shapes), "a red box"]]
    payload = {"dataframe_split": {"columns": ["image", "phrase"], "data": data}}
    status, body = post(server_url, {**payload, "params": {"top_k": 10**12}})
    assert status == 400 and "must be a whole number in 1..1000" in json.loads(body)["message"]
