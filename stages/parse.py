"""parse: read the annotations of `data.root` (in the format `data.format`) into tables."""

from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

from grounding import io, validation
from grounding.config import load_params
from grounding.data.formats import FORMATS, dataset_format
from grounding.data.tables import build_tables
from grounding.errors import run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file")
    parser.add_argument("--out", type=Path, required=True, help="folder of the parsed tables")
    parser.add_argument("--summary", type=Path, required=True, help="counts (JSON)")
    parser.add_argument("--validation", type=Path, required=True, help="checks run (JSON)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    params = load_params(args.params)
    data = params.data
    FORMATS.check_section(data.formats)
    fmt = dataset_format(data.format, data.formats)
    reader = fmt.open(
        data.root,
        splits=data.splits_dir,
        files=fmt.files,
        skip_bad_files=params.parse.skip_bad_files,
    )
    records = tqdm(reader, desc="parse", unit="image", mininterval=2)
    parsed = build_tables(
        records, io.present_files(data.images_dir), reader.skipped, reader.duplicate_split_ids
    )
    tables = parsed.tables()
    checks = validation.check_parsed(tables, types=fmt.types)
    io.write_tables(tables, args.out)
    io.write_json(
        {
            **parsed.counts(),
            "skipped": [vars(skipped) for skipped in parsed.skipped],
            "examples": parsed.examples(),
        },
        args.summary,
    )
    io.write_json(validation.report(checks), args.validation)
    print(", ".join(f"{name} {count:,}" for name, count in parsed.counts().items()))


if __name__ == "__main__":
    run(main)
