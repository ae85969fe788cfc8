"""The grounder as an MLflow pyfunc model: images and phrases in, boxes out.

Input: a table with a column ``image`` (the image file's bytes, base64-encoded) and a column
``phrase``; rows with the same image are grounded together, in one pass over the image.
Output: one row per phrase and box: ``row`` (the input row), ``phrase``, ``rank`` (1 = best),
``x1, y1, x2, y2`` (image pixels), ``score``, ``above_threshold``, ``reason`` (why a phrase
has no box) and ``model`` (which grounder answered: where it was loaded from and what it was
trained on). Param ``top_k`` (default 1): boxes per phrase.

The model runs on the device that the environment variable ``GROUNDING_DEVICE`` names
(``auto``, the default: a GPU if torch sees one; ``cpu``; ``cuda``; ``cuda:N``), with the CPU
kernels that ``GROUNDING_NUMERICS`` names (``portable``, the default, or ``fast``:
:mod:`grounding.numerics`).

Memory is bounded by design: at most ``GROUNDING_CONCURRENCY`` requests (default 2) are
grounded at once, the others wait; an image is decoded no larger than the models need
(:attr:`~grounding.inference.grounder.Grounder.decode_side`; a JPEG at 1/2, 1/4 or 1/8 of its
size, any image then shrunk by a whole factor; boxes are scaled back to the full image); so
a request holds at most one full-size decoded image (4 bytes a pixel, at most
:data:`~grounding.io.images.MAX_IMAGE_PIXELS`), and only while it decodes.

The image is base64 (line breaks, as GNU ``base64`` writes by default, are ignored), with or
without a ``data:image/...;base64,`` prefix. Bad input (a null or non-string image or phrase,
not base64, not an image, an empty phrase, a missing column, ``top_k`` not a whole number
in 1..1000) raises an ``MlflowException`` with ``INVALID_PARAMETER_VALUE`` naming the row:
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
import sys
import threading
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import BAD_REQUEST, INTERNAL_ERROR, INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from PIL import Image

from grounding.errors import ConfigError, DataError
from grounding.inference.grounder import MAX_TOP_K, Grounder
from grounding.io.images import decode_image as decode_image_bytes
from grounding.numerics import NUMERICS_VARIABLE, check_numerics, use_numerics

_log = logging.getLogger(__name__)

#: The environment variable naming the device a served model runs on (default ``auto``).
DEVICE_VARIABLE = "GROUNDING_DEVICE"
#: The environment variable bounding how many requests a served model grounds at once.
CONCURRENCY_VARIABLE = "GROUNDING_CONCURRENCY"
DEFAULT_CONCURRENCY = 2
#: The ceiling: the most memory (MB) one grounding in flight adds to a served model at rest:
#: one image decoded whole (at most 4 bytes x 60 Mpx = 240 MB) and the models' work at
#: ``decode_side``. A server stays under rest + GROUNDING_CONCURRENCY x this (with
#: ``--workers N``, per worker), plus the bodies of the requests that wait.
MEMORY_PER_GROUNDING_MB = 500
#: Pillow allocates an image in blocks of this many bytes. Above glibc's largest mmap
#: threshold (32 MB) each block is a mapping of its own, given back to the system when the
#: image is freed; Pillow's default 16 MB blocks stay in the allocator's arenas, and a burst
#: of huge images left the server hundreds of MB larger after each burst.
IMAGE_BLOCK_BYTES = 64 * 2**20
#: The most characters of an error message, the request it may repeat included.
ECHO_LIMIT = 2000
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
    "model",
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
            ColSpec("string", "model"),
        ]
    ),
    params=ParamSchema([ParamSpec("top_k", "long", 1)]),
)


def encode_image(data: bytes) -> str:
    """An image file's bytes as the ``image`` column wants them."""
    return base64.b64encode(data).decode("ascii")


def decode_image(text: str, row: int, *, max_side: int | None = None) -> Image.Image:
    """The image of input row ``row`` (decoded shrunk to ``max_side``, see
    :func:`grounding.io.images.decode_image`); :class:`DataError` naming the row if it is not a
    base64-encoded image file (or is truncated)."""
    try:
        data = base64.b64decode(image_text(text), validate=True)
    except (binascii.Error, ValueError):
        raise DataError(f"row {row}: image is not base64-encoded") from None
    return decode_image_bytes(data, f"row {row}", max_side=max_side)


def full_size_box(box: tuple[float, float, float, float], image: Image.Image) -> list[float]:
    """``box`` ``(x1, y1, x2, y2)`` in the pixels of ``image``, in those of the full image it
    was decoded shrunk from (``image.info["full_size"]``; itself when not shrunk)."""
    width, height = image.info.get("full_size", image.size)
    sx, sy = width / image.width, height / image.height
    x1, y1, x2, y2 = box
    return [min(x1 * sx, width), min(y1 * sy, height), min(x2 * sx, width), min(y2 * sy, height)]


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
    """The ``top_k`` param as an int; :class:`DataError` unless it is a whole number in
    ``1..MAX_TOP_K``."""
    whole = isinstance(value, numbers.Integral) and not isinstance(value, bool | np.bool_)
    if not whole or not 1 <= int(value) <= MAX_TOP_K:  # type: ignore[call-overload]
        shown = "null" if value is None else repr(value)[:40]
        raise DataError(
            f"param top_k is {shown}; it must be a whole number in 1..{MAX_TOP_K} (default 1)"
        )
    return int(value)  # type: ignore[call-overload]


