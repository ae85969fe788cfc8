"""pair: ground truth, ANY-box IoU labels, the candidates of present images, the summary."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from grounding.candidates import candidates_table
from grounding.candidates.annotated import annotated_regions
from grounding.data.pair import (
    PairCounts,
    Paired,
    build_pairs,
    ground_truth,
    pair_dataset,
    pairing,
)
from grounding.data.tables import ParsedDataset


def rows(table: pd.DataFrame) -> list[tuple]:
    return list(table.itertuples(index=False, name=None))


def annotated(parsed: ParsedDataset) -> pd.DataFrame:
    """The candidates table of every image's distinct annotated boxes (400's included)."""
    return candidates_table(annotated_regions(parsed.boxes), "annotated")


@pytest.fixture(scope="module")
def paired(tiny_parsed: ParsedDataset) -> Paired:
    t = tiny_parsed
    return pair_dataset(t.images, t.phrases, t.boxes, t.chain_boxes, annotated(t), pos_iou=0.5)


# --- candidates -----------------------------------------------------------------------------


def test_candidates_of_images_without_file_are_dropped_and_regions_renumbered(
    tiny_parsed: ParsedDataset, paired: Paired
) -> None:
    given = annotated(tiny_parsed)
    before = given.copy()
    # 100: 4 distinct; 200: chains 7 and 8 share coordinates; 300: chain 12 lists its box twice
    assert given.groupby("image_id").size().to_dict() == {
        "100": 4,
        "200": 2,
        "300": 2,
        "400": 1,
        "500": 2,
    }
    candidates = paired.candidates
    assert candidates.groupby("image_id").size().to_dict() == {
        "100": 4,
        "200": 2,
        "300": 2,
        "500": 2,
    }  # 400 has no JPEG
    # region ids index the region features: contiguous again after 400's region (8) left
    assert candidates["region_id"].tolist() == list(range(10))
    assert rows(candidates[candidates["image_id"] == "500"]) == [
        (8, "500", 0.0, 0.0, 15.0, 15.0, "annotated"),
        (9, "500", 15.0, 15.0, 30.0, 30.0, "annotated"),
    ]
    pd.testing.assert_frame_equal(given, before)  # the table passed in is not modified


# --- ground truth ---------------------------------------------------------------------------


def test_ground_truth_of_shared_boxes_and_multi_box_chains(tiny_parsed: ParsedDataset) -> None:
    t = tiny_parsed
    truth = ground_truth(t.phrases[t.phrases["image_id"] == "100"], t.chain_boxes, t.boxes)
    assert rows(truth) == [
        (0, "100", 0.0, 0.0, 50.0, 40.0),  # "Two men": chain 1's two boxes
        (0, "100", 50.0, 0.0, 100.0, 40.0),
        (1, "100", 10.0, 40.0, 30.0, 80.0),  # "a red car" (chain 2) and "It" (chain 3)
        (2, "100", 10.0, 40.0, 30.0, 80.0),  # share one box
        (4, "100", 0.0, 40.0, 10.0, 80.0),
        (7, "100", 0.0, 0.0, 50.0, 40.0),
        (7, "100", 50.0, 0.0, 100.0, 40.0),
    ]  # phrases 3 (not visual), 5 (scene flag) and 6 (nobndbox) have no row


def test_ground_truth_keys_chains_by_image() -> None:
    phrases = pd.DataFrame({"phrase_id": [0, 1], "image_id": ["a", "b"], "chain_id": [1, 1]})
    chain_boxes = pd.DataFrame({"image_id": ["a", "b"], "chain_id": [1, 1], "box_id": [0, 0]})
    boxes = pd.DataFrame(
        [("a", 0, 0.0, 0.0, 1.0, 1.0), ("b", 0, 5.0, 5.0, 6.0, 6.0)],
        columns=["image_id", "box_id", "x1", "y1", "x2", "y2"],
    )
    assert rows(ground_truth(phrases, chain_boxes, boxes)) == [
        (0, "a", 0.0, 0.0, 1.0, 1.0),
        (1, "b", 5.0, 5.0, 6.0, 6.0),
    ]


# --- pairs ----------------------------------------------------------------------------------


def test_pairs_of_a_two_box_phrase_take_the_best_box() -> None:
    candidates = pd.DataFrame(
        [
            (0, "a", 0.0, 0.0, 2.0, 2.0),
            (1, "a", 1.0, 0.0, 3.0, 2.0),
            (2, "a", 8.0, 8.0, 9.0, 9.0),
        ],
        columns=["region_id", "image_id", "x1", "y1", "x2", "y2"],
    )
    truth = pd.DataFrame(
        [(5, "a", 0.0, 0.0, 2.0, 2.0), (5, "a", 2.0, 0.0, 4.0, 2.0)],
        columns=["phrase_id", "image_id", "x1", "y1", "x2", "y2"],
    )
    pairs = build_pairs(candidates, truth, pos_iou=0.5)
    # region 1 has IoU 1/3 with each of the two boxes; MERGED would give 4/8 = 0.5
    assert [(p, r, i, round(float(u), 6), lab) for p, r, i, u, lab in rows(pairs)] == [
        (5, 0, "a", 1.0, 1),
        (5, 1, "a", round(1 / 3, 6), 0),
        (5, 2, "a", 0.0, 0),
    ]
    assert list(pairs.columns) == ["phrase_id", "region_id", "image_id", "iou", "label"]


@pytest.mark.parametrize(
    "pos_iou",
    [
        0.5,
        0.7,
        pytest.param(np.float64(0.7), id="numpy-0.7"),
    ],
)
def test_label_is_iou_at_least_pos_iou_at_the_boundary(pos_iou: float) -> None:
    # (0,0,10,10) against (0,0,10,10*pos_iou) has IoU exactly pos_iou; one row less is below
    h = round(10 * pos_iou)
    candidates = pd.DataFrame(
        [(0, "a", 0.0, 0.0, 10.0, float(h)), (1, "a", 0.0, 0.0, 10.0, float(h - 1))],
        columns=["region_id", "image_id", "x1", "y1", "x2", "y2"],
    )
    truth = pd.DataFrame(
        [(0, "a", 0.0, 0.0, 10.0, 10.0)], columns=["phrase_id", "image_id", "x1", "y1", "x2", "y2"]
    )
    pairs = build_pairs(candidates, truth, pos_iou=pos_iou)
    assert pairs["label"].tolist() == [1, 0]


@pytest.mark.parametrize("pos_iou", [0.0, -0.1, 1.5])
def test_pos_iou_out_of_range_is_refused(pos_iou: float) -> None:
    empty = pd.DataFrame(columns=["region_id", "image_id", "x1", "y1", "x2", "y2"])
    with pytest.raises(ValueError, match="pos_iou"):
        build_pairs(empty, empty.rename(columns={"region_id": "phrase_id"}), pos_iou=pos_iou)


def reference_pairs(candidates: pd.DataFrame, truth: pd.DataFrame, pos_iou: float) -> list:
    """The slow double loop: every phrase x every region of its image, max IoU over boxes."""

    def iou(a, b) -> float:
        iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = iw * ih
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
        return inter / union

    result = []
    for phrase_id in sorted(set(truth["phrase_id"])):
        mine = truth[truth["phrase_id"] == phrase_id]
        image_id = mine["image_id"].iloc[0]
        gt = mine[["x1", "y1", "x2", "y2"]].to_numpy(float)
        regions = candidates[candidates["image_id"] == image_id].sort_values("region_id")
        for region in regions.itertuples(index=False):
            box = (region.x1, region.y1, region.x2, region.y2)
            best = max(iou(box, g) for g in gt)
            result.append((phrase_id, region.region_id, image_id, best, int(best >= pos_iou)))
    return result


def random_boxes(rng: np.random.Generator, n: int, size: int = 40) -> np.ndarray:
    corner = rng.integers(0, size - 1, size=(n, 2))
    extent = rng.integers(1, size // 2, size=(n, 2))
    return np.concatenate([corner, np.minimum(corner + extent, size)], axis=1).astype(float)


def test_build_pairs_matches_a_reference_double_loop() -> None:
    rng = np.random.default_rng(7)
    candidate_rows, truth_rows = [], []
    phrase_id = 0
    # "e" has candidates but no phrase; "f" has phrases but no candidate; ids out of order
    for image_id in ["c", "a", "e", "b", "d", "f"]:
        if image_id != "f":
            for box in random_boxes(rng, int(rng.integers(1, 8))):
                candidate_rows.append((image_id, *box))
        if image_id == "e":
            continue
        for _ in range(int(rng.integers(1, 5))):
            for box in random_boxes(rng, int(rng.integers(1, 4))):
                truth_rows.append((phrase_id, image_id, *box))
            phrase_id += 1
    # one phrase's box is also a candidate, so that some pairs are positives
    boxes_of_a = [row[1:] for row in candidate_rows if row[0] == "a"]
    truth_rows.append((phrase_id, "a", *boxes_of_a[0]))
    truth_rows.append((phrase_id, "a", *boxes_of_a[-1]))
    candidates = pd.DataFrame(candidate_rows, columns=["image_id", "x1", "y1", "x2", "y2"])
    candidates.insert(0, "region_id", rng.permutation(len(candidates)))
    truth = pd.DataFrame(truth_rows, columns=["phrase_id", "image_id", "x1", "y1", "x2", "y2"])
    truth = truth.sample(frac=1.0, random_state=1)  # any row order

    pairs = build_pairs(candidates, truth, pos_iou=0.3)
    expected = reference_pairs(candidates, truth, 0.3)
    assert len(pairs) == len(expected) > 50
    assert [r[:3] for r in rows(pairs)] == [e[:3] for e in expected]
    np.testing.assert_allclose(pairs["iou"], [e[3] for e in expected], atol=1e-6)
    assert pairs["label"].tolist() == [e[4] for e in expected]
    assert 0 < pairs["label"].sum() < len(pairs)
    assert "f" not in set(pairs["image_id"]) and "e" not in set(pairs["image_id"])


# --- the stage's function -------------------------------------------------------------------


def test_pair_dataset_summary_hand_counts(paired: Paired) -> None:
    assert paired.summary == {
        "images": 5,
        "images_paired": 4,  # 400 has no JPEG
        "images_left_out_no_file": 1,
        "images_left_out_no_candidate": 0,
        "phrases": 36,
        "phrases_paired": 5 + 7 + 6 + 10,
        "phrases_left_out_no_file": 5,
        "phrases_left_out_not_visual": 1,  # "very" (chain 0)
        "phrases_left_out_no_box": 2,  # "the street" (<scene>1), "A sign" (<nobndbox>1)
        "candidates": 4 + 2 + 2 + 2,
        "candidates_per_image": 2.5,
        "pairs": 5 * 4 + 7 * 2 + 6 * 2 + 10 * 2,
        "positives": 7 + 7 + 6 + 10,
        "positive_share": round(30 / 66, 4),
    }


def test_pair_dataset_leaves_out_images_without_file(paired: Paired) -> None:
    for name, table in paired.tables().items():
        assert "400" not in set(table["image_id"]), name
    assert set(paired.phrases["image_id"]) == {"100", "200", "300", "500"}
    assert paired.phrases["has_box"].all()


def test_pair_dataset_labels_of_image_100(paired: Paired) -> None:
    pairs = paired.pairs[paired.pairs["image_id"] == "100"]
    labels = pairs.pivot(index="phrase_id", columns="region_id", values="label")
    # regions 0..3 are boxes 0..3 of image 100
    assert labels.to_numpy().tolist() == [
        [1, 1, 0, 0],  # 0 "Two men": both of chain 1's boxes
        [0, 0, 1, 0],  # 1 "a red car": the shared box
        [0, 0, 1, 0],  # 2 "It": the shared box
        [0, 0, 0, 1],  # 4 "a pole"
        [1, 1, 0, 0],  # 7 "the men"
    ]
    assert labels.index.tolist() == [0, 1, 2, 4, 7]


def test_pair_dataset_with_no_image_file_pairs_nothing(tiny_parsed: ParsedDataset) -> None:
    t = tiny_parsed
    images = t.images.assign(has_file=False)
    paired = pair_dataset(images, t.phrases, t.boxes, t.chain_boxes, annotated(t), pos_iou=0.5)
    assert len(paired.pairs) == 0
    assert paired.summary["images_left_out_no_file"] == 5
    assert paired.summary["phrases_left_out_no_file"] == 36
    assert paired.summary["positive_share"] == 0.0


def test_pair_dataset_with_proposed_candidates_labels_them_by_iou(
    tiny_parsed: ParsedDataset,
) -> None:
    t = tiny_parsed
    present = sorted(t.images.loc[t.images["has_file"], "image_id"])
    # each image's proposals: its annotated boxes shifted by 1 pixel (still IoU >= 0.5),
    # and one image with none (nothing survived its size filter)
    shifted = {
        image_id: group[["x1", "y1", "x2", "y2"]].to_numpy() + 1.0
        for image_id, group in t.boxes.groupby("image_id")
        if image_id in present[1:]
    }
    proposals = {present[0]: np.empty((0, 4)), **shifted}
    candidates = candidates_table(proposals, "selective_search")
    paired = pair_dataset(t.images, t.phrases, t.boxes, t.chain_boxes, candidates, pos_iou=0.5)
    assert set(paired.candidates["source"]) == {"selective_search"}
    assert present[0] not in set(paired.pairs["image_id"])
    assert paired.summary["images_left_out_no_candidate"] == 1
    # every kept phrase has a positive: a shifted copy of its own box
    assert paired.pairs.groupby("phrase_id")["label"].max().min() == 1


# --- pairs image batch by image batch -------------------------------------------------------


@pytest.mark.parametrize("batch_images", [1, 2, 3, 100])
def test_pairs_of_image_batches_are_the_whole_table_result(
    tiny_parsed: ParsedDataset, paired: Paired, batch_images: int
) -> None:
    t = tiny_parsed
    made = pairing(t.images, t.phrases, t.boxes, t.chain_boxes, annotated(t))
    parts = list(made.batches(pos_iou=0.5, batch_images=batch_images))
    assert len(parts) == -(-made.ground_truth["image_id"].nunique() // batch_images)
    # row for row the pairs of all images at once (built the way the stage built them before)
    whole = build_pairs(made.candidates, made.ground_truth, pos_iou=0.5)
    pd.testing.assert_frame_equal(pd.concat(parts, ignore_index=True), whole)
    for part in parts:  # each part holds whole images
        assert not set(part["image_id"]) & set().union(
            *(set(other["image_id"]) for other in parts if other is not part)
        )
    counts = PairCounts()
    for part in parts:
        counts.add(part)
    assert made.summary(counts) == paired.summary


def test_pairs_of_image_batches_of_the_shipped_sample_are_the_whole_table_result() -> None:
    from grounding.data.formats import dataset_format
    from grounding.data.tables import build_tables
    from grounding.io import present_files

    root = Path(__file__).resolve().parents[2] / "data" / "sample"
    reader = dataset_format("flickr30k").open(root, splits=root)
    parsed = build_tables(reader, present_files(root / "images"), reader.skipped)
    t = parsed
    made = pairing(t.images, t.phrases, t.boxes, t.chain_boxes, annotated(t))
    parts = list(made.batches(pos_iou=0.5, batch_images=7))
    whole = build_pairs(made.candidates, made.ground_truth, pos_iou=0.5)
    pd.testing.assert_frame_equal(pd.concat(parts, ignore_index=True), whole)
