"""A second person reproduces and compares (docs/collaboration.md), end to end on the sample:
the project's default DVC remote restores main's outputs in a fresh clone; push and pull over
a real SSH server (OpenSSH's sshd on 127.0.0.1), a pull killed half-way included; a copied
checkout's MLflow store that points at itself; two clones running experiments at once against
a real `mlflow server` on PostgreSQL, whose credentials end up nowhere."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from repository import REPO, commit, run, scratch_env, scratch_repo

from grounding.tracking import CHAMPION, EXPERIMENT, REGISTERED_MODEL, best_version

pytestmark = pytest.mark.slow

SSHD = Path("/usr/sbin/sshd")
POSTGRES_BIN = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
#: few epochs: the experiments test the tracking, not the learning
EXPERIMENT_PARAMS = ["-S", "train.epochs=3"]
IMAGE = "data/sample/images/100000001.jpg"


@dataclass(frozen=True)
class Published:
    """The project after one `dvc repro`, committed on `main` and pushed to its default
    remote; ``home`` is the HOME of everyone here, so ``~`` of the remote is inside the test."""

    work: Path
    env: dict[str, str]
    home: Path


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for(url: str, process: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            assert process.poll() is None, f"the server behind {url} exited"
            assert time.monotonic() < deadline, f"{url} did not answer in {seconds} s"
            time.sleep(1)


def _env(work: Path, home: Path, **changes: str | None) -> dict[str, str]:
    env = {**scratch_env(work), "HOME": str(home)}
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def _clone(published: Published, where: Path, **changes: str | None) -> dict[str, str]:
    """A git clone of the published project at ``where``; the environment to run it in."""
    run(["git", "clone", "-q", str(published.work), str(where)], published.work, published.env)
    return _env(where, published.home, **changes)


def _printed_json(printed: str) -> dict:
    """The JSON that `grounding predict` printed (MLflow's progress bars may follow it)."""
    return json.JSONDecoder().raw_decode(printed, printed.index("{"))[0]


def _clean_status(work: Path, env: dict[str, str]) -> str:
    return run(["dvc", "status"], work, env)


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Published:
    root = tmp_path_factory.mktemp("collaboration")
    work, home = root / "origin", root / "home"
    home.mkdir()
    work.mkdir()
    scratch_repo(work)
    env = _env(work, home)
    for name in (".dvc/config", ".gitignore"):  # the default remote; mlflow.db stays out of git
        shutil.copy2(REPO / name, work / name)
    run(["git", "branch", "-M", "main"], work, env)
    run(["dvc", "repro"], work, env)
    run(["git", "add", "-A"], work, env)
    run(["git", "commit", "-qm", "main's outputs", "--allow-empty"], work, env)
    run(["dvc", "push"], work, env)
    return Published(work, env, home)


def test_the_default_remote_is_a_folder_of_the_home_outside_the_checkout(
    published: Published,
) -> None:
    storage = published.home / ".local/share/phrase-grounding/dvc-storage"
    assert (storage / "files" / "md5").is_dir()
    assert not str(storage).startswith(str(published.work))


def test_a_fresh_clone_pulls_main_and_needs_no_training(
    published: Published, tmp_path: Path
) -> None:
    clone = tmp_path / "clone"
    env = _clone(published, clone)
    run(["dvc", "pull"], clone, env)
    assert "up to date" in _clean_status(clone, env)
    assert "Running stage" not in run(["dvc", "repro"], clone, env)
    for name in ("models/grounder.safetensors", "reports/plots/precision_recall.csv"):
        assert (clone / name).read_bytes() == (published.work / name).read_bytes(), name
    shown = json.loads(run(["dvc", "plots", "diff", "main", "--json"], clone, env))
    assert "errors" not in shown, shown["errors"]  # "No storage files available" before
    assert {"Precision-recall (test pairs)", "reports/plots/precision_recall.png"} <= set(
        shown["data"]
    )
    printed = run(
        [
            sys.executable,
            "-m",
            "grounding.cli",
            "predict",
            IMAGE,
            "--phrase",
            "a blue square",
            "--model",
            "models/grounder.safetensors",
        ],
        clone,
        env,
    )
    assert _printed_json(printed)["phrases"][0]["boxes"]


def test_dvc_get_fetches_the_model_and_the_metrics_from_the_repository(
    published: Published, tmp_path: Path
) -> None:
    for name in ("models/grounder.safetensors", "reports/metrics.json"):  # DVC's, and git's
        out = tmp_path / Path(name).name
        run(["dvc", "get", str(published.work), name, "-o", str(out)], tmp_path, published.env)
        assert out.read_bytes() == (published.work / name).read_bytes(), name


# --- a real SSH server --------------------------------------------------------------------


@dataclass(frozen=True)
class SshServer:
    url: str  # ssh://user@127.0.0.1:port/<storage folder>
    keyfile: Path


@pytest.fixture(scope="session")
def ssh_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    """OpenSSH's sshd on 127.0.0.1, a port of its own, a generated host key, and a user key
    that logs the current user in; skipped where sshd or dvc-ssh is absent."""
    if not SSHD.exists():
        pytest.skip("openssh-server is not installed (.ci/run installs it)")
    pytest.importorskip("dvc_ssh", reason="dvc-ssh is not installed (the dev extra has it)")
    folder = tmp_path_factory.mktemp("sshd")
    for key in ("host_key", "user_key"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / key)], check=True
        )
    shutil.copy(folder / "user_key.pub", folder / "authorized_keys")
    port = _free_port()
    (folder / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {folder / 'host_key'}\n"
        f"PidFile {folder / 'sshd.pid'}\nAuthorizedKeysFile {folder / 'authorized_keys'}\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
        "PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\n"
        "Subsystem sftp internal-sftp\n"
    )
    if os.geteuid() == 0:  # sshd started by root needs its privilege separation folder
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    server = subprocess.Popen(
        [str(SSHD), "-D", "-e", "-f", str(folder / "sshd_config")],
        stdout=subprocess.DEVNULL,
        stderr=(folder / "sshd.log").open("w"),
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert server.poll() is None, (folder / "sshd.log").read_text()
            assert time.monotonic() < deadline, "sshd did not listen in 30 s"
            time.sleep(0.2)
        user = pwd.getpwuid(os.geteuid()).pw_name
        yield SshServer(f"ssh://{user}@127.0.0.1:{port}{folder / 'storage'}", folder / "user_key")
    finally:
        server.terminate()
        server.wait(timeout=30)


def _cache_files(work: Path) -> list[Path]:
    return [path for path in (work / ".dvc" / "cache").rglob("*") if path.is_file()]


def test_push_and_pull_over_ssh_recover_from_a_killed_pull(
    published: Published, ssh_server: SshServer, tmp_path: Path
) -> None:
    work, env = published.work, published.env
    run(["dvc", "remote", "add", "team", ssh_server.url], work, env)
    commit(work, env, "the team's remote")  # its address is shared; its key is not
    run(
        ["dvc", "remote", "modify", "--local", "team", "keyfile", str(ssh_server.keyfile)],
        work,
        env,
    )
    assert not run(["git", "status", "--porcelain"], work, env)  # .dvc/config.local stays out
    assert "key" not in (work / ".dvc" / "config").read_text()
    run(["dvc", "push", "-r", "team"], work, env)

    clone = tmp_path / "clone"
    env = _clone(published, clone)
    run(
        ["dvc", "remote", "modify", "--local", "team", "keyfile", str(ssh_server.keyfile)],
        clone,
        env,
    )
    pulling = subprocess.Popen(
        [sys.executable, "-m", "dvc", "pull", "-r", "team", "-j", "1"],
        cwd=clone,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while not _cache_files(clone) and pulling.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    still_running = pulling.poll() is None
    os.killpg(pulling.pid, signal.SIGKILL)
    pulling.wait()
    assert still_running, "the pull ended before it could be killed half-way"
    assert "up to date" not in _clean_status(clone, env)

    run(["dvc", "pull", "-r", "team"], clone, env)
    assert "up to date" in _clean_status(clone, env)
    assert "Running stage" not in run(["dvc", "repro"], clone, env)
    for name in ("models/grounder.safetensors", "models/head.safetensors"):
        assert (clone / name).read_bytes() == (work / name).read_bytes(), name


# --- the embedded MLflow store moves with its checkout ------------------------------------


def _store_texts(database: Path) -> str:
    with sqlite3.connect(database) as db:
        rows = [
            *db.execute("SELECT artifact_location FROM experiments"),
            *db.execute("SELECT artifact_uri FROM runs"),
            *db.execute("SELECT storage_location FROM model_versions"),
        ]
    return "\n".join(str(value) for (value,) in rows)


def _tree(folder: Path) -> set[str]:
    return {str(path.relative_to(folder)) for path in folder.rglob("*")}


def test_a_copied_checkout_logs_and_predicts_from_its_own_store(
    published: Published, tmp_path: Path
) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    shutil.copytree(published.work, first, symlinks=True)
    shutil.copytree(first, second, symlinks=True)
    shutil.rmtree(first)
    original_store = _tree(published.work / "mlruns")
    env = _env(second, published.home, MLFLOW_TRACKING_URI=None)  # the default store
    run(["dvc", "exp", "run", "-S", "train.pos_weight=2", *EXPERIMENT_PARAMS], second, env)
    for model in (f"models:/{REGISTERED_MODEL}/1", f"models:/{REGISTERED_MODEL}@{CHAMPION}"):
        printed = run(
            [
                sys.executable,
                "-m",
                "grounding.cli",
                "predict",
                IMAGE,
                "--phrase",
                "a circle",
                "--model",
                model,
            ],
            second,
            env,
        )
        assert _printed_json(printed)["phrases"], model
    assert not first.exists()  # nothing wrote into the deleted checkout
    assert _tree(published.work / "mlruns") == original_store  # nor into the one copied
    texts = _store_texts(second / "mlflow.db")
    assert str(second / "mlruns") in texts
    assert str(published.work) not in texts and str(first) not in texts
    with sqlite3.connect(second / "mlflow.db") as db:
        assert db.execute("SELECT count(*) FROM runs").fetchone() == (2,)


# --- a team's tracking server: mlflow server on PostgreSQL --------------------------------


def _as_postgres_user(args: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run its tools as ``nobody`` then."""
    return ["runuser", "-u", "nobody", "--", *args] if os.geteuid() == 0 else args


@pytest.fixture(scope="session")
def tracking_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """PostgreSQL on 127.0.0.1 (initdb + pg_ctl in a temporary folder) and `mlflow server`
    on it, serving the artifacts itself; yields the server's URI. Skipped where Debian's
    postgresql or psycopg is absent."""
    if not POSTGRES_BIN:
        pytest.skip("Debian's postgresql is not installed (.ci/run installs it)")
    pytest.importorskip("psycopg", reason="psycopg is not installed (the dev extra has it)")
    bin_dir = POSTGRES_BIN[-1]
    # a folder nobody can reach (pytest's are the owner's only) when root runs the tests
    database = Path(tempfile.mkdtemp(prefix="grounding-pg-"))
    database.chmod(0o755)
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        os.chown(database, nobody.pw_uid, nobody.pw_gid)
    data, log = database / "data", database / "postgres.log"
    pg_port, port = _free_port(), _free_port()
    pg_ctl = [str(bin_dir / "pg_ctl"), "-D", str(data)]
    server = None
    try:
        subprocess.run(
            [
                *_as_postgres_user([str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres"]),
                "-A",
                "trust",
            ],
            cwd=database,
            check=True,
            capture_output=True,
        )
        options = f"-p {pg_port} -k {database} -c listen_addresses=127.0.0.1"
        subprocess.run(
            _as_postgres_user([*pg_ctl, "-w", "-l", str(log), "-o", options, "start"]),
            cwd=database,
            check=True,
            capture_output=True,
        )
        subprocess.run(
            [
                str(bin_dir / "createdb"),
                "-h",
                "127.0.0.1",
                "-p",
                str(pg_port),
                "-U",
                "postgres",
                "mlflow",
            ],
            check=True,
            capture_output=True,
        )
        artifacts = tmp_path_factory.mktemp("mlartifacts")
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--backend-store-uri",
                f"postgresql://postgres@127.0.0.1:{pg_port}/mlflow",
                "--serve-artifacts",
                "--artifacts-destination",
                str(artifacts),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "2",
            ],
            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
            stdout=subprocess.DEVNULL,
            stderr=(artifacts / "server.log").open("w"),
        )
        _wait_for(f"http://127.0.0.1:{port}/health", server)
        yield f"http://127.0.0.1:{port}"
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=60)
        if (data / "postmaster.pid").exists():
            subprocess.run(
                _as_postgres_user([*pg_ctl, "-m", "fast", "-w", "stop"]),
                cwd=database,
                capture_output=True,
            )
        shutil.rmtree(database, ignore_errors=True)


def test_two_clones_run_experiments_at_once_against_a_tracking_server(
    published: Published, tracking_server: str, tmp_path: Path
) -> None:
    import mlflow

    password = "s3cret-of-ann"
    with_password = tracking_server.replace("http://", f"http://ann:{password}@")
    clones = {}
    for name, uri, pos_weight in (("ann", with_password, "2"), ("bob", tracking_server, "4")):
        clone = tmp_path / name
        env = _clone(published, clone, MLFLOW_TRACKING_URI=uri)
        run(["dvc", "pull"], clone, env)
        clones[name] = (clone, env, pos_weight)
    started = time.monotonic()
    running = {
        name: subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dvc",
                "exp",
                "run",
                "-S",
                f"train.pos_weight={pos_weight}",
                *EXPERIMENT_PARAMS,
            ],
            cwd=clone,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name, (clone, env, pos_weight) in clones.items()
    }
    printed = {name: process.communicate()[0] for name, process in running.items()}
    print(f"two experiments at once: {time.monotonic() - started:.0f} s")
    for name, process in running.items():
        assert process.returncode == 0, printed[name]
        assert (
            "Running stage 'train'" in printed[name]
            and "Running stage 'features'" not in (printed[name])
        )
    assert password not in printed["ann"]
    assert "http://ann:***@" in printed["ann"]

    client = mlflow.MlflowClient(tracking_server)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.params["train.pos_weight"] for r in runs) == ["2.0", "4.0"]
    versions = client.search_model_versions(f"name = '{REGISTERED_MODEL}'")
    assert len(versions) == 2 and {v.run_id for v in versions} == {r.info.run_id for r in runs}
    for each in runs:
        assert each.info.status == "FINISHED"
        assert each.info.artifact_uri.startswith("mlflow-artifacts:")  # kept by the server
        assert {"f1", "val_f1", "recall_at_1"} <= set(each.data.metrics)
        contexts = sorted(
            tag.value
            for dataset in each.inputs.dataset_inputs
            for tag in dataset.tags
            if tag.key == "mlflow.data.context"
        )
        assert contexts == ["test", "train", "val"]
        logged = json.dumps([each.data.params, each.data.tags])
        assert password not in logged and "ann:" not in logged
    tagged = {str(v.version): float(v.tags["val_f1"]) for v in versions}
    champion = client.get_model_version_by_alias(REGISTERED_MODEL, CHAMPION)
    assert str(champion.version) == best_version(tagged)

    clone, env, _ = clones["bob"]
    printed_model = run(
        [
            sys.executable,
            "-m",
            "grounding.cli",
            "predict",
            IMAGE,
            "--phrase",
            "a square",
            "--model",
            f"models:/{REGISTERED_MODEL}@{CHAMPION}",
        ],
        clone,
        env,
    )
    assert _printed_json(printed_model)["phrases"]
