"""Great Expectations suites for every table a stage writes, and the runner that applies them.

Each ``*_suite`` function returns the expectations of one artifact, starting from its
:class:`~grounding.schemas.TableSchema` (the exact column set, the unique key, no nulls);
:func:`validate` runs them on an in-memory DataFrame in an ephemeral context (no
files, no network) and raises :class:`ValidationError` with a message a person can act on:
which expectation failed, on how many rows, and a few offending rows.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import cache
from typing import Any

import numpy as np
import pandas as pd

from grounding.errors import DataError
from grounding.schemas import (
    BOXES,
    CANDIDATES,
    CAPTIONS,
    CHAIN_BOXES,
    CHAINS,
    GROUND_TRUTH,
    IMAGES,
    PAIRS,
    PHRASE_ROWS,
    PHRASES,
    PREDICTIONS,
    SPLITS,
    TableSchema,
)

_SHOWN_ROWS = 5


def types_pattern(types: Sequence[str]) -> str:
    """The regex of a ``/``-joined list of ``types`` (``people/scene``)."""
    alternatives = "|".join(types)
    return rf"^(?:{alternatives})(?:/(?:{alternatives}))*$"


@dataclass(frozen=True)
class CheckResult:
    """One expectation's outcome on one table."""

    table: str
    expectation: str
    arguments: dict[str, Any]
    success: bool
    unexpected_count: int | None
    element_count: int | None


class ValidationError(DataError):
    """A table failed its suite; the message lists each failed expectation with examples."""

    def __init__(self, table: str, failures: list[tuple[CheckResult, pd.DataFrame]]) -> None:
        lines = [f"{table}: {len(failures)} expectation(s) failed"]
        for check, rows in failures:
            count = (
                f"{check.unexpected_count} of {check.element_count} rows"
                if check.unexpected_count is not None
                else "table-level"
            )
            lines.append(f"- {check.expectation}({_arguments(check.arguments)}): {count}")
            if not rows.empty:
                lines.extend("    " + line for line in rows.to_string(max_cols=12).splitlines())
        super().__init__("\n".join(lines))
        self.table = table
        self.failures = [check for check, _ in failures]


def _arguments(arguments: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in arguments.items() if k != "batch_id")


@cache
def _context() -> Any:
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    return context


def validate(table: pd.DataFrame, name: str, expectations: Sequence[Any]) -> list[CheckResult]:
    """Run ``expectations`` on ``table``; return every check or raise :class:`ValidationError`."""
    import great_expectations as gx

    context = _context()
    source = context.data_sources.add_or_update_pandas(f"source_{name}")
    asset = source.add_dataframe_asset(f"asset_{name}_{len(source.assets)}")
    batch = asset.add_batch_definition_whole_dataframe("all").get_batch(
        # GX reports offending rows by index label: give it positions, show the original rows
        batch_parameters={"dataframe": table.reset_index(drop=True)}
    )
    suite = gx.ExpectationSuite(name=name, expectations=list(expectations))
    outcome = batch.validate(suite, result_format="SUMMARY")
    checks, failures = [], []
    for result in outcome.results:
        config = result.expectation_config
        check = CheckResult(
            table=name,
            expectation=config.type,
            arguments={k: _plain(v) for k, v in config.kwargs.items() if k != "batch_id"},
            success=bool(result.success),
            unexpected_count=result.result.get("unexpected_count"),
            element_count=result.result.get("element_count"),
        )
        checks.append(check)
        if not check.success:
            index = result.result.get("partial_unexpected_index_list") or []
            failures.append((check, table.iloc[list(index)[:_SHOWN_ROWS]]))
    _release_memory()
    if failures:
        raise ValidationError(name, failures)
    return checks


