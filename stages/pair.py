"""pair: pair each phrase that has boxes with every candidate region of its image."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from tqdm import tqdm

from grounding import io, validation
from grounding.config import load_params
from grounding.errors import run
from grounding.pair import pair_dataset
from grounding.proposals import ProposalSettings
from grounding.tracking import repo_root


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
    parsed = io.read_tables(args.parsed, ("images", "phrases", "boxes", "chain_boxes"))
    proposals = None
    if params.pair.candidates == "proposals":
        images = parsed["images"]
        present = images.loc[images["has_file"], "image_id"].tolist()
        # in the original checkout even when DVC runs a queued experiment in a temporary copy
        cache = io.ProposalCache(repo_root() / params.paths.proposals)
        proposals = image_proposals(present, params.data.images_dir, params.proposals, cache)
    paired = pair_dataset(**parsed, pos_iou=params.pair.pos_iou, proposals=proposals)
    tables = paired.tables()
    checks = validation.check_paired(tables, parsed["images"])
    io.write_tables(tables, args.out)
    io.write_json(paired.summary, args.summary)
    io.write_json(validation.report(checks), args.validation)
    print(", ".join(f"{name} {value:,}" for name, value in paired.summary.items()))


def image_proposals(
    image_ids: list[str], images_dir: Path, settings: ProposalSettings, cache: io.ProposalCache
) -> dict[str, np.ndarray]:
    """Each image's proposals, from the cache where an earlier run computed them."""
    found = {}
    for image_id in tqdm(image_ids, desc="proposals", unit="image"):
        image = io.load_image(images_dir, image_id)
        found[image_id] = cache.proposals(image, settings)
    return found


if __name__ == "__main__":
    run(main)
