"""The pipeline's figures: what each draws, read back from the matplotlib objects."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from PIL import Image

from grounding.evaluation import plots
from grounding.evaluation.plots import PREDICTION_COLOUR, TRUTH_COLOUR, Example, box_patch


def labels(figure: Figure) -> list[list[str]]:
    return [[line.get_label() for line in axes.get_lines()] for axes in figure.axes]


def test_box_patch_spans_the_box() -> None:
    patch = box_patch(np.array([10, 20, 50, 80]), "#123456", linestyle="--")
    assert patch.get_xy() == (10.0, 20.0)
    assert (patch.get_width(), patch.get_height()) == (40.0, 60.0)
    assert not patch.get_fill() and patch.get_linestyle() == "--"


def test_training_curves_show_loss_and_accuracy_per_epoch() -> None:
    history = pd.DataFrame(
        {
            "epoch": [1, 2, 3],
            "train_loss": [0.9, 0.5, 0.3],
            "val_loss": [1.0, 0.7, 0.6],
            "train_accuracy": [0.5, 0.7, 0.8],
            "val_accuracy": [0.4, 0.6, 0.7],
            "val_recall_at_1": [0.3, 0.5, 0.6],
        }
    )
    figure = plots.training_curves(history)
    assert labels(figure) == [
        ["train (all terms)", "validation (weighted BCE)"],
        ["train accuracy", "validation accuracy", "validation Recall@1"],
    ]
    np.testing.assert_array_equal(figure.axes[1].get_lines()[2].get_ydata(), [0.3, 0.5, 0.6])


def test_threshold_sweep_marks_the_chosen_threshold() -> None:
    sweep = pd.DataFrame(
        {"threshold": [0.2, 0.6], "precision": [0.5, 1.0], "recall": [1.0, 0.5], "f1": [0.6, 0.6]}
    )
    figure = plots.threshold_sweep(sweep, 0.6)
    [axes] = figure.axes
    assert labels(figure) == [["precision", "recall", "f1", "chosen 0.600"]]
    assert list(axes.get_lines()[-1].get_xdata()) == [0.6, 0.6]


def test_precision_recall_marks_the_operating_point() -> None:
    curve = pd.DataFrame({"recall": [0.0, 0.5, 1.0], "precision": [1.0, 0.8, 0.5]})
    figure = plots.precision_recall(curve, (0.5, 0.8))
    point = figure.axes[0].get_lines()[1]
    assert point.get_label() == "swept threshold"
    assert (list(point.get_xdata()), list(point.get_ydata())) == ([0.5], [0.8])


def test_confusion_matrix_shows_counts_and_row_shares() -> None:
    figure = plots.confusion_matrix(np.array([[2, 1], [1, 3]]))
    texts = [text.get_text() for text in figure.axes[0].texts]
    assert texts == ["2\n66.7%", "1\n33.3%", "1\n25.0%", "3\n75.0%"]


def test_gallery_draws_truth_and_prediction_of_each_example() -> None:
    examples = [
        Example(
            Image.new("RGB", (8, 8)),
            "a dog",
            np.array([[1, 1, 4, 4], [2, 2, 6, 6]]),
            np.array([0, 0, 5, 5]),
            0.9,
            True,
        ),
        Example(
            Image.new("RGB", (8, 8)),
            "a cat",
            np.array([[1, 1, 4, 4]]),
            np.array([3, 3, 7, 7]),
            0.25,
            False,
        ),
    ]
    figure = plots.gallery(examples, columns=4, title="test")
    assert len(figure.axes) == 4  # one row of four; two stay empty
    first, second = figure.axes[:2]
    assert first.get_title() == '"a dog"\nfound, score 0.90'
    assert second.get_title() == '"a cat"\nmissed, score 0.25'
    colours = [patch.get_edgecolor() for patch in first.patches]
    assert len(colours) == 3  # two truths, one prediction
    assert colours == [to_rgba(TRUTH_COLOUR)] * 2 + [to_rgba(PREDICTION_COLOUR)]
    assert len(figure.axes[2].patches) == len(figure.axes[3].patches) == 0


@pytest.mark.parametrize("count, rows", [(0, 1), (4, 1), (5, 2)])
def test_gallery_has_enough_rows(count: int, rows: int) -> None:
    example = Example(Image.new("RGB", (8, 8)), "x", np.zeros((0, 4)), np.zeros(4), 0.5, True)
    assert len(plots.gallery([example] * count, columns=4).axes) == 4 * rows
