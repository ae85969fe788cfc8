r"""A phrase-conditioned box prior learned from the annotations of ~29k images (issue 12).

Boxes and phrases need no pixels: every Flickr30k Entities annotation file gives, for each
boxed phrase, where in its image such a thing is and how large. This script learns a small
prior ``(phrase embedding, box geometry) -> logit`` from all annotation files except the held-out
ones, and measures what it adds on the held-out test images of a finished pipeline run:

* the prior alone as a ranker of each test phrase's candidates;
* late fusion: the run's trained head's logit + ``alpha`` x the prior's logit, ``alpha`` chosen
  on the run's val split only;
* the head retrained by the pipeline's own ``train_head`` with the frozen prior's logit added
  to its score (it learns what the prior misses).

Held out from the prior's training (asserted): every image of the runs' val and test splits
and every id of the official ``val.txt`` / ``test.txt``. The parsed tables of all 31,783
annotation files are the run's ``data/parsed`` (the parse stage's own reader).

Training (listwise: a softmax over each phrase's candidates, several positives allowed, the
pipeline's ``listwise_loss``): for each training phrase, its image's annotated boxes, jittered
copies of its ground-truth boxes, and boxes drawn from the pool of selective-search proposals
of the run's *training* images (their geometry relative to their image); a candidate is a
positive at IoU >= 0.5 with one of the phrase's boxes (ANY-box), as in the pairs.

    nice -n 10 python -m benchmarks.prior --run /tmp/h-quality/prop \
        --annotated /tmp/h-quality/ann --cache /tmp/h-prior --name prior-real --retrain

Phrase embeddings (the packaged text encoder, as the features stage makes them) and the
trained prior are cached in ``--cache``; one torch thread throughout.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from torch import nn
from tqdm import tqdm

from benchmarks import REPO, SHARED_DATA
from benchmarks.quality import recalls
from grounding import io
from grounding.boxes import BOX_COLUMNS, aligned_iou
from grounding.data.formats.flickr30k import read_split_lists
from grounding.data.pair import ground_truth
from grounding.data.split import assign_splits
from grounding.evaluation.metrics import IOU_THRESHOLD, merged_iou, phrase_ranks
from grounding.modeling.head import HEADS, HeadConfig, PriorMatchingHead
from grounding.modeling.losses import listwise_loss
from grounding.modeling.scoring import PairFeatures, TrainedHead, score_pairs
from grounding.modeling.train import train_head

#: Candidates of each training phrase: its image's annotated boxes (padded to this many) ...
IMAGE_BOXES = 24
#: ... jittered copies of its ground-truth boxes, and boxes from the proposal pool.
JITTERS = 8
PROPOSALS = 40
#: Most ground-truth boxes of a phrase used for its labels (more are rare).
TRUTH_BOXES = 8
#: Most epochs of the control prior (the run's training images only).
CONTROL_EPOCHS = 40
ALPHAS = np.round(np.arange(0.0, 3.01, 0.1), 2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", type=Path, required=True, help="finished run (proposals)")
    parser.add_argument(
        "--annotated",
        type=Path,
        help="a run of the same images with annotated candidates "
        "(its pairs; the split is recomputed from its params): the prior alone is scored there",
    )
    parser.add_argument("--splits", type=Path, default=SHARED_DATA, help="official split lists")
    parser.add_argument("--cache", type=Path, required=True, help="embeddings and prior cache")
    parser.add_argument("--name", default="prior-real", help="reports/quality-<name>.json/.md")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the prior")
    parser.add_argument("--hidden", type=int, default=128, help="width of the prior's MLP")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prior's training")
    parser.add_argument("--retrain", action="store_true", help="also retrain the head with it")
    parser.add_argument("--out", type=Path, default=REPO / "reports", help="folder to write to")
    return parser.parse_args(argv)


# ---- data: which images the prior may learn from, and their boxed phrases ----------------


def run_splits(run: Path) -> dict[str, pd.DataFrame]:
    """The run's ``train, val, test`` pairs."""
    return {
        n: io.read_table(run / "data" / "split" / f"{n}.parquet") for n in ("train", "val", "test")
    }


