r"""Benchmark of the features stage's engines: ``local`` against ``ray`` on one machine.

Region features of the annotated boxes of the first ``--images`` real Flickr30k Entities
images (``../shared``; the shipped sample with ``--dataset data/sample``), with
``features:`` of params.yaml, by :func:`grounding.modeling.engines.local_features`, then by
:func:`grounding.modeling.engines.ray_features` on a fresh local Ray (``--concurrency``
actors). Reports wall times (Ray's start apart), the 1-minute load average around each run,
and whether the two arrays are identical bit for bit.

    PYTHONPATH=src python -m benchmarks.ray_engine --images 200 --out reports/benchmark_ray.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from benchmarks import REPO, SHARED_DATA
from benchmarks.features import read_annotated
from grounding import io
from grounding.boxes import BOX_COLUMNS
from grounding.config import load_params
from grounding.modeling.backbones import load_backbone
from grounding.modeling.engines import local_features, ray_features
from grounding.modeling.region_features import region_dim


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", type=Path, default=SHARED_DATA, help="Flickr30k layout")
    parser.add_argument("--images", type=int, default=200, help="images timed")
    parser.add_argument("--concurrency", type=int, default=None, help="ray actors (params')")
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--out", type=Path, help="write the results here (JSON)")
    return parser.parse_args(argv)


def tables(dataset: Path, limit: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``images`` (image_id, file_name, width, height) and ``candidates`` (the distinct
    annotated boxes) of the first ``limit`` images that have a file."""
    annotated = read_annotated(dataset, limit)
    images, candidates = [], []
    for entry in annotated:
        image_id = Path(entry.file_name).stem
        with Image.open(dataset / "images" / entry.file_name) as image:
            width, height = image.size
        images.append({"image_id": image_id, "file_name": entry.file_name, "width": width,
                       "height": height})  # fmt: skip
        boxes = pd.DataFrame(entry.boxes, columns=BOX_COLUMNS)
        boxes.insert(0, "image_id", image_id)
        candidates.append(boxes)
    table = pd.concat(candidates, ignore_index=True)
    table.insert(0, "region_id", np.arange(len(table), dtype=np.int64))
    return pd.DataFrame(images), table


def fill(per_image, rows: int, width: int) -> np.ndarray:
    array = np.zeros((rows, width), dtype=np.float32)
    for region_ids, vectors in per_image:
        array[region_ids] = vectors
    return array


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = load_params(args.params).features
    ray_settings = cfg.ray
    if args.concurrency is not None:
        ray_settings = type(cfg.ray)(concurrency=args.concurrency, num_gpus=cfg.ray.num_gpus)
    images, candidates = tables(args.dataset, args.images)
    load_image = io.ImageFolder(args.dataset / "images", images)
    backbone = load_backbone(cfg.backbone, cfg.backbone_weights)
    kwargs = {"image_size": cfg.image_size, "batch_size": cfg.batch_size, "context": cfg.context}
    width = region_dim(backbone, context=cfg.context)
    results: dict[str, object] = {
        "images": len(images),
        "regions": len(candidates),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "features": {k: str(v) for k, v in kwargs.items()},
        "concurrency": ray_settings.concurrency,
    }

    load = os.getloadavg()[0]
    start = time.perf_counter()
    local = fill(local_features(backbone, candidates, images, load_image, **kwargs),
                 len(candidates), width)  # fmt: skip
    results["local_s"] = round(time.perf_counter() - start, 1)
    results["local_load"] = [round(load, 1), round(os.getloadavg()[0], 1)]

    import ray

    start = time.perf_counter()
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", include_dashboard=False)
    results["ray_start_s"] = round(time.perf_counter() - start, 1)
    load = os.getloadavg()[0]
    start = time.perf_counter()
    shards = Path(os.environ.get("TMPDIR", "/tmp")) / f"ray-engine-{os.getpid()}" / ".shards"
    distributed = fill(
        ray_features(
            backbone,
            candidates,
            images,
            load_image,
            **kwargs,
            load_backbone=partial(load_backbone, cfg.backbone, cfg.backbone_weights),
            ray_settings=ray_settings,
            shards=shards,
        ),
        len(candidates),
        width,
    )
    results["ray_s"] = round(time.perf_counter() - start, 1)
    results["ray_load"] = [round(load, 1), round(os.getloadavg()[0], 1)]
    ray.shutdown()
    results["identical"] = distributed.tobytes() == local.tobytes()
    print(json.dumps(results, indent=2))
    if args.out:
        io.write_json(results, args.out)


if __name__ == "__main__":
    main()
