"""Benchmark parse on a whole Flickr30k Entities annotation set (default: the real one in
../shared): time to read and parse every file into tables, then to validate the tables.

    python -m benchmarks.parse --out parse.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks import SHARED_DATA
from grounding import io, validation
from grounding.data.formats import dataset_format
from grounding.data.tables import build_tables


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--root", type=Path, default=SHARED_DATA, help="dataset in the Flickr30k layout"
    )
    parser.add_argument("--out", type=Path, help="write the figures here (JSON)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    flickr30k = dataset_format("flickr30k")
    reader = flickr30k.open(args.root, splits=args.root)
    parsed = build_tables(
        reader, io.present_files(args.root / "images"), reader.skipped, reader.duplicate_split_ids
    )
    parse_s = time.perf_counter() - start
    start = time.perf_counter()
    validation.check_parsed(parsed.tables(), types=flickr30k.types)
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
