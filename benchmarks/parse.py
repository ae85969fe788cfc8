"""Benchmark parse on a whole Flickr30k Entities annotation set (default: the real one in
../shared): time to read and parse every file into tables, then to validate the tables.

    python benchmarks/parse.py --out parse.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from grounding import io, validation
from grounding.parse import parse_dataset

REAL = Path(__file__).resolve().parents[2] / "shared" / "flickr30k_entities"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", type=Path, default=REAL, help="dataset in the Flickr30k layout")
    parser.add_argument("--out", type=Path, help="write the figures here (JSON)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    parsed = parse_dataset(
        io.AnnotationReader(io.find_annotations(args.root)),
        io.read_split_lists(args.root),
        io.list_image_ids(args.root / "images"),
    )
    parse_s = time.perf_counter() - start
    start = time.perf_counter()
    validation.check_parsed(parsed.tables())
    results = {
        "parse_s": parse_s,
        "validate_s": time.perf_counter() - start,
        **parsed.counts(),
    }
    for name, value in results.items():
        print(f"{name:20} {value:,.2f}" if isinstance(value, float) else f"{name:20} {value:,}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
