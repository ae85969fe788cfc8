"""The results summary: the committed benchmark reports as the tables the docs show.

Runs nothing: reads the JSON reports that other benchmarks wrote and writes
``reports/results.md``, whose tables the README and ``docs/results.md`` include.

- The headline table: each candidate setting on the shipped sample and on the real images
  (``reports/candidates-sample.json``, ``reports/candidates-real.json``, written by
  ``python -m benchmarks.candidates [--real]``), and the packaged grounder
  (``reports/pretrained-flickr30k.json``, ``python -m release.pretrained``).
- The annotated-candidates quality levers (``reports/quality-annotated-real.json``).

    python -m benchmarks.results
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from benchmarks import REPO

HEADLINE_COLUMNS = (
    ("phrases", "test phrases", "{:,}"),
    ("recall_at_1", "Recall@1", "{:.3f}"),
    ("recall_at_5", "Recall@5", "{:.3f}"),
    ("recall_at_10", "Recall@10", "{:.3f}"),
    ("upper_bound", "upper bound", "{:.3f}"),
)
QUALITY_COLUMNS = (
    ("recall_at_1", "test R@1"),
    ("recall_at_5", "R@5"),
    ("recall_at_10", "R@10"),
    ("merged_recall_at_1", "MERGED R@1"),
    ("merged_recall_at_5", "R@5"),
    ("merged_recall_at_10", "R@10"),
)
#: The quality benchmark's variant names as the `dvc exp run -S` settings they stand for.
VARIANT_SETTINGS = {
    "baseline": "`train.head=matching train.epochs=30` (default)",
    "head=matching_prior": "`train.head=matching_prior`",
    "epochs=10": "`train.epochs=10`",
    "head=matching_prior,epochs=10": "`train.head=matching_prior train.epochs=10`",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--reports", type=Path, default=REPO / "reports", help="folder to read and write"
    )
    return parser.parse_args(argv)


def headline_table(
    sample: dict[str, Any], real: dict[str, Any], pretrained: dict[str, Any]
) -> list[str]:
    """Markdown lines: one row per (data, candidates) from the candidates benchmark's results
    (``{"annotated": metrics, "proposals": metrics}``), then the packaged grounder's row from
    ``pretrained``'s ``metrics``; a metric a report lacks is ``-``."""
    rows = [
        ("shipped sample", "annotated", sample["annotated"], ""),
        ("shipped sample", "proposals", sample["proposals"], ""),
        ("985 real images", "annotated", real["annotated"], ""),
        ("985 real images", "proposals", real["proposals"], ""),
        (
            "985 real images",
            "proposals",
            pretrained["metrics"],
            " (packaged grounder)",
        ),
    ]
    lines = [
        "| data | candidates | " + " | ".join(title for _, title, _ in HEADLINE_COLUMNS) + " |",
        "|---|---|" + "---|" * len(HEADLINE_COLUMNS),
    ]
    for data, candidates, metrics, note in rows:
        cells = [
            fmt.format(metrics[key]) if key in metrics else "-" for key, _, fmt in HEADLINE_COLUMNS
        ]
        lines.append(f"| {data} | {candidates}{note} | " + " | ".join(cells) + " |")
    return lines


def quality_table(quality: dict[str, Any]) -> list[str]:
    """Markdown lines: one row per variant of the quality benchmark's results (``variants``:
    ``variant``, ``val_recall_at_1`` and the ``test`` metrics)."""
    lines = [
        "| setting (`dvc exp run -S ...`) | val R@1 | "
        + " | ".join(title for _, title in QUALITY_COLUMNS)
        + " |",
        "|---|---|" + "---|" * len(QUALITY_COLUMNS),
    ]
    for row in quality["variants"]:
        setting = VARIANT_SETTINGS.get(row["variant"], f"`{row['variant']}`")
        cells = [f"{row['val_recall_at_1']:.3f}"]
        cells += [f"{row['test'][key]:.3f}" for key, _ in QUALITY_COLUMNS]
        lines.append(f"| {setting} | " + " | ".join(cells) + " |")
    return lines


def markdown(reports: dict[str, dict[str, Any]]) -> str:
    """``reports/results.md`` from the reports, keyed by their file stem."""
    quality = reports["quality-annotated-real"]
    lines = [
        "# Results",
        "",
        "Written by `python -m benchmarks.results` from the committed reports: test split,",
        "ANY-box Recall@k (a phrase is found when one of its k best candidates has IoU >= 0.5",
        "with one of its boxes); the upper bound is the share of phrases some candidate covers.",
        "",
        "## Sample and real images, annotated boxes and proposals",
        "",
        "From `reports/candidates-sample.json`, `reports/candidates-real.json`",
        "(`python -m benchmarks.candidates [--real]`) and `reports/pretrained-flickr30k.json`",
        "(`python -m release.pretrained`).",
        "",
        *headline_table(
            reports["candidates-sample"],
            reports["candidates-real"],
            reports["pretrained-flickr30k"],
        ),
        "",
        "## Quality levers, annotated candidates on the real images",
        "",
        f"From `reports/quality-annotated-real.json`: {quality['data']}; one seed each.",
        "",
        *quality_table(quality),
    ]
    return "\n".join(lines) + "\n"


SOURCES = ("candidates-sample", "candidates-real", "pretrained-flickr30k", "quality-annotated-real")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    reports = {}
    for name in SOURCES:
        path = args.reports / f"{name}.json"
        if not path.is_file():
            raise SystemExit(f"error: {path} is missing: rerun the benchmark that writes it")
        reports[name] = json.loads(path.read_text(encoding="utf-8"))
    text = markdown(reports)
    (args.reports / "results.md").write_text(text, encoding="utf-8")
    print(text, end="")


if __name__ == "__main__":
    main()
