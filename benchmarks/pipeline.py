"""Benchmark the pipeline: full `dvc repro` on the shipped sample, the `train.pos_weight`
experiment, a no-op `dvc repro`, and feature-extraction throughput on real images.

Runs in a temporary copy of the repository (nothing here is touched) and prints a table;
``--out`` also writes the figures as JSON. ``--numerics`` runs both with that
``runtime.numerics`` (portable: AVX2 kernels on every CPU; fast: this CPU's newest);
``--no-repro`` times only the feature throughput (what the numerics change the most).

    python -m benchmarks.pipeline --out benchmarks/pipeline.json
    python -m benchmarks.pipeline --no-repro --numerics fast --n-images 30
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from benchmarks import REPO, SHARED_DATA
from grounding.numerics import NUMERICS, use_numerics
from tests.repository import commit, run, scratch_repo

REAL_IMAGES = SHARED_DATA / "images"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, help="write the figures here (JSON)")
    parser.add_argument(
        "--images", type=Path, default=REAL_IMAGES, help="real JPEGs for the throughput"
    )
    parser.add_argument("--n-images", type=int, default=100, help="how many real images to time")
    parser.add_argument(
        "--numerics", choices=NUMERICS, default="portable", help="runtime.numerics (%(default)s)"
    )
    parser.add_argument("--no-repro", action="store_true", help="only the feature throughput")
    return parser.parse_args(argv)


def _timed(args: list[str], work: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    run(args, work, env)
    return time.perf_counter() - start


def pipeline_times(work: Path, numerics: str) -> dict[str, float]:
    """Seconds for a full `dvc repro`, the pos_weight experiment and a no-op `dvc repro`, with
    ``numerics`` as runtime.numerics."""
    env = scratch_repo(work)
    params = work / "params.yaml"
    text = params.read_text(encoding="utf-8")
    params.write_text(text.replace("numerics: portable", f"numerics: {numerics}", 1))
    commit(work, env, f"numerics {numerics}")
    times = {"full_repro_s": _timed(["dvc", "repro"], work, env)}
    commit(work, env, "lock")
    experiment = ["dvc", "exp", "run", "-S", "train.pos_weight=3"]
    times["pos_weight_experiment_s"] = _timed(experiment, work, env)
    times["noop_repro_s"] = _timed(["dvc", "repro"], work, env)
    times["experiment_share_of_full"] = times["pos_weight_experiment_s"] / times["full_repro_s"]
    return times


def feature_throughput(images: Path, n_images: int) -> dict[str, float]:
    import numpy as np

    from grounding import io
    from grounding.config import load_params
    from grounding.modeling.backbones import load_backbone
    from grounding.modeling.region_features import extract_region_features

    params = load_params(REPO / "params.yaml").features
    paths = sorted(images.glob("*.jpg"))[:n_images]
    if not paths:
        return {}
    backbone = load_backbone(params.backbone, params.backbone_weights)
    loaded = [io.read_image(path) for path in paths]
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
    use_numerics(args.numerics, "--numerics")  # before the throughput loads torch
    results: dict[str, float | str] = {"numerics": args.numerics}
    if not args.no_repro:
        with tempfile.TemporaryDirectory() as work:
            results.update(pipeline_times(Path(work), args.numerics))
    results.update(feature_throughput(args.images, args.n_images))
    for name, value in results.items():
        print(f"{name:32} {value:.3f}" if isinstance(value, float) else f"{name:32} {value}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