def _release_memory() -> None:
    """GX leaves each validated table in reference cycles and glibc keeps the freed heap:
    collect both, so validating a table part by part holds one part, not every part so far
    (measured: +30 MB per 0.8M-row part without, flat with)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def combine(name: str, parts: Sequence[Sequence[CheckResult]]) -> list[CheckResult]:
    """The checks of a table validated part by part (each part by :func:`validate` with the
    same expectations), as if validated whole: one check per expectation, counts added up.
    Row-level expectations add up exactly; a key unique within each part is unique overall
    only when the parts hold disjoint keys (as pairs cut by image do)."""
    if not parts:
        return []
    combined = []
    for checks in zip(*parts, strict=True):
        first = checks[0]
        counts = [check.unexpected_count for check in checks]
        elements = [check.element_count for check in checks]
        combined.append(
            CheckResult(
                table=name,
                expectation=first.expectation,
                arguments=first.arguments,
                success=all(check.success for check in checks),
                unexpected_count=None if None in counts else sum(counts),
                element_count=None if None in elements else sum(elements),
            )
        )
    return combined


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list | tuple | set):
        return [_plain(v) for v in value]
    return value


def report(checks: Sequence[CheckResult]) -> dict[str, Any]:
    """A JSON-ready summary of checks, for ``reports/validation/<stage>.json``."""
    return {
        "success": all(check.success for check in checks),
        "checks": [asdict(check) for check in checks],
    }


# --- suites ---------------------------------------------------------------------------------


def _gx() -> Any:
    import great_expectations as gx

    return gx.expectations


def _schema(columns: Sequence[str]) -> list[Any]:
    e = _gx()
    return [e.ExpectTableColumnsToMatchSet(column_set=list(columns), exact_match=True)]


def _unique(*columns: str) -> Any:
    e = _gx()
    if len(columns) == 1:
        return e.ExpectColumnValuesToBeUnique(column=columns[0])
    return e.ExpectCompoundColumnsToBeUnique(column_list=list(columns))


def _not_null(columns: Sequence[str]) -> list[Any]:
    e = _gx()
    return [e.ExpectColumnValuesToNotBeNull(column=column) for column in columns]


def _table(schema: TableSchema, *, keyed: bool = True, extra: Sequence[str] = ()) -> list[Any]:
    """A table's schema as expectations: exactly its columns (and ``extra``: the columns a
    check joins on), none null, its key unique (unless ``keyed`` is false)."""
    columns = [*schema.columns, *extra]
    key = [_unique(*schema.key)] if keyed and schema.key else []
    return [*_schema(columns), *_not_null(columns), *key]


def _boxes_inside_image() -> list[Any]:
    """On a table with ``x1, y1, x2, y2, width, height``: boxes non-empty and inside."""
    e = _gx()
    return [
        e.ExpectColumnValuesToBeBetween(column="x1", min_value=0),
        e.ExpectColumnValuesToBeBetween(column="y1", min_value=0),
        e.ExpectColumnPairValuesAToBeGreaterThanB(column_A="x2", column_B="x1"),
        e.ExpectColumnPairValuesAToBeGreaterThanB(column_A="y2", column_B="y1"),
        e.ExpectColumnPairValuesAToBeGreaterThanB(column_A="width", column_B="x2", or_equal=True),
        e.ExpectColumnPairValuesAToBeGreaterThanB(column_A="height", column_B="y2", or_equal=True),
    ]


def images_suite() -> list[Any]:
    e = _gx()
    return [
        *_table(IMAGES),
        e.ExpectColumnValuesToBeBetween(column="width", min_value=1),
        e.ExpectColumnValuesToBeBetween(column="height", min_value=1),
        e.ExpectColumnValuesToBeInSet(column="split", value_set=[*SPLITS, "none"]),
    ]


def captions_suite() -> list[Any]:
    e = _gx()
    return [*_table(CAPTIONS), e.ExpectColumnValuesToBeBetween(column="n_phrases", min_value=0)]


def phrases_suite(types: Sequence[str] | None) -> list[Any]:
    """``types``: the entity types the dataset's format allows (None: free text)."""
    e = _gx()
    typed = []
    if types is not None:
        typed = [
            e.ExpectColumnValuesToBeInSet(column="first_type", value_set=list(types)),
            e.ExpectColumnValuesToMatchRegex(column="types", regex=types_pattern(types)),
        ]
    return [
        *_table(PHRASES),
        _unique("image_id", "caption_index", "phrase_index"),
        *typed,
        e.ExpectColumnValuesToBeBetween(column="chain_id", min_value=0),
        e.ExpectColumnValueLengthsToBeBetween(column="text", min_value=1),
    ]


def boxes_suite() -> list[Any]:
    """On boxes joined with their image's ``width, height``."""
    return [*_table(BOXES, extra=("width", "height")), *_boxes_inside_image()]


def chain_boxes_suite() -> list[Any]:
    return _table(CHAIN_BOXES)


