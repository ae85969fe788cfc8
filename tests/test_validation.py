"""Great Expectations suites: good tables pass; each broken table names what failed and shows it.

Great Expectations takes a few seconds to import and start its context; everything here shares
one context (it is cached per process), so the file stays fast.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from grounding import validation
from grounding.candidates import ANNOTATED, candidates_table
from grounding.candidates.annotated import annotated_regions
from grounding.data.formats.flickr30k import TYPES
from grounding.data.pair import Paired, pair_dataset
from grounding.data.split import split_pairs
from grounding.data.tables import ParsedDataset
from grounding.validation import ValidationError


def copy_tables(parsed: ParsedDataset) -> dict[str, pd.DataFrame]:
    return {name: table.copy() for name, table in parsed.tables().items()}


@pytest.fixture(scope="module")
def paired(tiny_parsed: ParsedDataset) -> Paired:
    t = tiny_parsed
    candidates = candidates_table(annotated_regions(t.boxes), "annotated")
    return pair_dataset(t.images, t.phrases, t.boxes, t.chain_boxes, candidates, pos_iou=0.5)


def check_paired(tables: dict[str, pd.DataFrame], images: pd.DataFrame) -> list:
    # the pair stage passes the generator it ran: its name is every candidate's source
    return validation.check_paired(tables, images, types=TYPES, sources=[ANNOTATED])


@pytest.fixture(scope="module")
def split_tables(paired: Paired) -> dict[str, pd.DataFrame]:
    split_of_image = pd.Series({"100": "train", "200": "val", "300": "test", "500": "none"})
    return split_pairs(paired.pairs, split_of_image, train_pos_share=0.5, seed=0)


# --- parse ----------------------------------------------------------------------------------


def test_check_parsed_passes_on_good_tables(tiny_parsed: ParsedDataset) -> None:
    checks = validation.check_parsed(copy_tables(tiny_parsed), types=TYPES)
    assert {check.table for check in checks} == {
        "images",
        "captions",
        "phrases",
        "boxes",
        "chain_boxes",
        "chains",
    }
    assert all(check.success for check in checks)
    report = validation.report(checks)
    assert report["success"] is True
    assert len(report["checks"]) == len(checks)


def test_box_beyond_the_image_width_is_named_counted_and_shown(
    tiny_parsed: ParsedDataset,
) -> None:
    tables = copy_tables(tiny_parsed)
    boxes = tables["boxes"]
    boxes.loc[(boxes["image_id"] == "300") & (boxes["box_id"] == 0), "x2"] = 51.0  # width 50
    with pytest.raises(ValidationError) as caught:
        validation.check_parsed(tables, types=TYPES)
    message = str(caught.value)
    assert caught.value.table == "boxes"
    assert message.startswith("boxes: 1 expectation(s) failed")
    assert (
        "expect_column_pair_values_a_to_be_greater_than_b(column_A='width', column_B='x2', "
        "or_equal=True): 1 of 13 rows" in message
    )
    # the offending row: image 300, box 0, x2 = 51.0, width 50
    shown = [line.split() for line in message.splitlines()[3:]]
    assert ["7", "300", "0", "0.0", "0.0", "51.0", "40.0", "50", "40"] in shown


def test_unknown_type_is_named_and_shown(tiny_parsed: ParsedDataset) -> None:
    tables = copy_tables(tiny_parsed)
    tables["phrases"].loc[9, ["types", "first_type"]] = ["animals/robots", "animals"]
    tables["phrases"].loc[10, ["types", "first_type"]] = ["dogs", "dogs"]
    with pytest.raises(ValidationError) as caught:
        validation.check_parsed(tables, types=TYPES)
    message = str(caught.value)
    assert message.startswith("phrases: 2 expectation(s) failed")
    assert "expect_column_values_to_match_regex(column='types'" in message
    assert "): 2 of 36 rows" in message
    assert "expect_column_values_to_be_in_set(column='first_type'" in message
    assert "): 1 of 36 rows" in message
    assert "animals/robots" in message and "dogs" in message


def test_duplicated_phrase_id_is_named_and_shown(tiny_parsed: ParsedDataset) -> None:
    tables = copy_tables(tiny_parsed)
    tables["phrases"].loc[20, "phrase_id"] = 3
    with pytest.raises(ValidationError) as caught:
        validation.check_parsed(tables, types=TYPES)
    message = str(caught.value)
    assert "expect_column_values_to_be_unique(column='phrase_id'): 2 of 36 rows" in message
    assert [f.expectation for f in caught.value.failures] == ["expect_column_values_to_be_unique"]
    assert "very" in message  # phrase 3's text is shown


def test_extra_column_fails_the_schema(tiny_parsed: ParsedDataset) -> None:
    tables = copy_tables(tiny_parsed)
    tables["chains"]["colour"] = "red"
    with pytest.raises(ValidationError, match=r"expect_table_columns_to_match_set\(.*table-level"):
        validation.check_parsed(tables, types=TYPES)


def test_phrase_types_are_free_text_for_a_format_without_types(
    tiny_parsed: ParsedDataset,
) -> None:
    tables = copy_tables(tiny_parsed)
    tables["phrases"]["types"] = ""
    tables["phrases"]["first_type"] = ""
    assert all(check.success for check in validation.check_parsed(tables, types=None))
    with pytest.raises(ValidationError, match=r"first_type.*: 36 of 36 rows"):
        validation.check_parsed(tables, types=TYPES)


@pytest.mark.parametrize(
    ("types", "matches"),
    [
        ("people", True),
        ("vehicles/scene", True),
        ("people/people", True),
        ("people/", False),
        ("/people", False),
        ("people//scene", False),
        ("peoples", False),
        ("", False),
    ],
)
def test_types_pattern(types: str, matches: bool) -> None:
    pattern = validation.types_pattern(("people", "vehicles", "scene"))
    assert (re.fullmatch(pattern, types) is not None) == matches


def test_images_table_without_file_names_fails_the_schema(tiny_parsed: ParsedDataset) -> None:
    tables = copy_tables(tiny_parsed)
    tables["images"] = tables["images"].drop(columns="file_name")  # written before file_name
    with pytest.raises(ValidationError) as caught:
        validation.check_parsed(tables, types=TYPES)
    assert caught.value.table == "images"
    assert "expect_table_columns_to_match_set(" in str(caught.value)
    assert "'file_name'" in str(caught.value)


def test_validate_failure_rows_of_a_table_with_the_default_index() -> None:
    table = pd.DataFrame(
        {
            "image_id": ["a", "b", "c"],
            "file_name": ["a.jpg", "b.jpg", "c.jpg"],
            "width": [10, 0, 10],
            "height": [10, 10, 10],
            "split": ["train", "val", "test"],
            "has_file": [True, True, True],
        },
    )
    with pytest.raises(ValidationError) as caught:
        validation.validate(table, "images", validation.images_suite())
    assert "1 of 3 rows" in str(caught.value)
    assert [line.split() for line in str(caught.value).splitlines()[3:4]] == [
        ["1", "b", "b.jpg", "0", "10", "val", "True"]
    ]


def test_validate_failure_rows_of_a_table_with_another_index() -> None:
    table = pd.DataFrame(
        {
            "image_id": ["a", "b", "c"],
            "file_name": ["a.jpg", "b.jpg", "c.jpg"],
            "width": [10, 0, 10],
            "height": [10, 10, 10],
            "split": ["train", "val", "test"],
            "has_file": [True, True, True],
        },
        index=[30, 20, 10],
    )
    with pytest.raises(ValidationError) as caught:
        validation.validate(table, "images", validation.images_suite())
    shown = [line.split() for line in str(caught.value).splitlines()[3:]]
    assert ["20", "b", "b.jpg", "0", "10", "val", "True"] in shown


# --- pair -----------------------------------------------------------------------------------


def test_check_paired_passes_on_good_tables(paired: Paired, tiny_parsed: ParsedDataset) -> None:
    checks = check_paired(paired.tables(), tiny_parsed.images)
    assert all(check.success for check in checks)
    assert {check.table for check in checks} == {"candidates", "phrases", "ground_truth", "pairs"}


def test_check_paired_catches_a_duplicated_pair(paired: Paired, tiny_parsed: ParsedDataset) -> None:
    tables = {name: table.copy() for name, table in paired.tables().items()}
    tables["pairs"] = pd.concat([tables["pairs"], tables["pairs"].iloc[[4]]], ignore_index=True)
    with pytest.raises(ValidationError) as caught:
        check_paired(tables, tiny_parsed.images)
    assert "expect_compound_columns_to_be_unique(column_list=['phrase_id', 'region_id'])" in str(
        caught.value
    )
    assert caught.value.table == "pairs"


def test_check_paired_catches_an_iou_above_one(paired: Paired, tiny_parsed: ParsedDataset) -> None:
    tables = {name: table.copy() for name, table in paired.tables().items()}
    tables["pairs"].loc[0, "iou"] = np.float32(1.5)
    with pytest.raises(ValidationError, match=r"expect_column_values_to_be_between\(column='iou'"):
        check_paired(tables, tiny_parsed.images)


def test_check_paired_catches_a_source_that_is_no_generator(
    paired: Paired, tiny_parsed: ParsedDataset
) -> None:
    tables = {name: table.copy() for name, table in paired.tables().items()}
    tables["candidates"].loc[[0, 3], "source"] = "proposals"  # the old name of selective search
    with pytest.raises(ValidationError) as caught:
        check_paired(tables, tiny_parsed.images)
    message = str(caught.value)
    assert message.startswith("candidates: 1 expectation(s) failed")
    assert (
        "expect_column_values_to_be_in_set(column='source', "
        "value_set=['annotated']): 2 of 10 rows" in message
    )


# --- predictions ----------------------------------------------------------------------------


def predictions_of(paired: Paired) -> pd.DataFrame:
    pairs = paired.pairs
    return pairs.assign(score=pairs["iou"].astype(float), predicted=pairs["label"])


def test_check_predictions_passes_on_scored_pairs(paired: Paired) -> None:
    checks = validation.check_predictions(predictions_of(paired))
    assert all(check.success for check in checks)
    assert {check.table for check in checks} == {"predictions"}


def test_check_predictions_catches_a_score_above_one_and_a_missing_column(
    paired: Paired,
) -> None:
    predictions = predictions_of(paired)
    predictions.loc[5, "score"] = 1.25
    with pytest.raises(ValidationError, match=r"column='score'.*: 1 of 66 rows"):
        validation.check_predictions(predictions)
    with pytest.raises(ValidationError, match=r"expect_table_columns_to_match_set"):
        validation.check_predictions(predictions_of(paired).drop(columns="predicted"))


# --- split ----------------------------------------------------------------------------------


def test_check_split_passes_on_good_tables(split_tables: dict[str, pd.DataFrame]) -> None:
    checks = validation.check_split(split_tables, train_pos_share=0.5, natural_train_share=0.35)
    assert all(check.success for check in checks)
    assert {check.table for check in checks} == {
        "split_images",
        "train_pairs",
        "val_pairs",
        "test_pairs",
    }


def test_check_split_catches_an_image_in_two_splits(
    split_tables: dict[str, pd.DataFrame],
) -> None:
    tables = dict(split_tables)
    leaked = split_tables["val"].iloc[:2].assign(image_id="100")
    tables["test"] = pd.concat([split_tables["test"], leaked], ignore_index=True)
    with pytest.raises(ValidationError) as caught:
        validation.check_split(tables, train_pos_share=0.5, natural_train_share=0.35)
    message = str(caught.value)
    assert message.startswith("split_images: 1 expectation(s) failed")
    assert "expect_column_values_to_be_unique(column='image_id'): 2 of 4 rows" in message
    assert "100" in message


def test_check_split_catches_a_training_share_off_target(
    split_tables: dict[str, pd.DataFrame],
) -> None:
    tables = dict(split_tables)
    train = split_tables["train"]
    # drop 3 of the 13 positives: 10 / 23 = 0.43 instead of 0.5
    drop = train.index[train["label"] == 1][:3]
    tables["train"] = train.drop(drop).reset_index(drop=True)
    with pytest.raises(ValidationError) as caught:
        validation.check_split(tables, train_pos_share=0.5, natural_train_share=0.35)
    assert str(caught.value).startswith("train_pairs: 1 expectation(s) failed")
    assert "expect_column_mean_to_be_between(column='label', min_value=0.495" in str(caught.value)


def test_check_split_accepts_a_natural_share_above_target(
    split_tables: dict[str, pd.DataFrame],
) -> None:
    # oversampling never drops negatives: a train share of 0.5 passes a 0.3 target
    # when the natural share was 0.5 already, and fails it otherwise
    validation.check_split(split_tables, train_pos_share=0.3, natural_train_share=0.5)
    with pytest.raises(ValidationError, match="expect_column_mean_to_be_between"):
        validation.check_split(split_tables, train_pos_share=0.3, natural_train_share=0.3)


def test_checks_of_parts_combine_into_the_checks_of_the_whole(paired: Paired) -> None:
    pairs = paired.pairs
    whole = validation.check_pairs(pairs)
    images = pairs["image_id"].to_numpy()
    parts = [validation.check_pairs(pairs[images == image]) for image in pd.unique(images)]
    combined = validation.combine("pairs", parts)
    assert [(c.expectation, c.success, c.unexpected_count, c.element_count) for c in combined] == [
        (c.expectation, c.success, c.unexpected_count, c.element_count) for c in whole
    ]
