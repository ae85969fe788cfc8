"""pair: every phrase with ground truth x every candidate region of its image, labelled by IoU.

Tables written by the stage (columns in :mod:`grounding.schemas`):

- ``candidates``: ``region_id, image_id, x1, y1, x2, y2, source`` -- the regions a phrase may
  be grounded to, made by a generator of :mod:`grounding.candidates` (``source``).
  ``region_id`` is the row number, which later stages use to index region features.
- ``phrases``: the paired phrases (columns of parse's ``phrases``).
- ``ground_truth``: ``phrase_id, image_id, x1, y1, x2, y2`` -- each phrase's boxes.
- ``pairs``: ``phrase_id, region_id, image_id, iou, label`` -- ``iou`` is the region's best
  IoU with any of the phrase's ground-truth boxes (ANY-box), ``label`` is ``iou >= pos_iou``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from grounding.boxes import BOX_COLUMNS, box_iou
from grounding.data.records import NOT_VISUAL
from grounding.schemas import GROUND_TRUTH, PAIRED, PAIRS


@dataclass
class Paired:
    """What :func:`pair_dataset` returns: its tables and a summary of what was left out."""

    candidates: pd.DataFrame
    phrases: pd.DataFrame
    ground_truth: pd.DataFrame
    pairs: pd.DataFrame
    summary: dict[str, int | float]

    def tables(self) -> dict[str, pd.DataFrame]:
        """The tables by name (``candidates``, ``phrases``, ``ground_truth``, ``pairs``)."""
        return {schema.name: getattr(self, schema.name) for schema in PAIRED}


def ground_truth(
    phrases: pd.DataFrame, chain_boxes: pd.DataFrame, boxes: pd.DataFrame
) -> pd.DataFrame:
    """Each phrase's ground-truth boxes: the boxes of its chain, one row per (phrase, box)."""
    linked = phrases[["phrase_id", "image_id", "chain_id"]].merge(
        chain_boxes, on=["image_id", "chain_id"]
    )
    linked = linked.merge(boxes, on=["image_id", "box_id"])
    return (
        linked[list(GROUND_TRUTH.columns)]
        .sort_values(["phrase_id", *BOX_COLUMNS])
        .reset_index(drop=True)
    )


def build_pairs(candidates: pd.DataFrame, truth: pd.DataFrame, *, pos_iou: float) -> pd.DataFrame:
    """Pair every phrase of ``truth`` with every candidate of its image.

    Returns ``phrase_id, region_id, image_id, iou, label`` sorted by phrase then region; ``iou``
    is the best IoU of the region with any of the phrase's boxes. A phrase whose image has no
    candidate gets no pair.
    """
    if not 0.0 < pos_iou <= 1.0:
        raise ValueError(f"pos_iou must be in (0, 1], got {pos_iou}")
    truth = truth.sort_values(["image_id", "phrase_id"], kind="stable")
    candidates = candidates.sort_values(["image_id", "region_id"], kind="stable")
    region_images = candidates["image_id"].to_numpy()
    region_ids = candidates["region_id"].to_numpy(np.int64)
    region_boxes = candidates[BOX_COLUMNS].to_numpy(np.float64)
    truth_phrases = truth["phrase_id"].to_numpy(np.int64)
    truth_boxes = truth[BOX_COLUMNS].to_numpy(np.float64)

    columns: dict[str, list[np.ndarray]] = {
        "phrase_id": [],
        "region_id": [],
        "image_id": [],
        "iou": [],
    }
    for image_id, (t0, t1) in _runs(truth["image_id"].to_numpy()).items():
        r0 = np.searchsorted(region_images, image_id, "left")
        r1 = np.searchsorted(region_images, image_id, "right")
        if r0 == r1:
            continue
        phrase_ids = truth_phrases[t0:t1]
        first_box = np.flatnonzero(np.r_[True, phrase_ids[1:] != phrase_ids[:-1]])
        iou = box_iou(region_boxes[r0:r1], truth_boxes[t0:t1])  # (regions, boxes)
        best = np.maximum.reduceat(iou, first_box, axis=1)  # (regions, phrases)
        n_regions, n_phrases = best.shape
        columns["phrase_id"].append(np.repeat(phrase_ids[first_box], n_regions))
        columns["region_id"].append(np.tile(region_ids[r0:r1], n_phrases))
        columns["image_id"].append(np.full(n_regions * n_phrases, image_id, dtype=object))
        columns["iou"].append(best.T.reshape(-1))
    dtypes = {"phrase_id": np.int64, "region_id": np.int64, "image_id": object, "iou": np.float64}
    pairs = pd.DataFrame(
        {
            name: np.concatenate(chunks) if chunks else np.empty(0, dtypes[name])
            for name, chunks in columns.items()
        }
    )
    # label before the cast to float32, so that an IoU of exactly pos_iou is a positive
    pairs["label"] = (pairs["iou"] >= pos_iou).astype(np.int8)
    pairs["iou"] = pairs["iou"].astype(np.float32)
    return pairs.sort_values(["phrase_id", "region_id"]).reset_index(drop=True)[list(PAIRS.columns)]


#: Images paired at once by :meth:`Pairing.batches`: the pair stage holds this many images'
#: pairs, whatever the size of the dataset (100 proposals x 16 phrases: 0.8M pairs).
BATCH_IMAGES = 512


@dataclass
class PairCounts:
    """Counts over the pairs, added up part by part (:meth:`Pairing.summary` reads them)."""

    images: set = field(default_factory=set)
    phrases: set = field(default_factory=set)
    pairs: int = 0
    positives: int = 0

    def add(self, pairs: pd.DataFrame) -> None:
        self.images.update(pd.unique(pairs["image_id"]))
        self.phrases.update(pd.unique(pairs["phrase_id"]).tolist())
        self.pairs += len(pairs)
        self.positives += int(pairs["label"].sum())


