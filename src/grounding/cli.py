"""The ``grounding`` command: tools around the pipeline (the stages themselves run from dvc.yaml).

``grounding sample --out data/sample`` regenerates the shipped synthetic sample, byte for byte.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from grounding import io
from grounding.errors import run


def _sample(args: argparse.Namespace) -> None:
    from grounding.sample import generate_sample

    dataset = generate_sample(seed=args.seed, n_images=args.images)
    # replace an earlier sample's files, and nothing else that may live in the folder
    for name in ("Annotations", "Sentences", "images"):
        shutil.rmtree(args.out / name, ignore_errors=True)
    io.write_files(dataset.files, args.out)
    print(f"wrote {len(dataset.files)} files to {args.out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grounding", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    sample = commands.add_parser(
        "sample",
        help="write the synthetic sample dataset in the Flickr30k Entities layout",
        description="Write the synthetic sample (images, Annotations/, Sentences/, split lists).",
    )
    sample.add_argument(
        "--out",
        type=Path,
        default=Path("data/sample"),
        help="folder; an earlier sample there is replaced",
    )
    sample.add_argument("--seed", type=int, default=0, help="random seed")
    sample.add_argument("--images", type=int, default=300, help="number of images")
    sample.set_defaults(handler=_sample)
    return parser


def _main(argv: list[str] | None) -> None:
    args = build_parser().parse_args(argv)
    args.handler(args)


def main(argv: list[str] | None = None) -> None:
    run(_main, argv)
