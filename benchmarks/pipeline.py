"""Benchmark the pipeline: full `dvc repro` on the shipped sample, the `train.pos_weight`
experiment, a no-op `dvc repro`, and feature-extraction throughput on real images.

Runs in a temporary copy of the repository (nothing here is touched) and prints a table;
``--out`` also writes the figures as JSON.

    python benchmarks/pipeline.py --out benchmarks/pipeline.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COPIED = ["dvc.yaml", "params.yaml", "stages", "src", "data/sample", ".dvcignore"]
REAL_IMAGES = REPO.parent / "shared" / "flickr30k_entities" / "images"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, help="write the figures here (JSON)")
    parser.add_argument(
        "--images", type=Path, default=REAL_IMAGES, help="real JPEGs for the throughput"
    )
    parser.add_argument("--n-images", type=int, default=100, help="how many real images to time")
    return parser.parse_args(argv)


def _timed(args: list[str], cwd: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return time.perf_counter() - start


def pipeline_times(work: Path) -> dict[str, float]:
    for name in COPIED:
        source, target = REPO / name, work / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target)
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "GIT_AUTHOR_NAME": "bench",
        "GIT_AUTHOR_EMAIL": "b@b",
        "GIT_COMMITTER_NAME": "bench",
        "GIT_COMMITTER_EMAIL": "b@b",
    }
    for args in (
        ["git", "init", "-q"],
        ["dvc", "init", "-q"],
        ["dvc", "config", "core.analytics", "false"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "bench"],
    ):
        _timed(args, work, env)
    times = {"full_repro_s": _timed(["dvc", "repro"], work, env)}
    for args in (["git", "add", "-A"], ["git", "commit", "-qm", "lock"]):
        _timed(args, work, env)
    times["pos_weight_experiment_s"] = _timed(
        ["dvc", "exp", "run", "-S", "train.pos_weight=3"], work, env
    )
    times["noop_repro_s"] = _timed(["dvc", "repro"], work, env)
    times["experiment_share_of_full"] = times["pos_weight_experiment_s"] / times["full_repro_s"]
    return times


def feature_throughput(images: Path, n_images: int) -> dict[str, float]:
    import numpy as np
    from PIL import Image

    from grounding.config import load_params
    from grounding.features import extract_region_features, load_backbone

    params = load_params(REPO / "params.yaml").features
    paths = sorted(images.glob("*.jpg"))[:n_images]
    if not paths:
        return {}
    backbone = load_backbone(params.backbone, params.backbone_weights)
    loaded = [Image.open(path).convert("RGB") for path in paths]
    items = [
        (image, np.array([[0, 0, image.width, image.height]] * 6, dtype=np.float32))
        for image in loaded
    ]
    start = time.perf_counter()
    for _ in extract_region_features(
        backbone, items, image_size=params.image_size, batch_size=params.batch_size
    ):
        pass
    seconds = time.perf_counter() - start
    return {
        "feature_images": len(paths),
        "feature_images_per_s": len(paths) / seconds,
        "feature_backbone": params.backbone,
        "feature_image_size": params.image_size,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        results: dict[str, float | str] = pipeline_times(Path(work))
    results.update(feature_throughput(args.images, args.n_images))
    for name, value in results.items():
        print(f"{name:32} {value:.3f}" if isinstance(value, float) else f"{name:32} {value}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
