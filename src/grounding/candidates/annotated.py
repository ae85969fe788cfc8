"""The image's own annotated boxes as its candidates (the setting of the original Flickr30k
Entities work: telling phrases apart among known objects)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from grounding.boxes import BOX_COLUMNS

if TYPE_CHECKING:
    import pandas as pd


def annotated_regions(boxes: pd.DataFrame) -> dict[str, np.ndarray]:
    """The distinct annotated boxes ``{image_id: boxes (N, 4)}`` of each image, in box order.

    ``boxes`` has ``image_id, box_id, x1, y1, x2, y2``; a box listed twice (two chains with the
    same coordinates) is one region.
    """
    distinct = boxes.drop_duplicates(["image_id", *BOX_COLUMNS]).sort_values(["image_id", "box_id"])
    return {
        str(image_id): group[BOX_COLUMNS].to_numpy(np.float32)
        for image_id, group in distinct.groupby("image_id", sort=True)
    }