def run_params(run: Path) -> dict:
    """A run's params file as a dict (runs made before a params section was added do not load
    with today's :func:`~grounding.config.load_params`; only their values are needed)."""
    return yaml.safe_load((run / "params.yaml").read_text())


def recomputed_splits(run: Path) -> dict[str, pd.DataFrame]:
    """A run's split pairs, recomputed by the split stage's own function from its pairs and
    params when its split stage never ran (val and test unbalanced, as the stage writes them;
    train not needed here)."""
    params = run_params(run)["split"]
    pairs = io.read_table(run / "data" / "pairs" / "pairs.parquet")
    images = io.read_table(run / "data" / "parsed" / "images.parquet")
    split_of = assign_splits(
        images,
        pairs,
        strategy=params["strategy"],
        val_fraction=float(params["val_fraction"]),
        test_fraction=float(params["test_fraction"]),
        seed=int(params["seed"]),
    )
    return {
        name: pairs[pairs["image_id"].map(split_of) == name].reset_index(drop=True)
        for name in ("train", "val", "test")
    }


def held_out_images(split_tables: list[dict[str, pd.DataFrame]], splits: Path) -> set[str]:
    """Images the prior must never see: the runs' val and test images and the official val and
    test lists."""
    held = {
        image
        for tables in split_tables
        for name in ("val", "test")
        for image in tables[name]["image_id"].unique()
    }
    for split_list in read_split_lists(splits):
        if split_list.split in ("val", "test"):
            held |= set(split_list.image_ids)
    return held


@dataclass(frozen=True)
class PriorData:
    """Boxed phrases of the prior's training images, boxes relative to their image (0..1).

    ``text_rows (P,)``: each phrase's row in the embeddings; ``truth (P, TRUTH_BOXES, 4)`` and
    ``truth_valid (P, TRUTH_BOXES)``: its boxes; ``image (P,)``: its image's row in
    ``image_boxes (I, IMAGE_BOXES, 4)`` / ``image_valid``: every annotated box of the image.
    """

    text_rows: np.ndarray
    truth: np.ndarray
    truth_valid: np.ndarray
    image: np.ndarray
    image_boxes: np.ndarray
    image_valid: np.ndarray
    texts: list[str]
    counts: dict[str, int]


def relative_boxes(boxes: pd.DataFrame, images: pd.DataFrame) -> np.ndarray:
    """``(N, 4)`` float32: the boxes' ``x1, y1, x2, y2`` over their image's width and height
    (the first four geometry columns of the region features)."""
    size = images.set_index("image_id").loc[boxes["image_id"], ["width", "height"]].to_numpy()
    scale = np.hstack([size, size]).astype(np.float64)
    return (boxes[BOX_COLUMNS].to_numpy(np.float64) / scale).astype(np.float32)


