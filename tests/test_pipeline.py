"""End to end: `dvc repro` of the whole pipeline on the shipped sample, in a temporary copy,
then an experiment that must rerun only the stages after `features`."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from benchmarks.scratch_repo import commit, run, scratch_repo

STAGES = ("parse", "pair", "split", "features", "train", "sweep", "report")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str], str]:
    """A fresh git + DVC repository holding the project, after one `dvc repro`."""
    work = tmp_path_factory.mktemp("pipeline")
    env = scratch_repo(work)
    return work, env, run(["dvc", "repro"], work, env)


def _metrics(work: Path) -> dict:
    return json.loads((work / "reports" / "metrics.json").read_text())


def _mlflow_runs(work: Path) -> list[tuple[str, float]]:
    with sqlite3.connect(work / "mlflow.db") as db:
        return db.execute(
            "SELECT runs.run_uuid, metrics.value FROM runs JOIN metrics "
            "ON runs.run_uuid = metrics.run_uuid WHERE metrics.key = 'f1'"
        ).fetchall()


def test_repro_learns_the_sample(pipeline: tuple[Path, dict[str, str], str]) -> None:
    work, _, log = pipeline
    for stage in STAGES:
        assert f"Running stage '{stage}'" in log
    metrics = _metrics(work)
    assert metrics["f1"] >= 0.9, metrics
    assert metrics["recall_at_1"] >= 0.9, metrics
    assert metrics["upper_bound"] == 1.0  # annotated candidates always hold the truth
    for name in (
        "report.md",
        "gallery.png",
        "plots/confusion.png",
        "plots/precision_recall.png",
        "plots/sweep.png",
        "plots/train.png",
        "validation/features.json",
    ):
        assert (work / "reports" / name).stat().st_size > 0, name
    assert len(_mlflow_runs(work)) == 1


def test_noop_repro_runs_nothing(pipeline: tuple[Path, dict[str, str], str]) -> None:
    work, env, _ = pipeline
    log = run(["dvc", "repro"], work, env)
    assert "Running stage" not in log


def test_experiment_reruns_only_the_model_stages(
    pipeline: tuple[Path, dict[str, str], str],
) -> None:
    work, env, _ = pipeline
    commit(work, env, "lock")
    log = run(["dvc", "exp", "run", "-S", "train.pos_weight=3"], work, env)
    rerun = {stage for stage in STAGES if f"Running stage '{stage}'" in log}
    assert rerun == {"train", "sweep", "report"}, log
    assert len(_mlflow_runs(work)) == 2
