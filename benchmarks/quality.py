r"""Where the grounding quality goes, and which training settings win it back, on a pipeline run.

Reads a finished run's tables and cached features (``data/parsed``, ``data/pairs``,
``data/split``, ``data/features`` of a repository where ``dvc repro`` ran, e.g. a scratch copy
on the real images) and writes ``reports/quality-<name>.json`` / ``.md``:

* near misses: for the test phrases, the best candidate IoU (>= 0.5: coverable; 0.3-0.5: a
  near miss that box refinement could win; < 0.3), and for each head the IoU of its top-1 box
  and the rank of its first positive;
* each variant (train params as for ``dvc exp run -S train.<key>=<value>``) trained by the
  pipeline's own training on the train pairs and scored on val and test: Recall@1/5/10 with
  ANY-box and MERGED-box, and the upper bound.

    python -m benchmarks.quality --run /tmp/real-proposals --name proposals-real \
        --variant baseline --variant epochs=10 --variant head=matching_prior

Only the head is trained here: features are read, never extracted, so a variant costs
seconds to minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from itertools import pairwise
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from benchmarks import REPO
from grounding import io
from grounding.boxes import BOX_COLUMNS, aligned_iou, box_iou
from grounding.config import load_params
from grounding.evaluation.metrics import merged_iou, phrase_ranks, recall_at_k, upper_bound
from grounding.modeling.device import resolve_threads
from grounding.modeling.scoring import PairFeatures, TrainedHead, score_pairs
from grounding.modeling.train import train_head

KS = (1, 5, 10)
IOU_BINS = (0.0, 0.3, 0.5, 1.01)
RANK_BINS = ((1, 1), (2, 5), (6, 10), (11, 10**9))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", type=Path, required=True, help="repository of a finished run")
    parser.add_argument("--name", required=True, help="reports/quality-<name>.json and .md")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="'baseline', train overrides 'key=value[,key=value]', or "
        "'model=models/head.safetensors' (the run's own head, scored untrained); repeatable",
    )
    parser.add_argument(
        "--cached",
        nargs=2,
        type=Path,
        metavar=("REGIONS_NPZ", "PHRASES_NPZ"),
        help="features cached by `benchmarks.features --compare --cache` instead of the run's",
    )
    parser.add_argument("--params", type=Path, help="params file (default: the run's)")
    parser.add_argument(
        "--refine", action="store_true", help="also try box refinement on each variant's top-1"
    )
    parser.add_argument("--out", type=Path, default=REPO / "reports", help="folder to write to")
    return parser.parse_args(argv)


def recalls(pairs: pd.DataFrame, scores: np.ndarray, merged: np.ndarray) -> dict[str, float]:
    """Recall@k ANY-box and MERGED-box (``merged_*``) and both upper bounds."""
    out: dict[str, float] = {}
    for prefix, iou in (("", None), ("merged_", merged)):
        ranks = phrase_ranks(pairs, scores, iou)
        out |= {f"{prefix}recall_at_{k}": recall_at_k(ranks, k) for k in KS}
        out[f"{prefix}upper_bound"] = upper_bound(ranks)
    out["phrases"] = int(pairs["phrase_id"].nunique())
    return out


def _shares(values: np.ndarray, bins: tuple[float, ...]) -> dict[str, float]:
    counts, _ = np.histogram(values, bins=bins)
    labels = [f"{lo:g}-{min(hi, 1.0):g}" for lo, hi in pairwise(bins)]
    return {label: float(c / len(values)) for label, c in zip(labels, counts, strict=True)}


def near_misses(pairs: pd.DataFrame, scores: np.ndarray | None = None) -> dict:
    """Shares of test phrases by their best candidate's IoU (the bound), and with ``scores`` by
    their top-1 candidate's IoU and by the rank of the first positive (0: none)."""
    table = pairs[["phrase_id", "iou"]].assign(score=0.0 if scores is None else scores)
    best = table.groupby("phrase_id")["iou"].max().to_numpy()
    out: dict = {"best_candidate_iou": _shares(best, IOU_BINS)}
    if scores is None:
        return out
    top = table.sort_values(["phrase_id", "score"], ascending=[True, False])
    top1 = top.groupby("phrase_id")["iou"].first().to_numpy()
    out["top1_iou"] = _shares(top1, IOU_BINS)
    ranks = phrase_ranks(pairs, scores)["hit_rank"].to_numpy()
    out["first_positive_rank"] = {
        f"{lo}-{hi}" if hi < 10**9 else f">{lo - 1}": float(np.mean((ranks >= lo) & (ranks <= hi)))
        for lo, hi in RANK_BINS
    } | {"none": float(np.mean(ranks == 0))}
    # the misses at rank 1 whose top box is a near miss: what refining the box could recover
    out["top1_near_miss_share"] = float(np.mean((top1 >= 0.3) & (top1 < 0.5)))
    return out


