"""Figures of the pipeline as matplotlib ``Figure`` objects (no pyplot, no global backend).

The caller saves them (``figure.savefig(path, format="png")``); PNGs render anywhere,
offline, unlike DVC's HTML plots.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

TRUTH_COLOUR = "#2ca02c"
PREDICTION_COLOUR = "#d62728"


def training_curves(history: pd.DataFrame) -> Figure:
    """Loss and accuracy per epoch, train beside validation (``train.history``'s columns)."""
    figure = Figure(figsize=(9, 3.5), layout="constrained")
    loss, accuracy = figure.subplots(1, 2)
    loss.plot(history["epoch"], history["train_loss"], label="train (all terms)")
    loss.plot(history["epoch"], history["val_loss"], label="validation (weighted BCE)")
    loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    accuracy.plot(history["epoch"], history["train_accuracy"], label="train accuracy")
    accuracy.plot(history["epoch"], history["val_accuracy"], label="validation accuracy")
    accuracy.plot(history["epoch"], history["val_recall_at_1"], label="validation Recall@1")
    accuracy.set(xlabel="epoch", ylim=(0, 1.02), title="Accuracy and Recall@1")
    for axes in (loss, accuracy):
        axes.legend()
        axes.grid(alpha=0.3)
    return figure


def threshold_sweep(sweep: pd.DataFrame, chosen: float) -> Figure:
    """Precision, recall and F1 against the threshold, with the chosen threshold marked."""
    figure = Figure(figsize=(6, 4), layout="constrained")
    axes = figure.subplots()
    for column in ("precision", "recall", "f1"):
        axes.plot(sweep["threshold"], sweep[column], label=column)
    axes.axvline(chosen, color="grey", linestyle="--", label=f"chosen {chosen:.3f}")
    axes.set(xlabel="threshold", ylim=(0, 1.02), title="Threshold sweep (validation)")
    axes.legend()
    axes.grid(alpha=0.3)
    return figure


def precision_recall(curve: pd.DataFrame, chosen: tuple[float, float]) -> Figure:
    """The precision-recall curve with the operating point ``(recall, precision)`` marked."""
    figure = Figure(figsize=(5, 4.5), layout="constrained")
    axes = figure.subplots()
    axes.plot(curve["recall"], curve["precision"])
    axes.plot(*chosen, "o", color=PREDICTION_COLOUR, label="swept threshold")
    axes.set(xlabel="recall", ylabel="precision", xlim=(0, 1.02), ylim=(0, 1.02))
    axes.set_title("Precision-recall (test pairs)")
    axes.legend()
    axes.grid(alpha=0.3)
    return figure


def confusion_matrix(counts: np.ndarray) -> Figure:
    """A 2x2 confusion matrix ``counts[actual, predicted]`` with counts and row shares."""
    figure = Figure(figsize=(4.5, 4), layout="constrained")
    axes = figure.subplots()
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for actual in range(2):
        for predicted in range(2):
            colour = "white" if shares[actual, predicted] > 0.5 else "black"
            axes.text(
                predicted,
                actual,
                f"{counts[actual, predicted]:,}\n{shares[actual, predicted]:.1%}",
                ha="center",
                va="center",
                color=colour,
            )
    axes.set_xticks([0, 1], ["no match", "match"])
    axes.set_yticks([0, 1], ["no match", "match"])
    axes.set(xlabel="predicted", ylabel="actual", title="Confusion matrix (test pairs)")
    return figure


@dataclass(frozen=True)
class Example:
    """One phrase to draw: its image, ground-truth boxes, predicted box and whether it hit."""

    image: Image.Image
    phrase: str
    truth: np.ndarray  # (G, 4)
    predicted: np.ndarray  # (4,)
    score: float
    found: bool


def gallery(examples: Sequence[Example], columns: int = 4, title: str = "") -> Figure:
    """A grid of examples: ground truth in green, the top-scored region in red."""
    rows = max(int(np.ceil(len(examples) / columns)), 1)
    figure = Figure(figsize=(3.2 * columns, 3.4 * rows), layout="constrained")
    grid = np.atleast_2d(figure.subplots(rows, columns, squeeze=False))
    for axes, example in zip(grid.flat, examples, strict=False):
        axes.imshow(example.image)
        for box in example.truth:
            axes.add_patch(box_patch(box, TRUTH_COLOUR, linestyle="-"))
        axes.add_patch(box_patch(example.predicted, PREDICTION_COLOUR, linestyle="--"))
        mark = "found" if example.found else "missed"
        caption = textwrap.fill(f'"{example.phrase}"', 34)
        axes.set_title(f"{caption}\n{mark}, score {example.score:.2f}", fontsize=8)
    for axes in grid.flat:
        axes.axis("off")
    if title:
        figure.suptitle(f"{title}  (green: ground truth, red dashed: prediction)")
    return figure


def box_patch(box: np.ndarray, colour: str, linestyle: str) -> Rectangle:
    """An unfilled rectangle on ``box (4,)`` ``(x1, y1, x2, y2)``."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return Rectangle(
        (x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, linewidth=2, linestyle=linestyle
    )