def chains_suite() -> list[Any]:
    e = _gx()
    return [*_table(CHAINS), e.ExpectColumnValuesToBeBetween(column="n_boxes", min_value=0)]


def candidates_suite(sources: Sequence[str]) -> list[Any]:
    """On candidates joined with their image's ``width, height``; ``sources``: the names of
    the candidate generators (:data:`grounding.candidates.GENERATORS`)."""
    e = _gx()
    return [
        *_table(CANDIDATES, extra=("width", "height")),
        e.ExpectColumnValuesToBeInSet(column="source", value_set=sorted(sources)),
        *_boxes_inside_image(),
    ]


def ground_truth_suite() -> list[Any]:
    """On ground truth joined with its image's ``width, height``."""
    return [*_table(GROUND_TRUTH, extra=("width", "height")), *_boxes_inside_image()]


def pairs_suite(*, unique: bool, schema: TableSchema = PAIRS) -> list[Any]:
    """Pairs (or a table that extends them): ``unique`` false for the balanced training pairs,
    which repeat positives."""
    e = _gx()
    return [
        *_table(schema, keyed=unique),
        e.ExpectColumnValuesToBeBetween(column="iou", min_value=0, max_value=1),
        e.ExpectColumnValuesToBeInSet(column="label", value_set=[0, 1]),
    ]


def split_images_suite() -> list[Any]:
    """On the distinct ``(image_id, split)`` rows of all splits: no image in two splits."""
    e = _gx()
    return [
        *_schema(["image_id", "split"]),
        _unique("image_id"),
        e.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS)),
    ]


# --- checks per stage (joins that a suite needs, then the suites) ----------------------------


def _with_image_size(table: pd.DataFrame, images: pd.DataFrame) -> pd.DataFrame:
    return table.merge(images[["image_id", "width", "height"]], on="image_id", how="left")


def check_parsed(
    tables: dict[str, pd.DataFrame], *, types: Sequence[str] | None
) -> list[CheckResult]:
    """The suites of every table of the parse stage; ``types`` as in :func:`phrases_suite`."""
    images = tables["images"]
    return [
        *validate(images, "images", images_suite()),
        *validate(tables["captions"], "captions", captions_suite()),
        *validate(tables["phrases"], "phrases", phrases_suite(types)),
        *validate(_with_image_size(tables["boxes"], images), "boxes", boxes_suite()),
        *validate(tables["chain_boxes"], "chain_boxes", chain_boxes_suite()),
        *validate(tables["chains"], "chains", chains_suite()),
    ]


def check_paired(
    tables: dict[str, pd.DataFrame],
    images: pd.DataFrame,
    *,
    types: Sequence[str] | None,
    sources: Sequence[str],
) -> list[CheckResult]:
    """The suites of every table of the pair stage (``types`` and ``sources`` as in
    :func:`phrases_suite` and :func:`candidates_suite`); ``pairs`` only when given (the stage
    checks them part by part, :func:`check_pairs`)."""
    candidates = _with_image_size(tables["candidates"], images)
    pairs = check_pairs(tables["pairs"]) if "pairs" in tables else []
    return [
        *validate(candidates, "candidates", candidates_suite(sources)),
        *validate(tables["phrases"], "phrases", phrases_suite(types)),
        *validate(
            _with_image_size(tables["ground_truth"], images), "ground_truth", ground_truth_suite()
        ),
        *pairs,
    ]


def check_pairs(pairs: pd.DataFrame) -> list[CheckResult]:
    """The pairs' suite, on all the pairs or a part of whole images (:func:`combine`)."""
    return validate(pairs, "pairs", pairs_suite(unique=True))


def check_split(
    tables: dict[str, pd.DataFrame], *, train_pos_share: float, natural_train_share: float
) -> list[CheckResult]:
    """The suites of the split pairs: schema and labels per split, no image in two splits,
    and the training positive share as configured (or the natural share where that is
    already higher: balancing never drops negatives)."""
    images = pd.concat(
        [
            table[["image_id"]].drop_duplicates().assign(split=name)
            for name, table in tables.items()
        ],
        ignore_index=True,
    )
    checks = check_split_images(images)
    for name, table in tables.items():
        checks += check_split_pairs(name, table)
        if name == "train":
            share = float(table["label"].mean()) if len(table) else float("nan")
            checks.append(
                check_train_share(
                    share,
                    train_pos_share=train_pos_share,
                    natural_train_share=natural_train_share,
                )
            )
    return checks


