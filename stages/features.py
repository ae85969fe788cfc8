"""features: region features of every candidate and an embedding of every paired phrase."""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

from tqdm import tqdm

from grounding import io, validation
from grounding.config import load_params
from grounding.errors import ConfigError, run
from grounding.modeling.backbones import load_backbone
from grounding.modeling.device import gpu_memory_hint, loader_workers, resolve_threads, use_runtime
from grounding.modeling.engines import (
    ENGINES,
    SHARDS,
    EngineResources,
    feature_engine,
    ray_device,
)
from grounding.modeling.region_features import region_dim
from grounding.modeling.text import distinct_phrases, encode_phrases, load_text_encoder
from grounding.numerics import use_numerics
from grounding.schemas import FeaturesMeta


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file")
    parser.add_argument("--parsed", type=Path, required=True, help="folder of parse's tables")
    parser.add_argument("--pairs", type=Path, required=True, help="folder of pair's tables")
    parser.add_argument("--out", type=Path, required=True, help="folder of the features")
    parser.add_argument("--validation", type=Path, required=True, help="checks run (JSON)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    params = load_params(args.params)
    use_numerics(params.runtime.numerics)  # before torch loads
    cfg = params.features
    ENGINES.choose(cfg.engine)  # an unknown name fails before any model loads
    device = use_runtime(params.runtime)
    candidates = io.read_table(args.pairs / "candidates.parquet")
    phrases = io.read_table(args.pairs / "phrases.parquet")
    images = io.read_table(args.parsed / "images.parquet")
    try:
        backbone = load_backbone(cfg.backbone, cfg.backbone_weights, device=device)
        encoder = load_text_encoder(cfg.text_encoder, device=device)
    except ValueError as error:  # an unknown model name or a weights file that does not fit
        raise ConfigError(f"features: {error}") from None
    texts, phrase_rows = distinct_phrases(phrases)

    shape = (len(candidates), region_dim(backbone, context=cfg.context))
    advice = f"lower features.batch_size (now {cfg.batch_size}) or set runtime.device: cpu"
    with io.region_features_writer(args.out, shape) as regions, gpu_memory_hint(device, advice):
        engine = feature_engine(
            cfg.engine,
            EngineResources(
                workers=loader_workers(
                    device,
                    resolve_threads(params.runtime.threads, numerics=params.runtime.numerics),
                ),
                load_backbone=partial(
                    load_backbone, cfg.backbone, cfg.backbone_weights, device=ray_device(cfg.ray)
                ),
                ray_settings=cfg.ray,
                shards=args.out / SHARDS,
            ),
        )
        per_image = engine(
            backbone,
            candidates,
            images,
            io.ImageFolder(params.data.images_dir, images),
            image_size=cfg.image_size,
            batch_size=cfg.batch_size,
            context=cfg.context,
        )
        n_images = candidates["image_id"].nunique()
        for region_ids, vectors in tqdm(per_image, total=n_images, desc="features", unit="image"):
            regions[region_ids] = vectors
        text_advice = f"lower features.text_batch_size (now {cfg.text_batch_size})"
        with gpu_memory_hint(device, text_advice):
            embeddings = encode_phrases(encoder, texts, batch_size=cfg.text_batch_size)
        checks = validation.check_features(regions, embeddings, phrase_rows, candidates, phrases)
    meta = FeaturesMeta(
        backbone=cfg.backbone,
        backbone_weights=str(cfg.backbone_weights) if cfg.backbone_weights else None,
        text_encoder=cfg.text_encoder,
        image_size=cfg.image_size,
        context=cfg.context,
        region_dim=shape[1],
        phrase_dim=int(embeddings.shape[1]),
        regions=shape[0],
        phrases=len(phrase_rows),
    )
    io.write_features(args.out, embeddings, phrase_rows, meta)
    io.write_json(validation.report(checks), args.validation)
    print(", ".join(f"{name} {value}" for name, value in meta.to_dict().items()))


if __name__ == "__main__":
    run(main)
