"""pair: pair each phrase that has boxes with every candidate region of its image."""

from __future__ import annotations

import argparse
from pathlib import Path

from grounding import io, validation
from grounding.config import load_params
from grounding.errors import run
from grounding.pair import pair_dataset


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
    params = load_params(args.params).pair
    parsed = io.read_tables(args.parsed, ("images", "phrases", "boxes", "chain_boxes"))
    paired = pair_dataset(**parsed, pos_iou=params.pos_iou)
    tables = paired.tables()
    checks = validation.check_paired(tables, parsed["images"])
    io.write_tables(tables, args.out)
    io.write_json(paired.summary, args.summary)
    io.write_json(validation.report(checks), args.validation)
    print(", ".join(f"{name} {value:,}" for name, value in paired.summary.items()))


if __name__ == "__main__":
    run(main)
