"""MLflow: one run per pipeline run, logged by the report stage.

The run holds the flattened ``params.yaml``, the per-epoch training history, the final metrics
(the same numbers as ``reports/metrics.json``), the model and the report's files, and is tagged
with the git commit and the DVC experiment name, so that runs can be compared in ``mlflow ui``.

The store defaults to ``sqlite:///<repo>/mlflow.db``; ``MLFLOW_TRACKING_URI`` overrides it.
Queued DVC experiments run in copies of the repository, so ``<repo>`` is ``DVC_ROOT`` (the
original checkout) when DVC sets it. Writers take a file lock: two processes creating the
same fresh SQLite store at once fail otherwise.
"""

from __future__ import annotations

import fcntl
import math
import os
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd

EXPERIMENT = "phrase-grounding"
MODEL_NAME = "model"  # the head alone (mlflow.pytorch)
GROUNDER_NAME = "grounder"  # the whole grounder (pyfunc): what `mlflow models serve` serves
REGISTERED_MODEL = "phrase-grounder"


def repo_root() -> Path:
    """The repository the pipeline belongs to (``DVC_ROOT`` under ``dvc exp run``)."""
    return Path(os.environ.get("DVC_ROOT", ".")).resolve()


def tracking_uri(root: Path) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the SQLite store ``<root>/mlflow.db``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"


def artifact_location(root: Path) -> str:
    """Where a new experiment keeps its artifacts: ``<root>/mlruns``. MLflow would otherwise
    resolve ``./mlruns`` against the working directory, which for a queued DVC experiment is
    a temporary copy deleted after the run."""
    return (root / "mlruns").as_uri()


def run_tags(root: Path) -> dict[str, str]:
    """The git commit of ``root`` and the DVC experiment (``workspace`` outside one)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "mlflow.source.git.commit": commit,
        "git_commit": commit,
        "dvc_experiment": os.environ.get("DVC_EXP_NAME", "workspace"),
        "dvc_baseline": os.environ.get("DVC_EXP_BASELINE_REV", commit),
    }


@contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Hold an exclusive lock beside a SQLite store while writing to it."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    database = Path(uri.removeprefix("sqlite:///"))
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{database}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def numeric_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Flatten nested metrics to ``{"a.b": float}``, keeping numbers only."""
    flat: dict[str, float] = {}
    for name, value in metrics.items():
        key = f"{prefix}{name}"
        if isinstance(value, Mapping):
            flat.update(numeric_metrics(value, f"{key}."))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[key] = float(value)
    return flat


def log_pipeline_run(
    *,
    uri: str,
    artifacts_at: str,
    params: Mapping[str, Any],
    history: pd.DataFrame,
    metrics: Mapping[str, Any],
    model: Any,
    grounder: Path,
    artifacts: Sequence[Path],
    tags: Mapping[str, str],
) -> tuple[str, str]:
    """Log one pipeline run; returns its run id and the version under which the grounder
    was registered as :data:`REGISTERED_MODEL`.

    ``artifacts_at`` is the artifact location given to the experiment if this creates it;
    ``params`` are already flat (``train.pos_weight``); ``history`` has an ``epoch`` column
    and one column per metric; ``model`` is a ``torch.nn.Module``; ``grounder`` the bundle
    file of :mod:`grounding.grounder`, logged as a pyfunc model (:mod:`grounding.serving`).
    """
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow
    import mlflow.pytorch

    with _store_lock(uri):
        mlflow.set_tracking_uri(uri)
        experiment = mlflow.get_experiment_by_name(EXPERIMENT)
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else mlflow.create_experiment(EXPERIMENT, artifact_location=artifacts_at)
        )
        with mlflow.start_run(
            # named after the DVC experiment when there is one; MLflow names the others
            experiment_id=experiment_id,
            run_name=os.environ.get("DVC_EXP_NAME"),
            tags=dict(tags),
        ) as run:
            mlflow.log_params({key: str(value) for key, value in params.items()})
            for row in history.to_dict("records"):
                epoch = int(row.pop("epoch"))
                mlflow.log_metrics({k: float(v) for k, v in row.items()}, step=epoch)
            mlflow.log_metrics(
                {k: v for k, v in numeric_metrics(metrics).items() if math.isfinite(v)}
            )
            for path in artifacts:
                mlflow.log_artifact(str(path))
            mlflow.pytorch.log_model(
                model,
                name=MODEL_NAME,
                serialization_format="pickle",
                pip_requirements=["torch", "grounding"],
            )
            from grounding.serving import SIGNATURE, GrounderModel

            logged = mlflow.pyfunc.log_model(
                name=GROUNDER_NAME,
                python_model=GrounderModel(),
                artifacts={"grounder": str(grounder)},
                signature=SIGNATURE,
                pip_requirements=["grounding"],
                registered_model_name=REGISTERED_MODEL,
            )
            return run.info.run_id, str(logged.registered_model_version)
