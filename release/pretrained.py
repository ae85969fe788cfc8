r"""Build the packaged grounder: the DVC experiment ``pretrained-flickr30k``.

    python -m release.pretrained

The experiment is this pipeline with the params of ``params.yaml`` overridden by
``release/pretrained-flickr30k.yaml`` (a seeded random image split of the real images of
``../shared/flickr30k_entities``, selective-search proposals as candidates, the training settings
that the quality levers chose, one thread per stage). It runs in a fresh ``git clone`` of this
checkout's HEAD (a release is built from a commit: uncommitted changes are not in it), as

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 dvc exp run -n pretrained-flickr30k \
        -S data.root=DATA -S paths.proposals=CACHE -S split.strategy=random ...

then the run's ``models/grounder.safetensors`` is copied to
``src/grounding/pretrained/flickr30k.safetensors`` (package data, what ``grounding predict``
falls back to) and its held-out test metrics, size, MD5 and commit are written to
``reports/pretrained-flickr30k.json`` and ``.md``.

The file is reproduced byte for byte: every stage is seeded, every stage runs on one thread and
safetensors bytes depend only on the values (two builds from fresh copies wrote the same MD5,
see docs/serving.md). Selective search is the slow part (about 1 s per image on an idle core);
its boxes are cached per image in ``--proposals`` (default ``data/proposals`` of this checkout,
the pipeline's own cache), so a rebuild reuses them without changing a byte. The images are
Flickr30k's: the weights are for non-commercial research and education, as the images are.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "flickr30k_entities"
EXPERIMENT = REPO / "release" / "pretrained-flickr30k.yaml"
TARGET = REPO / "src" / "grounding" / "pretrained" / "flickr30k.safetensors"
#: One thread for every library in every stage: the bytes of the features depend on the thread
#: count, and on a busy machine two threads ran the features stage about 10x slower than one.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
REPORTED = (
    "recall_at_1",
    "recall_at_5",
    "recall_at_10",
    "upper_bound",
    "merged_recall_at_1",
    "merged_recall_at_5",
    "merged_recall_at_10",
    "merged_upper_bound",
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=SHARED_DATA, help="Flickr30k Entities root")
    parser.add_argument(
        "--proposals",
        type=Path,
        default=REPO / "data" / "proposals",
        help="cache of each image's proposals (default %(default)s)",
    )
    parser.add_argument(
        "--experiment",
        type=Path,
        default=EXPERIMENT,
        help="the experiment's name and params overrides (default %(default)s)",
    )
    parser.add_argument(
        "--work", type=Path, help="clone into this new folder and keep it (default: a temporary)"
    )
    parser.add_argument("--out", type=Path, default=TARGET, help="the weights file to write")
    parser.add_argument(
        "--check-proposals",
        action="store_true",
        help="build nothing: recompute every image's selective-search proposals, compare them "
        "with the --proposals cache and add the count to the --reports JSON",
    )
    parser.add_argument(
        "--reports", type=Path, default=REPO / "reports", help="folder of the metrics report"
    )
    return parser.parse_args(argv)


def read_experiment(path: Path, params: dict) -> tuple[str, dict[str, object]]:
    """The experiment's name and its overrides ``{"section.key": value}`` from ``path``;
    raises ``ValueError`` naming what is wrong (a key that ``params``, the content of
    params.yaml, does not have: ``dvc exp run -S`` would refuse it)."""
    content = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(content, dict) or set(content) != {"name", "params"}:
        raise ValueError(f"{path}: needs exactly the keys `name` and `params`")
    name, overrides = content["name"], content["params"]
    if not isinstance(name, str) or not name:
        raise ValueError(f"{path}: `name` must be a non-empty string")
    if not isinstance(overrides, dict):
        raise ValueError(f"{path}: `params` must map `section.key` to a value")
    for key, value in overrides.items():
        node: object = params
        for part in str(key).split("."):
            if not isinstance(node, dict) or part not in node:
                raise ValueError(f"{path}: params.yaml has no `{key}`")
            node = node[part]
        if isinstance(value, dict | list):
            raise ValueError(f"{path}: `{key}` must be a single value, not {type(value).__name__}")
    return name, overrides


def set_params(overrides: dict[str, object]) -> list[str]:
    """``dvc exp run`` arguments that set ``overrides`` (``-S key=value`` each, YAML values)."""
    arguments: list[str] = []
    for key, value in overrides.items():
        text = value if isinstance(value, str) else json.dumps(value)
        arguments += ["-S", f"{key}={text}"]
    return arguments


def run(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    """Run a command (``dvc`` as this interpreter's module); return its output, or raise
    ``RuntimeError`` with the output if it fails."""
    if args[0] == "dvc":
        args = [sys.executable, "-m", "dvc", *args[1:]]
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout + done.stderr


def build_env(work: Path) -> dict[str, str]:
    """The environment of the build in the clone ``work``: its own code and MLflow store."""
    return {
        **os.environ,
        **ONE_THREAD,
        # the clone's package, not an install of this checkout: the code that runs is the
        # commit's
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(work / "src"), os.environ.get("PYTHONPATH")])
        ),
        "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        # `dvc exp run` commits the experiment: a machine without a git identity still builds
        "GIT_AUTHOR_NAME": os.environ.get("GIT_AUTHOR_NAME", "release"),
        "GIT_AUTHOR_EMAIL": os.environ.get("GIT_AUTHOR_EMAIL", "release@localhost"),
        "GIT_COMMITTER_NAME": os.environ.get("GIT_COMMITTER_NAME", "release"),
        "GIT_COMMITTER_EMAIL": os.environ.get("GIT_COMMITTER_EMAIL", "release@localhost"),
    }


def build(
    work: Path, name: str, overrides: dict[str, object], data: Path, proposals: Path
) -> tuple[dict, float]:
    """Clone this checkout's HEAD into ``work`` and run the experiment there; return its test
    metrics (with the phrase count and the images paired) and the seconds the run took."""
    env = build_env(work)
    run(["git", "clone", "-q", "--no-hardlinks", str(REPO), str(work)], REPO, env)
    placed = {"data.root": str(data.resolve()), "paths.proposals": str(proposals.resolve())}
    start = time.perf_counter()
    command = ["dvc", "exp", "run", "-n", name, *set_params(placed | overrides)]
    print(run(command, work, env)[-2000:])
    seconds = time.perf_counter() - start
    metrics = json.loads((work / "reports" / "metrics.json").read_text())
    details = json.loads((work / "reports" / "test.json").read_text())
    paired = json.loads((work / "reports" / "pair.json").read_text())
    return {
        **metrics,
        "phrases": details.get("phrases"),
        "images": paired.get("images_paired"),
    }, seconds


def markdown(summary: dict) -> str:
    metrics = summary["metrics"]
    return "\n".join(
        [
            "# The packaged grounder (`src/grounding/pretrained/flickr30k.safetensors`)",
            "",
            "Rebuilt by `python -m release.pretrained` (the DVC experiment",
            f"`{summary['experiment']}`). Trained by this pipeline on the",
            f"{summary['images']} real Flickr30k images of `../shared/flickr30k_entities`",
            f"(settings `{json.dumps(summary['settings'])}`); scored on the held-out test",
            f"images of that split ({metrics['phrases']} phrases, never trained on), with the",
            "selective-search proposals a user's photo gets.",
            "",
            "| protocol | Recall@1 | Recall@5 | Recall@10 | upper bound |",
            "|---|---|---|---|---|",
            "| ANY-box | {recall_at_1:.3f} | {recall_at_5:.3f} | {recall_at_10:.3f} "
            "| {upper_bound:.3f} |".format(**metrics),
            "| MERGED-box | {merged_recall_at_1:.3f} | {merged_recall_at_5:.3f} | "
            "{merged_recall_at_10:.3f} | {merged_upper_bound:.3f} |".format(**metrics),
            "",
            f"File: {summary['bytes']:,} bytes, MD5 `{summary['md5']}`. Flickr30k images are",
            "for non-commercial research and education: so are these weights.",
            "",
        ]
    )


def check_proposals(data: Path, proposals: Path) -> dict[str, int]:
    """Recompute each image's proposals as the pair stage would and count those equal, box for
    box and in order, to what the cache holds: whether a rebuild without the cache (which
    recomputes them) would see the same candidates."""
    import numpy as np
    from tqdm import tqdm

    from grounding import io
    from grounding.candidates import SELECTIVE_SEARCH, cache_key, settings_of
    from grounding.candidates.selective_search import propose
    from grounding.config import load_params

    settings = settings_of(SELECTIVE_SEARCH, load_params(REPO / "params.yaml").candidates)
    key = cache_key(SELECTIVE_SEARCH, settings)
    counts = {"images": 0, "identical": 0, "not_cached": 0}
    for path in tqdm(sorted((data / "images").glob("*.jpg")), desc="proposals", unit="image"):
        image = io.read_image(path)
        cached = proposals / f"{io.ProposalCache.key(image, key)}.npy"
        counts["images"] += 1
        if not cached.exists():
            counts["not_cached"] += 1
            continue
        before, now = np.load(cached), propose(image, **settings)
        counts["identical"] += before.shape == now.shape and bool((before == now).all())
    return counts


def release(args: argparse.Namespace, work: Path) -> dict:
    """Build in ``work``, copy the grounder to ``args.out``; return the report's summary."""
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    name, overrides = read_experiment(args.experiment, params)
    metrics, seconds = build(work, name, overrides, args.data, args.proposals)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(work / "models" / "grounder.safetensors", args.out)
    content = args.out.read_bytes()
    commit = run(["git", "rev-parse", "HEAD"], work, build_env(work)).strip()
    return {
        "file": str(args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out),
        "bytes": len(content),
        "md5": hashlib.md5(content).hexdigest(),
        "experiment": name,
        "commit": commit,
        "images": metrics["images"],
        "settings": overrides,
        "metrics": {key: metrics[key] for key in (*REPORTED, "phrases")},
        "seconds": round(seconds),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not (args.data / "images").is_dir():
        raise SystemExit(f"error: {args.data} has no images/ folder: give --data")
    if args.check_proposals:
        report = args.reports / "pretrained-flickr30k.json"
        summary = json.loads(report.read_text())
        summary["proposals_recomputed"] = check_proposals(args.data, args.proposals)
        report.write_text(json.dumps(summary, indent=2) + "\n")
        print(summary["proposals_recomputed"])
        return
    try:
        if args.work is None:
            with tempfile.TemporaryDirectory(prefix="pretrained-") as folder:
                summary = release(args, Path(folder) / "repo")
        elif args.work.exists():
            raise SystemExit(f"error: {args.work} exists: --work must name a new folder")
        else:
            summary = release(args, args.work)
    except (ValueError, RuntimeError) as error:
        raise SystemExit(f"error: {error}") from None
    args.reports.mkdir(parents=True, exist_ok=True)
    (args.reports / "pretrained-flickr30k.json").write_text(json.dumps(summary, indent=2) + "\n")
    (args.reports / "pretrained-flickr30k.md").write_text(markdown(summary))
    print(markdown(summary))


if __name__ == "__main__":
    main()
