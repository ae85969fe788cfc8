r"""Build the packaged grounder: this pipeline trained on the real Flickr30k Entities images.

    python -m benchmarks.pretrained

runs ``dvc repro`` in a scratch copy of this repository (:mod:`benchmarks.scratch_repo`) with
the params of :data:`SETTINGS` (the real images of ``../shared/flickr30k_entities``, a seeded
random image split, selective-search proposals as candidates, the training settings that the
quality levers chose), then copies the run's ``models/grounder.safetensors`` to
``src/grounding/pretrained/flickr30k.safetensors`` (package data, what ``grounding predict``
falls back to) and writes its held-out test metrics, size and MD5 to
``reports/pretrained-flickr30k.json`` and ``.md``.

The file is reproduced byte for byte: every stage is seeded, every stage runs on one thread
(``OMP_NUM_THREADS=1``) and safetensors bytes depend only on the values (two builds from fresh
scratch repositories wrote the same MD5, see docs/serving.md).
Selective search is the slow part (about 1 s per image on an idle core); its boxes are cached
per image in ``--proposals`` (default ``data/proposals`` of this checkout, the pipeline's own
cache), so a rebuild reuses them without changing a byte. The images are Flickr30k's: the
weights are for non-commercial research and education, as the images are.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks import REPO, SHARED_DATA
from tests.repository import commit, run, scratch_env, scratch_repo

TARGET = REPO / "src" / "grounding" / "pretrained" / "flickr30k.safetensors"
#: The params that differ from params.yaml: section -> {name: value}.
SETTINGS: dict[str, dict[str, object]] = {
    "split": {"strategy": "random"},  # the 985 images hold 32 of the official val and no test
    "pair": {"candidates": "selective_search"},
    "train": {"head": "matching_prior", "epochs": 10},
    # one torch thread in every stage: the bytes of the features and the head depend on it
    "runtime": {"threads": 1},
}
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
        "--work", type=Path, help="run in this folder and keep it (default: a temporary one)"
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


def params_for(params: dict, data: Path, proposals: Path) -> dict:
    """``params`` (params.yaml's content) with :data:`SETTINGS`, the data root and the cache."""
    params["data"]["root"] = str(data.resolve())
    params["paths"]["proposals"] = str(proposals.resolve())
    for section, values in SETTINGS.items():
        params[section].update(values)
    return params


def build(work: Path, data: Path, proposals: Path) -> tuple[dict, float]:
    """Run the pipeline in ``work`` (a fresh scratch repository when it has no params.yaml);
    return the test metrics and the seconds taken."""
    if (work / "params.yaml").exists():  # a kept folder: this checkout's code, its data kept
        env = scratch_env(work)
        for name in ("src", "stages"):
            shutil.rmtree(work / name)
            shutil.copytree(REPO / name, work / name, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(REPO / "dvc.yaml", work / "dvc.yaml")
    else:
        env = scratch_repo(work)
    # one thread everywhere: the bytes of the features may depend on the thread count, and on a
    # busy machine two threads ran the features stage about 10x slower than one
    env |= {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    params = yaml.safe_load((work / "params.yaml").read_text())
    (work / "params.yaml").write_text(
        yaml.safe_dump(params_for(params, data, proposals), sort_keys=False)
    )
    commit(work, env, "pretrained settings")
    start = time.perf_counter()
    print(run(["dvc", "repro"], work, env)[-2000:])
    seconds = time.perf_counter() - start
    metrics = json.loads((work / "reports" / "metrics.json").read_text())
    details = json.loads((work / "reports" / "test.json").read_text())
    return {**metrics, "phrases": details.get("phrases")}, seconds


def markdown(summary: dict) -> str:
    metrics = summary["metrics"]
    return "\n".join(
        [
            "# The packaged grounder (`src/grounding/pretrained/flickr30k.safetensors`)",
            "",
            "Rebuilt by `python -m benchmarks.pretrained`. Trained by this pipeline on the",
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
    from grounding.candidates import SELECTIVE_SEARCH, cache_key
    from grounding.candidates.selective_search import propose
    from grounding.config import load_params

    settings = load_params(REPO / "params.yaml").candidates.settings(SELECTIVE_SEARCH)
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


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.check_proposals:
        report = args.reports / "pretrained-flickr30k.json"
        summary = json.loads(report.read_text())
        summary["proposals_recomputed"] = check_proposals(args.data, args.proposals)
        report.write_text(json.dumps(summary, indent=2) + "\n")
        print(summary["proposals_recomputed"])
        return
    if args.work is None:
        with tempfile.TemporaryDirectory() as folder:
            work = Path(folder)
            metrics, seconds = build(work, args.data, args.proposals)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(work / "models" / "grounder.safetensors", args.out)
            images = json.loads((work / "reports" / "pair.json").read_text()).get("images_paired")
    else:
        args.work.mkdir(parents=True, exist_ok=True)
        metrics, seconds = build(args.work, args.data, args.proposals)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(args.work / "models" / "grounder.safetensors", args.out)
        images = json.loads((args.work / "reports" / "pair.json").read_text()).get("images_paired")
    content = args.out.read_bytes()
    summary = {
        "file": str(args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out),
        "bytes": len(content),
        "md5": hashlib.md5(content).hexdigest(),
        "images": images,
        "settings": SETTINGS,
        "metrics": {key: metrics[key] for key in (*REPORTED, "phrases")},
        "seconds": round(seconds),
    }
    args.reports.mkdir(parents=True, exist_ok=True)
    (args.reports / "pretrained-flickr30k.json").write_text(json.dumps(summary, indent=2) + "\n")
    (args.reports / "pretrained-flickr30k.md").write_text(markdown(summary))
    print(markdown(summary))


if __name__ == "__main__":
    main()
