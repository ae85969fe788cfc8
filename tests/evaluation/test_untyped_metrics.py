"""Data without entity types (ODVG grounding, MDETR): the by-type metrics are absent, the rest is
unchanged; data that mixes typed and untyped phrases reports the typed ones."""

from __future__ import annotations

import numpy as np
import pandas as pd

from grounding.evaluation import report
from grounding.evaluation.metrics import phrase_ranks, recall_at_1_by_type

PAIRS = pd.DataFrame(
    {
        "phrase_id": [1, 1, 2, 2],
        "region_id": [0, 1, 2, 3],
        "image_id": ["a", "a", "b", "b"],
        "iou": [1.0, 0.0, 0.0, 1.0],
        "label": [1, 0, 0, 1],
    }
)
SCORES = np.array([0.9, 0.2, 0.7, 0.4])  # phrase 1 found, phrase 2 missed


def phrases(types: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"phrase_id": [1, 2], "types": types, "text": ["a dog", "a cat"]})


def test_phrases_without_types_count_for_no_type() -> None:
    ranks = phrase_ranks(PAIRS, SCORES)
    assert recall_at_1_by_type(ranks, phrases(["", ""])) == {}
    assert recall_at_1_by_type(ranks, phrases(["", "dog"])) == {"dog": 0.0}
    assert recall_at_1_by_type(ranks, phrases(["person", "dog"])) == {"person": 1.0, "dog": 0.0}


def test_untyped_data_has_no_by_type_metrics_and_the_same_others() -> None:
    predictions = report.predictions_table(PAIRS, SCORES, 0.5)
    untyped = report.evaluate(predictions, phrases(["", ""]), threshold=0.5)
    typed = report.evaluate(predictions, phrases(["people", "animals"]), threshold=0.5)
    assert "recall_at_1_by_type" not in untyped
    assert typed["recall_at_1_by_type"] == {"animals": 0.0, "people": 1.0}
    assert untyped == {k: v for k, v in typed.items() if k != "recall_at_1_by_type"}
    assert list(untyped) == [k for k in typed if k != "recall_at_1_by_type"]  # same order

    markdown = report.markdown(untyped, {"parse": {"images": 2}}, [])
    assert "by entity type" not in markdown
    assert "| Recall@1 (phrases, IoU >= 0.5) | 0.5000 |" in markdown
    assert "### parse" in markdown
    assert "## Recall@1 by entity type" in report.markdown(typed, {}, [])