@dataclass
class Pairing:
    """What the pairs are made from (:func:`pairing`): the present images' ``candidates``
    (``region_id`` renumbered), the ``phrases`` that have boxes and their ``ground_truth``,
    and the counts of what was left out before pairing."""

    candidates: pd.DataFrame
    phrases: pd.DataFrame
    ground_truth: pd.DataFrame
    left_out: dict[str, int]

    def batches(
        self, *, pos_iou: float, batch_images: int = BATCH_IMAGES
    ) -> Iterator[pd.DataFrame]:
        """:func:`build_pairs` on ``batch_images`` images at a time, the images in the order of
        their first phrase. Each image's pairs are consecutive; the parts concatenated are
        :func:`build_pairs` of all images, row for row, when each image's phrase ids are
        consecutive (as parse numbers them)."""
        truth, candidates = self.ground_truth, self.candidates
        order = pd.Index(pd.unique(truth["image_id"]))  # images by first phrase
        truth_code = order.get_indexer(truth["image_id"])
        truth = truth.iloc[np.argsort(truth_code, kind="stable")]
        truth_code = np.sort(truth_code, kind="stable")
        candidate_code = order.get_indexer(candidates["image_id"])
        by_code = np.argsort(candidate_code, kind="stable")
        candidates, candidate_code = candidates.iloc[by_code], candidate_code[by_code]
        for start in range(0, len(order), batch_images):
            stop = start + batch_images
            t0, t1 = np.searchsorted(truth_code, [start, stop])
            c0, c1 = np.searchsorted(candidate_code, [start, stop])
            yield build_pairs(candidates.iloc[c0:c1], truth.iloc[t0:t1], pos_iou=pos_iou)

    def summary(self, counts: PairCounts) -> dict[str, int | float]:
        """The pair stage's summary: what was paired (``counts`` of all the pairs) and what
        was left out and why."""
        left_out, candidates = self.left_out, self.candidates
        return {
            "images": left_out["images"],
            "images_paired": len(counts.images),
            "images_left_out_no_file": left_out["images_left_out_no_file"],
            "images_left_out_no_candidate": left_out["images_left_out_no_candidate"],
            "phrases": left_out["phrases"],
            "phrases_paired": len(counts.phrases),
            "phrases_left_out_no_file": left_out["phrases_left_out_no_file"],
            "phrases_left_out_not_visual": left_out["phrases_left_out_not_visual"],
            "phrases_left_out_no_box": left_out["phrases_left_out_no_box"],
            "candidates": len(candidates),
            "candidates_per_image": round(
                len(candidates) / max(candidates["image_id"].nunique(), 1), 3
            ),
            "pairs": counts.pairs,
            "positives": counts.positives,
            "positive_share": round(counts.positives / counts.pairs if counts.pairs else 0.0, 4),
        }

    def no_pairs(self) -> pd.DataFrame:
        """The pairs table with no rows (its columns and types)."""
        return build_pairs(self.candidates.iloc[:0], self.ground_truth.iloc[:0], pos_iou=0.5)


def pairing(
    images: pd.DataFrame,
    phrases: pd.DataFrame,
    boxes: pd.DataFrame,
    chain_boxes: pd.DataFrame,
    candidates: pd.DataFrame,
) -> Pairing:
    """Keep images whose file is present and their phrases that have boxes, with the
    ``candidates`` (a table of :func:`grounding.candidates.candidates_table`) of those images,
    and count everything left out and why."""
    present = set(images.loc[images["has_file"], "image_id"])
    in_present = phrases["image_id"].isin(present)
    kept_phrases = phrases[in_present & phrases["has_box"]].reset_index(drop=True)
    candidates = candidates[candidates["image_id"].isin(present)].reset_index(drop=True)
    candidates["region_id"] = np.arange(len(candidates), dtype=np.int64)
    truth = ground_truth(kept_phrases, chain_boxes, boxes)
    lost = phrases[in_present & ~phrases["has_box"]]
    left_out = {
        "images": len(images),
        "images_left_out_no_file": len(images) - len(present),
        "images_left_out_no_candidate": len(present - set(candidates["image_id"])),
        "phrases": len(phrases),
        "phrases_left_out_no_file": int((~in_present).sum()),
        "phrases_left_out_not_visual": int((lost["chain_id"] == NOT_VISUAL).sum()),
        "phrases_left_out_no_box": int((lost["chain_id"] != NOT_VISUAL).sum()),
    }
    return Pairing(candidates, kept_phrases, truth, left_out)


def pair_dataset(
    images: pd.DataFrame,
    phrases: pd.DataFrame,
    boxes: pd.DataFrame,
    chain_boxes: pd.DataFrame,
    candidates: pd.DataFrame,
    *,
    pos_iou: float,
) -> Paired:
    """The pair stage in memory (:func:`pairing`, then all its pairs at once); the stage
    itself writes :meth:`Pairing.batches` part by part."""
    made = pairing(images, phrases, boxes, chain_boxes, candidates)
    counts = PairCounts()
    parts = []
    for part in made.batches(pos_iou=pos_iou):
        counts.add(part)
        parts.append(part)
    pairs = pd.concat(parts, ignore_index=True) if parts else made.no_pairs()
    return Paired(made.candidates, made.phrases, made.ground_truth, pairs, made.summary(counts))


def _runs(sorted_keys: np.ndarray) -> dict:
    """``{key: (start, stop)}`` of each run of equal keys in a sorted array."""
    if len(sorted_keys) == 0:
        return {}
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    stops = np.r_[starts[1:], len(sorted_keys)]
    return {sorted_keys[a]: (a, b) for a, b in zip(starts, stops, strict=True)}
