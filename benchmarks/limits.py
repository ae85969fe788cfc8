"""What the packaged grounder cannot do, measured on real Flickr30k Entities photos.

For each of ``--n-images`` images of ``../shared/flickr30k_entities`` (the official test list's
order), one grounding of several probe phrases with the packaged grounder
(``src/grounding/pretrained/flickr30k.safetensors``) and its selective-search proposals:

- present: up to three of the image's annotated phrases (the reference: a box is right when
  its IoU with one of the phrase's boxes is >= 0.5);
- negation: ``"something that is not <present phrase>"``: how often its best box is the very
  box of the phrase it negates (IoU >= 0.9 with that phrase's best box), and how often it lands
  on that phrase's annotated region (IoU >= 0.5);
- spatial relations: in images with two or more annotated people side by side,
  ``"the person on the left"`` / ``"... on the right"``: right when the best box is the
  leftmost / rightmost person's (IoU >= 0.5), and how often left and right pick the same box;
- absence: phrases for things the image does not show (``"a dog"`` where no caption mentions a
  dog and no annotated phrase is an animal, ...): how often their best score clears the
  threshold; calibration: the AUROC of the best score for telling a present phrase from an
  absent one (0.5: the score says nothing about presence), and the share of the answers above
  the threshold that name an absent thing.

The packaged grounder was trained on a random 70% of these 985 images: present phrases may be
phrases it trained on (their numbers are optimistic); no probe phrase was ever trained on.
Writes ``OUT.json`` and ``OUT.md``:

    python -m benchmarks.limits --out reports/limits-real
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from benchmarks import SHARED_DATA
from grounding import io
from grounding.boxes import box_iou
from grounding.data.formats.flickr30k import AnnotationArchive, find_annotations, parse_files
from grounding.data.records import NOT_VISUAL, ImageRecord
from grounding.inference.grounder import Grounder, Grounding, pretrained_path

#: Things to ask for where they are absent: the phrase, the entity type that would hold it,
#: and the words whose mention in any caption rules the image out.
ABSENT = (
    ("a dog", "animals", r"\b(dogs?|pupp(y|ies)|animals?)\b"),
    ("a horse", "animals", r"\b(horses?|pon(y|ies)|animals?)\b"),
    ("an elephant", "animals", r"\b(elephants?|animals?)\b"),
    ("a car", "vehicles", r"\b(cars?|vehicles?|trucks?|taxis?)\b"),
    ("a bicycle", "vehicles", r"\b(bicycles?|bikes?|cycl\w*)\b"),
    ("a guitar", "instruments", r"\b(guitars?|instruments?)\b"),
)
LEFT, RIGHT = "the person on the left", "the person on the right"
SAME_BOX_IOU = 0.9
HIT_IOU = 0.5


def negated(phrase: str) -> str:
    return f"something that is not {phrase}"


@dataclass(frozen=True)
class Probes:
    """An image's probe phrases and what each should find."""

    present: dict[str, np.ndarray]  # phrase -> its annotated boxes (K, 4)
    absent: list[str]
    left_right: tuple[np.ndarray, np.ndarray] | None  # the leftmost and rightmost person


def probes_of(record: ImageRecord, per_image: int = 3) -> Probes:
    boxes = np.array([[b.x1, b.y1, b.x2, b.y2] for b in record.boxes], dtype=np.float64)
    box_ids = {entity.entity_id: entity.box_ids for entity in record.entities}
    present: dict[str, np.ndarray] = {}
    types: set[str] = set()
    people: dict[int, np.ndarray] = {}
    for caption in record.captions:
        for phrase in caption.phrases:
            types.update(phrase.types)
            ids = box_ids.get(phrase.entity_id, ())
            if phrase.entity_id == NOT_VISUAL or not ids:
                continue
            text = phrase.text.strip()
            if len(present) < per_image and text.lower() not in {p.lower() for p in present}:
                present[text] = boxes[list(ids)]
            if "people" in phrase.types and len(ids) == 1:
                people[ids[0]] = boxes[ids[0]]
    captions = " ".join(caption.text.lower() for caption in record.captions)
    absent = [
        phrase
        for phrase, kind, words in ABSENT
        if kind not in types and not re.search(words, captions)
    ]
    left_right = None
    if len(people) >= 2:
        ordered = sorted(people.values(), key=lambda box: (box[0] + box[2]) / 2)
        left, right = ordered[0], ordered[-1]
        # side by side: the two people's boxes overlap little
        if box_iou(left[None], right[None])[0, 0] < 0.3:
            left_right = (left, right)
    return Probes(present, absent, left_right)


