"""sweep: choose the decision threshold that maximises F1 on the validation pairs, and bundle
the head, its threshold, the candidate generator and what it was trained on (the dataset's name,
format and number of images) into the grounder `grounding predict` loads."""

from __future__ import annotations

import argparse
from pathlib import Path

from grounding import candidates, io
from grounding.config import load_params
from grounding.data.sample import is_sample_root
from grounding.errors import run
from grounding.evaluation import plots
from grounding.evaluation.metrics import best_threshold, pair_scores, thin, threshold_sweep
from grounding.inference.grounder import TrainedOn, grounder_weights
from grounding.modeling.device import use_runtime
from grounding.numerics import use_numerics
from grounding.schemas import SPLITS

PLOT_POINTS = 400


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file")
    parser.add_argument("--split", type=Path, required=True, help="folder of split's pairs")
    parser.add_argument("--features", type=Path, required=True, help="folder of the features")
    parser.add_argument("--model", type=Path, required=True, help="head weights")
    parser.add_argument("--summary", type=Path, required=True, help="chosen threshold (JSON)")
    parser.add_argument("--curve", type=Path, required=True, help="sweep curve (CSV)")
    parser.add_argument("--plot", type=Path, required=True, help="sweep curve (PNG)")
    parser.add_argument(
        "--grounder", type=Path, required=True, help="the whole grounder for `grounding predict`"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    params = load_params(args.params)
    use_numerics(params.runtime.numerics)
    # torch loads with these imports: after the numerics are fixed
    from grounding.modeling.scoring import TrainedHead

    device = use_runtime(params.runtime)
    trained = TrainedHead.from_weights(*io.read_weights(args.model)).to(device)
    pairs = io.read_table(args.split / "val.parquet", ["phrase_id", "region_id", "label"])
    scores = trained.score(io.read_features(args.features), pairs)
    sweep = threshold_sweep(pairs["label"].to_numpy(), scores)
    threshold = best_threshold(sweep)
    best = pair_scores(pairs["label"].to_numpy(), scores, threshold)
    summary = {
        "threshold": threshold,
        "val_f1": best.f1,
        "val_precision": best.precision,
        "val_recall": best.recall,
    }
    proposer = candidates.proposer_for_new_images(params.pair.candidates)
    images = {
        image_id
        for name in SPLITS
        for image_id in io.read_table(args.split / f"{name}.parquet", ["image_id"])["image_id"]
    }
    trained_on = TrainedOn(
        name=params.data.root.resolve().name,
        format=params.data.format,
        images=len(images),
        synthetic=is_sample_root(params.data.root),
    )
    grounder = grounder_weights(
        trained,
        threshold=threshold,
        candidates=proposer,
        settings=candidates.settings_of(proposer, params.candidates),
        trained_on=trained_on,
    )
    io.write_weights(*grounder, args.grounder)
    io.write_json(summary, args.summary)
    io.write_csv(thin(sweep, PLOT_POINTS), args.curve)
    io.write_png(plots.threshold_sweep(sweep, threshold), args.plot)
    print(", ".join(f"{name} {value:.4f}" for name, value in summary.items()))


if __name__ == "__main__":
    run(main)
