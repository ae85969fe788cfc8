"""One dataset in each format: the Flickr30k Entities layout as it is, and converted by
`grounding convert` to ODVG and MDETR; the three runs' counts and test metrics side by side.

Runs in a temporary copy of the repository: `dvc repro` on the Flickr30k layout, then for each
format `grounding convert` into ``data/<format>/`` (the images linked beside the files) and
`dvc exp run -S data.format=<format> -S data.root=data/<format>`. Writes
``reports/formats-sample.md`` (``-real`` with ``--real``) and the same as JSON: per format the
parse and pair counts, the test metrics (``metrics.json`` and ``test.json``), and which of them
differ from the Flickr30k run's.

    python -m benchmarks.formats            # the shipped sample
    python -m benchmarks.formats --real     # the real images in ../shared/, a random split
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import REPO, SHARED_DATA
from tests.repository import commit, run, scratch_repo

FORMATS = ("odvg", "mdetr")
COUNTS = ("images", "captions", "phrases", "phrases_with_box", "boxes", "chains")
PAIRED = ("phrases_paired", "candidates", "pairs", "positives")
METRICS = ("phrases", "recall_at_1", "recall_at_5", "recall_at_10", "upper_bound", "f1", "roc_auc")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--real",
        action="store_true",
        help=f"use {SHARED_DATA} with a random image split (it has no test images)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "reports", help="folder to write to")
    return parser.parse_args(argv)


def _results(work: Path, seconds: float) -> dict:
    reports = work / "reports"
    parse, pair, metrics, details = (
        json.loads((reports / f"{name}.json").read_text())
        for name in ("parse", "pair", "metrics", "test")
    )
    return {
        "parse": {name: parse[name] for name in COUNTS},
        "pair": {name: pair[name] for name in PAIRED},
        "metrics": {**metrics, **details},
        "seconds": round(seconds, 1),
    }


def compare(work: Path, real: bool) -> dict[str, dict]:
    """Run the pipeline on the dataset in each format in a scratch repository at ``work``."""
    env = scratch_repo(work)
    dataset = SHARED_DATA if real else work / "data" / "sample"
    base = ["-S", f"data.root={dataset}", "-S", "split.strategy=random"] if real else []
    start = time.perf_counter()
    run(["dvc", "exp", "run", *base], work, env)
    results = {"flickr30k": _results(work, time.perf_counter() - start)}
    for name in FORMATS:
        root = work / "data" / name
        grounding = [sys.executable, "-m", "grounding.cli"]
        convert = ["convert", "--from", "flickr30k", "--to", name, str(dataset), str(root)]
        run([*grounding, *convert], work, env)
        (root / "images").symlink_to(dataset / "images")
        commit(work, env, f"{name} files")
        start = time.perf_counter()
        overrides = ["-S", f"data.format={name}", "-S", f"data.root=data/{name}"]
        run(["dvc", "exp", "run", *base, *overrides], work, env)
        results[name] = _results(work, time.perf_counter() - start)
    typed = results["flickr30k"]["metrics"]
    untyped = {key: value for key, value in typed.items() if key != "recall_at_1_by_type"}
    for name in FORMATS:
        metrics = results[name]["metrics"]
        results[name]["differs_from_flickr30k"] = sorted(
            key for key in {*untyped, *metrics} if metrics.get(key) != untyped.get(key)
        )
    return results


def markdown(results: dict[str, dict], data: str) -> str:
    header = ["format", *COUNTS, *PAIRED, *(f"test {m}" if m in COUNTS else m for m in METRICS)]
    header.append("seconds")
    lines = [
        f"# One dataset in each format ({data})",
        "",
        "`dvc exp run` on the Flickr30k layout and on its `grounding convert` to each format.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for name, result in results.items():
        cells = [
            *(f"{result['parse'][c]:,}" for c in COUNTS),
            *(f"{result['pair'][c]:,}" for c in PAIRED),
            *(_cell(result["metrics"][m]) for m in METRICS),
            f"{result['seconds']:.0f}",
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    for name in FORMATS:
        differs = results[name]["differs_from_flickr30k"]
        verdict = f"differ in {', '.join(differs)}" if differs else "equal the Flickr30k run's"
        lines.append(f"- {name}: the test metrics {verdict}")
    return "\n".join(lines) + "\n"


def _cell(value: float | int) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:.4f}"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="formats-") as work:
        results = compare(Path(work), args.real)
    data = "real" if args.real else "sample"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"formats-{data}.json").write_text(json.dumps(results, indent=2) + "\n")
    text = markdown(results, "the real images in ../shared/" if args.real else "the sample")
    (args.out / f"formats-{data}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
