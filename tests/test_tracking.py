"""MLflow logging into a temporary SQLite store."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import stand_ins

from grounding.config import tracking_uri
from grounding.inference.grounder import grounder_weights
from grounding.io import write_weights
from grounding.tracking import (
    CHAMPION,
    EXPERIMENT,
    REGISTERED_MODEL,
    RUNS_VIEW,
    DatasetInput,
    _crown,
    artifact_location,
    best_version,
    changed_params,
    file_digest,
    log_pipeline_run,
    numeric_metrics,
    pipeline_started_at,
    relocate_store,
    run_tags,
    runs_page,
    split_inputs,
)


def test_numeric_metrics_flattens_and_drops_text() -> None:
    metrics = {
        "f1": 0.5,
        "by_type": {"people": 0.25, "scene": {"outdoor": 1}},
        "name": "x",
        "count": 3,
        "ok": True,
        "list": [1, 2],
    }
    assert numeric_metrics(metrics) == {
        "f1": 0.5,
        "by_type.people": 0.25,
        "by_type.scene.outdoor": 1.0,
        "count": 3.0,
    }


def test_tracking_uri_defaults_to_the_repo_and_respects_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(tmp_path) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere.db")
    assert tracking_uri(tmp_path) == "sqlite:////elsewhere.db"


def test_run_tags_name_the_dvc_experiment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DVC_EXP_NAME", "tidy-lamb")
    tags = run_tags(tmp_path)  # not a git repository: the commit is unknown, not an error
    assert tags["dvc_experiment"] == "tidy-lamb"
    assert tags["git_commit"] == "unknown"


def _logged_run(tmp_path: Path, *, validation_f1: float, pos_weight: float = 3.0):
    """Log one run of a stand-in grounder into ``tmp_path``'s store."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    report = tmp_path / "report.md"
    report.write_text("# report\n")
    history = pd.DataFrame(
        {"epoch": [1, 2], "train_loss": [0.9, 0.4], "val_recall_at_1": [0.5, 0.7]}
    )
    metrics = {"f1": 0.8, "recall_at_1": 0.7, "roc_auc": float("nan"), "by_type": {"other": 0.6}}
    trained = stand_ins.trained_head()
    head, grounder = tmp_path / "head.safetensors", tmp_path / "grounder.safetensors"
    write_weights(*trained.to_weights(), head)
    write_weights(
        *grounder_weights(
            trained, threshold=0.5, candidates="selective_search", settings=stand_ins.SETTINGS
        ),
        grounder,
    )
    (tmp_path / "test.parquet").write_bytes(b"the pairs")
    logged = log_pipeline_run(
        uri=uri,
        artifacts_at=artifact_location(tmp_path),
        params={"train.pos_weight": pos_weight, "data.root": "data/sample"},
        history=history,
        metrics=metrics,
        validation_f1=validation_f1,
        head=head,
        grounder=grounder,
        artifacts=[report],
        datasets=[
            DatasetInput(
                "flickr30k:sample", str(tmp_path), file_digest(tmp_path / "test.parquet"), "test"
            )
        ],
        tags={"git_commit": "abcdef123456", "dvc_experiment": "tidy-lamb"},
        started_at=1_000_000.0,
    )
    return uri, trained, logged


def test_log_pipeline_run_records_params_history_metrics_model_and_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DVC_EXP_NAME", "tidy-lamb")
    uri, trained, (run_id, version, champion) = _logged_run(tmp_path, validation_f1=0.7)
    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.run_name == "tidy-lamb"
    assert run.info.status == "FINISHED"
    assert run.info.start_time == 1_000_000_000  # the pipeline's start, not the logging's
    assert run.data.params["train.pos_weight"] == "3.0"
    assert run.data.metrics["f1"] == pytest.approx(0.8)
    assert run.data.metrics["val_f1"] == pytest.approx(0.7)
    assert run.data.metrics["by_type.other"] == pytest.approx(0.6)
    assert "roc_auc" not in run.data.metrics  # NaN is not logged
    assert run.data.tags["dvc_experiment"] == "tidy-lamb"
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    (dataset,) = run.inputs.dataset_inputs
    assert (dataset.dataset.name, dataset.dataset.digest) == (
        "flickr30k:sample",
        file_digest(tmp_path / "test.parquet"),
    )
    assert [t.value for t in dataset.tags if t.key == "mlflow.data.context"] == ["test"]
    steps = client.get_metric_history(run_id, "train_loss")
    assert [(m.step, m.value) for m in steps] == [(1, 0.9), (2, 0.4)]
    names = {artifact.path for artifact in client.list_artifacts(run_id)}
    assert "report.md" in names
    assert experiment.artifact_location.startswith((tmp_path / "mlruns").as_uri())
    # the head's weights, as the safetensors file: no pickle anywhere in the run
    (head_file,) = client.list_artifacts(run_id, "model")
    local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=head_file.path))
    assert local.read_bytes() == (tmp_path / "head.safetensors").read_bytes()
    store = tmp_path / "mlruns"
    assert not [path for path in store.rglob("*") if path.suffix in (".pkl", ".pickle")]
    assert json.loads(json.dumps(run.data.params))  # plain strings, JSON-serialisable
    # the whole grounder is registered, from this run, and is the first champion
    assert (version, champion) == ("1", True)
    assert client.get_model_version(REGISTERED_MODEL, version).run_id == run_id
    stand_ins.install(monkeypatch)  # the grounder file names the stand-in models
    served = mlflow.pyfunc.load_model(f"models:/{REGISTERED_MODEL}@{CHAMPION}")
    rebuilt = served.unwrap_python_model().grounder
    assert (rebuilt.threshold, rebuilt.candidates) == (0.5, "selective_search")
    assert rebuilt.features == trained.features


