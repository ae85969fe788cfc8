"""Table schemas and the features metadata: extension, round trip, missing keys named."""

from __future__ import annotations

import pytest

from grounding.errors import DataError
from grounding.schemas import (
    BOXES,
    CANDIDATES,
    IMAGES,
    PAIRS,
    PARSED,
    PREDICTIONS,
    FeaturesMeta,
    TableSchema,
)

META = FeaturesMeta(
    backbone="efficientnet-lite0",
    backbone_weights=None,
    text_encoder="all-minilm-l6-v2",
    image_size=448,
    context=True,
    region_dim=2 * 1280 + 7,
    phrase_dim=384,
    regions=11,
    phrases=30,
)


def test_predictions_extend_pairs_with_score_and_prediction() -> None:
    assert PREDICTIONS.name == "predictions"
    assert PREDICTIONS.columns == (
        "phrase_id",
        "region_id",
        "image_id",
        "iou",
        "label",
        "score",
        "predicted",
    )
    assert PREDICTIONS.key == PAIRS.key == ("phrase_id", "region_id")
    assert PAIRS.columns == PREDICTIONS.columns[:5]  # extended() does not change PAIRS


def test_extended_appends_columns_under_a_new_name() -> None:
    base = TableSchema("base", ("a", "b"), ("a",))
    assert base.extended("more", "c", "d") == TableSchema("more", ("a", "b", "c", "d"), ("a",))


def test_tables_with_boxes_hold_them_as_four_columns() -> None:
    assert BOXES.columns == ("image_id", "box_id", "x1", "y1", "x2", "y2")
    assert CANDIDATES.columns == ("region_id", "image_id", "x1", "y1", "x2", "y2", "source")
    assert IMAGES.columns == ("image_id", "file_name", "width", "height", "split", "has_file")


def test_parsed_tables_in_the_order_parse_writes_them() -> None:
    assert [schema.name for schema in PARSED] == [
        "images",
        "captions",
        "phrases",
        "boxes",
        "chain_boxes",
        "chains",
    ]


def test_features_meta_round_trips_through_a_dict() -> None:
    values = META.to_dict()
    assert values == {
        "backbone": "efficientnet-lite0",
        "backbone_weights": None,
        "text_encoder": "all-minilm-l6-v2",
        "image_size": 448,
        "context": True,
        "region_dim": 2567,
        "phrase_dim": 384,
        "regions": 11,
        "phrases": 30,
    }
    assert FeaturesMeta.from_dict(values) == META


def test_features_meta_lacking_keys_names_them() -> None:
    values = META.to_dict()
    del values["phrase_dim"], values["context"]
    with pytest.raises(DataError, match=r"lacks \['context', 'phrase_dim'\]: rerun the features"):
        FeaturesMeta.from_dict(values)
