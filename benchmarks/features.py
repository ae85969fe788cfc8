r"""Benchmark of the feature extractors: speed on real images, and (``--compare``) quality.

Speed: for each packaged backbone and image size, images per second of
:func:`grounding.modeling.region_features.extract_region_features` on decoded Flickr30k
Entities images with their annotated boxes (JPEG decoding is timed apart), and phrases per
second of :func:`grounding.modeling.text.encode_phrases` on the same images' phrases.

Quality (``--compare``): region features of every candidate of the pipeline's ``pairs``
tables, phrase embeddings of every distinct phrase, then the pipeline's own head trained by
the pipeline's own training (``train:`` of params.yaml: weighted BCE plus the listwise term)
on the ``split`` tables' train pairs; Recall@1 on the test phrases with the package's Recall@k
(:func:`grounding.evaluation.metrics.phrase_ranks`), next to random-box, largest-box and
geometry-only baselines.

    PYTHONPATH=src python benchmarks/features.py --out reports/benchmark_features.json
    PYTHONPATH=src python benchmarks/features.py --no-speed --compare --cache /tmp/features-cache \
        --parsed data/parsed --pairs data/pairs --split data/split

With ``--cache``, extracted features and each head's scores are kept, so a rerun (or an
interrupted one) only computes what is missing. Cold, speed and ``--compare`` with the defaults
take about 11 minutes on 2 idle cores (speed 1.5, feature extraction 3.5, 26 heads 6).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from benchmarks import REPO, SHARED_DATA
from grounding import io
from grounding.boxes import box_area
from grounding.config import load_params
from grounding.data.formats.flickr30k import Flickr30kReader
from grounding.evaluation.metrics import IOU_THRESHOLD, phrase_ranks, recall_at_k
from grounding.modeling.backbones import BACKBONES, Backbone, load_backbone
from grounding.modeling.device import resolve_threads
from grounding.modeling.region_features import candidate_features, extract_region_features
from grounding.modeling.scoring import PairFeatures, score_pairs
from grounding.modeling.text import distinct_phrases, encode_phrases, load_text_encoder
from grounding.modeling.train import train_head

TEXT_ENCODER = "all-minilm-l6-v2"
WARM_UP_IMAGES = 3


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dataset",
        type=Path,
        default=SHARED_DATA,
        help="a dataset in the Flickr30k Entities layout (annotations.zip, images/)",
    )
    parser.add_argument("--images", type=int, default=200, help="images timed (speed)")
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES), help="backbones")
    parser.add_argument("--sizes", nargs="+", type=int, default=[320, 448, 512], help="px")
    parser.add_argument(
        "--batch-sizes", nargs="+", type=int, default=[1, 4], help="images per trunk batch"
    )
    parser.add_argument(
        "--text-batch-sizes", nargs="+", type=int, default=[32, 256], help="phrases per batch"
    )
    parser.add_argument("--out", type=Path, help="write the results here (JSON)")
    parser.add_argument("--no-speed", action="store_true", help="skip the speed measurements")
    compare = parser.add_argument_group("quality comparison")
    compare.add_argument("--compare", action="store_true", help="also compare Recall@1")
    compare.add_argument(
        "--parsed", type=Path, default=Path("data/parsed"), help="parse's tables (image sizes)"
    )
    compare.add_argument("--pairs", type=Path, default=Path("data/pairs"), help="pair's tables")
    compare.add_argument("--split", type=Path, default=Path("data/split"), help="split's tables")
    compare.add_argument(
        "--compare-sizes", nargs="+", type=int, help="image sizes compared (default: --sizes)"
    )
    compare.add_argument(
        "--epochs", type=int, help="training epochs of each head (default: params.yaml's)"
    )
    compare.add_argument("--seeds", type=int, default=2, help="heads trained per configuration")
    compare.add_argument("--cache", type=Path, help="folder caching extracted features (.npz)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results: dict[str, Any] = {"machine": _machine()}
    if not args.no_speed:
        results["speed"] = measure_speed(args)
    if args.compare:
        results["compare"] = compare_backbones(args)
    if args.out is not None:
        io.write_json(results, args.out)
        print(f"wrote {args.out}")


def _machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def _load_average() -> float:
    return round(os.getloadavg()[0], 2)


# --- speed ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class AnnotatedImage:
    file_name: str
    boxes: np.ndarray  # (N, 4) distinct annotated boxes, canonical form
    phrases: list[str]


def read_annotated(dataset: Path, limit: int) -> list[AnnotatedImage]:
    """The first ``limit`` images (by id) that have a file, with their boxes and phrases."""
    present = io.present_files(dataset / "images")
    found = []
    for record in Flickr30kReader.open(dataset, splits=dataset):
        if record.file_name not in present:
            continue
        boxes = {(b.x1, b.y1, b.x2, b.y2) for b in record.boxes}
        phrases = [phrase.text for caption in record.captions for phrase in caption.phrases]
        found.append(
            AnnotatedImage(
                record.file_name, np.array(sorted(boxes), np.float32).reshape(-1, 4), phrases
            )
        )
        if len(found) == limit:
            break
    return found


def _timed(run: Callable[[], object]) -> tuple[float, float, float]:
    """Seconds taken by ``run()`` and the 1-minute load average before and after."""
    before = _load_average()
    start = time.perf_counter()
    run()
    return time.perf_counter() - start, before, _load_average()


def measure_speed(args: argparse.Namespace) -> dict[str, Any]:
    annotated = read_annotated(args.dataset, args.images)
    images_dir = args.dataset / "images"
    decoded: list[Image.Image] = []
    seconds, _, _ = _timed(
        lambda: decoded.extend(io.read_image(images_dir / a.file_name) for a in annotated)
    )
    n_images, n_boxes = len(annotated), sum(len(a.boxes) for a in annotated)
    speed: dict[str, Any] = {
        "images": n_images,
        "boxes": n_boxes,
        "decode_images_per_s": n_images / seconds,
        "backbones": [],
        "text": [],
    }
    print(f"{n_images} images, {n_boxes} boxes; JPEG decoding {n_images / seconds:.0f} images/s")
    print(f"{'backbone':<20}{'size':>6}{'batch':>7}{'images/s':>10}{'boxes/s':>9}{'load':>12}")
    items = list(zip(decoded, (a.boxes for a in annotated), strict=True))
    for name in args.backbones:
        backbone = load_backbone(name)
        for size in args.sizes:
            for batch_size in args.batch_sizes:

                def extract(these=items, size=size, batch_size=batch_size, backbone=backbone):
                    for _ in extract_region_features(
                        backbone, these, image_size=size, batch_size=batch_size
                    ):
                        pass

                extract(items[:WARM_UP_IMAGES])
                seconds, before, after = _timed(extract)
                row = {
                    "backbone": name,
                    "image_size": size,
                    "batch_size": batch_size,
                    "images_per_s": n_images / seconds,
                    "boxes_per_s": n_boxes / seconds,
                    "load_average": [before, after],
                }
                speed["backbones"].append(row)
                print(
                    f"{name:<20}{size:>6}{batch_size:>7}{row['images_per_s']:>10.1f}"
                    f"{row['boxes_per_s']:>9.0f}{before:>6.1f}->{after:<4.1f}"
                )
    encoder = load_text_encoder(TEXT_ENCODER)
    phrases = [p for a in annotated for p in a.phrases]
    distinct = len(set(phrases))
    encode_phrases(encoder, phrases[:64], batch_size=64)
    for batch_size in args.text_batch_sizes:
        seconds, before, after = _timed(
            lambda batch_size=batch_size: encode_phrases(encoder, phrases, batch_size=batch_size)
        )
        row = {
            "encoder": TEXT_ENCODER,
            "batch_size": batch_size,
            "phrases": len(phrases),
            "distinct_phrases": distinct,
            "phrases_per_s": len(phrases) / seconds,
            "distinct_phrases_per_s": distinct / seconds,
            "load_average": [before, after],
        }
        speed["text"].append(row)
        print(
            f"{TEXT_ENCODER} batch {batch_size}: {row['phrases_per_s']:.0f} phrases/s "
            f"({len(phrases)} phrases, {distinct} distinct: {row['distinct_phrases_per_s']:.0f}/s)"
        )
    return speed


# --- quality -------------------------------------------------------------------------------


def region_inputs(
    backbone: Backbone,
    candidates: pd.DataFrame,
    images: pd.DataFrame,
    images_dir: Path,
    *,
    image_size: int,
) -> dict[str, np.ndarray]:
    """``visual``, ``context`` (whole image) ``(R, C)`` and ``geometry (R, 7)`` of every
    candidate, row = ``region_id``."""
    vectors = np.zeros((len(candidates), 2 * backbone.channels + 7), np.float32)
    for region_ids, rows in candidate_features(
        backbone,
        candidates,
        images,
        io.ImageFolder(images_dir, images),
        image_size=image_size,
        batch_size=1,
        context=True,
    ):
        vectors[region_ids] = rows
    visual, context, geometry = np.split(vectors, [backbone.channels, 2 * backbone.channels], 1)
    return {"visual": visual, "context": context, "geometry": geometry}


def _cached(
    path: Path | None, compute: Callable[[], dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    if path is not None and path.is_file():
        with np.load(path) as stored:
            return dict(stored)
    arrays = compute()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **arrays)
    return arrays


def found_at_1(pairs: pd.DataFrame, scores: np.ndarray) -> np.ndarray:
    """Per phrase (sorted ids), whether its top-scored candidate is a hit, with the package's
    tie rule (:func:`~grounding.evaluation.metrics.phrase_ranks`)."""
    return phrase_ranks(pairs, scores)["hit_rank"].to_numpy() == 1


def paired_difference(
    found_a: np.ndarray, found_b: np.ndarray, *, resamples: int = 2000, seed: int = 0
) -> dict[str, float]:
    """Recall@1 of A minus B on the same phrases, with a 95% paired bootstrap interval."""
    rng = np.random.default_rng(seed)
    difference = np.asarray(found_a, dtype=float) - np.asarray(found_b, dtype=float)
    means = difference[rng.integers(0, len(difference), (resamples, len(difference)))].mean(1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"difference": float(difference.mean()), "ci95": [float(low), float(high)]}


def baselines(pairs: pd.DataFrame, candidates: pd.DataFrame) -> dict[str, float]:
    """Recall@1 of a random candidate (expected value), of the largest one, and the best any
    ranking can do."""
    hit = pairs["iou"].to_numpy() >= IOU_THRESHOLD
    by_phrase = pd.Series(hit).groupby(pairs["phrase_id"].to_numpy())
    boxes = candidates.set_index("region_id").loc[pairs["region_id"], ["x1", "y1", "x2", "y2"]]
    area = box_area(boxes.to_numpy(np.float64))
    return {
        "random_box": float(by_phrase.mean().mean()),
        "largest_box": recall_at_k(phrase_ranks(pairs, area), 1),
        "upper_bound": float(by_phrase.any().mean()),
    }


def compare_backbones(args: argparse.Namespace) -> dict[str, Any]:
    """Recall@1 on the test phrases of the pipeline's own head and training (``train:`` of
    params.yaml) on each backbone, image size and set of inputs."""
    params = load_params(REPO / "params.yaml")
    train_params = {**asdict(params.train), "heads": params.heads}
    torch.set_num_threads(resolve_threads(params.runtime.threads, small_tensors=True))
    if args.epochs is not None:
        train_params["epochs"] = args.epochs
    seed0 = train_params.pop("seed")
    candidates = io.read_table(args.pairs / "candidates.parquet")
    phrases = io.read_table(args.pairs / "phrases.parquet")
    images = io.read_table(args.parsed / "images.parquet")
    split = {
        name: io.read_table(args.split / f"{name}.parquet") for name in ("train", "val", "test")
    }
    texts, phrase_rows = distinct_phrases(phrases)

    cache = args.cache
    start = time.perf_counter()
    embeddings = _cached(
        cache / f"phrases-{TEXT_ENCODER}.npz" if cache else None,
        lambda: {"phrases": encode_phrases(load_text_encoder(TEXT_ENCODER), texts, batch_size=256)},
    )["phrases"]
    print(f"{len(texts)} distinct phrase embeddings: {time.perf_counter() - start:.0f} s")

    results: dict[str, Any] = {
        "train_pairs": len(split["train"]),
        "val_phrases": int(split["val"]["phrase_id"].nunique()),
        "test_phrases": int(split["test"]["phrase_id"].nunique()),
        "train": {**train_params, "seeds": [seed0 + i for i in range(args.seeds)]},
        "baselines": {name: baselines(split[name], candidates) for name in ("val", "test")},
        "heads": [],
    }
    print(f"baselines (test): {results['baselines']['test']}")

    found: dict[tuple[str, str, int], np.ndarray] = {}

    def run(label: str, regions: np.ndarray, **extra: Any) -> None:
        features = PairFeatures.from_arrays(np.ascontiguousarray(regions), embeddings, phrase_rows)
        val, test, test_found = [], [], []
        start = time.perf_counter()
        for seed in range(seed0, seed0 + args.seeds):
            # cached per head: a long comparison resumes where it stopped
            key = f"{label}-{extra.get('backbone')}-{extra.get('image_size')}-{seed}"
            key += f"-{train_params['epochs']}"

            def compute(seed: int = seed) -> dict[str, np.ndarray]:
                model = train_head(
                    features, split["train"], split["val"], **train_params, seed=seed
                ).model
                return {name: score_pairs(model, features, split[name]) for name in ("val", "test")}

            scores = _cached(
                cache / f"scores-{key.replace(' ', '')}.npz" if cache else None, compute
            )
            val.append(recall_at_k(phrase_ranks(split["val"], scores["val"]), 1))
            test_found.append(found_at_1(split["test"], scores["test"]))
            test.append(float(test_found[-1].mean()))
        row = {
            "inputs": label,
            **extra,
            "val_recall_at_1": float(np.mean(val)),
            "test_recall_at_1": float(np.mean(test)),
            "test_recall_at_1_std": float(np.std(test)),
            "test_recall_at_1_per_seed": test,
            "train_seconds_per_head": (time.perf_counter() - start) / args.seeds,
        }
        results["heads"].append(row)
        if "backbone" in extra:
            # averaged over seeds: the share of heads that found each test phrase
            found[label, extra["backbone"], extra["image_size"]] = np.mean(test_found, axis=0)
        print(
            f"{label:<28}{extra.get('backbone', '-'):<20}{extra.get('image_size', '-')!s:>6}"
            f"  val {row['val_recall_at_1']:.3f}  test {row['test_recall_at_1']:.3f}"
            f" +- {row['test_recall_at_1_std']:.3f}"
        )

    images_dir = args.dataset / "images"
    geometry: np.ndarray | None = None
    for name in args.backbones:
        backbone = load_backbone(name)
        for size in args.compare_sizes or args.sizes:
            start = time.perf_counter()
            arrays = _cached(
                cache / f"regions-{name}-{size}.npz" if cache else None,
                lambda backbone=backbone, size=size: region_inputs(
                    backbone, candidates, images, images_dir, image_size=size
                ),
            )
            print(
                f"{name} {size}px: features of {len(candidates)} regions in "
                f"{time.perf_counter() - start:.0f} s"
            )
            if geometry is None:
                geometry = arrays["geometry"]
                run("geometry only", geometry)
            visual = arrays["visual"]
            run("visual + geometry", np.hstack([visual, geometry]), backbone=name, image_size=size)
            run(
                "visual + context + geometry",
                np.hstack([visual, arrays["context"], geometry]),
                backbone=name,
                image_size=size,
            )
    results["differences"] = _differences(found)
    return results


def _differences(found: dict[tuple[str, str, int], np.ndarray]) -> list[dict[str, Any]]:
    """Paired differences at the same image size between heads that differ in one thing:
    the backbone (same inputs), or the inputs (same backbone)."""
    rows = []
    for (inputs, backbone, size), found_a in found.items():
        for (other_inputs, other_backbone, other_size), found_b in found.items():
            if other_size != size:
                continue
            if inputs == other_inputs and backbone < other_backbone:
                row = {"image_size": size, "inputs": inputs, "a": backbone, "b": other_backbone}
            elif backbone == other_backbone and len(inputs) > len(other_inputs):
                row = {"image_size": size, "backbone": backbone, "a": inputs, "b": other_inputs}
            else:
                continue
            row |= paired_difference(found_a, found_b)
            rows.append(row)
            low, high = row["ci95"]
            print(
                f"{size:>4}  {row.get('inputs', row.get('backbone'))}: {row['a']} - {row['b']}: "
                f"{row['difference']:+.3f} (95% CI {low:+.3f} to {high:+.3f})"
            )
    return rows


if __name__ == "__main__":
    main()
