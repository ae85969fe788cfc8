"""The grounder as an MLflow pyfunc model: the input table, the output rows, and bad input as
``INVALID_PARAMETER_VALUE`` (HTTP 400 from `mlflow models serve`)."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import stand_ins
import torch
from conftest import jpeg_bytes
from mlflow.exceptions import MlflowException
from PIL import Image

from grounding.errors import ConfigError, DataError
from grounding.inference.grounder import Found, Grounding, grounder_weights
from grounding.inference.serving import (
    DEVICE_VARIABLE,
    OUTPUT_COLUMNS,
    SIGNATURE,
    GrounderModel,
    decode_image,
    encode_image,
    predict_table,
)
from grounding.io import write_weights


class RecordingGrounder:
    """Stands in for a :class:`Grounder`: records its calls, answers a fixed box (none for a
    phrase that starts with "no")."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[int, int], list[str]]] = []

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
        (encode_image(jpeg_bytes(64, 64)), "   ", "phrase 1 of 1 is empty"),
        (encode_image(jpeg_bytes(16, 64)), "a dog", "at least 32"),
    ],
)
def test_bad_input_is_an_invalid_parameter(
    model: GrounderModel, image: str, phrase: str, message: str
) -> None:
    with pytest.raises(MlflowException, match=message) as caught:
        model.predict(None, pd.DataFrame({"image": [image], "phrase": [phrase]}))
    assert caught.value.error_code == "INVALID_PARAMETER_VALUE"
