"""The report's metrics, curves, example choice and Markdown."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from grounding.evaluation import report
from grounding.schemas import PREDICTIONS


@pytest.fixture
def predictions() -> pd.DataFrame:
    # phrase 1 found (best region is the hit), phrase 2 missed, phrase 3 found
    pairs = pd.DataFrame(
        {
            "phrase_id": [1, 1, 2, 2, 3, 3],
            "region_id": [0, 1, 2, 3, 4, 5],
            "image_id": ["a", "a", "b", "b", "c", "c"],
            "iou": [1.0, 0.0, 0.0, 1.0, 0.2, 0.8],
            "label": [1, 0, 0, 1, 0, 1],
        }
    )
    return report.predictions_table(pairs, np.array([0.9, 0.2, 0.7, 0.4, 0.3, 0.6]), 0.5)


PHRASES = pd.DataFrame(
    {"phrase_id": [1, 2, 3], "types": ["people", "people/scene", "other"], "text": ["a", "b", "c"]}
)


def test_evaluate_by_hand(predictions: pd.DataFrame) -> None:
    metrics = report.evaluate(predictions, PHRASES, threshold=0.5)
    # predicted positive: 0.9 (tp), 0.7 (fp), 0.6 (tp); missed positive 0.4 (fn)
    assert metrics["precision"] == pytest.approx(2 / 3)
    assert metrics["recall"] == pytest.approx(2 / 3)
    assert metrics["recall_at_1"] == pytest.approx(2 / 3)
    assert metrics["recall_at_5"] == 1.0
    assert metrics["upper_bound"] == 1.0
    assert metrics["recall_at_1_by_type"] == {"other": 1.0, "people": 0.5, "scene": 0.0}
    assert metrics["confusion"] == {
        "true_positives": 2,
        "false_positives": 1,
        "false_negatives": 1,
        "true_negatives": 2,
    }
    assert report.confusion_counts(metrics).tolist() == [[2, 1], [1, 2]]
    # AUC: 9 positive/negative orderings... 3 positives x 3 negatives, 7 ranked right
    assert metrics["roc_auc"] == pytest.approx(7 / 9)


def test_predictions_table_marks_scores_at_the_threshold(predictions: pd.DataFrame) -> None:
    assert list(predictions.columns) == list(PREDICTIONS.columns)
    assert predictions["predicted"].tolist() == [1, 0, 1, 0, 0, 1]
    assert predictions["score"].dtype == np.float32
    at = report.predictions_table(predictions.iloc[:1], np.array([0.5]), 0.5)
    assert at["predicted"].tolist() == [1]  # score >= threshold


def test_headline_names_the_main_numbers(predictions: pd.DataFrame) -> None:
    line = report.headline(report.evaluate(predictions, PHRASES, threshold=0.5))
    assert line.startswith("recall_at_1 0.6667, recall_at_5 1.0000, upper_bound 1.0000")
    assert "roc_auc 0.7778" in line


def test_confusion_rows_and_pr_curve(predictions: pd.DataFrame) -> None:
    rows = report.confusion_rows(predictions)
    assert rows.value_counts().to_dict() == {
        ("match", "match"): 2,
        ("no match", "no match"): 2,
        ("match", "no match"): 1,
        ("no match", "match"): 1,
    }
    curve = report.pr_curve(predictions, max_points=3)
    assert list(curve.columns) == ["recall", "precision", "threshold"]
    assert len(curve) <= 3


def test_top_predictions_and_examples(predictions: pd.DataFrame) -> None:
    top = report.top_predictions(predictions)
    assert top.set_index("phrase_id")["region_id"].to_dict() == {1: 0, 2: 2, 3: 5}
    assert top.set_index("phrase_id")["found"].to_dict() == {1: True, 2: False, 3: True}
    chosen = report.choose_examples(top, per_kind=1, seed=0)
    assert chosen["found"].tolist() == [True, False]
    candidates = pd.DataFrame({"region_id": range(6), "x1": 0.0, "y1": 0.0, "x2": 5.0, "y2": 5.0})
    truth = pd.DataFrame({"phrase_id": [1, 2, 3], "x1": 1.0, "y1": 1.0, "x2": 4.0, "y2": 4.0})
    examples = report.gallery_examples(
        chosen, candidates, truth, PHRASES, lambda image_id: Image.new("RGB", (8, 8))
    )
    assert [example.found for example in examples] == [True, False]
    assert [example.phrase for example in examples] == [
        PHRASES.set_index("phrase_id").loc[i, "text"] for i in chosen["phrase_id"]
    ]
    first = examples[0]
    np.testing.assert_array_equal(first.truth, [[1.0, 1.0, 4.0, 4.0]])
    np.testing.assert_array_equal(first.predicted, [0.0, 0.0, 5.0, 5.0])
    assert first.score == pytest.approx(float(chosen["score"].iloc[0]))


def test_markdown_holds_the_numbers_and_figures(predictions: pd.DataFrame) -> None:
    metrics = report.evaluate(predictions, PHRASES, threshold=0.5)
    text = report.markdown(
        metrics, {"pair": {"pairs": 1234, "nested": {"x": 0.5}}}, [("gallery", "gallery.png")]
    )
    assert "| Recall@1 (phrases, IoU >= 0.5) | 0.6667 |" in text
    assert "| pairs | 1,234 |" in text
    assert "| nested.x | 0.5000 |" in text
    assert "![gallery](gallery.png)" in text
