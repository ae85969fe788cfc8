"""End to end: `dvc repro` of the whole pipeline on the shipped sample, in a temporary copy,
then an experiment that must rerun only the stages after `features`."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COPIED = ["dvc.yaml", "params.yaml", "stages", "src", "data/sample", ".dvcignore"]

pytestmark = pytest.mark.slow


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str], str]:
    """A fresh git + DVC repository holding the project, after one `dvc repro`."""
    work = tmp_path_factory.mktemp("pipeline")
    for name in COPIED:
        source, target = REPO / name, work / name
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "GIT_AUTHOR_NAME": "test",
        "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "test",
        "GIT_COMMITTER_EMAIL": "test@example.com",
    }
    _run(["git", "init", "-q"], work, env)
    _run(["dvc", "init", "-q"], work, env)
    _run(["dvc", "config", "core.analytics", "false"], work, env)
    _run(["git", "add", "-A"], work, env)
    _run(["git", "commit", "-qm", "project"], work, env)
    log = _run(["dvc", "repro"], work, env)
    return work, env, log


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
    for stage in ("parse", "pair", "split", "features", "train", "sweep", "report"):
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
    log = _run(["dvc", "repro"], work, env)
    assert "Running stage" not in log


def test_experiment_reruns_only_the_model_stages(
    pipeline: tuple[Path, dict[str, str], str],
) -> None:
    work, env, _ = pipeline
    _run(["git", "add", "-A"], work, env)
    _run(["git", "commit", "-qm", "lock"], work, env)
    log = _run(["dvc", "exp", "run", "-S", "train.pos_weight=3"], work, env)
    rerun = {
        stage
        for stage in ("parse", "pair", "split", "features", "train", "sweep", "report")
        if f"Running stage '{stage}'" in log
    }
    assert rerun == {"train", "sweep", "report"}, log
    assert len(_mlflow_runs(work)) == 2
