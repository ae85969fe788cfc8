"""The picture of a grounding: the image with each phrase's boxes, labelled, drawn with
supervision's annotators (OpenCV underneath)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from grounding.inference.grounder import Grounding

#: Space in pixels between a label's text and its edge.
LABEL_PADDING = 4
#: Colours of the phrases, in phrase order and cycled (matplotlib's tab10: dark enough for
#: white label text).
PHRASE_COLOURS = (
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#9467bd",
    "#ff7f0e",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#7f7f7f",
    "#bcbd22",
)


def box_label(phrase: str, score: float, above_threshold: bool) -> str:
    """The text on a box: the phrase and its score, ``?`` after a score below the threshold."""
    return f"{phrase} {score:.2f}" + ("" if above_threshold else "?")


def groundings(image: Image.Image, found: Sequence[Grounding]) -> Image.Image:
    """``image`` (RGB, unchanged) copied with each phrase's boxes: one colour per phrase (phrase
    ``i`` gets ``PHRASE_COLOURS[i % 10]``), a thick line above the threshold and a thin one
    below, and on every box a label with the phrase and its score (:func:`box_label`). Labels
    that would overlap (several phrases choosing the same box) are moved apart, so each stays
    readable. Phrases without boxes draw nothing."""
    import supervision as sv

    boxes, phrase_index, labels, above = [], [], [], []
    for index, grounding in enumerate(found):
        for box in grounding.boxes:
            boxes.append(box.box)
            phrase_index.append(index % len(PHRASE_COLOURS))
            labels.append(box_label(grounding.phrase, box.score, box.above_threshold))
            above.append(box.above_threshold)
    scene = image.convert("RGB")  # a copy, also of an RGB image: the caller's is not drawn on
    if not boxes:
        return scene
    detections = sv.Detections(
        xyxy=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        class_id=np.asarray(phrase_index, dtype=int),
    )
    palette = sv.ColorPalette.from_hex(list(PHRASE_COLOURS))
    size = image.size
    thickness = max(2, sv.calculate_optimal_line_thickness(size))
    above_mask = np.asarray(above, dtype=bool)
    for mask, width in ((~above_mask, 1), (above_mask, thickness)):
        if mask.any():
            annotator = sv.BoxAnnotator(color=palette, thickness=width)
            scene = annotator.annotate(scene, detections[mask])
    text_scale = max(0.4, sv.calculate_optimal_text_scale(size))
    labeller = sv.LabelAnnotator(
        color=palette,
        text_color=sv.Color.WHITE,
        text_scale=text_scale,
        text_padding=LABEL_PADDING,
        smart_position=True,
    )
    # the annotator puts a label's lower left corner on its box's upper left corner: moving
    # that corner stacks the labels of one box (which is all the label reads of the box)
    shifted = detections.xyxy.copy()
    height = label_height(text_scale)
    shifted[:, 1] = label_tops(detections.xyxy, height) + height
    labelled = sv.Detections(xyxy=shifted, class_id=detections.class_id)
    # a PIL image in, a PIL image out: supervision handles the channel order of PIL and OpenCV
    return labeller.annotate(scene, labelled, labels=labels)


def label_height(text_scale: float) -> int:
    """The height in pixels of a one-line label of supervision's ``LabelAnnotator`` at
    ``text_scale`` (line thickness 1, :data:`LABEL_PADDING`)."""
    import cv2

    (_, text_height), _ = cv2.getTextSize("Tg", cv2.FONT_HERSHEY_SIMPLEX, text_scale, 1)
    return int(text_height + 2 * LABEL_PADDING)


def label_tops(boxes: np.ndarray, height: int) -> np.ndarray:
    """The top pixel row ``(N,)`` of each box's label, for ``boxes (N, 4)`` in
    ``(x1, y1, x2, y2)`` pixels: the labels of boxes with the same corners are stacked, the
    first right above the box (or, when the stack would leave the image at the top, right
    below the box's top edge), the next one ``height`` pixels further out."""
    keys = [tuple(np.round(box).astype(int)) for box in boxes]
    counts: dict[tuple[int, ...], int] = {}
    ranks = []
    for key in keys:
        ranks.append(counts.get(key, 0))
        counts[key] = ranks[-1] + 1
    tops = np.empty(len(boxes), dtype=np.float32)
    for i, (key, rank) in enumerate(zip(keys, ranks, strict=True)):
        top = float(boxes[i, 1])
        fits_above = top >= counts[key] * height
        tops[i] = top - (rank + 1) * height if fits_above else top + rank * height
    return tops
