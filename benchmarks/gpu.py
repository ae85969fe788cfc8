"""How fast a GPU is against the CPU: features, train and test scoring on the shipped sample,
once on the CPU and once on CUDA.

    python -m benchmarks.gpu              # exits 0 with a notice on a machine without a GPU

The data stages (parse, pair, split: no model) run once, with ``dvc repro split`` in a
temporary copy of the repository; then, per device, the features of every candidate and
phrase (images/s), the head's training on the train pairs (pairs/s: training pairs times
epochs per second) and Recall@1 of the test phrases, with the pipeline's params, and their
difference. Whether the two Recall@1 agree is a test, not this benchmark's verdict:
``tests/stages/test_gpu_pipeline.py`` (marked ``gpu``; it runs where torch sees a GPU).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tests.repository import run, scratch_repo


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cuda", default="cuda", help="the GPU to compare (default %(default)s)")
    parser.add_argument("--epochs", type=int, help="train this many epochs (default: params)")
    return parser.parse_args(argv)


def no_gpu_notice() -> str | None:
    """Why there is nothing to compare on this machine, or None when torch sees a GPU."""
    import torch

    if torch.cuda.is_available():
        return None
    built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    return f"no GPU on this machine (torch {torch.__version__}, {built}): nothing to compare"


def run_on(device_spec: str, work: Path, epochs: int | None) -> dict[str, Any]:
    """Features, training and test Recall@1 of the sample (data stages done in ``work``) on
    one device, with the pipeline's params; timings exclude loading the models."""
    import numpy as np
    import torch

    from grounding import io
    from grounding.config import load_params
    from grounding.evaluation.metrics import phrase_ranks, recall_at_k
    from grounding.modeling.backbones import load_backbone
    from grounding.modeling.device import loader_workers, resolve_device, resolve_threads
    from grounding.modeling.region_features import candidate_features, region_dim
    from grounding.modeling.scoring import PairFeatures, score_pairs
    from grounding.modeling.text import distinct_phrases, encode_phrases, load_text_encoder
    from grounding.modeling.train import train_head

    params = load_params(work / "params.yaml")
    cfg, paths = params.features, params.paths
    device = resolve_device(device_spec, "--cuda")
    threads = resolve_threads(params.runtime.threads)
    torch.set_num_threads(threads)
    candidates = io.read_table(work / paths.pairs / "candidates.parquet")
    phrases = io.read_table(work / paths.pairs / "phrases.parquet")
    images = io.read_table(work / paths.parsed / "images.parquet")
    backbone = load_backbone(cfg.backbone, cfg.backbone_weights, device=device)
    encoder = load_text_encoder(cfg.text_encoder, device=device)

    regions = np.zeros((len(candidates), region_dim(backbone, context=cfg.context)), np.float32)
    start = time.perf_counter()
    for region_ids, vectors in candidate_features(
        backbone,
        candidates,
        images,
        io.ImageFolder(work / params.data.images_dir, images),
        image_size=cfg.image_size,
        batch_size=cfg.batch_size,
        context=cfg.context,
        workers=loader_workers(device, threads),
    ):
        regions[region_ids] = vectors  # on the CPU already: the GPU is done with them
    feature_s = time.perf_counter() - start
    texts, phrase_rows = distinct_phrases(phrases)
    embeddings = encode_phrases(encoder, texts, batch_size=cfg.text_batch_size)
    features = PairFeatures.from_arrays(regions, embeddings, phrase_rows)

    split = {name: io.read_table(work / paths.split / f"{name}.parquet") for name in SPLITS}
    settings = {**asdict(params.train), "heads": params.heads}
    if epochs is not None:
        settings["epochs"] = epochs
    torch.set_num_threads(resolve_threads(params.runtime.threads, small_tensors=True))
    start = time.perf_counter()
    result = train_head(features, split["train"], split["val"], **settings, device=device)
    train_s = time.perf_counter() - start
    head = result.model.to(device)
    scores = score_pairs(head, features, split["test"])
    return {
        "device": str(device),
        "images": int(candidates["image_id"].nunique()),
        "images_per_s": candidates["image_id"].nunique() / feature_s,
        "pairs_per_s": len(split["train"]) * settings["epochs"] / train_s,
        "test_recall_at_1": recall_at_k(phrase_ranks(split["test"], scores), 1),
    }


SPLITS = ("train", "val", "test")


def compare(cpu: dict[str, Any], cuda: dict[str, Any]) -> str:
    """The lines to print: each run's figures and the difference of their test Recall@1."""
    difference = abs(cpu["test_recall_at_1"] - cuda["test_recall_at_1"])
    lines = [
        f"{run['device']:8} features {run['images_per_s']:8.1f} images/s   train "
        f"{run['pairs_per_s']:10.0f} pairs/s   test Recall@1 {run['test_recall_at_1']:.4f}"
        for run in (cpu, cuda)
    ]
    lines.append(f"test Recall@1 |difference| {difference:.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    notice = no_gpu_notice()
    if notice is not None:
        print(notice)
        return
    with tempfile.TemporaryDirectory(prefix="grounding-gpu-") as folder:
        work = Path(folder)
        env = scratch_repo(work)
        run(["dvc", "repro", "split"], work, env)
        cpu = run_on("cpu", work, args.epochs)
        cuda = run_on(args.cuda, work, args.epochs)
    print(compare(cpu, cuda))


if __name__ == "__main__":
    main()
