"""benchmarks/results.py: the results tables come from the reports' figures, and the committed
reports/results.md is what the command writes from the committed reports."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from repository import REPO

from benchmarks import results


def candidates(recall_at_1: float, phrases: int) -> dict:
    metrics = {
        "phrases": phrases,
        "recall_at_1": recall_at_1,
        "recall_at_5": 0.9,
        "recall_at_10": 0.95,
        "upper_bound": 1.0,
    }
    return {"annotated": metrics, "proposals": {**metrics, "upper_bound": 0.85}}


def test_the_headline_table_has_a_row_per_setting_and_the_packaged_grounder() -> None:
    pretrained = {"metrics": {"recall_at_1": 0.4737, "recall_at_5": 0.66, "phrases": 2001}}
    lines = results.headline_table(candidates(0.95, 423), candidates(0.7375, 2057), pretrained)
    assert lines[0].startswith("| data | candidates | test phrases | Recall@1 |")
    assert len(lines) == 2 + 5
    assert lines[2] == "| shipped sample | annotated | 423 | 0.950 | 0.900 | 0.950 | 1.000 |"
    assert lines[5] == "| 985 real images | proposals | 2,057 | 0.738 | 0.900 | 0.950 | 0.850 |"
    # a figure the packaged grounder's report lacks is shown as missing, not invented
    assert lines[6] == (
        "| 985 real images | proposals (packaged grounder) | 2,001 | 0.474 | 0.660 | - | - |"
    )


def test_the_quality_table_names_each_variant_as_its_setting() -> None:
    test = {
        "recall_at_1": 0.76,
        "recall_at_5": 0.98,
        "recall_at_10": 1.0,
        "merged_recall_at_1": 0.667,
        "merged_recall_at_5": 0.903,
        "merged_recall_at_10": 0.931,
    }
    quality = {
        "variants": [
            {"variant": "epochs=10", "val_recall_at_1": 0.757, "test": test},
            {"variant": "dropout=0.3", "val_recall_at_1": 0.7, "test": test},
        ]
    }
    lines = results.quality_table(quality)
    figures = "0.757 | 0.760 | 0.980 | 1.000 | 0.667 | 0.903 | 0.931"
    assert lines[2] == f"| `train.epochs=10` | {figures} |"
    assert lines[3].startswith("| `dropout=0.3` | 0.700 |")


def test_the_committed_results_are_what_the_command_writes(tmp_path: Path) -> None:
    for name in results.SOURCES:
        shutil.copy(REPO / "reports" / f"{name}.json", tmp_path)
    results.main(["--reports", str(tmp_path)])
    written = (tmp_path / "results.md").read_text(encoding="utf-8")
    assert written == (REPO / "reports" / "results.md").read_text(encoding="utf-8")


def test_a_missing_report_is_one_error_line(tmp_path: Path) -> None:
    (tmp_path / "candidates-sample.json").write_text(json.dumps(candidates(0.9, 1)))
    with pytest.raises(SystemExit, match=r"^error: .*candidates-real.json is missing"):
        results.main(["--reports", str(tmp_path)])
