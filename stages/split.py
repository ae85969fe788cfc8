"""split: assign images to train/val/test and balance the training pairs."""

from __future__ import annotations

import argparse
from pathlib import Path

from grounding import io, validation
from grounding.config import load_params
from grounding.data.split import assign_splits, split_pairs, split_summary
from grounding.errors import run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file")
    parser.add_argument("--parsed", type=Path, required=True, help="folder of parse's tables")
    parser.add_argument("--pairs", type=Path, required=True, help="folder of pair's tables")
    parser.add_argument("--out", type=Path, required=True, help="folder of the split pairs")
    parser.add_argument("--summary", type=Path, required=True, help="counts (JSON)")
    parser.add_argument("--validation", type=Path, required=True, help="checks run (JSON)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    params = load_params(args.params).split
    images = io.read_table(args.parsed / "images.parquet")
    pairs = io.read_table(args.pairs / "pairs.parquet")
    split_of_image = assign_splits(
        images,
        pairs,
        strategy=params.strategy,
        val_fraction=params.val_fraction,
        test_fraction=params.test_fraction,
        seed=params.seed,
    )
    tables = split_pairs(
        pairs, split_of_image, train_pos_share=params.train_pos_share, seed=params.seed
    )
    natural_share = float(pairs["label"][pairs["image_id"].map(split_of_image) == "train"].mean())
    checks = validation.check_split(
        tables, train_pos_share=params.train_pos_share, natural_train_share=natural_share
    )
    io.write_tables(tables, args.out)
    summary = split_summary(tables, split_of_image)
    io.write_json(summary, args.summary)
    io.write_json(validation.report(checks), args.validation)
    for name, counts in summary.items():
        print(name, ", ".join(f"{key} {value:,}" for key, value in counts.items()))


if __name__ == "__main__":
    run(main)
