"""Latency of `grounding predict`: one image, five phrases, on this machine's CPU.

Measures, for each of ``--n-images`` real images, the whole command as a user runs it (a new
process: imports, loading the grounder, proposals, features, scores, JSON), twice:

- cold: an empty proposal cache, so selective search runs;
- cached: the same command again, the proposals read from the cache.

and, inside one process with the grounder loaded once, the grounding alone (cold and cached).
Prints the medians; ``--out`` also writes them as JSON.

    python -m benchmarks.predict --model models/grounder.safetensors
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import REPO, SHARED_DATA

REAL_IMAGES = SHARED_DATA / "images"
PHRASES = (
    "a man",
    "a woman in a red shirt",
    "the dog on the left",
    "a blue car",
    "the sky",
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default=str(REPO / "models" / "grounder.safetensors"), help="grounder"
    )
    parser.add_argument("--images", type=Path, default=REAL_IMAGES, help="folder of JPEGs")
    parser.add_argument("--n-images", type=int, default=5, help="images to time")
    parser.add_argument("--out", type=Path, help="write the figures here (JSON)")
    return parser.parse_args(argv)


def command_seconds(image: Path, model: str, cache: Path) -> float:
    args = [sys.executable, "-m", "grounding.cli", "predict", str(image), "--model", model]
    args += ["--cache", str(cache)]
    for phrase in PHRASES:
        args += ["--phrase", phrase]
    start = time.perf_counter()
    subprocess.run(args, check=True, capture_output=True)
    return time.perf_counter() - start


def in_process_seconds(images: list[Path], model: str, cache_dir: Path) -> dict[str, list[float]]:
    from grounding import io
    from grounding.cli import load_grounder

    start = time.perf_counter()
    grounder = load_grounder(model)
    load = time.perf_counter() - start
    proposals = grounder.proposer(io.ProposalCache(cache_dir))
    times: dict[str, list[float]] = {"load_s": [load], "cold_s": [], "cached_s": []}
    for path in images:
        image = io.read_image(path)
        for kind in ("cold_s", "cached_s"):
            start = time.perf_counter()
            grounder.ground(image, PHRASES, proposals=proposals)
            times[kind].append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    images = sorted(args.images.glob("*.jpg"))[: args.n_images]
    if not images:
        raise SystemExit(f"no .jpg images in {args.images}")
    results: dict[str, float | int | str] = {"images": len(images), "phrases": len(PHRASES)}
    with tempfile.TemporaryDirectory() as work:
        cache = Path(work) / "command-cache"
        cold = [command_seconds(image, args.model, cache) for image in images]
        cached = [command_seconds(image, args.model, cache) for image in images]
        inside = in_process_seconds(images, args.model, Path(work) / "process-cache")
    results.update(
        {
            "command_cold_s": statistics.median(cold),
            "command_cached_s": statistics.median(cached),
            "load_grounder_s": inside["load_s"][0],
            "ground_cold_s": statistics.median(inside["cold_s"]),
            "ground_cached_s": statistics.median(inside["cached_s"]),
        }
    )
    for name, value in results.items():
        print(f"{name:24} {value:.3f}" if isinstance(value, float) else f"{name:24} {value}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
