"""pair: pair each phrase that has boxes with every candidate region of its image."""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

from tqdm import tqdm

from grounding import candidates, io, validation
from grounding.config import load_params, repo_root
from grounding.data.formats import dataset_format
from grounding.data.pair import BATCH_IMAGES, PairCounts, pairing
from grounding.errors import run
from grounding.numerics import use_numerics


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file")
    parser.add_argument("--parsed", type=Path, required=True, help="folder of parse's tables")
    parser.add_argument("--out", type=Path, required=True, help="folder of the pair tables")
    parser.add_argument("--summary", type=Path, required=True, help="counts (JSON)")
    parser.add_argument("--validation", type=Path, required=True, help="checks run (JSON)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    params = load_params(args.params)
    use_numerics(params.runtime.numerics)  # before torch loads (a detector generator runs it)
    parsed = io.read_tables(args.parsed, ("images", "phrases", "boxes", "chain_boxes"))
    images = parsed["images"]
    name = params.pair.candidates
    regions = candidates.candidate_regions(
        name,
        params.candidates,
        images[images["has_file"]],
        parsed["boxes"],
        io.ImageFolder(params.data.images_dir, images),
        # in the original checkout even when DVC runs a queued experiment in a temporary copy
        cache=io.ProposalCache(repo_root() / params.paths.proposals),
        progress=partial(tqdm, desc=name, unit="image"),
        engine=params.pair.engine,
        ray_settings=params.pair.ray,
        device=params.runtime.device,  # where a detector generator runs (resolved by it)
    )
    made = pairing(**parsed, candidates=candidates.candidates_table(regions, name))
    tables = {"candidates": made.candidates, "phrases": made.phrases}
    tables["ground_truth"] = made.ground_truth
    checks = validation.check_paired(
        tables,
        images,
        types=dataset_format(params.data.format, params.data.formats).types,
        sources=[name],  # the generator chosen (a scheme's source is its full name)
    )
    # the pairs, image batch by image batch: memory bounded by a batch, not by the dataset
    counts, pair_checks = PairCounts(), []
    empty = {**{key: table.iloc[:0] for key, table in tables.items()}, "pairs": made.no_pairs()}
    with io.table_writers(args.out, empty) as writers:
        for key, table in tables.items():
            writers[key].write(table)
        n_batches = -(-made.ground_truth["image_id"].nunique() // BATCH_IMAGES)
        batches = made.batches(pos_iou=params.pair.pos_iou)
        for pairs in tqdm(batches, total=n_batches, desc="pairs", unit="batch"):
            pair_checks.append(validation.check_pairs(pairs))
            counts.add(pairs)
            writers["pairs"].write(pairs)
    checks += validation.combine("pairs", pair_checks)
    summary = made.summary(counts)
    io.write_json(summary, args.summary)
    io.write_json(validation.report(checks), args.validation)
    print(", ".join(f"{name} {value:,}" for name, value in summary.items()))


if __name__ == "__main__":
    run(main)