def _padded(keys: np.ndarray, values: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``values (N, 4)`` grouped by the sorted codes ``keys (N,)`` into ``(G, width, 4)``
    and a mask (a group's rows beyond ``width`` are dropped)."""
    n_groups = int(keys.max()) + 1
    first = np.searchsorted(keys, np.arange(n_groups))
    column = np.arange(len(keys)) - first[keys]
    keep = column < width
    out = np.zeros((n_groups, width, 4), np.float32)
    valid = np.zeros((n_groups, width), bool)
    out[keys[keep], column[keep]] = values[keep]
    valid[keys[keep], column[keep]] = True
    return out, valid


def prior_data(parsed: dict[str, pd.DataFrame], held_out: set[str]) -> PriorData:
    """The boxed phrases of every parsed image not ``held_out`` (asserted)."""
    images = parsed["images"]
    train_images = images[~images["image_id"].isin(held_out)]
    phrases = parsed["phrases"]
    phrases = phrases[phrases["has_box"] & phrases["image_id"].isin(set(train_images["image_id"]))]
    truth = ground_truth(phrases, parsed["chain_boxes"], parsed["boxes"])
    assert not set(truth["image_id"]) & held_out, "a held-out image is in the prior's data"
    phrases = phrases[phrases["phrase_id"].isin(set(truth["phrase_id"]))].sort_values("phrase_id")
    texts, text_rows = np.unique(phrases["text"].to_numpy(str), return_inverse=True)
    image_codes = {image: code for code, image in enumerate(sorted(set(truth["image_id"])))}
    boxes = parsed["boxes"][parsed["boxes"]["image_id"].isin(image_codes)]
    boxes = boxes.assign(code=boxes["image_id"].map(image_codes)).sort_values("code", kind="stable")
    image_boxes, image_valid = _padded(
        boxes["code"].to_numpy(), relative_boxes(boxes, images), IMAGE_BOXES
    )
    phrase_code = {p: i for i, p in enumerate(phrases["phrase_id"])}
    truth = truth.assign(code=truth["phrase_id"].map(phrase_code)).sort_values(
        "code", kind="stable"
    )
    truth_boxes, truth_valid = _padded(
        truth["code"].to_numpy(), relative_boxes(truth, images), TRUTH_BOXES
    )
    counts = {
        "images_parsed": len(images),
        "images_held_out": len(held_out & set(images["image_id"])),
        "prior_images": len(image_codes),
        "prior_phrases": len(phrases),
        "prior_distinct_texts": len(texts),
        "prior_truth_boxes": len(truth),
        "images_with_more_than_padded_boxes": int(
            (boxes.groupby("code").size() > IMAGE_BOXES).sum()
        ),
    }
    return PriorData(
        text_rows=text_rows.reshape(-1).astype(np.int64),
        truth=truth_boxes,
        truth_valid=truth_valid,
        image=phrases["image_id"].map(image_codes).to_numpy(np.int64),
        image_boxes=image_boxes,
        image_valid=image_valid,
        texts=texts.tolist(),
        counts=counts,
    )


def embed_texts(
    texts: list[str], cache: Path, encoder: str, batch_size: int
) -> tuple[np.ndarray, float | None]:
    """Embeddings ``(T, dim)`` of ``texts`` by the packaged encoder (as the features stage
    makes them), cached in ``cache`` beside the texts they belong to; and the seconds they
    took when computed (None if the cache does not say)."""
    from grounding.modeling.text import encode_phrases, load_text_encoder

    path = cache / f"texts-{encoder}-{len(texts)}.npz"
    if path.is_file():
        stored = np.load(path)
        if stored["texts"].tolist() == texts:
            seconds = float(stored["seconds"]) if "seconds" in stored else None
            return stored["embeddings"], seconds
    start = time.perf_counter()
    model = load_text_encoder(encoder)
    chunk = 4096
    parts = [
        encode_phrases(model, texts[start : start + chunk], batch_size=batch_size)
        for start in tqdm(range(0, len(texts), chunk), desc="embed phrases", unit="chunk")
    ]
    embeddings = np.concatenate(parts)
    seconds = time.perf_counter() - start
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, texts=np.array(texts), embeddings=embeddings, seconds=seconds)
    return embeddings, seconds


# ---- the prior ------------------------------------------------------------------------------


def geometry(boxes: torch.Tensor) -> torch.Tensor:
    """``(..., 4)`` relative boxes -> ``(..., 9)``: the 7 geometry columns of the region
    features (x1, y1, x2, y2, centre x, centre y, area) and the log of width and height."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    w, h = (x2 - x1).clamp(min=1e-3), (y2 - y1).clamp(min=1e-3)
    return torch.stack(
        [x1, y1, x2, y2, (x1 + x2) / 2, (y1 + y2) / 2, w * h, w.log(), h.log()], dim=-1
    )


class BoxPrior(nn.Module):
    """``(phrase embedding (P, D), relative boxes (P, K, 4)) -> logits (P, K)``: an MLP on the
    sum of a projection of the phrase and one of the box geometry."""

    def __init__(self, phrase_dim: int, hidden: int) -> None:
        super().__init__()
        self.phrase = nn.Linear(phrase_dim, hidden)
        self.box = nn.Linear(9, hidden)
        self.mlp = nn.Sequential(
            nn.GELU(), nn.Linear(hidden, hidden // 2), nn.GELU(), nn.Linear(hidden // 2, 1)
        )

    def forward(self, phrases: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        joint = self.phrase(phrases).unsqueeze(-2) + self.box(geometry(boxes))
        return self.mlp(joint).squeeze(-1)


def jittered(boxes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Copies of ``boxes (..., 4)`` (relative) with centre and size moved at random, clipped
    to the image: some stay positives (IoU >= 0.5), others become near misses."""
    w, h = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    cx = (boxes[..., 0] + boxes[..., 2]) / 2 + rng.normal(0, 0.15, w.shape) * w
    cy = (boxes[..., 1] + boxes[..., 3]) / 2 + rng.normal(0, 0.15, h.shape) * h
    w, h = w * np.exp(rng.normal(0, 0.25, w.shape)), h * np.exp(rng.normal(0, 0.25, h.shape))
    out = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _max_iou(candidates: np.ndarray, truth: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """``(P, K)``: each candidate's best IoU with its phrase's valid truth boxes
    ``(P, G, 4)``."""
    c, t = np.broadcast_arrays(candidates[:, :, None, :], truth[:, None, :, :])
    iou = aligned_iou(c.reshape(-1, 4), t.reshape(-1, 4)).reshape(c.shape[:-1])
    return np.where(valid[:, None, :], iou, 0.0).max(-1)


def candidate_batch(
    data: PriorData, chosen: np.ndarray, pool: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The candidates ``(B, K, 4)``, labels and valid mask ``(B, K)`` of the ``chosen``
    phrases: image boxes, jittered truth boxes, proposals drawn from ``pool (M, 4)``."""
    truth, truth_valid = data.truth[chosen], data.truth_valid[chosen]
    image = data.image[chosen]
    pick = (rng.random((len(chosen), JITTERS)) * truth_valid.sum(1, keepdims=True)).astype(int)
    jitters = jittered(np.take_along_axis(truth, pick[..., None], axis=1), rng)
    proposals = pool[rng.integers(0, len(pool), (len(chosen), PROPOSALS))]
    candidates = np.concatenate([data.image_boxes[image], jitters, proposals], axis=1)
    valid = np.concatenate(
        [data.image_valid[image], np.ones((len(chosen), JITTERS + PROPOSALS), bool)], axis=1
    )
    labels = (_max_iou(candidates, truth, truth_valid) >= IOU_THRESHOLD) & valid
    return candidates, labels.astype(np.float32), valid


def train_prior(
    data: PriorData,
    embeddings: np.ndarray,
    pool: np.ndarray,
    *,
    epochs: int,
    hidden: int,
    seed: int,
    batch_size: int = 512,
    learning_rate: float = 2e-3,
) -> tuple[BoxPrior, list[float]]:
    """A :class:`BoxPrior` trained listwise on every phrase of ``data`` per epoch; returns it
    (eval mode) and each epoch's mean loss."""
    rng = np.random.default_rng(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = BoxPrior(embeddings.shape[1], hidden)
    steps = int(np.ceil(len(data.text_rows) / batch_size))
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=learning_rate, total_steps=epochs * steps
    )
    losses = []
    for epoch in range(epochs):
        order, total = rng.permutation(len(data.text_rows)), 0.0
        bar = tqdm(range(steps), desc=f"prior epoch {epoch + 1}/{epochs}", mininterval=5)
        for step in bar:
            chosen = order[step * batch_size : (step + 1) * batch_size]
            boxes, labels, valid = candidate_batch(data, chosen, pool, rng)
            logits = model(
                torch.from_numpy(embeddings[data.text_rows[chosen]]), torch.from_numpy(boxes)
            )
            loss = listwise_loss(logits, torch.from_numpy(labels), torch.from_numpy(valid))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss)
            bar.set_postfix(loss=f"{total / (step + 1):.3f}", refresh=False)
        losses.append(total / steps)
    return model.eval(), losses


@torch.inference_mode()
def prior_logits(
    model: BoxPrior, phrases: np.ndarray, boxes: np.ndarray, chunk: int = 65536
) -> np.ndarray:
    """Logits ``(N,)`` of aligned pairs: ``phrases (N, D)`` embeddings, ``boxes (N, 4)``
    relative."""
    out = [
        model(
            torch.from_numpy(phrases[s : s + chunk]), torch.from_numpy(boxes[s : s + chunk, None])
        )[:, 0].numpy()
        for s in range(0, len(boxes), chunk)
    ]
    return np.concatenate(out) if out else np.empty(0, np.float32)


# ---- evaluation on a run --------------------------------------------------------------------


@dataclass
class Evaluation:
    """One run's pairs of a split with what scoring them needs: relative candidate boxes and
    phrase embeddings ``(N, 4), (N, D)`` aligned with the pairs, and MERGED-box IoU."""

    pairs: pd.DataFrame
    boxes: np.ndarray
    phrases: np.ndarray
    merged: np.ndarray


def evaluation(
    run: Path, pairs: pd.DataFrame, embed: Callable[[list[str]], np.ndarray]
) -> Evaluation:
    tables = io.read_tables(run / "data" / "pairs", ("candidates", "ground_truth", "phrases"))
    images = io.read_table(run / "data" / "parsed" / "images.parquet")
    candidates = tables["candidates"].set_index("region_id").loc[pairs["region_id"]]
    boxes = relative_boxes(candidates.reset_index(), images)
    text = tables["phrases"].set_index("phrase_id").loc[pairs["phrase_id"], "text"].to_numpy(str)
    distinct, rows = np.unique(text, return_inverse=True)
    phrases = embed(distinct.tolist())[rows.reshape(-1)]
    merged = merged_iou(pairs, tables["candidates"], tables["ground_truth"])
    return Evaluation(pairs, boxes, phrases, merged)


def logit(probabilities: np.ndarray) -> np.ndarray:
    p = np.clip(probabilities.astype(np.float64), 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


def fusion(
    val: Evaluation, test: Evaluation, head: dict[str, np.ndarray], prior: dict[str, np.ndarray]
) -> dict:
    """``head + alpha * prior`` logits, ``alpha`` of the best val Recall@1 (ANY) on
    :data:`ALPHAS`; the val curve and the test recalls at that alpha."""
    curve = {
        float(a): recalls(val.pairs, head["val"] + a * prior["val"], val.merged)["recall_at_1"]
        for a in ALPHAS
    }
    alpha = max(curve, key=lambda a: (curve[a], -a))
    fused = head["test"] + alpha * prior["test"]
    return {
        "alpha": alpha,
        "val_recall_at_1_by_alpha": curve,
        "val": recalls(val.pairs, head["val"] + alpha * prior["val"], val.merged),
        "test": recalls(test.pairs, fused, test.merged),
        "test_gain_over_head": {
            "any": paired_gain(test.pairs, head["test"], fused),
            "merged": paired_gain(test.pairs, head["test"], fused, test.merged),
        },
    }


def paired_gain(
    pairs: pd.DataFrame,
    before: np.ndarray,
    after: np.ndarray,
    iou: np.ndarray | None = None,
    *,
    draws: int = 2000,
    seed: int = 0,
) -> dict[str, float]:
    """Recall@1 of ``after`` minus that of ``before`` (scores ``(N,)`` of ``pairs``) and its
    95% interval by a bootstrap over images (phrases of one image are not independent)."""
    hits = [
        phrase_ranks(pairs, scores, iou).set_index("phrase_id")["hit_rank"] == 1
        for scores in (before, after)
    ]
    image = pairs.groupby("phrase_id")["image_id"].first().loc[hits[0].index]
    codes, _ = pd.factorize(image)
    gain = np.bincount(codes, hits[1].to_numpy(float) - hits[0].to_numpy(float))
    count = np.bincount(codes).astype(float)
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(len(count), np.full(len(count), 1 / len(count)), size=draws)
    boot = (weights @ gain) / (weights @ count)
    low, high = np.quantile(boot, [0.025, 0.975])
    return {
        "gain": float(gain.sum() / count.sum()),
        "ci95_low": float(low),
        "ci95_high": float(high),
    }


class LearnedPriorHead(PriorMatchingHead):
    """The run's head type (:class:`PriorMatchingHead`) plus a frozen :class:`BoxPrior`'s
    logit times a learned weight: retrained, the head learns what the prior misses. Regions
    carry their geometry (their last 7 features), phrases their raw embedding."""

    def __init__(self, config: HeadConfig, prior: BoxPrior) -> None:
        super().__init__(config)
        self.frozen = prior.requires_grad_(False)
        self.weight = nn.Parameter(torch.ones(()))

    def embed_phrases(self, phrases: torch.Tensor) -> torch.Tensor:
        return torch.cat([super().embed_phrases(phrases), phrases], dim=-1)

    def score(self, regions: torch.Tensor, phrases: torch.Tensor) -> torch.Tensor:
        projected, raw = phrases[:, : self.config.hidden], phrases[:, self.config.hidden :]
        boxes = regions[:, -7:-3]  # x1/W, y1/H, x2/W, y2/H
        prior = self.frozen(raw, boxes[:, None])[:, 0]
        return super().score(regions, projected) + self.weight * prior


def retrain(run: Path, splits: dict[str, pd.DataFrame], prior: BoxPrior) -> dict:
    """The run's head retrained on its train pairs by ``train_head`` (the run's train params)
    as :class:`LearnedPriorHead`; val and test recalls and the learned prior weight."""
    kwargs = run_params(run)["train"] | {"head": "matching_learned_prior"}
    kwargs.pop("threads", None)
    *arrays, _ = io.read_features(run / "data" / "features")
    features = PairFeatures.from_arrays(*arrays)
    HEADS["matching_learned_prior"] = lambda config: LearnedPriorHead(config, prior)
    start = time.perf_counter()
    trained = train_head(
        features,
        splits["train"],
        splits["val"],
        **kwargs,
        on_epoch=lambda row: print(
            json.dumps({k: round(v, 4) for k, v in row.items()}), flush=True
        ),
    )
    paired = io.read_tables(run / "data" / "pairs", ("candidates", "ground_truth"))
    out = {"seconds": time.perf_counter() - start, "prior_weight": float(trained.model.weight)}
    out["history_val_recall_at_1"] = trained.history["val_recall_at_1"].round(4).tolist()
    for name in ("val", "test"):
        merged = merged_iou(splits[name], paired["candidates"], paired["ground_truth"])
        out[name] = recalls(
            splits[name], score_pairs(trained.model, features, splits[name]), merged
        )
    return out


def run_head_logits(run: Path, splits: dict[str, pd.DataFrame]) -> dict[str, np.ndarray]:
    """The run's trained head's logits on its val and test pairs (as benchmarks.quality scores
    ``model=models/head.safetensors``)."""
    head = TrainedHead.from_weights(*io.read_weights(run / "models" / "head.safetensors")).head
    *arrays, _ = io.read_features(run / "data" / "features")
    features = PairFeatures.from_arrays(*arrays)
    return {name: logit(score_pairs(head, features, splits[name])) for name in ("val", "test")}


def proposal_pool(run: Path, train_images: set[str]) -> np.ndarray:
    """Relative boxes ``(M, 4)`` of the run's proposals on its training images: what
    selective search proposes, the prior's random negatives."""
    candidates = io.read_table(run / "data" / "pairs" / "candidates.parquet")
    images = io.read_table(run / "data" / "parsed" / "images.parquet")
    return relative_boxes(candidates[candidates["image_id"].isin(train_images)], images)


def cached_prior(
    data: PriorData, embeddings: np.ndarray, pool: np.ndarray, cache: Path, tag: str, **kwargs
) -> tuple[BoxPrior, dict]:
    """:func:`train_prior` (``kwargs``), its weights cached as ``prior-<tag>-...pt`` and its
    epoch losses and training seconds as ``.json``."""
    stem = f"prior-{tag}-" + "-".join(f"{k}{v}" for k, v in sorted(kwargs.items()))
    path, log_path = cache / f"{stem}-{len(data.text_rows)}.pt", cache / f"{stem}.json"
    if path.is_file() and log_path.is_file():
        model = BoxPrior(embeddings.shape[1], kwargs["hidden"])
        model.load_state_dict(torch.load(path, weights_only=True))
        log = json.loads(log_path.read_text())
        return model.eval(), log if isinstance(log, dict) else {"losses": log, "seconds": None}
    start = time.perf_counter()
    model, losses = train_prior(data, embeddings, pool, **kwargs)
    log = {"losses": losses, "seconds": time.perf_counter() - start}
    torch.save(model.state_dict(), path)
    log_path.write_text(json.dumps(log))
    return model, log


def scored(setting: str, candidates: str, sets: dict[str, Evaluation], scores: dict) -> dict:
    """A row of the report: val and test recalls of ``scores`` (by split)."""
    return {
        "setting": setting,
        "candidates": candidates,
        **{n: recalls(sets[n].pairs, scores[n], sets[n].merged) for n in ("val", "test")},
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    timings: dict[str, float | None] = {}
    started = time.perf_counter()
    features = run_params(args.run)["features"]
    splits = run_splits(args.run)
    annotated = recomputed_splits(args.annotated) if args.annotated else None
    evaluated = [splits] + ([annotated] if annotated else [])
    held_out = held_out_images(evaluated, args.splits)
    parsed = io.read_tables(
        args.run / "data" / "parsed", ("images", "phrases", "boxes", "chain_boxes")
    )
    data = prior_data(parsed, held_out)
    evaluated_images = {
        image
        for tables in evaluated
        for name in ("val", "test")
        for image in tables[name]["image_id"]
    }
    prior_images = set(parsed["images"]["image_id"]) - held_out
    assert not evaluated_images & prior_images, "leakage: an evaluated image trains the prior"
    run_train = set(splits["train"]["image_id"])
    control = prior_data(parsed, held_out | (set(parsed["images"]["image_id"]) - run_train))
    timings["data_seconds"] = time.perf_counter() - started
    print(json.dumps(data.counts), flush=True)

    encoder, batch = features["text_encoder"], int(features["text_batch_size"])
    embeddings, timings["embed_seconds"] = embed_texts(data.texts, args.cache, encoder, batch)

    def embed(texts: list[str]) -> np.ndarray:
        from grounding.modeling.text import encode_phrases, load_text_encoder

        return encode_phrases(load_text_encoder(encoder), texts, batch_size=batch)

    pool = proposal_pool(args.run, run_train)
    config = {"epochs": args.epochs, "hidden": args.hidden, "seed": args.seed}
    model, log = cached_prior(data, embeddings, pool, args.cache, "all", **config)
    timings["prior_train_seconds"] = log["seconds"]
    # the control: the same prior from the run's training images only (more epochs, as many
    # as a small set bears before it only memorises: at most CONTROL_EPOCHS)
    control_embeddings = embeddings[np.searchsorted(data.texts, control.texts)]
    assert [data.texts[i] for i in np.searchsorted(data.texts, control.texts)] == control.texts
    control_epochs = min(
        CONTROL_EPOCHS, round(args.epochs * len(data.text_rows) / len(control.text_rows))
    )
    small, small_log = cached_prior(
        control,
        control_embeddings,
        pool,
        args.cache,
        "runtrain",
        **config | {"epochs": control_epochs},
    )
    timings["control_prior_train_seconds"] = small_log["seconds"]

    results: dict = {
        "run": str(args.run),
        "annotated_run": str(args.annotated) if args.annotated else None,
        "counts": data.counts
        | {
            "proposal_pool": len(pool),
            "control_prior_images": control.counts["prior_images"],
            "control_prior_phrases": control.counts["prior_phrases"],
        },
        "prior": config
        | {
            "loss": "listwise (softmax over each phrase's candidates, several positives)",
            "candidates_per_phrase": f"{IMAGE_BOXES} image boxes (padded) + {JITTERS} jittered "
            f"truth + {PROPOSALS} pool proposals",
            "epoch_losses": log["losses"],
            "control_epochs": control_epochs,
            "control_epoch_losses": small_log["losses"],
        },
        "settings": [],
    }
    start = time.perf_counter()
    sets = {name: evaluation(args.run, splits[name], embed) for name in ("val", "test")}
    head = run_head_logits(args.run, splits)
    results["counts"] |= {
        "test_phrases": int(splits["test"]["phrase_id"].nunique()),
        "test_images": int(splits["test"]["image_id"].nunique()),
        "val_phrases": int(splits["val"]["phrase_id"].nunique()),
    }
    results["settings"].append(scored("run's head (baseline)", "selective_search", sets, head))
    for label, prior_model in (("prior", model), ("run-train-only prior", small)):
        prior = {n: prior_logits(prior_model, sets[n].phrases, sets[n].boxes) for n in sets}
        results["settings"].append(scored(f"{label} alone", "selective_search", sets, prior))
        fused = fusion(sets["val"], sets["test"], head, prior)
        results["settings"].append(
            {
                "setting": f"head + {fused['alpha']:g} x {label} (alpha on val)",
                "candidates": "selective_search",
                **fused,
            }
        )
    timings["evaluate_seconds"] = time.perf_counter() - start
    if annotated:
        ann = {n: evaluation(args.annotated, annotated[n], embed) for n in ("val", "test")}
        results["counts"]["annotated_test_phrases"] = int(annotated["test"]["phrase_id"].nunique())
        for label, prior_model in (("prior", model), ("run-train-only prior", small)):
            prior = {n: prior_logits(prior_model, ann[n].phrases, ann[n].boxes) for n in ann}
            results["settings"].append(scored(f"{label} alone", "annotated", ann, prior))
    write(results | {"timings": timings}, args.out, args.name)
    if args.retrain:
        path = args.cache / ("retrain-" + "-".join(f"{k}{v}" for k, v in config.items()) + ".json")
        row = json.loads(path.read_text()) if path.is_file() else retrain(args.run, splits, model)
        path.write_text(json.dumps(row))
        timings["retrain_seconds"] = row["seconds"]
        results["settings"].append(
            {"setting": "head retrained with the prior's logit", "candidates": "selective_search"}
            | {k: v for k, v in row.items() if k != "seconds"}
        )
        write(results | {"timings": timings}, args.out, args.name)


def write(results: dict, out: Path, name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"quality-{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / f"quality-{name}.md").write_text(markdown(results, name))
    for row in results["settings"]:
        print(row["setting"], row["candidates"], json.dumps(row["test"]), flush=True)


def markdown(results: dict, name: str) -> str:
    counts = results["counts"]
    lines = [
        f"# Quality lever: a box prior from all annotations ({name})",
        "",
        "Rebuilt by `python -m benchmarks.prior` (command in its docstring). The prior learns",
        f"from {counts['prior_phrases']:,} boxed phrases ({counts['prior_distinct_texts']:,}",
        f"distinct texts) of {counts['prior_images']:,} images: every annotation file except",
        f"{counts['images_held_out']:,} held out (the runs' val and test images, the official",
        "val and test lists). Test: the run's "
        f"{counts['test_phrases']:,} test phrases on {counts['test_images']} images, never in",
        "the prior's or the head's training. ANY: a hit on any of the phrase's boxes; MERGED: on",
        "their union. Fusion's alpha is chosen on val only. The run-train-only prior is the same",
        f"prior trained on the run's {counts['control_prior_images']} training images only "
        f"({counts['control_prior_phrases']:,} phrases,",
        f"{results['prior']['control_epochs']} epochs; the official val ids among them are held",
        "out too).",
        "Gain: test R@1 (ANY) over the run's head, with its 95% interval by a bootstrap over",
        "the test images.",
        "",
        "| setting | candidates | val R@1 | test R@1 | R@5 | R@10 | bound | MERGED R@1 | R@5 "
        "| R@10 | bound | gain (95% CI) |",
        "|---|---|" + "---|" * 10,
    ]
    for row in results["settings"]:
        test = row["test"]
        cells = [row["val"]["recall_at_1"]] + [
            test[f"{p}{k}"]
            for p in ("", "merged_")
            for k in ("recall_at_1", "recall_at_5", "recall_at_10", "upper_bound")
        ]
        gain = row.get("test_gain_over_head", {}).get("any")
        interval = (
            f"{gain['gain']:+.3f} ({gain['ci95_low']:+.3f}, {gain['ci95_high']:+.3f})"
            if gain
            else ""
        )
        lines.append(
            f"| {row['setting']} | {row['candidates']} | "
            + " | ".join(f"{v:.3f}" for v in cells)
            + f" | {interval} |"
        )
    timings = results.get("timings", {})
    lines += [
        "",
        "Wall times (s, one torch thread, shared 2-core machine): "
        + ", ".join(
            f"{k.removesuffix('_seconds')} " + ("n/a" if v is None else f"{v:.0f}")
            for k, v in timings.items()
        ),
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