def best_box(grounding: Grounding) -> np.ndarray:
    return np.asarray(grounding.boxes[0].box, dtype=np.float64)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(box_iou(a.reshape(-1, 4), b.reshape(-1, 4)).max())


def measure(grounder: Grounder, records: list[ImageRecord], images: Path, cache: Path) -> dict:
    proposals = grounder.proposer(io.ProposalCache(cache))
    rows: dict[str, list[dict[str, Any]]] = {"present": [], "negation": [], "absent": []}
    rows["spatial"] = []
    for record in tqdm(records, unit="image"):
        probes = probes_of(record)
        phrases = [*probes.present, *map(negated, probes.present), *probes.absent]
        if probes.left_right is not None:
            phrases += [LEFT, RIGHT]
        image = io.read_image(images / record.file_name)
        found = {g.phrase: g for g in grounder.ground(image, phrases, proposals=proposals)}
        for phrase, truth in probes.present.items():
            chosen, negation = found[phrase], found[negated(phrase)]
            rows["present"].append(
                {
                    "score": chosen.boxes[0].score,
                    "hit": iou(best_box(chosen), truth) >= HIT_IOU,
                }
            )
            rows["negation"].append(
                {
                    "score": negation.boxes[0].score,
                    "same_box": iou(best_box(negation), best_box(chosen)) >= SAME_BOX_IOU,
                    "on_negated_thing": iou(best_box(negation), truth) >= HIT_IOU,
                }
            )
        for phrase in probes.absent:
            rows["absent"].append({"phrase": phrase, "score": found[phrase].boxes[0].score})
        if probes.left_right is not None:
            left, right = probes.left_right
            chose_left, chose_right = best_box(found[LEFT]), best_box(found[RIGHT])
            rows["spatial"].append(
                {
                    "left_hit": iou(chose_left, left) >= HIT_IOU,
                    "right_hit": iou(chose_right, right) >= HIT_IOU,
                    "left_on_right": iou(chose_left, right) >= HIT_IOU,
                    "right_on_left": iou(chose_right, left) >= HIT_IOU,
                    "same_box": iou(chose_left, chose_right) >= SAME_BOX_IOU,
                }
            )
    return summarise(rows, grounder.threshold, len(records))


def share(rows: list[dict[str, Any]], key: str) -> float:
    return float(np.mean([bool(row[key]) for row in rows])) if rows else float("nan")


def above(rows: list[dict[str, Any]], threshold: float) -> float:
    return float(np.mean([row["score"] >= threshold for row in rows])) if rows else float("nan")


def auroc(positives: list[float], negatives: list[float]) -> float:
    """The chance that a random present phrase scores above a random absent one (ties half)."""
    pos, neg = np.asarray(positives)[:, None], np.asarray(negatives)[None, :]
    return float(((pos > neg).sum() + 0.5 * (pos == neg).sum()) / (pos.size * neg.size))


def summarise(rows: dict[str, list[dict[str, Any]]], threshold: float, n_images: int) -> dict:
    present, negation, absent, spatial = (
        rows[k] for k in ("present", "negation", "absent", "spatial")
    )
    present_scores = [row["score"] for row in present]
    absent_scores = [row["score"] for row in absent]
    n_above_present = sum(s >= threshold for s in present_scores)
    n_above_absent = sum(s >= threshold for s in absent_scores)
    return {
        "images": n_images,
        "threshold": threshold,
        "present": {
            "phrases": len(present),
            "hit_rate": share(present, "hit"),
            "above_threshold": above(present, threshold),
            "median_score": statistics.median(present_scores),
        },
        "negation": {
            "phrases": len(negation),
            "same_box_as_the_negated_phrase": share(negation, "same_box"),
            "on_the_negated_thing": share(negation, "on_negated_thing"),
            "above_threshold": above(negation, threshold),
            "median_score": statistics.median(row["score"] for row in negation),
        },
        "spatial": {
            "images": len(spatial),
            "left_hit": share(spatial, "left_hit"),
            "right_hit": share(spatial, "right_hit"),
            "left_on_the_right_person": share(spatial, "left_on_right"),
            "right_on_the_left_person": share(spatial, "right_on_left"),
            "left_and_right_same_box": share(spatial, "same_box"),
        },
        "absent": {
            "phrases": len(absent),
            "above_threshold": above(absent, threshold),
            "median_score": statistics.median(absent_scores),
            "by_phrase": {
                phrase: above([r for r in absent if r["phrase"] == phrase], threshold)
                for phrase, _, _ in ABSENT
                if any(r["phrase"] == phrase for r in absent)
            },
        },
        "calibration": {
            "auroc_present_vs_absent": auroc(present_scores, absent_scores),
            "absent_share_of_answers_above_threshold": n_above_absent
            / max(1, n_above_present + n_above_absent),
        },
    }


