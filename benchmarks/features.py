r"""Benchmark of the feature extractors: speed on real images, and (``--compare``) quality.

Speed: for each packaged backbone and image size, images per second of
:func:`grounding.features.extract_region_features` on decoded Flickr30k Entities images with
their annotated boxes (JPEG decoding is timed apart), and phrases per second of
:func:`grounding.features.encode_phrases` on the same images' phrases.

Quality (``--compare``): region features of every candidate of the pipeline's ``pairs``
tables, phrase embeddings of every phrase, then a small matching head trained on the ``split``
tables' train pairs; Recall@1 on the test phrases (the top-scored candidate has IoU >= 0.5
with the phrase's ground truth), next to random-box, largest-box and geometry-only baselines.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn

from grounding import io
from grounding.boxes import IOU_THRESHOLD
from grounding.features import (
    BACKBONES,
    Backbone,
    candidate_features,
    encode_phrases,
    extract_region_features,
    load_backbone,
    load_text_encoder,
)
from grounding.flickr30k import parse_annotation, parse_sentences

TEXT_ENCODER = "all-minilm-l6-v2"
WARM_UP_IMAGES = 3


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dataset",
        type=Path,
        default=Path("../shared/flickr30k_entities"),
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
    compare.add_argument("--epochs", type=int, default=6, help="training epochs of each head")
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
    image_id: str
    boxes: np.ndarray  # (N, 4) distinct annotated boxes, canonical form
    phrases: list[str]


def read_annotated(dataset: Path, limit: int) -> list[AnnotatedImage]:
    """The first ``limit`` images (by id) that have a JPEG, with their boxes and phrases."""
    with_file = io.list_image_ids(dataset / "images")
    found = []
    for files in io.AnnotationReader(io.find_annotations(dataset)):
        if files.image_id not in with_file:
            continue
        annotation = parse_annotation(files.xml, files.xml_source)
        boxes = {(o.box.x1, o.box.y1, o.box.x2, o.box.y2) for o in annotation.objects if o.box}
        captions = parse_sentences(files.sentences, files.sentences_source)
        phrases = [mention.text for caption in captions for mention in caption.mentions]
        found.append(
            AnnotatedImage(
                files.image_id, np.array(sorted(boxes), np.float32).reshape(-1, 4), phrases
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
        lambda: decoded.extend(io.load_image(images_dir, a.image_id) for a in annotated)
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
    """``visual``, ``context`` (whole image) ``(R, C)`` and ``geometry (R, 7)`` of every row of
    ``candidates``, in its order."""
    vectors = np.zeros((len(candidates), 2 * backbone.channels + 7), np.float32)
    positions = pd.Index(candidates["region_id"])
    for region_ids, rows in candidate_features(
        backbone,
        candidates,
        images,
        partial(io.load_image, images_dir),
        image_size=image_size,
        batch_size=1,
        context=True,
    ):
        vectors[positions.get_indexer(region_ids)] = rows
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


class MatchingHead(nn.Module):
    """Region and phrase projected to ``hidden``; an MLP on ``[r * p, r, p]`` gives a logit."""

    def __init__(self, region_dim: int, phrase_dim: int, hidden: int = 256) -> None:
        super().__init__()
        self.region = nn.Linear(region_dim, hidden)
        self.phrase = nn.Linear(phrase_dim, hidden)
        self.score = nn.Sequential(
            nn.Linear(3 * hidden, hidden), nn.ReLU(), nn.Dropout(0.1), nn.Linear(hidden, 1)
        )

    def forward(self, regions: torch.Tensor, phrases: torch.Tensor) -> torch.Tensor:
        r, p = self.region(regions), self.phrase(phrases)
        return self.score(torch.cat([r * p, r, p], dim=1)).squeeze(1)


def train_and_score(
    regions: np.ndarray,
    phrases: np.ndarray,
    train: tuple[np.ndarray, np.ndarray, np.ndarray],
    evaluate: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    epochs: int,
    seed: int,
    batch_size: int = 1024,
) -> list[np.ndarray]:
    """Train a head on ``train = (region rows, phrase rows, labels)``; score each
    ``(region rows, phrase rows)`` of ``evaluate``. Rows index ``regions (R, D)`` and
    ``phrases (P, E)``."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    region_table, phrase_table = torch.from_numpy(regions), torch.from_numpy(phrases)
    region_rows, phrase_rows = torch.from_numpy(train[0]), torch.from_numpy(train[1])
    labels = torch.tensor(train[2], dtype=torch.float32)
    head = MatchingHead(regions.shape[1], phrases.shape[1])
    optimiser = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-4)
    head.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(labels), generator=generator).split(batch_size):
            logits = head(region_table[region_rows[batch]], phrase_table[phrase_rows[batch]])
            loss = nn.functional.binary_cross_entropy_with_logits(logits, labels[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    head.eval()
    with torch.inference_mode():
        return [
            head(region_table[torch.from_numpy(r)], phrase_table[torch.from_numpy(p)]).numpy()
            for r, p in evaluate
        ]


def found_at_1(pairs: pd.DataFrame, scores: np.ndarray) -> pd.Series:
    """Per phrase (sorted ids), whether its top-scored candidate has IoU >= 0.5; ``pairs`` has
    one row per candidate, ``scores (N,)`` aligned with it."""
    table = pairs[["phrase_id", "iou"]].assign(score=scores)
    top = table.loc[table.groupby("phrase_id")["score"].idxmax()]
    return (top.set_index("phrase_id")["iou"] >= IOU_THRESHOLD).sort_index()


def recall_at_1(pairs: pd.DataFrame, scores: np.ndarray) -> float:
    return float(found_at_1(pairs, scores).mean())


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
    boxes = candidates.set_index("region_id").loc[pairs["region_id"]]
    area = ((boxes["x2"] - boxes["x1"]) * (boxes["y2"] - boxes["y1"])).to_numpy()
    return {
        "random_box": float(by_phrase.mean().mean()),
        "largest_box": recall_at_1(pairs, area),
        "upper_bound": float(by_phrase.any().mean()),
    }


def _standardise(values: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Each column to zero mean, unit variance over ``rows`` (the training regions)."""
    mean, std = values[rows].mean(axis=0), values[rows].std(axis=0) + 1e-6
    return ((values - mean) / std).astype(np.float32)


def compare_backbones(args: argparse.Namespace) -> dict[str, Any]:
    candidates = io.read_table(args.pairs / "candidates.parquet")
    phrases = io.read_table(args.pairs / "phrases.parquet")
    images = io.read_table(args.parsed / "images.parquet")
    split = {
        name: io.read_table(args.split / f"{name}.parquet") for name in ("train", "val", "test")
    }
    region_index = pd.Index(candidates["region_id"])
    phrase_index = pd.Index(phrases["phrase_id"])

    def rows(pairs: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        return (
            region_index.get_indexer(pairs["region_id"]),
            phrase_index.get_indexer(pairs["phrase_id"]),
        )

    train_rows = (*rows(split["train"]), split["train"]["label"].to_numpy())
    evaluate = [rows(split["val"]), rows(split["test"])]
    train_regions = np.unique(train_rows[0])

    cache = args.cache
    start = time.perf_counter()
    embeddings = _cached(
        cache / f"phrases-{TEXT_ENCODER}.npz" if cache else None,
        lambda: {
            "phrases": encode_phrases(
                load_text_encoder(TEXT_ENCODER), phrases["text"].tolist(), batch_size=256
            )
        },
    )["phrases"]
    print(f"{len(phrases)} phrase embeddings: {time.perf_counter() - start:.0f} s")

    results: dict[str, Any] = {
        "train_pairs": len(split["train"]),
        "val_phrases": int(split["val"]["phrase_id"].nunique()),
        "test_phrases": int(split["test"]["phrase_id"].nunique()),
        "epochs": args.epochs,
        "seeds": args.seeds,
        "baselines": {name: baselines(split[name], candidates) for name in ("val", "test")},
        "heads": [],
    }
    print(f"baselines (test): {results['baselines']['test']}")

    found: dict[tuple[str, str, int], np.ndarray] = {}

    def run(label: str, regions: np.ndarray, **extra: Any) -> None:
        val, test, test_found = [], [], []
        start = time.perf_counter()
        standardised = _standardise(regions, train_regions)
        for seed in range(args.seeds):
            # cached per head too: a long comparison resumes where it stopped
            key = f"{label}-{extra.get('backbone')}-{extra.get('image_size')}-{args.epochs}-{seed}"
            scores = _cached(
                cache / f"scores-{key.replace(' ', '')}.npz" if cache else None,
                lambda seed=seed: dict(
                    zip(
                        ("val", "test"),
                        train_and_score(
                            standardised,
                            embeddings,
                            train_rows,
                            evaluate,
                            epochs=args.epochs,
                            seed=seed,
                        ),
                        strict=True,
                    )
                ),
            )
            val.append(recall_at_1(split["val"], scores["val"]))
            test_found.append(found_at_1(split["test"], scores["test"]).to_numpy())
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