def test_the_champion_moves_only_to_a_better_validation_f1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    uri, _, (_, first, crowned) = _logged_run(tmp_path, validation_f1=0.7)
    assert crowned
    _, _, (run_id, worse, crowned) = _logged_run(tmp_path, validation_f1=0.6)
    assert not crowned
    client = mlflow.MlflowClient(tracking_uri=uri)
    assert client.get_run(run_id).info.run_name == "abcdef1"  # no DVC experiment: the commit
    assert str(client.get_model_version_by_alias(REGISTERED_MODEL, CHAMPION).version) == first
    _, _, (_, tie, crowned) = _logged_run(tmp_path, validation_f1=0.7)
    assert not crowned  # a tie keeps the older champion
    _, _, (_, better, crowned) = _logged_run(tmp_path, validation_f1=0.9)
    assert crowned
    assert str(client.get_model_version_by_alias(REGISTERED_MODEL, CHAMPION).version) == better
    assert (worse, tie, better) == ("2", "3", "4")


def test_a_run_left_running_by_a_killed_report_is_marked_failed(tmp_path: Path) -> None:
    uri, _, (first, _, _) = _logged_run(tmp_path, validation_f1=0.7)
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    killed = client.create_run(experiment.experiment_id).info.run_id  # never ended
    _logged_run(tmp_path, validation_f1=0.6)
    assert client.get_run(killed).info.status == "FAILED"
    assert client.get_run(first).info.status == "FINISHED"


def test_pipeline_started_at_is_none_outside_dvc() -> None:
    assert pipeline_started_at() is None  # pytest's ancestors are no `dvc repro`


def test_file_digest_changes_with_the_bytes(tmp_path: Path) -> None:
    path = tmp_path / "pairs.parquet"
    path.write_bytes(b"one")
    first = file_digest(path)
    path.write_bytes(b"two")
    assert file_digest(path) != first and len(first) == 16


def test_split_inputs_give_one_input_per_split_with_its_pairs_digest(tmp_path: Path) -> None:
    files = {}
    for split, content in (("train", b"a"), ("val", b"b"), ("test", b"a")):
        files[split] = tmp_path / f"{split}.parquet"
        files[split].write_bytes(content)
    inputs = split_inputs("flickr30k:sample", tmp_path, files)
    assert [(i.split, i.name, i.source) for i in inputs] == [
        (split, "flickr30k:sample", str(tmp_path)) for split in ("train", "val", "test")
    ]
    assert inputs[0].digest == inputs[2].digest != inputs[1].digest  # same bytes, same digest


def test_best_version_prefers_the_higher_f1_then_the_older_version() -> None:
    assert best_version({"1": 0.5, "2": 0.7, "3": 0.6}) == "2"
    assert best_version({"3": 0.7, "10": 0.7, "2": 0.1}) == "3"  # numeric order: 3 before 10


class _SlowAliasClient:
    """A real client whose first alias write waits while ``meanwhile`` runs: the interleaving
    of two pipelines on a server where one reads the versions before the other tagged its own
    and writes the alias after the other one did."""

    def __init__(self, client: mlflow.MlflowClient, meanwhile) -> None:
        self._client, self._meanwhile = client, meanwhile

    def __getattr__(self, name: str):
        return getattr(self._client, name)

    def set_registered_model_alias(self, *args) -> None:
        if self._meanwhile is not None:
            meanwhile, self._meanwhile = self._meanwhile, None
            meanwhile()
        self._client.set_registered_model_alias(*args)