def markdown(summary: dict) -> str:
    p, n, s, a, c = (
        summary[k] for k in ("present", "negation", "spatial", "absent", "calibration")
    )
    lines = [
        "# What the packaged grounder cannot do",
        "",
        f"Written by `python -m benchmarks.limits` on {summary['images']} real Flickr30k "
        f"images (threshold {summary['threshold']:.3f}, the packaged grounder's, chosen on "
        "validation). IoU >= 0.5 counts as a hit.",
        "",
        "| probe | phrases | result |",
        "|---|---|---|",
        f"| present (annotated phrases, reference) | {p['phrases']} | hit {p['hit_rate']:.0%}, "
        f"above threshold {p['above_threshold']:.0%}, median score {p['median_score']:.2f} |",
        f'| negation: "something that is not X" | {n["phrases"]} | same box as X '
        f"{n['same_box_as_the_negated_phrase']:.0%}, on X's annotated region "
        f"{n['on_the_negated_thing']:.0%}, above threshold {n['above_threshold']:.0%} |",
        f'| spatial: "the person on the left / right" | {2 * s["images"]} '
        f'({s["images"]} images with two people side by side) | "left" finds the leftmost '
        f'person {s["left_hit"]:.0%}, "right" the rightmost {s["right_hit"]:.0%}; both '
        f'the same box {s["left_and_right_same_box"]:.0%}; "left" on the rightmost person '
        f"{s['left_on_the_right_person']:.0%} |",
        f"| absence: a thing not in the photo | {a['phrases']} | above threshold "
        f"{a['above_threshold']:.0%}, median score {a['median_score']:.2f} |",
        f"| calibration | | AUROC present vs absent {c['auroc_present_vs_absent']:.2f} "
        "(0.5: the score says nothing of presence); "
        f"{c['absent_share_of_answers_above_threshold']:.0%} of the answers above the "
        "threshold name an absent thing |",
        "",
        "Absent phrases above the threshold, by phrase: "
        + ", ".join(f"{k} {v:.0%}" for k, v in a["by_phrase"].items())
        + ".",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=SHARED_DATA, help="Flickr30k Entities root")
    parser.add_argument("--n-images", type=int, default=80, help="images to probe")
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path.home() / ".cache" / "grounding" / "proposals",
        help="proposal cache (default %(default)s)",
    )
    parser.add_argument("--out", type=Path, help="write OUT.json and OUT.md")
    args = parser.parse_args(argv)
    from grounding.cli import load_grounder

    order = [
        image_id
        for name in ("test.txt", "val.txt", "train.txt")
        for image_id in (args.data / name).read_text().split()
        if (args.data / "images" / f"{image_id}.jpg").is_file()
    ][: args.n_images]
    wanted = set(order)
    records = {
        files.image_id: parse_files(files, None)
        for files in AnnotationArchive(find_annotations(args.data))
        if files.image_id in wanted
    }
    records = [records[image_id] for image_id in order]
    grounder = load_grounder(str(pretrained_path()))
    summary = measure(grounder, records, args.data / "images", args.cache)
    print(json.dumps(summary, indent=2))
    if args.out:
        io.write_text(json.dumps(summary, indent=2) + "\n", args.out.with_suffix(".json"))
        io.write_text(markdown(summary), args.out.with_suffix(".md"))


if __name__ == "__main__":
    main()
