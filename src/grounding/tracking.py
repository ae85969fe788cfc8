"""MLflow: one run per pipeline run, logged by the report stage.

The run holds the flattened ``params.yaml``, the per-epoch training history, the final metrics
(the same numbers as ``reports/metrics.json``), the data as dataset inputs (one per split, with
a digest of its pairs), the head's weights, the report's files and the grounder as a
registered pyfunc model, and is tagged with the git commit and the DVC experiment name. It is
named after the DVC experiment (the short commit for a plain ``dvc repro``) and spans the
pipeline run: it starts when the ``dvc repro`` / ``dvc exp run`` process that ran the stages
started. The experiment is marked as a model-training one, and the registered model's alias
:data:`CHAMPION` follows the version with the best validation F1. The experiment's saved view
:data:`RUNS_VIEW` shows F1, Recall@1 and the params that differ between runs, best F1
first; only the headline metrics are top-level. Nothing logged is a pickle:
the grounder is a model from code (:mod:`grounding.inference.mlflow_model`) with safetensors
weights.

The store defaults to ``sqlite:///<repo>/mlflow.db``; ``MLFLOW_TRACKING_URI`` overrides it.
Queued DVC experiments run in copies of the repository, so ``<repo>`` is ``DVC_ROOT`` (the
original checkout) when DVC sets it. Writers take a file lock: two processes creating the
same fresh SQLite store at once fail otherwise.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import subprocess
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from grounding.config import flatten

EXPERIMENT = "phrase-grounding"
#: The MLflow UI opens a model-training experiment on its runs, not on GenAI traces.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
HEAD_ARTIFACTS = "model"  # the head's weights file
GROUNDER_NAME = "grounder"  # the whole grounder (pyfunc): what `mlflow models serve` serves
REGISTERED_MODEL = "phrase-grounder"
#: The alias of the registered version with the best validation F1.
CHAMPION = "champion"
_MODEL_CODE = Path(__file__).parent / "inference" / "mlflow_model.py"
#: The runs view that :func:`log_pipeline_run` keeps current: its key (the address's
#: ``viewStateShareKey``), its name under **Views**, and its metric columns (sorted by the first).
RUNS_VIEW = "best-f1"
RUNS_VIEW_NAME = "Best F1 and the params that changed"
VIEW_METRICS = ("f1", "recall_at_1")
#: The experiment tag prefix under which mlflow ui (3.17) keeps saved views.
_SAVED_VIEW_TAG = "mlflow.sharedViewState."


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


def numeric_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Flatten nested metrics to ``{"a.b": float}``, keeping numbers only."""
    return {
        key: float(value)
        for key, value in flatten(metrics).items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }


@dataclass(frozen=True)
class DatasetInput:
    """One split of the data as MLflow shows it: ``name`` (the dataset), ``source`` (where it
    lives: ``data.root``), ``digest`` (changes when the split's pairs change) and ``split``."""

    name: str
    source: str
    digest: str
    split: str


def file_digest(path: Path) -> str:
    """A short hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def split_inputs(name: str, source: Path, split_files: Mapping[str, Path]) -> list[DatasetInput]:
    """The dataset inputs of a run: ``name`` at ``source``, one per split, each with the digest
    of that split's pairs file."""
    return [
        DatasetInput(name, str(source), file_digest(path), split)
        for split, path in split_files.items()
    ]


def run_name(tags: Mapping[str, str]) -> str | None:
    """The DVC experiment's name, else the short commit (None outside git)."""
    if os.environ.get("DVC_EXP_NAME"):
        return os.environ["DVC_EXP_NAME"]
    commit = tags.get("git_commit", "unknown")
    return commit[:7] if commit != "unknown" else None


def pipeline_started_at() -> float | None:
    """When the DVC command that runs this stage started (seconds since the epoch): the
    creation time of the nearest ancestor process whose command line is ``dvc repro``,
    ``dvc exp run`` or DVC's queued-experiment runner; None when no DVC process ran it."""
    import psutil

    try:
        process = psutil.Process().parent()
        while process is not None:
            words = " ".join(process.cmdline())
            if "dvc" in words and any(w in words for w in ("repro", "exp run", "exec-run")):
                return process.create_time()
            process = process.parent()
    except psutil.Error:
        return None
    return None