def concurrency(environ: dict[str, str] | os._Environ[str] = os.environ) -> int:
    """How many requests are grounded at once: ``GROUNDING_CONCURRENCY``, a whole number >= 1
    (default :data:`DEFAULT_CONCURRENCY`); :class:`ConfigError` naming the variable otherwise."""
    text = environ.get(CONCURRENCY_VARIABLE, str(DEFAULT_CONCURRENCY))
    try:
        value = int(text) if len(text) < 20 else 0
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(f"{CONCURRENCY_VARIABLE}={text[:40]!r}: must be a whole number >= 1")
    return value


def predict_table(
    grounder: Grounder, table: pd.DataFrame, *, top_k: int, max_side: int | None = None
) -> pd.DataFrame:
    """Ground every input row (see the module docstring), each image decoded shrunk to
    ``max_side`` (boxes scaled back; None: decoded whole); :class:`DataError` on bad input."""
    table = check_rows(table)
    rows: list[dict[str, Any]] = []
    for _, group in table.groupby("image", sort=False):
        image = decode_image(group["image"].iloc[0], int(group.index[0]), max_side=max_side)
        found = grounder.ground(image, group["phrase"].tolist(), top_k=top_k)
        for row, grounding in zip(group.index, found, strict=True):
            if not grounding.boxes:
                rows.append(
                    {"row": int(row), "phrase": grounding.phrase, "reason": grounding.reason}
                )
            for rank, box in enumerate(grounding.boxes, start=1):
                x1, y1, x2, y2 = full_size_box(box.box, image)
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
    result = pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS)).assign(model=grounder.describe())
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
    #: Held while a request is grounded: at most ``GROUNDING_CONCURRENCY`` at once.
    slots: threading.BoundedSemaphore

    def load_context(self, context: Any) -> None:
        """Load the artifact with :func:`~grounding.inference.loading.load_grounder` (a weights
        file or an ONNX export; anything else is refused unread) on ``GROUNDING_DEVICE``."""
        _fix_numerics()
        from grounding.inference.loading import load_grounder

        self.slots = threading.BoundedSemaphore(concurrency())
        Image.core.set_block_size(IMAGE_BLOCK_BYTES)
        guard_scoring_server()
        device = os.environ.get(DEVICE_VARIABLE, "auto")
        self.grounder = load_grounder(context.artifacts["grounder"], device, where=DEVICE_VARIABLE)

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        try:
            top_k = check_top_k((params or {}).get("top_k", 1))
            with self.slots:
                return predict_table(
                    self.grounder,
                    pd.DataFrame(model_input),
                    top_k=top_k,
                    max_side=self.grounder.decode_side,
                )
        except DataError as error:
            raise MlflowException(str(error), error_code=INVALID_PARAMETER_VALUE) from None
        except Exception as error:  # a bug: its traceback goes to the log, not to the client
            _log.exception("grounding failed")
            raise MlflowException(
                f"internal error ({type(error).__name__}); the server's log has the details",
                error_code=INTERNAL_ERROR,
            ) from None


def guard_scoring_server() -> None:
    """Make MLflow's scoring server (``mlflow models serve``, when this process runs it)
    answer every request body it cannot parse with a JSON 400, and never repeat more than
    :data:`ECHO_LIMIT` characters of a request in an error: it lets ``RecursionError`` (JSON
    nested too deeply) and ``ValueError`` (an integer of more than 4,300 digits) through as a
    plain-text 500, and puts the whole body in its message on malformed JSON."""
    server = sys.modules.get("mlflow.pyfunc.scoring_server")  # imported by the server only
    invocations = getattr(server, "invocations", None)
    if invocations is None or getattr(invocations, "guarded", False):
        return

    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return invocations(*args, **kwargs)
        except MlflowException as error:
            error.message = _cut(error.message)
            raise
        except RecursionError:
            raise MlflowException(
                "the request is not JSON this server reads: nested too deeply",
                error_code=BAD_REQUEST,  # as MLflow answers malformed JSON
            ) from None
        except ValueError as error:  # what json.loads refuses beyond the grammar
            raise MlflowException(
                f"the request is not JSON this server reads: {_cut(str(error).split(';')[0])}",
                error_code=BAD_REQUEST,
            ) from None

    guarded.guarded = True  # type: ignore[attr-defined]
    server.invocations = guarded  # type: ignore[union-attr]


def _cut(message: str) -> str:
    """``message`` with its middle cut out when it is longer than :data:`ECHO_LIMIT`: its
    start says what failed, its end holds the reason (MLflow puts the request in between)."""
    if len(message) <= ECHO_LIMIT:
        return message
    head, tail = ECHO_LIMIT // 4, ECHO_LIMIT - ECHO_LIMIT // 4
    cut = len(message) - head - tail
    return f"{message[:head]} ... ({cut:,} characters cut) ... {message[-tail:]}"
