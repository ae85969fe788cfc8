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

The store defaults to ``sqlite:///<repo>/mlflow.db`` with the artifacts in ``<repo>/mlruns``;
``MLFLOW_TRACKING_URI`` overrides it (a team's ``mlflow server``: docs/collaboration.md).
Queued DVC experiments run in copies of the repository, so ``<repo>`` is ``DVC_ROOT`` (the
original checkout) when DVC sets it. Writers of a SQLite store take a file lock: two processes
creating the same fresh store at once fail otherwise. MLflow records absolute paths in the
store; :func:`relocate_store` rewrites them when the checkout was copied or moved, so that it
never reads from or writes into the old folder. A server has no such lock: two pipelines
finishing together each register their version, and :func:`_crown` converges on the best one.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import sqlite3
import subprocess
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

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


def _sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, None for any other store."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


@contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Hold an exclusive lock beside a SQLite store while writing to it."""
    database = _sqlite_file(uri)
    if database is None:
        yield
        return
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{database}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def relocate_store(uri: str) -> Path | None:
    """Make a SQLite store that was copied or moved with its checkout point at itself; returns
    the folder it was moved from (None when nothing was rewritten).

    The embedded store is ``<folder>/mlflow.db`` beside the artifacts in ``<folder>/mlruns``,
    and MLflow records absolute paths (artifact roots ``file:///<folder>/mlruns/...`` of the
    experiment, its runs, logged models and model versions; dataset sources). When the runs'
    artifacts are found in ``<new folder>/mlruns`` but the store names another folder, every
    occurrence of the old folder in the store's text becomes the new one. A store shared by
    several checkouts (its artifacts are not beside it) is left alone; any other store (a
    server) too."""
    database = _sqlite_file(uri)
    if database is None or not database.is_file():  # nothing to move, and no lock file made
        return None
    with _store_lock(uri):
        return _relocate(uri)


def _relocate(uri: str) -> Path | None:
    database = _sqlite_file(uri)
    if database is None or not database.is_file():
        return None
    folder = database.resolve().parent
    with closing(sqlite3.connect(database)) as db, db:
        tables = {
            name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        if "experiments" not in tables:
            return None
        found = db.execute(
            "SELECT experiment_id, artifact_location FROM experiments WHERE name = ?",
            (EXPERIMENT,),
        ).fetchone()
        if found is None or not str(found[1]).startswith("file://"):
            return None
        old = Path(unquote(urlsplit(found[1]).path)).parent
        runs = db.execute("SELECT run_uuid FROM runs WHERE experiment_id = ?", (found[0],))
        if old == folder or not any((folder / "mlruns" / run).is_dir() for (run,) in runs):
            return None
        # as written in paths, and as written in file URIs (percent-encoded)
        rewrites = {f"{old}/": f"{folder}/", f"{quote(str(old))}/": f"{quote(str(folder))}/"}
        for table in sorted(tables):
            columns = db.execute(f'PRAGMA table_info("{table}")').fetchall()
            texts = [c[1] for c in columns if "CHAR" in c[2].upper() or "TEXT" in c[2].upper()]
            for column in texts:
                for before, after in rewrites.items():
                    db.execute(
                        f'UPDATE "{table}" SET "{column}" = replace("{column}", ?, ?) '
                        f'WHERE instr("{column}", ?) > 0',
                        (before, after, before),
                    )
    return old


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

    ``artifacts_at`` is the artifact location given to the experiment if this creates it in a
    SQLite store (a server's experiment gets the server's own);
    ``params`` are already flat (``train.pos_weight``); ``history`` has an ``epoch`` column
    and one column per metric; ``head`` and ``grounder`` are weights files
    (:mod:`grounding.io.weights`), the grounder logged as a pyfunc model from code;
    ``started_at`` is when the pipeline run began (default: now). A run left RUNNING by a
    report stage that was killed is marked FAILED first (in a SQLite store only). A SQLite
    store copied or moved with its checkout is relocated first (:func:`relocate_store`).
    """
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # MLflow prints a server's run address with the URI's password; the stage prints its own
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    from grounding.inference.serving import SIGNATURE

    with _store_lock(uri):
        _relocate(uri)
        mlflow.set_tracking_uri(uri)
        client = mlflow.MlflowClient()
        # a server keeps the artifacts itself (--serve-artifacts): no folder of this checkout
        experiment_id = _experiment_id(client, artifacts_at if _sqlite_file(uri) else None)
        client.set_experiment_tag(experiment_id, *EXPERIMENT_KIND)
        if _sqlite_file(uri) is not None:
            # every writer holds the lock while its run is open: a RUNNING run seen now was
            # killed (a server has no such lock: another person's run may be running)
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


def _experiment_id(client: Any, artifacts_at: str | None) -> str:
    """The id of :data:`EXPERIMENT`, created with ``artifacts_at`` if it does not exist (on a
    server, another pipeline may create it at the same moment: then that one is used)."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is not None:
        return str(experiment.experiment_id)
    try:
        return str(client.create_experiment(EXPERIMENT, artifact_location=artifacts_at))
    except MlflowException:
        experiment = client.get_experiment_by_name(EXPERIMENT)
        if experiment is None:
            raise
        return str(experiment.experiment_id)


def best_version(tagged: Mapping[str, float]) -> str:
    """The version with the best validation F1 of ``{version: val_f1}``; a tie goes to the
    older (lower) version."""
    return min(tagged, key=lambda version: (-tagged[version], int(version)))


def _crown(client: Any, version: str, validation_f1: float, *, rounds: int = 20) -> bool:
    """Tag ``version`` with its validation F1, then point :data:`CHAMPION` at the best tagged
    version and return whether that is ``version``.

    Two pipelines finishing together on a server may each read the versions before the other
    tagged its own, and the later alias write wins. So each one, after writing, reads again
    until the alias it reads is the best version it reads: the last writer reads after every
    version was tagged (each tags before its first read), so the alias ends on the best."""
    from mlflow.exceptions import MlflowException

    client.set_model_version_tag(REGISTERED_MODEL, version, "val_f1", repr(validation_f1))
    for _ in range(rounds):
        tagged = {
            str(each.version): float(each.tags["val_f1"])
            for each in client.search_model_versions(f"name = '{REGISTERED_MODEL}'")
            if "val_f1" in each.tags
        }
        best = best_version(tagged)
        try:
            current = str(client.get_model_version_by_alias(REGISTERED_MODEL, CHAMPION).version)
        except MlflowException:  # no champion yet
            current = None
        if current == best:
            return best == version
        client.set_registered_model_alias(REGISTERED_MODEL, CHAMPION, best)
    raise RuntimeError(f"@{CHAMPION} still moving after {rounds} rounds")


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
    """The ``#/experiments/<id>/runs`` address of the experiment in the UI, opened on the view
    :data:`RUNS_VIEW` (the UI opens an experiment on its GenAI overview otherwise): on the
    server of an ``http(s)`` store (without its credentials), else on a local ``mlflow ui``;
    None if it does not exist yet."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return None
    parts = urlsplit(uri)
    server = "http://127.0.0.1:5000"
    if parts.scheme in ("http", "https"):
        port = f":{parts.port}" if parts.port else ""
        server = f"{parts.scheme}://{parts.hostname}{port}{parts.path.rstrip('/')}"
    return f"{server}/#/experiments/{experiment.experiment_id}/runs?viewStateShareKey={RUNS_VIEW}"
