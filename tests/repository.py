"""The repository under test: its root, the real data beside it, and throw-away copies of it.

A scratch copy is the project as a fresh git + DVC repository, for the end-to-end tests and the
benchmarks that run the pipeline: what a user has after cloning (the committed ``dvc.lock``
included), without touching this checkout. Tests import this module as ``repository`` (pytest
puts ``tests/`` on the path), benchmarks as ``tests.repository``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

#: The repository's root.
REPO = Path(__file__).resolve().parents[1]
#: The real Flickr30k Entities annotations and images beside the project (never committed).
SHARED_DATA = REPO.parent / "shared" / "flickr30k_entities"
COPIED = (
    "dvc.yaml",
    "dvc.lock",
    "params.yaml",
    "stages",
    "src",
    "data/sample",
    "reports/metrics.json",  # committed: main's metrics before anything is rebuilt
    ".dvcignore",
    ".gitignore",  # a virtualenv inside the checkout stays out of experiments' stashes
)


def run(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    """Run a command (``dvc`` as this interpreter's module); return its output, or raise with
    the output if it fails."""
    if args[0] == "dvc":
        args = [sys.executable, "-m", "dvc", *args[1:]]
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout + done.stderr


def scratch_repo(work: Path) -> dict[str, str]:
    """Copy the project into ``work``, make it a committed git + DVC repository, and return
    the environment to run commands in (MLflow writes to ``work/mlflow.db``)."""
    for name in COPIED:
        source, target = REPO / name, work / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target)
    env = scratch_env(work)
    for args in (
        ["git", "init", "-q"],
        ["dvc", "init", "-q"],
    ):
        run(args, work, env)
    # the project's DVC config and its offline plots page, over what `dvc init` wrote
    shutil.copy2(REPO / ".dvc" / "config", work / ".dvc" / "config")
    shutil.copytree(REPO / ".dvc" / "plots", work / ".dvc" / "plots")
    commit(work, env, "project")
    return env


def scratch_env(work: Path) -> dict[str, str]:
    """The environment to run commands in the scratch repository ``work``."""
    return {
        **os.environ,
        # the copied package, not the install of this checkout: the code that runs is the code
        # whose hashes dvc.lock records, even while this checkout is being edited
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(work / "src"), os.environ.get("PYTHONPATH")])
        ),
        "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "GIT_AUTHOR_NAME": "scratch",
        "GIT_AUTHOR_EMAIL": "scratch@localhost",
        "GIT_COMMITTER_NAME": "scratch",
        "GIT_COMMITTER_EMAIL": "scratch@localhost",
    }


def commit(work: Path, env: dict[str, str], message: str) -> None:
    """Commit everything in ``work`` (``dvc exp run`` needs the lock file committed)."""
    run(["git", "add", "-A"], work, env)
    # --allow-empty: with the project's .gitignore, a commit after a no-op step has nothing new
    run(["git", "commit", "-q", "--allow-empty", "-m", message], work, env)