def check_split_images(images: pd.DataFrame) -> list[CheckResult]:
    """The distinct ``(image_id, split)`` rows of all splits: no image in two splits."""
    return validate(images, "split_images", split_images_suite())


def check_split_pairs(name: str, pairs: pd.DataFrame) -> list[CheckResult]:
    """The pairs' suite on one split's pairs, or a part of them (:func:`combine`); repeated
    pairs allowed in ``train``."""
    return validate(pairs, f"{name}_pairs", pairs_suite(unique=name != "train"))


def check_train_share(
    share: float, *, train_pos_share: float, natural_train_share: float
) -> CheckResult:
    """The share of positives over all the training pairs is ``train_pos_share`` (or the
    natural share where that is higher), within 0.005. The share is added up over the parts
    of the table, which GX's mean expectation would need whole in memory, so this one check
    is computed here; it reports as that expectation would."""
    tolerance = 0.005
    minimum = train_pos_share - tolerance
    maximum = max(train_pos_share, natural_train_share) + tolerance
    check = CheckResult(
        table="train_pairs",
        expectation="expect_column_mean_to_be_between",
        arguments={"column": "label", "min_value": minimum, "max_value": maximum},
        success=bool(minimum <= share <= maximum),
        unexpected_count=None,
        element_count=None,
    )
    if not check.success:
        raise ValidationError("train_pairs", [(check, pd.DataFrame())])
    return check


def check_predictions(predictions: pd.DataFrame) -> list[CheckResult]:
    """Scored pairs: the pair schema plus ``score`` in [0, 1] and ``predicted`` in {0, 1}."""
    e = _gx()
    expectations = [
        *pairs_suite(unique=True, schema=PREDICTIONS),
        e.ExpectColumnValuesToBeBetween(column="score", min_value=0, max_value=1),
        e.ExpectColumnValuesToBeInSet(column="predicted", value_set=[0, 1]),
    ]
    return validate(predictions, "predictions", expectations)


def check_features(
    regions: np.ndarray,
    embeddings: np.ndarray,
    phrase_rows: pd.DataFrame,
    candidates: pd.DataFrame,
    phrases: pd.DataFrame,
) -> list[CheckResult]:
    """Features: one finite, non-zero row per candidate (row = ``region_id``, which
    :mod:`grounding.pair` numbers from 0); one finite unit embedding per distinct phrase;
    every paired phrase mapped to an existing embedding row."""
    e = _gx()
    return [
        *validate(
            _row_stats(regions),
            "region_features",
            [
                e.ExpectTableRowCountToEqual(value=len(candidates)),
                e.ExpectColumnValuesToBeInSet(column="finite", value_set=[True]),
                e.ExpectColumnValuesToBeBetween(column="norm", min_value=1e-6, strict_min=True),
            ],
        ),
        *validate(
            _row_stats(embeddings),
            "phrase_embeddings",
            [
                e.ExpectColumnValuesToBeInSet(column="finite", value_set=[True]),
                e.ExpectColumnValuesToBeBetween(column="norm", min_value=0.999, max_value=1.001),
            ],
        ),
        *validate(
            phrase_rows,
            "phrase_rows",
            [
                *_table(PHRASE_ROWS),
                e.ExpectTableRowCountToEqual(value=len(phrases)),
                e.ExpectColumnValuesToBeBetween(
                    column="row", min_value=0, max_value=len(embeddings) - 1
                ),
            ],
        ),
    ]


def _row_stats(array: np.ndarray, chunk: int = 65_536) -> pd.DataFrame:
    """``finite`` and ``norm`` of each row, read in chunks (``array`` may be memory-mapped)."""
    finite, norm = [], []
    for start in range(0, len(array), chunk):
        rows = np.asarray(array[start : start + chunk], dtype=np.float64)
        finite.append(np.isfinite(rows).all(axis=1))
        norm.append(np.linalg.norm(np.nan_to_num(rows), axis=1))
    if not finite:
        return pd.DataFrame({"finite": np.empty(0, bool), "norm": np.empty(0)})
    return pd.DataFrame({"finite": np.concatenate(finite), "norm": np.concatenate(norm)})
