"""End to end: `dvc repro` of the whole pipeline on the shipped sample, in a temporary copy,
which must write the committed `dvc.lock` again; a forced rerun of `train` and `sweep` that
must write the same model files; an experiment that must rerun only the stages after
`features`; the registered grounder through `grounding predict` and `mlflow models serve`;
the selective search candidates."""

from __future__ import annotations

import json
import os
import re
import shlex
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
import yaml
from repository import SHARED_DATA, commit, run, scratch_repo

from grounding.config import load_params
from grounding.inference.serving import encode_image
from grounding.io import read_weights
from grounding.numerics import bytes_are_portable
from grounding.tracking import runs_page

STAGES = ("parse", "pair", "split", "features", "train", "sweep", "report")
MODELS = ("models/head.safetensors", "models/grounder.safetensors")
#: The stages whose outputs are floats torch computed: their bytes are the committed ones only
#: where the numerics are portable (docs/reproducibility.md).
FLOAT_STAGES = ("features", "train", "sweep", "report")
#: Where the bytes cannot hold, each metric of the rebuild is within this of the committed one
#: (the same sample and code on an AVX-512 machine moved roc_auc by 6e-6, threshold by 5e-5).
METRICS_TOLERANCE = 0.01
#: Kernel settings that change today's feature bytes when set from outside (measured:
#: docs/reproducibility.md); portable numerics must override every one of them.
FOREIGN_KERNELS = (
    {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": "SSE41"},
    {"ATEN_CPU_CAPABILITY": "avx512", "MKL_CBWR": "AUTO", "OMP_NUM_THREADS": "1"},
)

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


def why_bytes_differ(work: Path) -> str | None:
    """Why this machine cannot write the committed float bytes (None where it can): numerics
    fast, a CPU that is not x86-64 with AVX2, or a GPU."""
    runtime = load_params(work / "params.yaml").runtime
    if runtime.numerics != "portable":
        return f"runtime.numerics is {runtime.numerics}"
    if not bytes_are_portable(runtime.numerics):
        return "this CPU is not x86-64 with AVX2"
    if runtime.device != "cpu":
        import torch

        if torch.cuda.is_available():
            return f"runtime.device {runtime.device} runs on this machine's GPU"
    return None


def _lock_entries(lock: dict) -> dict[tuple[str, str, str], object]:
    """(stage, kind, path or param) -> hash or value of every dep, param and out of a
    dvc.lock, but the paths that a stage of FLOAT_STAGES writes."""
    floats = {
        out["path"]
        for stage in FLOAT_STAGES
        for out in lock["stages"].get(stage, {}).get("outs", [])
    }
    entries: dict[tuple[str, str, str], object] = {}
    for stage, locked in lock["stages"].items():
        for kind in ("deps", "outs"):
            for item in locked.get(kind, []):
                if item["path"] not in floats:
                    entries[stage, kind, item["path"]] = item.get("md5")
        for file, values in locked.get("params", {}).items():
            entries[stage, "params", file] = values
    return entries


def test_repro_writes_the_committed_lock(pipeline: Pipeline) -> None:
    # a stale dvc.lock makes a fresh clone rerun stages that nothing changed
    stale = "`dvc repro` of the committed project changed dvc.lock: run `dvc repro` and commit"
    reason = why_bytes_differ(pipeline.work)
    if reason is None:
        assert not pipeline.lock_diff, f"{stale} dvc.lock\n{pipeline.lock_diff}"
        return
    # the floats differ in their last bits here: code, params and data must still be the
    # committed ones exactly, and the metrics within METRICS_TOLERANCE
    committed = yaml.safe_load(run(["git", "show", "HEAD:dvc.lock"], pipeline.work, pipeline.env))
    written = yaml.safe_load((pipeline.work / "dvc.lock").read_text())
    assert _lock_entries(written) == _lock_entries(committed), f"{stale} dvc.lock"
    _assert_close(_metrics(pipeline.work), json.loads(pipeline.committed_metrics))
    print(f"dvc.lock: float outputs not compared byte for byte ({reason})")


def _assert_close(rebuilt: dict, committed: dict) -> None:
    assert rebuilt.keys() == committed.keys()
    for name, value in committed.items():
        assert abs(rebuilt[name] - value) <= METRICS_TOLERANCE, (name, rebuilt[name], value)


def test_a_fresh_clone_shows_the_committed_metrics(pipeline: Pipeline) -> None:
    # metrics.json is a DVC metric with cache: false, committed: `dvc exp show` has main's
    # numbers before anything is pulled or rebuilt, and a rebuild gives the same bytes
    shown = pipeline.fresh_clone_metrics["reports/metrics.json"]["data"]
    assert shown == json.loads(pipeline.committed_metrics)
    if why_bytes_differ(pipeline.work) is None:
        rebuilt = (pipeline.work / "reports" / "metrics.json").read_text()
        assert rebuilt == pipeline.committed_metrics
    else:
        _assert_close(_metrics(pipeline.work), json.loads(pipeline.committed_metrics))
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


def test_foreign_kernel_settings_write_the_committed_features_and_model(
    pipeline: Pipeline,
) -> None:
    # settings a user's shell may carry (each changes today's bytes without portable numerics)
    # are overridden: features and train write the committed bytes under every one of them
    work = pipeline.work
    reason = why_bytes_differ(work)
    if reason is not None:
        pytest.skip(f"the committed bytes cannot be written here: {reason}")
    committed = yaml.safe_load(run(["git", "show", "HEAD:dvc.lock"], work, pipeline.env))
    for kernels in FOREIGN_KERNELS:
        env = {**pipeline.env, **kernels}
        log = run(["dvc", "repro", "--force", "--single-item", "features", "train"], work, env)
        assert "Running stage 'features'" in log and "Running stage 'train'" in log, log
        written = yaml.safe_load((work / "dvc.lock").read_text())
        for stage in ("features", "train"):
            assert written["stages"][stage]["outs"] == committed["stages"][stage]["outs"], (
                stage,
                kernels,
            )
    assert "Running stage" not in run(["dvc", "repro"], work, pipeline.env)


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


def test_served_grounder_answers_http_and_refuses_bad_input_with_400(
    pipeline: Pipeline, tmp_path: Path
) -> None:
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

        # the commands of docs/serving.md, on a real photo when there is one: its base64
        # (over 128 KB) cannot be one argument of a command line
        status, body = _documented_serving_example(work, url, tmp_path)
        assert status == 200, body
        assert [p["row"] for p in body["predictions"]] == [0, 0, 0, 1, 1, 1]

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


def _documented_serving_example(work: Path, url: str, folder: Path) -> tuple[int, dict]:
    """Run the serving example of docs/serving.md in ``folder`` (build ``body.json`` from
    ``photo.jpg``, then ``curl --data-binary @body.json``) against ``url``; the photo is the
    largest real image in ``../shared`` (about 280 KB), else a sample image of ``work``.
    Returns the HTTP status and body."""
    page = README.parent / "docs" / "serving.md"
    example = re.search(r"```bash\n(\{ printf.*?)```", page.read_text(encoding="utf-8"), re.S)
    assert example, "docs/serving.md's serving example is gone"
    real = SHARED_DATA / "images"
    photos = sorted(real.glob("*.jpg"), key=lambda f: f.stat().st_size) if real.is_dir() else []
    photo = photos[-1] if photos else work / "data/sample/images/100000001.jpg"
    (folder / "photo.jpg").write_bytes(photo.read_bytes())
    script = example.group(1).replace("http://127.0.0.1:5001", url)
    script = script.replace("curl -s", "curl -s -o answer.json -w '%{http_code}'")
    done = subprocess.run(
        ["bash", "-c", script], cwd=folder, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return int(done.stdout), json.loads((folder / "answer.json").read_text())


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
        # the headline metrics, val_f1 and the training curves; the confusion counts and the
        # per-type figures are in the logged test.json, not 27 columns of the runs table
        headline = set(json.loads(pipeline.committed_metrics))
        curves = {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_recall_at_1"}
        assert set(each.data.metrics) == headline | curves | {"val_f1"}, each.data.metrics
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
#: headless Debian chromium, nothing fetched behind the page's back
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


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
            browser = driver.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1600, "height": 900})
            # the address the report stage prints: the pinned view, no click needed
            printed = runs_page(f"sqlite:///{pipeline.work / 'mlflow.db'}")
            page.goto(printed.replace("127.0.0.1:5000", f"127.0.0.1:{port}"))
            for each in runs:
                page.get_by_text(each.info.run_name, exact=True).first.wait_for(timeout=60_000)
            headers = page.evaluate(
                "() => Array.from(document.querySelectorAll('[role=columnheader]'))"
                ".map(h => [h.innerText.trim(), h.getBoundingClientRect().right])"
            )
            seen = {name: right for name, right in headers if name}
            for column in ("f1", "recall_at_1", "train.pos_weight"):
                assert column in seen and seen[column] <= 1600, headers  # on screen, unscrolled
            best = max(runs, key=lambda r: r.data.metrics["f1"])
            names = [each.info.run_name for each in runs]
            shown = page.evaluate(
                "names => names.map(n => [n, Array.from(document.querySelectorAll('a'))"
                ".filter(a => a.innerText.trim() === n).map(a => a.getBoundingClientRect().top)"
                "[0]])",
                names,
            )
            assert min(shown, key=lambda pair: pair[1])[0] == best.info.run_name, shown
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
        try:
            ui.wait(timeout=120)  # a graceful stop takes over 30 s on a loaded machine
        except subprocess.TimeoutExpired:
            ui.kill()
            ui.wait()
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


def test_the_readmes_exp_show_ranks_the_experiments_by_f1_at_120_columns(
    pipeline: Pipeline,
) -> None:
    # after the queue above, before the selective-search experiment commits a new HEAD: three
    # experiments of HEAD that differ in train.pos_weight
    work, env = pipeline.work, pipeline.env
    shown = run(_readme_command("which experiment is best"), work, {**env, "COLUMNS": "120"})
    lines = shown.splitlines()
    assert max(map(len, lines)) <= 120, shown
    assert "…" not in shown, shown  # nothing elided: names and numbers whole
    header = next(line for line in lines if "Experiment" in line).split()
    assert header[:4] == ["Experiment", "f1", "recall_at_1", "train.pos_weight"], shown
    rows = [line for line in lines if re.search(r"\[[\w-]+\]", line)]
    assert len(rows) >= 3, shown
    f1s = [float(line.split("]")[1].split()[0]) for line in rows]
    assert f1s == sorted(f1s, reverse=True), shown  # best first
    weights = {line.split()[-1] for line in rows}
    assert weights == {"1.5", "2", "4"}, shown  # the changed param, one value per experiment


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


README = Path(__file__).resolve().parents[2] / "README.md"


def _readme_command(comment: str) -> list[str]:
    """The README's ``dvc ...`` line that ends with ``# <comment>``, as arguments."""
    for line in README.read_text(encoding="utf-8").splitlines():
        if line.startswith("dvc ") and line.rstrip().endswith(f"# {comment}"):
            return shlex.split(line, comments=True)
    raise AssertionError(f"the README has no `dvc ...  # {comment}` line")


def _vega_plots_drawn(page: object) -> dict[str, int]:
    """Per plot that vega-embed drew on a `dvc plots` page: how many pixels of its canvas are
    coloured (marks: lines, bars, heat cells; axes, grid and text are grey or black)."""
    return page.evaluate(  # type: ignore[attr-defined]
        """() => Object.fromEntries(Array.from(document.querySelectorAll('div.vega-embed'))
            .map(div => {
                const canvas = div.querySelector('canvas');
                if (!canvas) return [div.id, 0];
                const rgba = canvas.getContext('2d')
                    .getImageData(0, 0, canvas.width, canvas.height).data;
                let coloured = 0;
                for (let i = 0; i < rgba.length; i += 4) {
                    const hi = Math.max(rgba[i], rgba[i + 1], rgba[i + 2]);
                    const lo = Math.min(rgba[i], rgba[i + 1], rgba[i + 2]);
                    if (rgba[i + 3] > 0 && hi - lo > 40) coloured++;
                }
                return [div.id, coloured];
            }))"""
    )


#: The top-level `plots:` of dvc.yaml, each drawn once (DVC's element ids of their titles).
VEGA_PLOTS = {
    "Training_per_epoch",
    "Threshold_sweep__validation_",
    "Precision-recall__test_pairs_",
    "Confusion_matrix__test_pairs_",
}


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed")
def test_dvc_plots_show_and_diff_draw_every_plot_offline(
    pipeline: Pipeline, tmp_path_factory: pytest.TempPathFactory
) -> None:
    playwright = pytest.importorskip("playwright.sync_api")
    work, env = pipeline.work, pipeline.env
    out = tmp_path_factory.mktemp("plots")
    run(["dvc", "plots", "show", "-o", str(out / "show")], work, env)
    run(["dvc", "plots", "diff", "HEAD", "-o", str(out / "diff")], work, env)
    fetched: list[str] = []

    def refuse(route: object) -> None:
        fetched.append(route.request.url)  # type: ignore[attr-defined]
        route.abort()  # type: ignore[attr-defined]

    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        for name in ("show", "diff"):
            page = browser.new_page(viewport={"width": 1600, "height": 900})
            page.route("http*://**", refuse)
            page.goto((out / name / "index.html").as_uri())
            page.wait_for_function(
                f"document.querySelectorAll('canvas').length >= {len(VEGA_PLOTS)}",
                timeout=60_000,
            )
            page.wait_for_timeout(1_000)  # vega draws after its dataflow runs
            page.screenshot(path=str(out / f"{name}.png"), full_page=True)
            drawn = _vega_plots_drawn(page)
            assert set(drawn) == VEGA_PLOTS, drawn  # no plot twice, none missing
            assert all(pixels > 200 for pixels in drawn.values()), drawn
            assert not fetched, fetched  # everything the page needs is inside it
            images = page.evaluate(
                "() => Array.from(document.images).map(i => [i.alt || i.src.slice(0, 40),"
                " i.naturalWidth])"
            )
            assert images and all(width > 0 for _, width in images), images
            page.close()
        browser.close()


def _git_bytes(work: Path) -> int:
    return sum(path.stat().st_size for path in (work / ".git").rglob("*") if path.is_file())


def test_a_virtualenv_in_the_checkout_stays_out_of_experiments(pipeline: Pipeline) -> None:
    # DVC's experiments stash untracked files into .git (`exp apply`, `exp run`, the queue);
    # a 100 MB virtualenv at .venv/ is ignored, so none of it may be copied there
    work, env = pipeline.work, pipeline.env
    venv = work / ".venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    blob = venv / "lib" / "site-packages-blob"
    blob.mkdir(parents=True)
    for index in range(1000):  # incompressible, as wheels and shared libraries are
        (blob / f"{index}.bin").write_bytes(os.urandom(100_000))
    before = _git_bytes(work)
    name = run(["dvc", "exp", "ls", "--name-only"], work, env).split()[0]  # one of the queue's
    seconds = {}
    for step, args in (
        ("exp apply", ["dvc", "exp", "apply", name]),
        ("exp run", ["dvc", "exp", "run", "-S", "report.gallery_examples=4"]),
        ("exp run --queue", ["dvc", "exp", "run", "--queue", "-S", "report.gallery_examples=6"]),
        ("queue start", ["dvc", "queue", "start", "-j", "1"]),
    ):
        started = time.monotonic()
        run(args, work, env)
        seconds[step] = time.monotonic() - started
        if step == "exp apply":
            subprocess.run(["git", "checkout", "--", "."], cwd=work, env=env, check=True)
    deadline = time.monotonic() + 900
    while "Queued" in (status := run(["dvc", "queue", "status"], work, env)) or (
        "Running" in status
    ):
        assert time.monotonic() < deadline, status
        time.sleep(3)
    assert "Failed" not in status, status
    grown = _git_bytes(work) - before
    assert grown < 20_000_000, f".git grew {grown / 1e6:.0f} MB ({seconds})"
    assert len(list(blob.iterdir())) == 1000  # the virtualenv is left as it was
    assert seconds["exp apply"] < 60, seconds
