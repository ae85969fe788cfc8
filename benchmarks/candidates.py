"""Both candidate settings side by side: annotated boxes and selective-search proposals.

Runs the pipeline in a temporary copy of the repository twice, `dvc repro` with
``pair.candidates=annotated`` then `dvc exp run -S pair.candidates=selective_search`, and writes
``reports/candidates-sample.md`` (``-real`` with ``--real``) and the same as JSON: per
setting, the candidates per image, the upper bound (share of test phrases some candidate
covers at IoU >= 0.5), Recall@1/5/10, pair F1 and ROC AUC, and the wall time.

    python -m benchmarks.candidates                      # the shipped sample
    python -m benchmarks.candidates --real               # the real images in ../shared/
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks import REPO, SHARED_DATA
from tests.repository import commit, run, scratch_repo

REAL_ROOT = SHARED_DATA
COLUMNS = (
    ("phrases", "test phrases", "{:,}"),
    ("candidates_per_image", "candidates / image", "{:.1f}"),
    ("upper_bound", "upper bound", "{:.3f}"),
    ("recall_at_1", "Recall@1", "{:.3f}"),
    ("recall_at_5", "Recall@5", "{:.3f}"),
    ("recall_at_10", "Recall@10", "{:.3f}"),
    ("f1", "pair F1", "{:.3f}"),
    ("roc_auc", "ROC AUC", "{:.3f}"),
    ("seconds", "wall time (s)", "{:.0f}"),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--real",
        action="store_true",
        help=f"use {REAL_ROOT} with a random image split (it has no test images)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="more params for both runs, as for `dvc exp run -S` (repeatable)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "reports", help="folder to write to")
    return parser.parse_args(argv)


def _settings(work: Path) -> dict:
    metrics = json.loads((work / "reports" / "metrics.json").read_text())
    details = json.loads((work / "reports" / "test.json").read_text())  # the phrase count
    pair = json.loads((work / "reports" / "pair.json").read_text())
    return {
        "candidates_per_image": pair["candidates_per_image"],
        "pairs": pair["pairs"],
        "phrases": details["phrases"],
        **metrics,
    }


def compare(work: Path, overrides: list[str]) -> dict[str, dict]:
    env = scratch_repo(work)
    params = yaml.safe_load((work / "params.yaml").read_text())
    for override in overrides:
        key, value = override.split("=", 1)
        section, name = key.split(".", 1)
        params[section][name] = yaml.safe_load(value)
    params["pair"]["candidates"] = "annotated"
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    commit(work, env, "settings")
    results = {}
    start = time.perf_counter()
    run(["dvc", "repro"], work, env)
    results["annotated"] = {**_settings(work), "seconds": time.perf_counter() - start}
    commit(work, env, "annotated")
    start = time.perf_counter()
    run(["dvc", "exp", "run", "-S", "pair.candidates=selective_search"], work, env)
    results["proposals"] = {**_settings(work), "seconds": time.perf_counter() - start}
    results["params"] = {
        "overrides": overrides,
        "proposals": params["candidates"]["selective_search"],
    }
    return results


def markdown(results: dict[str, dict], data: str) -> str:
    lines = [
        f"# Candidates: annotated boxes vs selective-search proposals ({data})",
        "",
        "Rebuilt by `python -m benchmarks.candidates"
        + (" --real" if "real" in data else "")
        + "`. Test split; a phrase is found when one of its k best candidates has IoU >= 0.5",
        "with one of its boxes. The upper bound caps Recall@k: the share of phrases that any",
        "candidate covers. The random split stratifies images by their positive rate, which",
        "depends on the candidates: with `--real` the two settings hold out different images.",
        "",
        "| candidates | " + " | ".join(title for _, title, _ in COLUMNS) + " |",
        "|---|" + "---|" * len(COLUMNS),
    ]
    for setting in ("annotated", "proposals"):
        row = results[setting]
        cells = [fmt.format(row[key]) for key, _, fmt in COLUMNS]
        lines.append(f"| {setting} | " + " | ".join(cells) + " |")
    lines += ["", f"Proposal settings: `{json.dumps(results['params']['proposals'])}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    overrides = list(args.set)
    data, name = "the shipped sample", "candidates-sample"
    if args.real:
        name = "candidates-real"
        overrides = [f"data.root={REAL_ROOT}", "split.strategy=random", *overrides]
        data = "985 real Flickr30k images, random image split"
    with tempfile.TemporaryDirectory() as work:
        results = compare(Path(work), overrides)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / f"{name}.md").write_text(markdown(results, data))
    print(markdown(results, data))


if __name__ == "__main__":
    main()
