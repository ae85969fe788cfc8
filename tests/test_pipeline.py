"""End to end: `dvc repro` of the whole pipeline on the shipped sample, in a temporary copy,
then an experiment that must rerun only the stages after `features`; the registered grounder
through `grounding predict` and `mlflow models serve`; the proposals setting."""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from benchmarks.scratch_repo import commit, run, scratch_repo
from grounding.serving import encode_image

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


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _post(url: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_predict_loads_the_registered_grounder(
    pipeline: tuple[Path, dict[str, str], str],
) -> None:
    work, env, _ = pipeline
    image = work / "data/sample/images/100000001.jpg"
    out = work / "predicted.png"
    printed = run(
        [
            sys.executable,
            "-m",
            "grounding.cli",
            "predict",
            str(image),
            "--phrase",
            "a blue square",
            "--caption",
            "[A man] next to [a red circle]",
            "--model",
            "models:/phrase-grounder/1",
            "--top-k",
            "2",
            "--out",
            str(out),
            "--cache",
            str(work / "cache"),
        ],
        work,
        env,
    )
    result = json.loads(printed[printed.index("{") :])
    assert [p["phrase"] for p in result["phrases"]] == ["a blue square", "A man", "a red circle"]
    for grounding in result["phrases"]:
        assert len(grounding["boxes"]) == 2
        assert grounding["boxes"][0]["score"] >= grounding["boxes"][1]["score"]
    assert out.stat().st_size > 0
    assert len(list((work / "cache").glob("*.npy"))) == 1  # proposals cached for next time


def test_served_grounder_answers_http_and_refuses_bad_input_with_400(
    pipeline: tuple[Path, dict[str, str], str],
) -> None:
    work, env, _ = pipeline
    port = _free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "models",
            "serve",
            "-m",
            "models:/phrase-grounder/1",
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        cwd=work,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=5):
                    break
            except OSError:
                assert server.poll() is None, "the server exited"
                assert time.monotonic() < deadline, "the server did not come up in 180 s"
                time.sleep(1)
        image = encode_image((work / "data/sample/images/100000001.jpg").read_bytes())
        status, body = _post(
            f"{url}/invocations",
            {
                "dataframe_split": {
                    "columns": ["image", "phrase"],
                    "data": [[image, "a blue square"], [image, "a red circle"]],
                },
                "params": {"top_k": 3},
            },
        )
        assert status == 200, body
        predictions = body["predictions"]
        assert [p["row"] for p in predictions] == [0, 0, 0, 1, 1, 1]
        assert all(0 <= p["x1"] < p["x2"] <= 212 for p in predictions)
        assert all(0.0 <= p["score"] <= 1.0 for p in predictions)

        bad = [
            [["not base64!", "a dog"]],
            [[encode_image(b"GIF89a-not-really"), "a dog"]],
            [[image, "   "]],
        ]
        for data in bad:
            status, body = _post(
                f"{url}/invocations",
                {"dataframe_split": {"columns": ["image", "phrase"], "data": data}},
            )
            assert status == 400, body
            assert body["error_code"] == "INVALID_PARAMETER_VALUE"
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_proposals_experiment_grounds_with_selective_search(
    pipeline: tuple[Path, dict[str, str], str],
) -> None:
    work, env, _ = pipeline
    commit(work, env, "lock")
    run(["dvc", "exp", "run", "-S", "pair.candidates=proposals"], work, env)
    pair = json.loads((work / "reports" / "pair.json").read_text())
    assert pair["candidates_per_image"] > 20  # proposals, not the ~4 annotated boxes
    metrics = _metrics(work)
    # proposals need not cover every phrase: the upper bound is measured, not 1 by design
    assert 0.8 <= metrics["upper_bound"] < 1.0, metrics
    assert metrics["recall_at_1"] <= metrics["recall_at_5"] <= metrics["recall_at_10"]
    assert metrics["recall_at_10"] <= metrics["upper_bound"]
    assert metrics["recall_at_1"] >= 0.6, metrics
    assert any((work / "data" / "proposals").glob("*.npy"))  # cached for the next run