def test_the_champion_ends_on_the_best_when_two_crown_at_once(tmp_path: Path) -> None:
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.create_registered_model(REGISTERED_MODEL)
    worse = client.create_model_version(REGISTERED_MODEL, source="file:///a").version
    better = client.create_model_version(REGISTERED_MODEL, source="file:///b").version
    outcomes = {}

    def the_other_pipeline() -> None:  # tags, reads and writes between the first one's steps
        outcomes["better"] = _crown(client, str(better), 0.9)

    outcomes["worse"] = _crown(_SlowAliasClient(client, the_other_pipeline), str(worse), 0.6)
    assert outcomes == {"better": True, "worse": False}
    assert str(client.get_model_version_by_alias(REGISTERED_MODEL, CHAMPION).version) == str(better)


def test_a_copied_store_is_relocated_and_never_touches_the_old_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original, copy = tmp_path / "original", tmp_path / "copy"
    original.mkdir()
    _logged_run(original, validation_f1=0.7)
    shutil.copytree(original, copy)
    shutil.rmtree(original)
    uri = f"sqlite:///{copy / 'mlflow.db'}"
    assert relocate_store(uri) == original
    assert relocate_store(uri) is None  # already pointing at itself
    with sqlite3.connect(copy / "mlflow.db") as db:
        for table, column in (
            ("experiments", "artifact_location"),
            ("runs", "artifact_uri"),
            ("model_versions", "storage_location"),
        ):
            values = [value for (value,) in db.execute(f"SELECT {column} FROM {table}")]
            assert values and all(str(original) not in str(v) for v in values), (table, values)
    stand_ins.install(monkeypatch)
    mlflow.set_tracking_uri(uri)
    served = mlflow.pyfunc.load_model(f"models:/{REGISTERED_MODEL}@{CHAMPION}")
    assert served.unwrap_python_model().grounder.threshold == 0.5
    _, _, (_, version, crowned) = _logged_run(copy, validation_f1=0.9)
    assert (version, crowned) == ("2", True)
    assert not original.exists()  # the new run wrote nothing into the old folder
    assert (copy / "mlruns").is_dir()


def test_a_store_whose_artifacts_live_elsewhere_is_left_alone(tmp_path: Path) -> None:
    checkout, shared = tmp_path / "checkout", tmp_path / "shared"
    checkout.mkdir()
    _logged_run(checkout, validation_f1=0.7)
    shared.mkdir()
    (checkout / "mlflow.db").rename(shared / "mlflow.db")  # artifacts stay in the checkout
    assert relocate_store(f"sqlite:///{shared / 'mlflow.db'}") is None
    with sqlite3.connect(shared / "mlflow.db") as db:
        (location,) = db.execute(
            "SELECT artifact_location FROM experiments WHERE name = ?", (EXPERIMENT,)
        ).fetchone()
    assert location == artifact_location(checkout)


def test_changed_params_are_the_keys_whose_values_differ() -> None:
    runs = [
        {"train.pos_weight": "1.0", "train.seed": "0", "data.root": "a"},
        {"train.pos_weight": "3", "train.seed": "0", "data.root": "a"},
        {"train.pos_weight": "3", "train.seed": "0", "data.root": "a", "train.new": "1"},
    ]
    assert changed_params(runs) == ["train.new", "train.pos_weight"]
    assert changed_params(runs[:1]) == []


def _saved_view(uri: str) -> dict:
    client = mlflow.MlflowClient(tracking_uri=uri)
    tags = client.get_experiment_by_name(EXPERIMENT).tags
    envelope = json.loads(tags[f"mlflow.sharedViewState.{RUNS_VIEW}"])
    assert isinstance(envelope["name"], str) and isinstance(envelope["createdAt"], int)
    return json.loads(envelope["state"])  # plain JSON: mlflow ui inflates only "deflate;..."


def test_each_run_pins_a_view_of_f1_recall_and_the_params_that_changed(tmp_path: Path) -> None:
    uri, _, _ = _logged_run(tmp_path, validation_f1=0.7, pos_weight=1.0)
    state = _saved_view(uri)
    assert state["selectedColumns"] == ["metrics.`f1`", "metrics.`recall_at_1`"]
    assert (state["orderByKey"], state["orderByAsc"]) == ("metrics.`f1`", False)
    _logged_run(tmp_path, validation_f1=0.6, pos_weight=3.0)
    assert _saved_view(uri)["selectedColumns"] == [
        "metrics.`f1`",
        "metrics.`recall_at_1`",
        "params.`train.pos_weight`",
    ]
    experiment = mlflow.MlflowClient(tracking_uri=uri).get_experiment_by_name(EXPERIMENT)
    assert runs_page(uri) == (
        f"http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}/runs"
        f"?viewStateShareKey={RUNS_VIEW}"
    )
