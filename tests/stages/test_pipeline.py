"""End to end: `dvc repro` of the whole pipeline on the shipped sample, in a temporary copy,
which must write the committed `dvc.lock` again; a forced rerun of `train` and `sweep` that
must write the same model files; an experiment that must rerun only the stages after
`features`; the registered grounder through `grounding predict` and `mlflow models serve`;
the selective search candidates."""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from benchmarks.scratch_repo import commit, run, scratch_repo
from grounding.inference.serving import encode_image
from grounding.io import read_weights

STAGES = ("parse", "pair", "split", "features", "train", "sweep", "report")
MODELS = ("models/head.safetensors", "models/grounder.safetensors")

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Pipeline:
    """The scratch repository after its first `dvc repro`."""

    work: Path
    env: dict[str, str]
    log: str  # what the first `dvc repro` printed
    lock_diff: str  # `git diff dvc.lock` right after it: empty when the committed lock is current
    committed_metrics: str  # reports/metrics.json as committed
    fresh_clone_metrics: dict  # what `dvc exp show --json` gave for HEAD before any `dvc repro`


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    """A fresh git + DVC repository holding the project (its `dvc.lock` committed), after one
    `dvc repro`."""
    work = tmp_path_factory.mktemp("pipeline")
    env = scratch_repo(work)
    committed_metrics = (work / "reports" / "metrics.json").read_text()
    shown = json.loads(run(["dvc", "exp", "show", "--json"], work, env))
    log = run(["dvc", "repro"], work, env)
    diff = subprocess.run(
        ["git", "diff", "--exit-code", "dvc.lock"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    if diff.returncode not in (0, 1):
        raise RuntimeError(f"git diff failed:\n{diff.stderr}")
    return Pipeline(
        work,
        env,
        log,
        diff.stdout if diff.returncode else "",
        committed_metrics,
        shown[0]["data"]["metrics"],
    )


def _metrics(work: Path) -> dict:
    return json.loads((work / "reports" / "metrics.json").read_text())


def _mlflow_runs(work: Path) -> list[tuple[str, float]]:
    with sqlite3.connect(work / "mlflow.db") as db:
        return db.execute(
            "SELECT runs.run_uuid, metrics.value FROM runs JOIN metrics "
            "ON runs.run_uuid = metrics.run_uuid WHERE metrics.key = 'f1'"
        ).fetchall()


def test_repro_learns_the_sample(pipeline: Pipeline) -> None:
    work, log = pipeline.work, pipeline.log
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
    for name in MODELS:
        assert (work / name).stat().st_size > 0, name
    assert len(_mlflow_runs(work)) == 1


def test_repro_writes_the_committed_lock(pipeline: Pipeline) -> None:
    # a stale dvc.lock makes a fresh clone rerun stages that nothing changed
    assert not pipeline.lock_diff, (
        "`dvc repro` of the committed project changed dvc.lock: run `dvc repro` and commit "
        f"dvc.lock\n{pipeline.lock_diff}"
    )


def test_a_fresh_clone_shows_the_committed_metrics(pipeline: Pipeline) -> None:
    # metrics.json is a DVC metric with cache: false, committed: `dvc exp show` has main's
    # numbers before anything is pulled or rebuilt, and a rebuild gives the same bytes
    shown = pipeline.fresh_clone_metrics["reports/metrics.json"]["data"]
    assert shown == json.loads(pipeline.committed_metrics)
    assert (pipeline.work / "reports" / "metrics.json").read_text() == pipeline.committed_metrics
    assert set(shown) >= {"f1", "recall_at_1", "merged_recall_at_1", "upper_bound"}
    # the data counts are outputs to open, not columns of `dvc exp show`
    assert set(pipeline.fresh_clone_metrics) == {"reports/metrics.json"}


def test_noop_repro_runs_nothing(pipeline: Pipeline) -> None:
    log = run(["dvc", "repro"], pipeline.work, pipeline.env)
    assert "Running stage" not in log


def test_forced_training_writes_byte_identical_models(pipeline: Pipeline) -> None:
    work, env = pipeline.work, pipeline.env
    before = {name: (work / name).read_bytes() for name in MODELS}
    log = run(["dvc", "repro", "--force", "--single-item", "train", "sweep"], work, env)
    assert "Running stage 'train'" in log and "Running stage 'sweep'" in log, log
    assert "Running stage 'features'" not in log
    for name in MODELS:
        assert (work / name).read_bytes() == before[name], f"{name} changed on a rerun"
    # the same outputs: nothing downstream is stale
    assert "Running stage" not in run(["dvc", "repro"], work, env)


def test_experiment_reruns_only_the_model_stages(pipeline: Pipeline) -> None:
    work, env = pipeline.work, pipeline.env
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


def test_predict_loads_the_registered_grounder(pipeline: Pipeline) -> None:
    work, env = pipeline.work, pipeline.env
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
            "models:/phrase-grounder@champion",
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
    # stdout and stderr together: the JSON, and the lines naming the model around it
    result, _ = json.JSONDecoder().raw_decode(printed[printed.index("{") :])
    assert [p["phrase"] for p in result["phrases"]] == ["a blue square", "A man", "a red circle"]
    assert result["model"]["source"] == "models:/phrase-grounder@champion"
    assert result["model"]["trained_on"]["synthetic"] is True
    assert "model: models:/phrase-grounder@champion, trained on sample (" in printed
    for grounding in result["phrases"]:
        assert len(grounding["boxes"]) == 2
        assert grounding["boxes"][0]["score"] >= grounding["boxes"][1]["score"]
    assert out.stat().st_size > 0
    assert len(list((work / "cache").glob("*.npy"))) == 1  # proposals cached for next time


def test_served_grounder_answers_http_and_refuses_bad_input_with_400(pipeline: Pipeline) -> None:
    work, env = pipeline.work, pipeline.env
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
        assert all("trained on sample (" in p["model"] for p in predictions)  # which model

        bad = [
            ([["not base64!", "a dog"]], {}),
            ([[encode_image(b"GIF89a-not-really"), "a dog"]], {}),
            ([[image, "   "]], {}),
            ([[image, "a dog"], [None, "a cat"]], {}),
            ([[{}, "a dog"]], {}),
            ([[image, 5]], {}),
            ([[image, "a dog"]], {"top_k": None}),
        ]
        for data, params in bad:
            status, body = _post(
                f"{url}/invocations",
                {
                    "dataframe_split": {"columns": ["image", "phrase"], "data": data},
                    **({"params": params} if params else {}),
                },
            )
            assert status == 400, body
            assert body["error_code"] == "INVALID_PARAMETER_VALUE"
            assert "stack_trace" not in body and "Traceback" not in body["message"]
    finally:
        server.terminate()
        server.wait(timeout=30)


def _runs(work: Path) -> tuple:
    """The MLflow client of the scratch store, its experiment and its runs."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("phrase-grounding")
    return client, experiment, client.search_runs([experiment.experiment_id])


def test_mlflow_runs_read_like_a_training_project(pipeline: Pipeline) -> None:
    client, experiment, runs = _runs(pipeline.work)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    commit = subprocess.run(
        ["git", "rev-list", "--max-parents=0", "HEAD"],
        cwd=pipeline.work,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    first = min(runs, key=lambda r: r.info.start_time)
    assert first.info.run_name == commit[:7]  # a plain `dvc repro`: named after the commit
    # the run spans the pipeline, features included, not just the logging (about a second)
    assert (first.info.end_time - first.info.start_time) / 1000 > 20
    for each in runs:
        assert each.info.status == "FINISHED"
        contexts = sorted(
            tag.value
            for dataset in each.inputs.dataset_inputs
            for tag in dataset.tags
            if tag.key == "mlflow.data.context"
        )
        assert contexts == ["test", "train", "val"]
        assert {d.dataset.name for d in each.inputs.dataset_inputs} == {"flickr30k:sample"}
    # the champion is the registered version with the best validation F1
    versions = client.search_model_versions("name = 'phrase-grounder'")
    best = max(versions, key=lambda v: (float(v.tags["val_f1"]), -int(v.version)))
    champion = client.get_model_version_by_alias("phrase-grounder", "champion")
    assert str(champion.version) == str(best.version)


def test_a_queue_of_three_experiments_two_at_a_time_logs_three_runs(pipeline: Pipeline) -> None:
    work, env = pipeline.work, pipeline.env
    commit(work, env, "before the queue")
    _, _, before = _runs(work)
    run(["dvc", "exp", "run", "--queue", "-S", "train.pos_weight=1.5,2,4"], work, env)
    run(["dvc", "queue", "start", "-j", "2"], work, env)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        status = run(["dvc", "queue", "status"], work, env)
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(5)
    assert "Failed" not in status, status
    client, _, after = _runs(work)
    new = [r for r in after if r.info.run_id not in {b.info.run_id for b in before}]
    assert sorted(float(r.data.params["train.pos_weight"]) for r in new) == [1.5, 2.0, 4.0]
    for each in new:
        assert each.info.status == "FINISHED"
        assert "f1" in each.data.metrics and "val_f1" in each.data.metrics
        assert len(each.inputs.dataset_inputs) == 3
        assert client.search_model_versions(f"run_id = '{each.info.run_id}'")
    versions = client.search_model_versions("name = 'phrase-grounder'")
    best = max(versions, key=lambda v: (float(v.tags["val_f1"]), -int(v.version)))
    champion = client.get_model_version_by_alias("phrase-grounder", "champion")
    assert str(champion.version) == str(best.version)


CHROMIUM = Path("/usr/bin/chromium")


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed")
def test_the_mlflow_ui_lists_the_runs_with_f1_and_shows_the_gallery(
    pipeline: Pipeline, tmp_path_factory: pytest.TempPathFactory
) -> None:
    playwright = pytest.importorskip("playwright.sync_api")
    _, experiment, runs = _runs(pipeline.work)
    shots = tmp_path_factory.mktemp("screenshots")
    port = _free_port()
    ui = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "ui",
            "--backend-store-uri",
            f"sqlite:///{pipeline.work / 'mlflow.db'}",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        cwd=pipeline.work,
        env=pipeline.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}/#/experiments/{experiment.experiment_id}"
    try:
        _wait_for(f"http://127.0.0.1:{port}/health")
        with playwright.sync_playwright() as driver:
            browser = driver.chromium.launch(
                executable_path=str(CHROMIUM),
                args=[
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                ],
            )
            page = browser.new_page(viewport={"width": 1600, "height": 900})
            page.goto(f"{base}/runs")
            for each in runs:
                page.get_by_text(each.info.run_name, exact=True).first.wait_for(timeout=60_000)
            assistant = page.get_by_role("button", name="Close")  # MLflow 3's chat panel
            if assistant.count():
                assistant.first.click()
            # the README's clicks: Columns, then the metrics and the param to compare
            page.get_by_role("button", name="Columns", exact=True).click()
            for column in ("f1", "recall_at_1", "train.pos_weight"):
                page.get_by_text(column, exact=True).first.click()
            page.keyboard.press("Escape")
            best = max(runs, key=lambda r: r.data.metrics["f1"])
            page.get_by_text(str(best.data.metrics["f1"])[:6]).first.wait_for(timeout=30_000)
            page.screenshot(path=str(shots / "runs.png"))
            page.goto(f"{base}/runs/{best.info.run_id}/artifacts/gallery.png")
            page.get_by_text("Test phrases", exact=False).or_(
                page.locator("img[src^='data:image/png'], img[src^='blob:']")
            ).first.wait_for(timeout=60_000)
            page.screenshot(path=str(shots / "run-gallery.png"))
            browser.close()
    finally:
        ui.terminate()
        ui.wait(timeout=30)
    for name in ("runs.png", "run-gallery.png"):
        assert (shots / name).stat().st_size > 10_000
    print(f"screenshots in {shots}")


def _wait_for(url: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(1)
    raise TimeoutError(f"{url} did not answer in {seconds} s")


def test_selective_search_experiment_grounds_with_proposals(pipeline: Pipeline) -> None:
    work, env = pipeline.work, pipeline.env
    commit(work, env, "lock")
    log = run(["dvc", "exp", "run", "-S", "pair.candidates=selective_search"], work, env)
    assert "Running stage 'pair'" in log and "Running stage 'parse'" not in log, log
    pair = json.loads((work / "reports" / "pair.json").read_text())
    assert pair["candidates_per_image"] > 20  # proposals, not the ~4 annotated boxes
    metrics = _metrics(work)
    # proposals need not cover every phrase: the upper bound is measured, not 1 by design
    assert 0.8 <= metrics["upper_bound"] < 1.0, metrics
    assert metrics["recall_at_1"] <= metrics["recall_at_5"] <= metrics["recall_at_10"]
    assert metrics["recall_at_10"] <= metrics["upper_bound"]
    assert metrics["recall_at_1"] >= 0.6, metrics
    assert any((work / "data" / "proposals").glob("*.npy"))  # cached for the next run
    _, config = read_weights(work / "models" / "grounder.safetensors")
    assert config["candidates"]["name"] == "selective_search"
