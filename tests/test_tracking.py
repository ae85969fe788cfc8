"""MLflow logging into a temporary SQLite store."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch

from grounding.grounder import grounder_bundle
from grounding.io import write_checkpoint
from grounding.model import HeadConfig, MatchingHead, head_state
from grounding.proposals import ProposalSettings
from grounding.tracking import (
    EXPERIMENT,
    REGISTERED_MODEL,
    artifact_location,
    log_pipeline_run,
    numeric_metrics,
    run_tags,
    tracking_uri,
)

PROPOSALS = ProposalSettings(
    mode="fast", max_side=300, min_size=16, dedupe_iou=0.7, max_proposals=100
)


def test_numeric_metrics_flattens_and_drops_text() -> None:
    metrics = {"f1": 0.5, "by_type": {"people": 0.25}, "name": "x", "count": 3, "ok": True}
    assert numeric_metrics(metrics) == {"f1": 0.5, "by_type.people": 0.25, "count": 3.0}


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


def test_log_pipeline_run_records_params_history_metrics_model_and_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DVC_EXP_NAME", "tidy-lamb")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    report = tmp_path / "report.md"
    report.write_text("# report\n")
    history = pd.DataFrame(
        {"epoch": [1, 2], "train_loss": [0.9, 0.4], "val_recall_at_1": [0.5, 0.7]}
    )
    metrics = {"f1": 0.8, "recall_at_1": 0.7, "roc_auc": float("nan"), "by_type": {"other": 0.6}}
    head = MatchingHead(HeadConfig(4, 3, 8, 0.0))
    grounder = tmp_path / "grounder.pt"
    checkpoint = {**head_state(head), "features": {"backbone": "efficientnet-lite0"}}
    write_checkpoint(grounder_bundle(checkpoint, 0.5, PROPOSALS), grounder)
    run_id, version = log_pipeline_run(
        uri=uri,
        artifacts_at=artifact_location(tmp_path),
        params={"train.pos_weight": 3.0, "data.root": "data/sample"},
        history=history,
        metrics=metrics,
        model=head,
        grounder=grounder,
        artifacts=[report],
        tags={"git_commit": "abc", "dvc_experiment": "tidy-lamb"},
    )
    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.run_name == "tidy-lamb"
    assert run.data.params["train.pos_weight"] == "3.0"
    assert run.data.metrics["f1"] == pytest.approx(0.8)
    assert run.data.metrics["by_type.other"] == pytest.approx(0.6)
    assert "roc_auc" not in run.data.metrics  # NaN is not logged
    assert run.data.tags["dvc_experiment"] == "tidy-lamb"
    steps = client.get_metric_history(run_id, "train_loss")
    assert [(m.step, m.value) for m in steps] == [(1, 0.9), (2, 0.4)]
    names = {artifact.path for artifact in client.list_artifacts(run_id)}
    assert "report.md" in names
    assert client.get_experiment_by_name(EXPERIMENT).artifact_location.startswith(
        (tmp_path / "mlruns").as_uri()
    )
    loaded = mlflow.pytorch.load_model(f"runs:/{run_id}/model")
    inputs = (torch.ones(2, 4), torch.ones(2, 3))
    torch.testing.assert_close(loaded.eval()(*inputs), head.eval()(*inputs))
    assert json.loads(json.dumps(run.data.params))  # plain strings, JSON-serialisable
    # the whole grounder is registered, from this run
    assert version == "1"
    assert client.get_model_version(REGISTERED_MODEL, version).run_id == run_id
