"""Latency of `grounding predict`: one image, five phrases, on this machine's CPU, with the torch
grounder and with its ONNX export (`grounding export --format onnx`).

For each grounder and each of ``--n-images`` real images, the whole command as a user runs it (a
new process: imports, loading the grounder, proposals, features, scores, JSON), twice:

- cold: an empty proposal cache, so selective search runs;
- cached: the same command again, the proposals read from the cache.

Each is the median over images and ``--runs`` repetitions; beside the wall time, the command's
CPU time (user + system, less sensitive to other load on the machine). Then the batch: one
`grounding predict` of ``--batch-images`` images into an ``--out-dir`` (records and pictures),
cold and cached, as images per second of the whole command (start-up and loading included).
Then, inside one process with each grounder loaded once, the grounding alone (cold and
cached), and the agreement of the export with torch: the smallest IoU between the two paths'
best box of a phrase, and the largest score difference. Prints the figures; ``--out`` also
writes them as JSON, and a Markdown table beside it.

    grounding export --format onnx --model models/grounder.safetensors --out models/grounder-onnx
    python -m benchmarks.predict --model models/grounder.safetensors --onnx models/grounder-onnx

``--onnx export`` exports ``--model`` into a temporary folder first; the packaged grounder on
the real images, written to reports/ (JSON and a Markdown table):

    python -m benchmarks.predict --model src/grounding/pretrained/flickr30k.safetensors \
        --onnx export --out reports/predict-real.json
    python -m benchmarks.predict --numerics fast   # torch's kernels: this CPU's newest
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import REPO, SHARED_DATA
from grounding.numerics import NUMERICS, use_numerics

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
        "--model", default=str(REPO / "models" / "grounder.safetensors"), help="torch grounder"
    )
    parser.add_argument(
        "--onnx", type=Path, help="its ONNX export's folder (default: only the torch grounder)"
    )
    parser.add_argument("--images", type=Path, default=REAL_IMAGES, help="folder of JPEGs")
    parser.add_argument("--n-images", type=int, default=5, help="images to time")
    parser.add_argument("--runs", type=int, default=1, help="repetitions of each command")
    parser.add_argument(
        "--batch-images", type=int, default=20, help="images of the batch command (0: none)"
    )
    parser.add_argument("--out", type=Path, help="write the figures here (JSON)")
    parser.add_argument(
        "--numerics",
        choices=NUMERICS,
        default="portable",
        help="torch's CPU kernels, in the commands and in this process (%(default)s)",
    )
    return parser.parse_args(argv)


def command_seconds(image: Path, model: str, cache: Path, numerics: str) -> tuple[float, float]:
    """Wall and CPU seconds of one fresh `grounding predict` command."""
    args = [sys.executable, "-m", "grounding.cli", "predict", str(image), "--model", model]
    args += ["--cache", str(cache), "--numerics", numerics]
    for phrase in PHRASES:
        args += ["--phrase", phrase]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(args, check=True, capture_output=True, env={**os.environ})
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def commands(
    images: list[Path], model: str, work: Path, runs: int, numerics: str
) -> dict[str, float]:
    """Medians of cold (fresh cache) and cached commands over images and runs."""
    kinds = ("cold", "cold_cpu", "cached", "cached_cpu")
    times: dict[str, list[float]] = {key: [] for key in kinds}
    for run in range(runs):
        cache = work / f"cache-{run}"
        for kind in ("cold", "cached"):
            for image in images:
                wall, cpu = command_seconds(image, model, cache, numerics)
                times[kind].append(wall)
                times[f"{kind}_cpu"].append(cpu)
    return {f"command_{key}_s": statistics.median(values) for key, values in times.items()}


def batch_command(images: list[Path], model: str, work: Path) -> dict[str, float]:
    """Images per second of one `grounding predict` of all ``images`` into an output folder,
    with an empty proposal cache (cold), then again with it filled (cached)."""
    args = [sys.executable, "-m", "grounding.cli", "predict", *map(str, images), "--model", model]
    args += ["--cache", str(work / "cache")]
    for phrase in PHRASES:
        args += ["--phrase", phrase]
    figures = {}
    for kind in ("cold", "cached"):
        start = time.perf_counter()
        subprocess.run(
            [*args, "--out-dir", str(work / kind)], check=True, capture_output=True, env=os.environ
        )
        figures[f"batch_{kind}_images_per_s"] = len(images) / (time.perf_counter() - start)
    return figures


def in_process(images: list[Path], model: str, cache_dir: Path) -> tuple[dict[str, float], Any]:
    """Load time and median grounding times inside one process; and the groundings."""
    from grounding import io
    from grounding.inference.loading import load_grounder

    start = time.perf_counter()
    grounder = load_grounder(model)
    times: dict[str, list[float]] = {"cold": [], "cached": []}
    load = time.perf_counter() - start
    proposals = grounder.proposer(io.ProposalCache(cache_dir))
    found = []
    for path in images:
        image = io.read_image(path)
        for kind in ("cold", "cached"):
            start = time.perf_counter()
            result = grounder.ground(image, PHRASES, proposals=proposals)
            times[kind].append(time.perf_counter() - start)
        found.append(result)
    figures = {"load_grounder_s": load}
    figures.update({f"ground_{kind}_s": statistics.median(v) for kind, v in times.items()})
    return figures, found


def agreement(torch_found: list, onnx_found: list) -> dict[str, float]:
    """The smallest IoU of the two paths' best boxes over every phrase of every image, and
    the largest difference of their scores."""
    from grounding.boxes import box_iou

    ious, differences = [], []
    for ours, theirs in zip(onnx_found, torch_found, strict=True):
        for a, b in zip(ours, theirs, strict=True):
            box_a, box_b = a.boxes[0], b.boxes[0]
            ious.append(float(box_iou(np.array([box_a.box]), np.array([box_b.box]))[0, 0]))
            differences.append(abs(box_a.score - box_b.score))
    return {"min_iou_vs_torch": min(ious), "max_score_difference": max(differences)}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    use_numerics(args.numerics, "--numerics")  # before in_process loads torch
    images = sorted(args.images.glob("*.jpg"))[: args.n_images]
    if not images:
        raise SystemExit(f"no .jpg images in {args.images}")
    results: dict[str, Any] = {
        "images": len(images),
        "phrases": len(PHRASES),
        "runs": args.runs,
        "numerics": args.numerics,
    }
    batch = sorted(args.images.glob("*.jpg"))[: args.batch_images]
    results["batch_images"] = len(batch)
    found = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        onnx = args.onnx
        if onnx == Path("export"):
            onnx = work / "onnx"
            export = ["grounding.cli", "export", "--model", args.model, "--out", str(onnx)]
            subprocess.run(
                [sys.executable, "-m", *export],
                check=True,
                capture_output=True,
            )
        models = {"torch": args.model, **({"onnx": str(onnx)} if onnx else {})}
        for name, model in models.items():
            figures = commands(images, model, work / f"{name}-commands", args.runs, args.numerics)
            inside, found[name] = in_process(images, model, work / f"{name}-process")
            results[name] = {**figures, **inside}
            if batch:
                results[name].update(batch_command(batch, model, work / f"{name}-batch"))
    if "onnx" in found:
        results["onnx"].update(agreement(found["torch"], found["onnx"]))
    for name, value in results.items():
        if isinstance(value, dict):
            for key, number in value.items():
                print(f"{name + ' ' + key:32} {number:.3f}")
        else:
            print(f"{name:32} {value}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(markdown(results))


def markdown(results: dict[str, Any]) -> str:
    """The images per second of each grounder, as a table for the docs."""
    lines = [
        "# `grounding predict` on real images",
        "",
        f"Written by `python -m benchmarks.predict`: {results['phrases']} phrases per image, "
        f"2 CPU cores shared; one command of {results['batch_images']} images (start-up, "
        f"loading and pictures included), and {results['images']} single-image commands.",
        "",
        "| grounder | batch, proposals computed | batch, proposals cached | one image a command "
        "(cached) | grounding alone, cold / cached | load |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("torch", "onnx"):
        if name not in results:
            continue
        r = results[name]
        lines.append(
            f"| {name} | {r.get('batch_cold_images_per_s', float('nan')):.2f} images/s | "
            f"{r.get('batch_cached_images_per_s', float('nan')):.2f} images/s | "
            f"{r['command_cached_s']:.1f} s | {r['ground_cold_s']:.2f} / "
            f"{r['ground_cached_s']:.2f} s | {r['load_grounder_s']:.1f} s |"
        )
    return "\n".join([*lines, ""])


if __name__ == "__main__":
    main()
