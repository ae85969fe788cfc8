r"""Speed of ``hf:`` CLIP and SigLIP on this machine's CPU, at the real models' sizes.

No CLIP or SigLIP weights can be had offline, so the models are randomly initialised at the
sizes of ``openai/clip-vit-base-patch32`` and ``google/siglip-base-patch16-224`` (the
transformers configs' defaults) and saved with ``save_pretrained``: the time a forward pass
takes does not depend on the weights' values. Their tokenizer is the tests' byte-level one
(one token per character, more tokens than the real BPE tokenizers make: the text timings are
pessimistic). For each family, on ``--n-images`` real images (the sample's without the real
data):

- loading ``hf:<folder>`` as backbone, text encoder and zero-training grounder;
- the backbone's region features (:func:`~grounding.modeling.region_features.region_features`,
  21 boxes per image) at ``--image-size``, seconds per image;
- phrases per second of :func:`~grounding.modeling.text.encode_phrases`;
- the zero-training grounder (``grounding predict --model hf:...``): seconds per image for five
  phrases, its proposals (selective search) computed beforehand and timed apart.

Writes JSON and a Markdown table beside it:

    PYTHONPATH=src python -m benchmarks.clip --out reports/clip-speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from benchmarks import REPO, SHARED_DATA
from tests.modeling.image_text_models import FAMILIES, save_full_size

PHRASES = ("a man", "a woman in a red shirt", "the dog on the left", "a blue car", "the sky")
SIZES = {
    "clip": "ViT-B/32 (openai/clip-vit-base-patch32)",
    "siglip": "B/16 (google/siglip-base-patch16-224)",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n-images", type=int, default=5, help="images to time")
    parser.add_argument("--image-size", type=int, default=448, help="features.image_size")
    parser.add_argument("--out", type=Path, help="write the figures here (JSON, and .md beside)")
    return parser.parse_args(argv)


def images(count: int) -> list[Image.Image]:
    """The first ``count`` real Flickr30k images, else the sample's."""
    folder = SHARED_DATA / "images"
    if not folder.is_dir():
        folder = REPO / "data" / "sample" / "images"
    return [Image.open(path).convert("RGB") for path in sorted(folder.glob("*.jpg"))[:count]]


def seconds(action: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    result = action()
    return time.perf_counter() - started, result


def measure(family: str, folder: Path, pictures: list[Image.Image], image_size: int) -> dict:
    from grounding.inference.loading import load_grounder
    from grounding.modeling.backbones import load_backbone
    from grounding.modeling.region_features import region_features
    from grounding.modeling.text import encode_phrases, load_text_encoder

    model = f"hf:{folder}"
    load_backbone_s, backbone = seconds(lambda: load_backbone(model))
    load_text_s, encoder = seconds(lambda: load_text_encoder(model))
    load_grounder_s, grounder = seconds(lambda: load_grounder(model, "cpu"))
    rng = np.random.default_rng(0)
    per_image = []
    for picture in pictures:
        w, h = picture.size
        corners = rng.uniform(0, 0.5, (20, 2)) * (w, h)
        sides = rng.uniform(0.2, 0.5, (20, 2)) * (w, h)
        boxes = np.concatenate([[[0, 0, w, h]], np.hstack([corners, corners + sides])])
        elapsed, _ = seconds(
            lambda p=picture, b=boxes: region_features(
                backbone, p, b.astype(np.float32), image_size=image_size
            )
        )
        per_image.append(elapsed)
    texts = [f"{phrase} number {i}" for i in range(40) for phrase in PHRASES]
    text_s, _ = seconds(lambda: encode_phrases(encoder, texts))
    propose = grounder.proposer()
    proposals = [seconds(lambda p=picture: propose(p)) for picture in pictures]
    ground = [
        seconds(lambda p=picture, b=boxes: grounder.ground(p, PHRASES, proposals=lambda _: b))[0]
        for picture, (_, boxes) in zip(pictures, proposals, strict=True)
    ]
    weights = sum(path.stat().st_size for path in folder.glob("*.safetensors"))
    return {
        "family": family,
        "sizes_of": SIZES[family],
        "weights_mb": round(weights / 1e6, 1),
        "load_backbone_s": round(load_backbone_s, 2),
        "load_text_encoder_s": round(load_text_s, 2),
        "load_grounder_s": round(load_grounder_s, 2),
        "features_s_per_image": round(statistics.median(per_image), 3),
        "phrases_per_s": round(len(texts) / text_s, 1),
        "proposals_s_per_image": round(statistics.median(s for s, _ in proposals), 3),
        "candidates_per_image": round(statistics.mean(len(b) for _, b in proposals), 1),
        "zero_training_s_per_image": round(statistics.median(ground), 3),
    }


def table(results: list[dict], settings: dict[str, Any]) -> str:
    rows = [
        "| family (sizes of) | weights MB | load s (backbone / text / grounder) | region "
        f"features s per image ({settings['image_size']} px, 21 boxes) | phrases per s | "
        "zero-training s per image (5 phrases) | selective search s per image (candidates) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rows.append(
            f"| {r['family']}, {r['sizes_of']} | {r['weights_mb']} | {r['load_backbone_s']} / "
            f"{r['load_text_encoder_s']} / {r['load_grounder_s']} | {r['features_s_per_image']} "
            f"| {r['phrases_per_s']} | {r['zero_training_s_per_image']} | "
            f"{r['proposals_s_per_image']} ({r['candidates_per_image']}) |"
        )
    machine = f"{settings['cpus']} CPUs ({settings['machine']}), torch {settings['torch']}"
    return "\n".join(rows) + f"\n\n{settings['images']} images; {machine}; random weights.\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    pictures = images(args.n_images)
    results = []
    with tempfile.TemporaryDirectory(prefix="clip-speed-") as scratch:
        for family in FAMILIES:
            folder = save_full_size(Path(scratch) / family, family)
            results.append(measure(family, folder, pictures, args.image_size))
            print(json.dumps(results[-1]))
    settings = {
        "image_size": args.image_size,
        "images": len(pictures),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "torch": torch.__version__,
    }
    if args.out:
        args.out.write_text(json.dumps({"settings": settings, "results": results}, indent=2))
        args.out.with_suffix(".md").write_text(table(results, settings))
    print(table(results, settings))


if __name__ == "__main__":
    main()
