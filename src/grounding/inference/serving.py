"""The grounder as an MLflow pyfunc model: images and phrases in, boxes out.

Input: a table with a column ``image`` (the image file's bytes, base64-encoded) and a column
``phrase``; rows with the same image are grounded together, in one pass over the image.
Output: one row per phrase and box: ``row`` (the input row), ``phrase``, ``rank`` (1 = best),
``x1, y1, x2, y2`` (image pixels), ``score``, ``above_threshold`` and ``reason`` (why a phrase
has no box). Param ``top_k`` (default 1): boxes per phrase.

Bad input (not base64, not an image, an empty phrase, a missing column) raises an
``MlflowException`` with ``INVALID_PARAMETER_VALUE``: ``mlflow models serve`` answers it with
HTTP 400 and the message, never 500.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from PIL import Image

from grounding.errors import DataError
from grounding.inference.grounder import Grounder
from grounding.io.images import decode_image as decode_image_bytes

INPUT_COLUMNS = ("image", "phrase")
OUTPUT_COLUMNS = (
    "row",
    "phrase",
    "rank",
    "x1",
    "y1",
    "x2",
    "y2",
    "score",
    "above_threshold",
    "reason",
)

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "image"), ColSpec("string", "phrase")]),
    outputs=Schema(
        [
            ColSpec("long", "row"),
            ColSpec("string", "phrase"),
            ColSpec("long", "rank", required=False),
            *(ColSpec("double", name, required=False) for name in ("x1", "y1", "x2", "y2")),
            ColSpec("double", "score", required=False),
            ColSpec("boolean", "above_threshold", required=False),
            ColSpec("string", "reason", required=False),
        ]
    ),
    params=ParamSchema([ParamSpec("top_k", "long", 1)]),
)


def encode_image(data: bytes) -> str:
    """An image file's bytes as the ``image`` column wants them."""
    return base64.b64encode(data).decode("ascii")


def decode_image(text: str, row: int) -> Image.Image:
    """The image of input row ``row``; :class:`DataError` naming the row if it is not a
    base64-encoded image file (or is truncated)."""
    try:
        data = base64.b64decode(str(text), validate=True)
    except (binascii.Error, ValueError):
        raise DataError(f"row {row}: image is not base64-encoded") from None
    return decode_image_bytes(data, f"row {row}")


def predict_table(grounder: Grounder, table: pd.DataFrame, *, top_k: int) -> pd.DataFrame:
    """Ground every input row (see the module docstring); :class:`DataError` on bad input."""
    missing = [column for column in INPUT_COLUMNS if column not in table.columns]
    if missing:
        raise DataError(f"input needs columns {list(INPUT_COLUMNS)}; missing {missing}")
    if table.empty:
        raise DataError("input has no rows")
    table = table.reset_index(drop=True)
    rows: list[dict[str, Any]] = []
    for _, group in table.groupby("image", sort=False):
        image = decode_image(group["image"].iloc[0], int(group.index[0]))
        found = grounder.ground(image, group["phrase"].astype(str).tolist(), top_k=top_k)
        for row, grounding in zip(group.index, found, strict=True):
            if not grounding.boxes:
                rows.append(
                    {"row": int(row), "phrase": grounding.phrase, "reason": grounding.reason}
                )
            for rank, box in enumerate(grounding.boxes, start=1):
                x1, y1, x2, y2 = box.box
                rows.append(
                    {
                        "row": int(row),
                        "phrase": grounding.phrase,
                        "rank": rank,
                        "x1": x1,
                        "y1": y1,
                        "x2": x2,
                        "y2": y2,
                        "score": box.score,
                        "above_threshold": box.above_threshold,
                    }
                )
    result = pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS))
    result = result.sort_values(["row", "rank"], na_position="first").reset_index(drop=True)
    return result.astype(object).where(result.notna(), None)  # JSON null, not NaN


class GrounderModel(mlflow.pyfunc.PythonModel):
    """The pyfunc wrapper; its one artifact ``grounder`` is the grounder's weights file, or the
    folder of its ONNX export (``grounding export``), which runs with onnxruntime."""

    grounder: Grounder

    def load_context(self, context: Any) -> None:
        from grounding.inference.onnx_grounder import OnnxGrounder, is_onnx_export
        from grounding.io.weights import read_weights

        path = Path(context.artifacts["grounder"])
        if is_onnx_export(path):
            self.grounder = OnnxGrounder.load(path)
            return
        self.grounder = Grounder.from_weights(*read_weights(path))

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        top_k = int((params or {}).get("top_k", 1))
        try:
            return predict_table(self.grounder, pd.DataFrame(model_input), top_k=top_k)
        except DataError as error:
            raise MlflowException(str(error), error_code=INVALID_PARAMETER_VALUE) from None
