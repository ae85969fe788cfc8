"""report: score the test pairs and summarise them as metrics, curves and examples."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
from PIL import Image
from sklearn.metrics import precision_recall_curve, roc_auc_score

from grounding.boxes import BOX_COLUMNS
from grounding.config import flatten
from grounding.evaluation.metrics import (
    pair_scores,
    phrase_ranks,
    recall_at_1_by_type,
    recall_summary,
    thin,
)
from grounding.evaluation.plots import Example
from grounding.schemas import PREDICTIONS

RECALL_KS: tuple[int, ...] = (1, 5, 10)
#: The metrics that answer "which experiment is best", in the order ``dvc exp show`` shows
#: them: ``reports/metrics.json``. ANY-box Recall@k (``recall_at_k``) is the headline, the
#: MERGED-box figures (``merged_*``) follow; the rest of :func:`evaluate` is the details file.
HEADLINE: tuple[str, ...] = (
    "f1",
    "recall_at_1",
    "recall_at_5",
    "recall_at_10",
    "upper_bound",
    "roc_auc",
    "threshold",
    "merged_recall_at_1",
    "merged_recall_at_5",
    "merged_recall_at_10",
    "merged_upper_bound",
)


def predictions_table(pairs: pd.DataFrame, scores: np.ndarray, threshold: float) -> pd.DataFrame:
    """The pairs with their ``score`` and ``predicted`` label (``score >= threshold``)."""
    return pairs.assign(
        score=np.asarray(scores, dtype=np.float32),
        predicted=(np.asarray(scores) >= threshold).astype(np.int8),
    )[list(PREDICTIONS.columns)]


def evaluate(
    predictions: pd.DataFrame,
    phrases: pd.DataFrame,
    *,
    threshold: float,
    merged_iou: np.ndarray | None = None,
) -> dict:
    """The test metrics.

    Pair metrics at ``threshold`` (precision, recall, f1, roc_auc), phrase metrics
    (``recall_at_k``, ``upper_bound``: ANY-box), with ``merged_iou (N,)`` (each pair's IoU with
    the union of its phrase's boxes, :func:`~grounding.evaluation.metrics.merged_iou`) the
    same as ``merged_recall_at_k`` and ``merged_upper_bound``, Recall@1 per entity type (only
    when the phrases have types), and the counts behind them.
    """
    labels = predictions["label"].to_numpy()
    scores = predictions["score"].to_numpy()
    at_threshold = pair_scores(labels, scores, threshold)
    ranks = phrase_ranks(predictions, scores)
    both_classes = 0 < labels.sum() < len(labels)
    by_type = recall_at_1_by_type(ranks, phrases)
    return {
        "precision": at_threshold.precision,
        "recall": at_threshold.recall,
        "f1": at_threshold.f1,
        "roc_auc": float(roc_auc_score(labels, scores)) if both_classes else float("nan"),
        "threshold": threshold,
        **recall_summary(ranks, RECALL_KS),
        **_merged(predictions, scores, merged_iou),
        **({"recall_at_1_by_type": by_type} if by_type else {}),
        "pairs": len(predictions),
        "confusion": {
            "true_positives": at_threshold.true_positives,
            "false_positives": at_threshold.false_positives,
            "false_negatives": at_threshold.false_negatives,
            "true_negatives": at_threshold.true_negatives,
        },
    }


def _merged(
    predictions: pd.DataFrame, scores: np.ndarray, merged_iou: np.ndarray | None
) -> dict[str, float]:
    if merged_iou is None:
        return {}
    summary = recall_summary(phrase_ranks(predictions, scores, merged_iou), RECALL_KS)
    return {f"merged_{name}": value for name, value in summary.items() if name != "phrases"}


def headline_and_details(metrics: Mapping) -> tuple[dict, dict]:
    """:func:`evaluate`'s output split into the :data:`HEADLINE` metrics (in that order) and
    everything else."""
    headline = {name: metrics[name] for name in HEADLINE if name in metrics}
    return headline, {name: value for name, value in metrics.items() if name not in headline}


def confusion_counts(metrics: Mapping) -> np.ndarray:
    """``counts[actual, predicted]`` (0 = no match, 1 = match) from :func:`evaluate`'s output."""
    c = metrics["confusion"]
    return np.array(
        [
            [c["true_negatives"], c["false_positives"]],
            [c["false_negatives"], c["true_positives"]],
        ]
    )


def confusion_rows(predictions: pd.DataFrame) -> pd.DataFrame:
    """One ``actual, predicted`` row per pair, as DVC's confusion template reads them."""
    names = np.array(["no match", "match"])
    return pd.DataFrame(
        {
            "actual": names[predictions["label"].to_numpy()],
            "predicted": names[predictions["predicted"].to_numpy()],
        }
    )


def pr_curve(predictions: pd.DataFrame, max_points: int = 300) -> pd.DataFrame:
    """``recall, precision, threshold`` along the precision-recall curve, thinned to at most
    ``max_points`` rows (a plot file, not a table of every pair)."""
    precision, recall, thresholds = precision_recall_curve(
        predictions["label"].to_numpy(), predictions["score"].to_numpy()
    )
    curve = pd.DataFrame(
        {"recall": recall[:-1], "precision": precision[:-1], "threshold": thresholds}
    )
    return thin(curve, max_points)


def top_predictions(predictions: pd.DataFrame) -> pd.DataFrame:
    """Each phrase's best-scored region: ``phrase_id, region_id, image_id, score, found``."""
    best = predictions.sort_values(["phrase_id", "score"], ascending=[True, False])
    best = best.drop_duplicates("phrase_id")
    ranks = phrase_ranks(predictions, predictions["score"].to_numpy()).set_index("phrase_id")
    return best.assign(found=best["phrase_id"].map(ranks["hit_rank"]).eq(1).to_numpy())[
        ["phrase_id", "region_id", "image_id", "score", "found"]
    ].reset_index(drop=True)


def choose_examples(top: pd.DataFrame, *, per_kind: int, seed: int) -> pd.DataFrame:
    """A seeded draw of ``per_kind`` found then ``per_kind`` missed phrases, one per image."""
    rng = np.random.default_rng(seed)

    def draw(rows: pd.DataFrame) -> pd.DataFrame:
        rows = rows.iloc[rng.permutation(len(rows))].drop_duplicates("image_id")
        return rows.head(per_kind)

    return pd.concat([draw(top[top["found"]]), draw(top[~top["found"]])], ignore_index=True)


def headline(metrics: Mapping) -> str:
    """One line of the main test numbers."""
    names = ("recall_at_1", "recall_at_5", "upper_bound", "precision", "recall", "f1", "roc_auc")
    return ", ".join(f"{name} {metrics[name]:.4f}" for name in names)


def markdown(
    metrics: Mapping,
    summaries: Mapping[str, Mapping],
    figures: Sequence[tuple[str, str]],
) -> str:
    """``reports/report.md``: headline metrics, the data behind them and the figures.

    ``summaries`` maps a stage name to its summary JSON; ``figures`` lists ``(title, path)``
    with paths relative to the report.
    """
    headline = [
        ("Recall@1 (phrases, IoU >= 0.5)", metrics["recall_at_1"]),
        ("Recall@5", metrics["recall_at_5"]),
        ("Recall@10", metrics["recall_at_10"]),
        ("Upper bound (some candidate has IoU >= 0.5)", metrics["upper_bound"]),
        *(
            (f"MERGED-box {label}", metrics[name])
            for label, name in (
                ("Recall@1", "merged_recall_at_1"),
                ("Recall@5", "merged_recall_at_5"),
                ("Recall@10", "merged_recall_at_10"),
                ("upper bound", "merged_upper_bound"),
            )
            if name in metrics
        ),
        ("Pair precision", metrics["precision"]),
        ("Pair recall", metrics["recall"]),
        ("Pair F1", metrics["f1"]),
        ("ROC AUC", metrics["roc_auc"]),
        ("Threshold (swept on validation)", metrics["threshold"]),
    ]
    lines = [
        "# Phrase grounding report",
        "",
        "Test split. A phrase is found when its top-scored candidate region has IoU >= 0.5 with",
        "one of its ground-truth boxes (ANY-box), or with their union (MERGED-box); pair metrics",
        "classify every (phrase, region) pair at the threshold chosen on validation.",
        "",
        "| metric | value |",
        "|---|---|",
        *(f"| {name} | {value:.4f} |" for name, value in headline),
        f"| Test phrases / pairs | {metrics['phrases']:,} / {metrics['pairs']:,} |",
        "",
    ]
    if "recall_at_1_by_type" in metrics:  # only data with entity types (or categories)
        lines += [
            "## Recall@1 by entity type",
            "",
            "| type | Recall@1 |",
            "|---|---|",
            *(
                f"| {name} | {value:.4f} |"
                for name, value in metrics["recall_at_1_by_type"].items()
            ),
            "",
        ]
    lines += ["## Data", ""]
    for stage, summary in summaries.items():
        lines += [f"### {stage}", "", "| count | value |", "|---|---|"]
        lines += [
            f"| {name} | {_cell(value)} |"
            for name, value in flatten(summary).items()
            if not isinstance(value, list)
        ]
        lines.append("")
    lines += ["## Figures", ""]
    lines += [f"### {title}\n\n![{title}]({path})\n" for title, path in figures]
    return "\n".join(lines)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def gallery_examples(
    chosen: pd.DataFrame,
    candidates: pd.DataFrame,
    ground_truth: pd.DataFrame,
    phrases: pd.DataFrame,
    load_image: Callable[[str], Image.Image],
) -> list[Example]:
    """The drawable :class:`~grounding.plots.Example` of each chosen top prediction.

    ``chosen`` rows come from :func:`top_predictions`; ``load_image(image_id)`` gives the image.
    """
    boxes = candidates.set_index("region_id")[BOX_COLUMNS]
    text = phrases.set_index("phrase_id")["text"]
    chosen_truth = ground_truth[ground_truth["phrase_id"].isin(chosen["phrase_id"])]
    truth_of = {
        phrase_id: group[BOX_COLUMNS].to_numpy()
        for phrase_id, group in chosen_truth.groupby("phrase_id")
    }
    return [
        Example(
            image=load_image(row.image_id),
            phrase=str(text[row.phrase_id]),
            truth=truth_of[row.phrase_id],
            predicted=boxes.loc[row.region_id].to_numpy(),
            score=float(row.score),
            found=bool(row.found),
        )
        for row in chosen.itertuples()
    ]