def _deltas(boxes: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """The usual box-regression targets ``(N, 4)``: centre shift in box widths/heights and the
    log of the size ratio, from ``boxes`` to ``targets`` (both ``(N, 4)``)."""
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    tw, th = targets[:, 2] - targets[:, 0], targets[:, 3] - targets[:, 1]
    return np.stack(
        [
            (targets[:, 0] + tw / 2 - boxes[:, 0] - w / 2) / w,
            (targets[:, 1] + th / 2 - boxes[:, 1] - h / 2) / h,
            np.log(tw / w),
            np.log(th / h),
        ],
        axis=1,
    ).astype(np.float32)


def _apply(boxes: np.ndarray, deltas: np.ndarray) -> np.ndarray:
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    cx, cy = boxes[:, 0] + w / 2 + deltas[:, 0] * w, boxes[:, 1] + h / 2 + deltas[:, 1] * h
    nw, nh = w * np.exp(deltas[:, 2]), h * np.exp(deltas[:, 3])
    return np.stack([cx - nw / 2, cy - nh / 2, cx + nw / 2, cy + nh / 2], axis=1)


def _nearest_truth(pairs: pd.DataFrame, candidates: pd.DataFrame, truth: pd.DataFrame):
    """Each pair's region box and the phrase's ground-truth box it overlaps most: ``(N, 4)``
    twice."""
    regions = candidates.set_index("region_id").loc[pairs["region_id"], BOX_COLUMNS].to_numpy()
    by_phrase = {key: group[BOX_COLUMNS].to_numpy() for key, group in truth.groupby("phrase_id")}
    nearest = np.empty_like(regions)
    for i, (phrase, region) in enumerate(zip(pairs["phrase_id"], regions, strict=True)):
        boxes = by_phrase[phrase]
        nearest[i] = boxes[box_iou(region[None], boxes)[0].argmax()]
    return regions.astype(np.float64), nearest.astype(np.float64)


def refinement(
    features: PairFeatures,
    split: dict[str, pd.DataFrame],
    candidates: pd.DataFrame,
    truth: pd.DataFrame,
    test_scores: np.ndarray,
    *,
    min_iou: float = 0.3,
    epochs: int = 20,
    seed: int = 0,
) -> dict[str, float]:
    """Lever (d): an MLP on (region features, phrase embedding) regresses the box deltas from
    a candidate to the phrase's nearest ground-truth box, trained on the distinct train pairs
    with IoU >= ``min_iou``; applied to each test phrase's top-1 candidate. Returns Recall@1
    (ANY and MERGED) before and after."""
    train = split["train"].drop_duplicates(["phrase_id", "region_id"])
    train = train[train["iou"] >= min_iou]
    boxes, nearest = _nearest_truth(train, candidates, truth)
    targets = torch.from_numpy(_deltas(boxes, nearest))
    region_rows, phrase_rows = features.rows(train)
    torch.manual_seed(seed)
    width = features.regions.shape[1] + features.phrases.shape[1]
    model = torch.nn.Sequential(
        torch.nn.LayerNorm(width),
        torch.nn.Linear(width, 256),
        torch.nn.GELU(),
        torch.nn.Linear(256, 4),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        for batch in np.array_split(rng.permutation(len(train)), max(1, len(train) // 512)):
            regions, phrases = features.gather(region_rows[batch], phrase_rows[batch])
            loss = torch.nn.functional.smooth_l1_loss(
                model(torch.cat([regions, phrases], 1)), targets[batch], beta=0.1
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    test = split["test"].assign(score=test_scores)
    top = (
        test.sort_values(["phrase_id", "score"], ascending=[True, False])
        .groupby("phrase_id", sort=True)
        .head(1)
    )
    regions, phrases = features.gather(*features.rows(top))
    with torch.inference_mode():
        deltas = model(torch.cat([regions, phrases], 1)).numpy()
    before = candidates.set_index("region_id").loc[top["region_id"], BOX_COLUMNS].to_numpy()
    after = _apply(before.astype(np.float64), deltas)
    truth_by = {key: g[BOX_COLUMNS].to_numpy() for key, g in truth.groupby("phrase_id")}
    union = truth.groupby("phrase_id")[BOX_COLUMNS].agg(["min", "max"])
    out: dict[str, float] = {"train_pairs": len(train)}
    for name, chosen in (("before", before), ("after", after)):
        anyiou = np.array(
            [
                box_iou(b[None], truth_by[p])[0].max()
                for b, p in zip(chosen, top["phrase_id"], strict=True)
            ]
        )
        merged = union.loc[top["phrase_id"]]
        merged_boxes = np.stack(
            [
                merged[("x1", "min")],
                merged[("y1", "min")],
                merged[("x2", "max")],
                merged[("y2", "max")],
            ],
            axis=1,
        )
        out[f"{name}_recall_at_1"] = float(np.mean(anyiou >= 0.5))
        out[f"{name}_merged_recall_at_1"] = float(np.mean(aligned_iou(chosen, merged_boxes) >= 0.5))
    return out


def parse_variant(text: str) -> dict[str, object]:
    if text == "baseline":
        return {}
    return {
        key.strip(): yaml.safe_load(value)
        for key, value in (item.split("=", 1) for item in text.split(","))
    }


def cached_features(run: Path, regions: Path, phrases: Path) -> tuple[PairFeatures, str]:
    """Features from ``benchmarks.features --compare --cache`` files instead of the run's: the
    ``visual`` and ``geometry`` arrays of a regions file, rows of the run's candidates, and a
    phrases file's embeddings of :func:`~grounding.modeling.text.distinct_phrases`."""
    from grounding.modeling.text import distinct_phrases

    arrays = np.load(regions)
    _, phrase_rows = distinct_phrases(io.read_table(run / "data" / "pairs" / "phrases.parquet"))
    features = PairFeatures.from_arrays(
        np.hstack([arrays["visual"], arrays["geometry"]]), np.load(phrases)["phrases"], phrase_rows
    )
    return features, f"{regions.name} + {phrases.name}"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run = args.run
    params = load_params(args.params or run / "params.yaml")
    if args.cached:
        features, meta = cached_features(run, *args.cached)
    else:
        stored = io.read_features(run / "data" / "features")
        features, meta = PairFeatures.stored(stored), stored.meta
    split = {
        name: io.read_table(run / "data" / "split" / f"{name}.parquet")
        for name in ("train", "val", "test")
    }
    paired = io.read_tables(run / "data" / "pairs", ("candidates", "ground_truth"))
    merged = {
        name: merged_iou(split[name], paired["candidates"], paired["ground_truth"])
        for name in ("val", "test")
    }
    results: dict = {
        "run": str(run),
        "features": meta if isinstance(meta, str) else meta.to_dict(),
        "candidates": params.pair.candidates,
        "split": asdict(params.split),
        "train_images": int(split["train"]["image_id"].nunique()),
        "near_misses": near_misses(split["test"]),
        "variants": [],
    }
    # the threads train would use (runtime.threads; auto is 1 for the head, see docs/gpu-and-ray.md)
    torch.set_num_threads(resolve_threads(params.runtime.threads, small_tensors=True))
    for text in args.variant or ["baseline"]:
        start = time.perf_counter()
        if text.startswith("model="):  # a head the run trained already: score it, no training
            model = TrainedHead.from_weights(*io.read_weights(run / text.split("=", 1)[1])).head
            row: dict = {"variant": text, "train": asdict(params.train), "seconds": 0.0}
        else:
            kwargs = asdict(replace(params.train, **parse_variant(text)))
            trained = train_head(
                features, split["train"], split["val"], **kwargs, heads=params.heads
            )
            model = trained.model
            row = {"variant": text, "train": kwargs, "seconds": time.perf_counter() - start}
            row["history_val_recall_at_1"] = trained.history["val_recall_at_1"].round(4).tolist()
        for name in ("val", "test"):
            scores = score_pairs(model, features, split[name])
            row[name] = recalls(split[name], scores, merged[name])
            if name == "test":
                row["near_misses"] = near_misses(split[name], scores)
                if args.refine:
                    row["refinement"] = refinement(
                        features, split, paired["candidates"], paired["ground_truth"], scores
                    )
        results["variants"].append(row)
        print(json.dumps({"variant": text, "val": row["val"], "test": row["test"]}), flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"quality-{args.name}.json").write_text(json.dumps(results, indent=2) + "\n")
        (args.out / f"quality-{args.name}.md").write_text(markdown(results, args.name))


def markdown(results: dict, name: str) -> str:
    bounds = results["near_misses"]["best_candidate_iou"]
    lines = [
        f"# Quality levers: {name}",
        "",
        f"Rebuilt by `python -m benchmarks.quality --run <run> --name {name} --variant ...` on",
        f"a run with `pair.candidates={results['candidates']}`, split `{results['split']}`,",
        f"{results['train_images']} training images. Heads trained by the pipeline's training;",
        "val and test phrases never trained on. ANY: a hit on any of the phrase's boxes; MERGED:",
        "on their union.",
        "",
        "Test phrases by their best candidate's IoU: "
        + ", ".join(f"{k}: {v:.3f}" for k, v in bounds.items()),
        "",
        "| variant | val R@1 | test R@1 | R@5 | R@10 | bound | MERGED R@1 | R@5 | R@10 | bound "
        "| top-1 IoU 0.3-0.5 | first hit > 10 | s |",
        "|---|" + "---|" * 12,
    ]
    for row in results["variants"]:
        test, near = row["test"], row["near_misses"]
        cells = [
            row["val"]["recall_at_1"],
            test["recall_at_1"],
            test["recall_at_5"],
            test["recall_at_10"],
            test["upper_bound"],
            test["merged_recall_at_1"],
            test["merged_recall_at_5"],
            test["merged_recall_at_10"],
            test["merged_upper_bound"],
            near["top1_near_miss_share"],
            near["first_positive_rank"][">10"],
        ]
        lines.append(
            f"| {row['variant']} | "
            + " | ".join(f"{v:.3f}" for v in cells)
            + f" | {row['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
