"""report: score the test split; write metrics, plots, a gallery and report.md; log to MLflow."""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict
from functools import partial
from pathlib import Path

from grounding import io, plots, report, tracking, validation
from grounding.config import flatten, load_params
from grounding.errors import run
from grounding.model import PairFeatures, check_trained_on, head_from_state, score_pairs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    arg = parser.add_argument
    arg("--params", type=Path, default=Path("params.yaml"), help="params file")
    arg("--pairs", type=Path, required=True, help="folder of pair's tables")
    arg("--split", type=Path, required=True, help="folder of split's pairs")
    arg("--features", type=Path, required=True, help="folder of the features")
    arg("--model", type=Path, required=True, help="model checkpoint")
    arg("--grounder", type=Path, required=True, help="grounder bundle, logged as a pyfunc model")
    arg("--sweep", type=Path, required=True, help="sweep's summary, with the threshold (JSON)")
    arg("--history", type=Path, required=True, help="train's per-epoch metrics (CSV)")
    arg("--summaries", type=Path, nargs="+", required=True, help="stage summaries (JSON)")
    arg("--figures", type=Path, nargs="+", default=[], help="earlier stages' PNGs to include")
    arg("--metrics", type=Path, required=True, help="test metrics to write (JSON)")
    arg("--predictions", type=Path, required=True, help="scored test pairs to write")
    arg("--confusion", type=Path, required=True, help="confusion rows (CSV) + PNG beside")
    arg("--pr-curve", type=Path, required=True, help="precision-recall curve (CSV) + PNG beside")
    arg("--gallery", type=Path, required=True, help="found and missed test phrases (PNG)")
    arg("--report", type=Path, required=True, help="report (Markdown)")
    arg("--validation", type=Path, required=True, help="checks run (JSON)")
    arg("--no-mlflow", action="store_true", help="do not log the run to MLflow")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    params = load_params(args.params)
    checkpoint = io.read_checkpoint(args.model)
    *arrays, features_meta = io.read_features(args.features)
    check_trained_on(checkpoint, features_meta)
    model = head_from_state(checkpoint)
    pairs = io.read_table(args.split / "test.parquet")
    tables = io.read_tables(args.pairs, ("candidates", "phrases", "ground_truth"))
    threshold = io.read_json(args.sweep)["threshold"]

    scores = score_pairs(model, PairFeatures.from_arrays(*arrays), pairs)
    predictions = report.predictions_table(pairs, scores, threshold)
    checks = validation.check_predictions(predictions)
    metrics = report.evaluate(predictions, tables["phrases"], threshold=threshold)
    curve = report.pr_curve(predictions)
    chosen = report.choose_examples(
        report.top_predictions(predictions),
        per_kind=params.report.gallery_examples,
        seed=params.report.seed,
    )
    examples = report.gallery_examples(
        chosen, **tables, load_image=partial(io.load_image, params.data.images_dir)
    )

    confusion_png, pr_png = args.confusion.with_suffix(".png"), args.pr_curve.with_suffix(".png")
    io.write_table(predictions, args.predictions)
    io.write_json(metrics, args.metrics)
    io.write_csv(report.confusion_rows(predictions), args.confusion)
    io.write_csv(curve, args.pr_curve)
    io.write_png(plots.confusion_matrix(report.confusion_counts(metrics)), confusion_png)
    io.write_png(plots.precision_recall(curve, (metrics["recall"], metrics["precision"])), pr_png)
    io.write_png(plots.gallery(examples, title="Test phrases, found then missed"), args.gallery)
    figures = [*args.figures, confusion_png, pr_png, args.gallery]
    summaries = {path.stem: io.read_json(path) for path in args.summaries}
    links = [(path.stem, os.path.relpath(path, args.report.parent)) for path in figures]
    io.write_text(report.markdown(metrics, summaries, links), args.report)
    io.write_json(validation.report(checks), args.validation)
    print(report.headline(metrics))

    if not args.no_mlflow:
        root = tracking.repo_root()
        run_id, version = tracking.log_pipeline_run(
            uri=tracking.tracking_uri(root),
            artifacts_at=tracking.artifact_location(root),
            params=flatten(asdict(params)),
            history=io.read_csv(args.history),
            metrics=metrics,
            model=model,
            grounder=args.grounder,
            artifacts=[args.report, args.metrics, *figures],
            tags=tracking.run_tags(root),
        )
        print(f"MLflow run {run_id} in {tracking.tracking_uri(root)}")
        print(f"grounder registered as models:/{tracking.REGISTERED_MODEL}/{version}")


if __name__ == "__main__":
    run(main)