def log_pipeline_run(
    *,
    uri: str,
    artifacts_at: str,
    params: Mapping[str, Any],
    history: pd.DataFrame,
    metrics: Mapping[str, Any],
    validation_f1: float,
    head: Path,
    grounder: Path,
    artifacts: Sequence[Path],
    datasets: Sequence[DatasetInput],
    tags: Mapping[str, str],
    started_at: float | None = None,
) -> tuple[str, str, bool]:
    """Log one pipeline run; returns its run id, the version under which the grounder was
    registered as :data:`REGISTERED_MODEL`, and whether that version became the
    :data:`CHAMPION` (its ``validation_f1`` beats the champion's; ties keep the older one).

    ``artifacts_at`` is the artifact location given to the experiment if this creates it;
    ``params`` are already flat (``train.pos_weight``); ``history`` has an ``epoch`` column
    and one column per metric; ``head`` and ``grounder`` are weights files
    (:mod:`grounding.io.weights`), the grounder logged as a pyfunc model from code;
    ``started_at`` is when the pipeline run began (default: now). A run left RUNNING by a
    report stage that was killed is marked FAILED first.
    """
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    from grounding.inference.serving import SIGNATURE

    with _store_lock(uri):
        mlflow.set_tracking_uri(uri)
        client = mlflow.MlflowClient()
        experiment = mlflow.get_experiment_by_name(EXPERIMENT)
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else mlflow.create_experiment(EXPERIMENT, artifact_location=artifacts_at)
        )
        client.set_experiment_tag(experiment_id, *EXPERIMENT_KIND)
        # every writer holds the lock while its run is open: a RUNNING run seen now was killed
        for stale in client.search_runs([experiment_id], "attributes.status = 'RUNNING'"):
            client.set_terminated(stale.info.run_id, status="FAILED")
        created = client.create_run(
            experiment_id,
            start_time=int(1000 * (started_at if started_at is not None else time.time())),
            tags=dict(tags),
            run_name=run_name(tags),
        )
        with mlflow.start_run(run_id=created.info.run_id) as run:
            mlflow.log_params({key: str(value) for key, value in params.items()})
            for row in history.to_dict("records"):
                epoch = int(row.pop("epoch"))
                mlflow.log_metrics({k: float(v) for k, v in row.items()}, step=epoch)
            scores = {**numeric_metrics(metrics), "val_f1": float(validation_f1)}
            mlflow.log_metrics({k: v for k, v in scores.items() if math.isfinite(v)})
            with warnings.catch_warnings():  # a local folder is "ambiguous" to MLflow's resolver
                warnings.simplefilter("ignore")
                for dataset in datasets:
                    mlflow.log_input(
                        MetaDataset(
                            resolve_dataset_source(dataset.source),
                            name=dataset.name,
                            digest=dataset.digest,
                        ),
                        context=dataset.split,
                    )
            for path in artifacts:
                mlflow.log_artifact(str(path))
            mlflow.log_artifact(str(head), artifact_path=HEAD_ARTIFACTS)
            logged = mlflow.pyfunc.log_model(
                name=GROUNDER_NAME,
                python_model=str(_MODEL_CODE),
                artifacts={"grounder": str(grounder)},
                signature=SIGNATURE,
                pip_requirements=["grounding"],
                registered_model_name=REGISTERED_MODEL,
            )
        version = str(logged.registered_model_version)
        pin_runs_view(client, experiment_id)
        return run.info.run_id, version, _crown(client, version, float(validation_f1))


def _crown(client: Any, version: str, validation_f1: float) -> bool:
    """Tag ``version`` with its validation F1; move :data:`CHAMPION` to it if it beats the
    champion's. Returns whether it did."""
    from mlflow.exceptions import MlflowException

    client.set_model_version_tag(REGISTERED_MODEL, version, "val_f1", repr(validation_f1))
    try:
        champion = client.get_model_version_by_alias(REGISTERED_MODEL, CHAMPION)
        best = float(champion.tags.get("val_f1", "-inf"))
    except MlflowException:  # no champion yet
        best = -math.inf
    if validation_f1 > best:
        client.set_registered_model_alias(REGISTERED_MODEL, CHAMPION, version)
        return True
    return False


def changed_params(runs_params: Sequence[Mapping[str, str]]) -> list[str]:
    """The param keys whose value differs between runs (a key a run lacks counts as a value),
    sorted: what a comparison of these runs is about."""
    keys = sorted({key for params in runs_params for key in params})
    return [key for key in keys if len({params.get(key) for params in runs_params}) > 1]


def runs_view_state(params: Sequence[str]) -> dict[str, Any]:
    """The runs-table state of ``mlflow ui`` (3.17's saved views) that shows the name, the
    :data:`VIEW_METRICS` and ``params`` as columns, best F1 first."""
    return {
        "searchFilter": "",
        "orderByKey": f"metrics.`{VIEW_METRICS[0]}`",
        "orderByAsc": False,
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "datasetsFilter": [],
        "modelVersionFilter": "All Runs",
        "selectedColumns": [
            *(f"metrics.`{name}`" for name in VIEW_METRICS),
            *(f"params.`{name}`" for name in params),
        ],
        "columnOrder": [],
        "columnWidths": {},
        "runsHiddenMode": "SHOW_ALL",
        "viewMaximized": False,
        "runListHidden": False,
        "isAccordionReordered": False,
        "useGroupedValuesInCharts": True,
        "hideEmptyCharts": True,
        "groupBy": None,
        "groupsExpanded": {},
        "globalLineChartConfig": {
            "xAxisKey": "step",
            "lineSmoothness": 0,
            "selectedXAxisMetricKey": "",
        },
    }


def pin_runs_view(client: Any, experiment_id: str) -> None:
    """Save the view :data:`RUNS_VIEW` of the experiment: :func:`runs_view_state` with the
    params that differ between its runs, as the experiment tag ``mlflow.sharedViewState.<key>``
    that ``mlflow ui`` reads for ``?viewStateShareKey=<key>`` and lists under **Views**."""
    runs = client.search_runs([experiment_id], max_results=1000)
    state = runs_view_state(changed_params([run.data.params for run in runs]))
    now = int(1000 * time.time())
    envelope = {
        "name": RUNS_VIEW_NAME,
        "createdAt": now,
        "updatedAt": now,
        "state": json.dumps(state),
    }
    client.set_experiment_tag(experiment_id, f"{_SAVED_VIEW_TAG}{RUNS_VIEW}", json.dumps(envelope))


def runs_page(uri: str) -> str | None:
    """The address of the experiment's runs in ``mlflow ui``, opened on the view
    :data:`RUNS_VIEW` (the UI opens an experiment on its GenAI overview otherwise), None if
    it does not exist yet."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return None
    return (
        f"http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}/runs"
        f"?viewStateShareKey={RUNS_VIEW}"
    )
