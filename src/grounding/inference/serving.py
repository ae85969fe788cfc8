"""The grounder as an MLflow pyfunc model: images and phrases in, boxes out.

Input: a table with a column ``image`` (the image file's bytes, base64-encoded) and a column
``phrase``; rows with the same image are grounded together, in one pass over the image.
Output: one row per phrase and box: ``row`` (the input row), ``phrase``, ``rank`` (1 = best),
``x1, y1, x2, y2`` (image pixels), ``score``, ``above_threshold`` and ``reason`` (why a phrase
has no box). Param ``top_k`` (default 1): boxes per phrase.

The model runs on the device that the environment variable ``GROUNDING_DEVICE`` names
(``auto``, the default: a GPU if torch sees one; ``cpu``; ``cuda``; ``cuda:N``), with the CPU
kernels that ``GROUNDING_NUMERICS`` names (``portable``, the default, or ``fast``:
:mod:`grounding.numerics`).

The image is base64 (line breaks, as GNU ``base64`` writes by default, are ignored), with or
without a ``data:image/...;base64,`` prefix. Bad input (a null or non-string image or phrase,
not base64, not an image, an empty phrase, a missing column, ``top_k`` not a whole number
>= 1) raises an ``MlflowException`` with ``INVALID_PARAMETER_VALUE`` naming the row:
``mlflow models serve`` answers it with HTTP 400 and the message. Anything else (a bug) is
logged with its traceback on the server and answered with a 500 that holds none.
"""

from __future__ import annotations

import base64
import binascii
import logging
import math
import numbers
import os
import re
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from PIL import Image

from grounding.errors import ConfigError, DataError
from grounding.inference.grounder import Grounder
from grounding.io.images import decode_image as decode_image_bytes
from grounding.numerics import NUMERICS_VARIABLE, check_numerics, use_numerics

_log = logging.getLogger(__name__)

#: The environment variable naming the device a served model runs on (default ``auto``).
DEVICE_VARIABLE = "GROUNDING_DEVICE"
INPUT_COLUMNS = ("image", "phrase")
#: ``data:image/png;base64,`` (any media type): the prefix of a data URL, dropped.
_DATA_URL = re.compile(r"^data:[^,;]*(?:;[^,;]*)*;base64,", re.IGNORECASE)
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
        data = base64.b64decode(image_text(text), validate=True)
    except (binascii.Error, ValueError):
        raise DataError(f"row {row}: image is not base64-encoded") from None
    return decode_image_bytes(data, f"row {row}")


def image_text(text: str) -> str:
    """The base64 of an ``image`` value: without a ``data:...;base64,`` prefix and without
    the line breaks (or any whitespace) that base64 tools put in."""
    return "".join(_DATA_URL.sub("", text.strip(), count=1).split())


def check_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The input table with its image column as bare base64 (:func:`image_text`) and its
    phrases stripped; :class:`DataError` naming the first row whose image or phrase is null,
    not a string, or empty (JSON gives ``null``, numbers, ``true``, lists and objects)."""
    missing = [column for column in INPUT_COLUMNS if column not in table.columns]
    if missing:
        raise DataError(f"input needs columns {list(INPUT_COLUMNS)}; missing {missing}")
    if table.empty:
        raise DataError("input has no rows")
    table = table.reset_index(drop=True)
    for column in INPUT_COLUMNS:
        for row, value in enumerate(table[column]):
            if not isinstance(value, str):
                raise DataError(f"row {row}: {column} is {_kind(value)}, not a string")
            if not value.strip():
                raise DataError(f"row {row}: {column} is empty")
    return pd.DataFrame(
        {
            "image": [image_text(text) for text in table["image"]],
            "phrase": [phrase.strip() for phrase in table["phrase"]],
        }
    )


def _kind(value: object) -> str:
    """What a JSON value that is not a string is, in words."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return "null"
    if isinstance(value, bool | np.bool_):
        return f"a boolean ({str(bool(value)).lower()})"
    if isinstance(value, numbers.Number):
        return f"a number ({value})"
    if isinstance(value, list | tuple | np.ndarray):
        return f"a list ({len(value)} items)"
    if isinstance(value, dict):
        return f"an object ({len(value)} keys)"
    return f"a {type(value).__name__}"


def check_top_k(value: object) -> int:
    """The ``top_k`` param as an int; :class:`DataError` unless it is a whole number >= 1."""
    whole = isinstance(value, numbers.Integral) and not isinstance(value, bool | np.bool_)
    if not whole or int(value) < 1:  # type: ignore[call-overload]
        shown = "null" if value is None else repr(value)
        raise DataError(f"param top_k is {shown}; it must be a whole number >= 1 (default 1)")
    return int(value)  # type: ignore[call-overload]


def predict_table(grounder: Grounder, table: pd.DataFrame, *, top_k: int) -> pd.DataFrame:
    """Ground every input row (see the module docstring); :class:`DataError` on bad input."""
    table = check_rows(table)
    rows: list[dict[str, Any]] = []
    for _, group in table.groupby("image", sort=False):
        image = decode_image(group["image"].iloc[0], int(group.index[0]))
        found = grounder.ground(image, group["phrase"].tolist(), top_k=top_k)
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


def _fix_numerics() -> None:
    """The CPU kernels that ``GROUNDING_NUMERICS`` names (default ``portable``), fixed before
    the grounder loads torch; a warning in the log where the host loaded torch first (its
    kernels then stay what they were)."""
    mode = check_numerics(os.environ.get(NUMERICS_VARIABLE, "portable"), NUMERICS_VARIABLE)
    try:
        use_numerics(mode, NUMERICS_VARIABLE)
    except ConfigError as error:  # the mode is valid: torch was loaded first
        _log.warning("%s", error)


class GrounderModel(mlflow.pyfunc.PythonModel):
    """The pyfunc wrapper; its one artifact ``grounder`` is the grounder's weights file, or the
    folder of its ONNX export (``grounding export``), which runs with onnxruntime."""

    grounder: Grounder

    def load_context(self, context: Any) -> None:
        _fix_numerics()
        from grounding.inference.onnx_grounder import OnnxGrounder, is_onnx_export
        from grounding.io.weights import read_weights
        from grounding.modeling.device import resolve_device

        path = Path(context.artifacts["grounder"])
        if is_onnx_export(path):  # onnxruntime on the CPU: GROUNDING_DEVICE does not apply
            self.grounder = OnnxGrounder.load(path)
            return
        device = resolve_device(os.environ.get(DEVICE_VARIABLE, "auto"), DEVICE_VARIABLE)
        self.grounder = Grounder.from_weights(*read_weights(path)).to(device)

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        try:
            top_k = check_top_k((params or {}).get("top_k", 1))
            return predict_table(self.grounder, pd.DataFrame(model_input), top_k=top_k)
        except DataError as error:
            raise MlflowException(str(error), error_code=INVALID_PARAMETER_VALUE) from None
        except Exception as error:  # a bug: its traceback goes to the log, not to the client
            _log.exception("grounding failed")
            raise MlflowException(
                f"internal error ({type(error).__name__}); the server's log has the details",
                error_code=INTERNAL_ERROR,
            ) from None
