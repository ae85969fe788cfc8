"""split: assign images to train/val/test and balance the training pairs."""

from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

from grounding import io, validation
from grounding.config import load_params
from grounding.data.split import SplitCounts, assign_image_splits, image_pair_counts, split_parts
from grounding.errors import run
from grounding.schemas import NO_SPLIT, SPLITS


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
    # two passes over the pairs, part by part: memory bounded by a part, not by the dataset
    pairs_path = args.pairs / "pairs.parquet"
    counts = image_pair_counts(io.read_table_parts(pairs_path, ["image_id", "label"]))
    split_of_image = assign_image_splits(
        images,
        counts,
        strategy=params.strategy,
        val_fraction=params.val_fraction,
        test_fraction=params.test_fraction,
        seed=params.seed,
    )
    train = counts[split_of_image.reindex(counts.index) == "train"].sum()
    natural_share = float(train["positives"] / train["pairs"]) if train["pairs"] else 0.0
    assigned = split_of_image[split_of_image != NO_SPLIT]
    checks = validation.check_split_images(
        assigned.rename_axis("image_id").reset_index()[["image_id", "split"]]
    )
    part_checks: dict[str, list] = {name: [] for name in SPLITS}
    split_counts = SplitCounts()
    parts = split_parts(
        io.read_table_parts(pairs_path),
        split_of_image,
        counts,
        train_pos_share=params.train_pos_share,
        seed=params.seed,
    )
    n_parts = -(-io.table_rows(pairs_path) // (1 << 20))
    empty = dict.fromkeys(SPLITS, io.empty_table(pairs_path))
    with io.table_writers(args.out, empty) as writers:
        for part in tqdm(parts, total=n_parts, desc="split", unit="part"):
            for name, table in part.items():
                if len(table):
                    part_checks[name].append(validation.check_split_pairs(name, table))
                    split_counts.add(name, table)
                    writers[name].write(table)
        for name in SPLITS:
            checks += validation.combine(f"{name}_pairs", part_checks[name])
            if name == "train":
                share = split_counts.positives["train"] / split_counts.pairs["train"]
                checks.append(
                    validation.check_train_share(
                        share,
                        train_pos_share=params.train_pos_share,
                        natural_train_share=natural_share,
                    )
                )
    summary = split_counts.summary(split_of_image)
    io.write_json(summary, args.summary)
    io.write_json(validation.report(checks), args.validation)
    for name, counts_of_split in summary.items():
        print(name, ", ".join(f"{key} {value:,}" for key, value in counts_of_split.items()))


if __name__ == "__main__":
    run(main)
