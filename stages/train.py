"""train: fit the matching head on the balanced training pairs, watching validation."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

from grounding.config import load_params
from grounding.errors import run
from grounding.numerics import use_numerics

#: What the validation scores read of the validation pairs (not ``image_id``).
VAL_COLUMNS = ("phrase_id", "region_id", "iou", "label")
#: tqdm's default bar, the epochs done shown to a tenth (each step adds a fraction of one)
_BAR = "{l_bar}{bar}| {n:.1f}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file")
    parser.add_argument("--split", type=Path, required=True, help="folder of split's pairs")
    parser.add_argument("--features", type=Path, required=True, help="folder of the features")
    parser.add_argument("--model", type=Path, required=True, help="head weights to write")
    parser.add_argument("--summary", type=Path, required=True, help="last epoch (JSON)")
    parser.add_argument("--history", type=Path, required=True, help="per-epoch metrics (CSV)")
    parser.add_argument("--plot", type=Path, required=True, help="training curves (PNG)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    all_params = load_params(args.params)
    use_numerics(all_params.runtime.numerics)
    params = all_params.train
    # imported once the params are known good (a typo such as `-S +train.pos_wieght=3` fails in
    # about a second, not after torch and matplotlib have loaded) and the numerics fixed (torch
    # loads with these imports)
    from tqdm import tqdm

    from grounding import io
    from grounding.evaluation import plots
    from grounding.modeling.device import gpu_memory_hint, use_runtime
    from grounding.modeling.scoring import PairFeatures, TrainedHead
    from grounding.modeling.train import TrainingPairs, train_head

    device = use_runtime(all_params.runtime, small_tensors=True)
    stored = io.read_features(args.features)
    features, meta = PairFeatures.stored(stored), stored.meta
    # the training pairs counted image by image, and only the columns scoring needs of the
    # validation pairs: memory bounded by the distinct pairs, never by the pandas table
    train_pairs = TrainingPairs.from_parts(
        features,
        io.read_image_parts(
            args.split / "train.parquet", ["phrase_id", "region_id", "image_id", "label"]
        ),
    )
    val_pairs = io.read_table(args.split / "val.parquet", VAL_COLUMNS)
    advice = f"lower train.batch_size (now {params.batch_size}) or set runtime.device: cpu"
    with (
        tqdm(total=params.epochs, desc="train", unit="epoch", bar_format=_BAR) as bar,
        gpu_memory_hint(device, advice),
    ):

        def step(steps: int) -> None:  # a step is 1/steps of an epoch
            bar.update(1 / steps)

        def show(row: dict[str, float]) -> None:
            bar.n = row["epoch"]  # whole again, whatever the float sum of the steps
            bar.set_postfix(loss=f"{row['train_loss']:.3f}", val_r1=f"{row['val_recall_at_1']:.3f}")
            bar.refresh()

        result = train_head(
            features,
            train_pairs,
            val_pairs,
            **asdict(params),
            heads=all_params.heads,
            on_epoch=show,
            on_step=step,
            device=device,
        )
    io.write_weights(*TrainedHead(result.model, meta).to_weights(), args.model)
    io.write_csv(result.history, args.history)
    io.write_json(result.history.iloc[-1].to_dict(), args.summary)
    io.write_png(plots.training_curves(result.history), args.plot)


if __name__ == "__main__":
    run(main)
