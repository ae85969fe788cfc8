"""report: score the test split; write metrics, plots, a gallery and report.md; log to MLflow."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from grounding import io, tracking, validation
from grounding.config import flatten, load_params, params_as_dict, repo_root, tracking_uri
from grounding.errors import DataError, redact, run
from grounding.evaluation import plots, report
from grounding.evaluation.metrics import merged_iou
from grounding.modeling.device import use_runtime
from grounding.numerics import use_numerics
from grounding.schemas import SPLITS


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    arg = parser.add_argument
    arg("--params", type=Path, default=Path("params.yaml"), help="params file")
    arg("--parsed", type=Path, required=True, help="folder of parse's tables")
    arg("--pairs", type=Path, required=True, help="folder of pair's tables")
    arg("--split", type=Path, required=True, help="folder of split's pairs")
    arg("--features", type=Path, required=True, help="folder of the features")
    arg("--model", type=Path, required=True, help="head weights")
    arg("--grounder", type=Path, required=True, help="grounder bundle, logged as a pyfunc model")
    arg("--sweep", type=Path, required=True, help="sweep's summary, with the threshold (JSON)")
    arg("--history", type=Path, required=True, help="train's per-epoch metrics (CSV)")
    arg("--summaries", type=Path, nargs="+", required=True, help="stage summaries (JSON)")
    arg("--figures", type=Path, nargs="+", default=[], help="earlier stages' PNGs to include")
    arg("--metrics", type=Path, required=True, help="headline test metrics to write (JSON)")
    arg("--details", type=Path, required=True, help="the other test metrics to write (JSON)")
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
    use_numerics(params.runtime.numerics)
    # torch loads with these imports: after the numerics are fixed
    from grounding.modeling.scoring import TrainedHead

    device = use_runtime(params.runtime)
    trained = TrainedHead.from_weights(*io.read_weights(args.model)).to(device)
    pairs = io.read_table(args.split / "test.parquet")
    tables = io.read_tables(args.pairs, ("candidates", "phrases", "ground_truth"))
    images = io.read_table(args.parsed / "images.parquet")
    sweep = io.read_json(args.sweep)
    threshold = sweep["threshold"]

    scores = trained.score(io.read_features(args.features), pairs)
    predictions = report.predictions_table(pairs, scores, threshold)
    checks = validation.check_predictions(predictions)
    merged = merged_iou(predictions, tables["candidates"], tables["ground_truth"])
    metrics = report.evaluate(
        predictions, tables["phrases"], threshold=threshold, merged_iou=merged
    )
    headline, details = report.headline_and_details(metrics)
    curve = report.pr_curve(predictions)
    chosen = report.choose_examples(
        report.top_predictions(predictions),
        per_kind=params.report.gallery_examples,
        seed=params.report.seed,
    )
    examples = report.gallery_examples(
        chosen, **tables, load_image=io.ImageFolder(params.data.images_dir, images)
    )

    confusion_png, pr_png = args.confusion.with_suffix(".png"), args.pr_curve.with_suffix(".png")
    io.write_table(predictions, args.predictions)
    io.write_json(headline, args.metrics)
    io.write_json(details, args.details)
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
        from mlflow.exceptions import MlflowException

        root = repo_root()
        uri = tracking_uri(root)
        try:
            run_id, version, champion = tracking.log_pipeline_run(
                uri=uri,
                artifacts_at=tracking.artifact_location(root),
                params=flatten(params_as_dict(params)),
                history=io.read_csv(args.history),
                metrics=headline,  # the rest (confusion counts, per type) is test.json
                validation_f1=sweep["val_f1"],
                head=args.model,
                grounder=args.grounder,
                artifacts=[args.report, args.metrics, args.details, *figures],
                datasets=tracking.split_inputs(
                    f"{params.data.format}:{params.data.root.name}",
                    params.data.root.resolve(),
                    {split: args.split / f"{split}.parquet" for split in SPLITS},
                ),
                tags=tracking.run_tags(root),
                started_at=tracking.pipeline_started_at(),
            )
        except MlflowException as error:  # an unreachable server, refused credentials
            raise DataError(f"cannot log the run to MLflow at {redact(uri)}: {error}") from None
        registered = f"models:/{tracking.REGISTERED_MODEL}/{version}"
        crowned = f" (now @{tracking.CHAMPION}: best validation F1)" if champion else ""
        shown = redact(uri)
        print(f"MLflow run {run_id} in {shown}; grounder registered as {registered}{crowned}")
        if uri.startswith(("http://", "https://")):
            print(f"compare the runs: {tracking.runs_page(uri)}")
        else:
            page = tracking.runs_page(uri)
            print(f"compare the runs: mlflow ui --backend-store-uri {shown}, then {page}")


if __name__ == "__main__":
    run(main)
