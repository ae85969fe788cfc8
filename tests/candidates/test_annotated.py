"""The annotated boxes of each image as its candidates."""

from __future__ import annotations

import numpy as np
import pandas as pd

from grounding.candidates.annotated import annotated_regions


def test_each_image_gets_its_distinct_boxes_in_box_order() -> None:
    boxes = pd.DataFrame(
        [
            ("b", 1, 5, 5, 9, 9),
            ("a", 2, 0, 0, 4, 4),
            ("a", 0, 1, 1, 3, 3),
            ("a", 1, 0, 0, 4, 4),  # same coordinates as box 2: one region
            ("b", 0, 0, 0, 4, 4),  # the same coordinates in another image: its own region
        ],
        columns=["image_id", "box_id", "x1", "y1", "x2", "y2"],
    )
    regions = annotated_regions(boxes)
    assert list(regions) == ["a", "b"]
    np.testing.assert_array_equal(regions["a"], [[1, 1, 3, 3], [0, 0, 4, 4]])
    np.testing.assert_array_equal(regions["b"], [[0, 0, 4, 4], [5, 5, 9, 9]])
    assert regions["a"].dtype == np.float32


def test_image_ids_are_strings_and_no_boxes_give_no_images() -> None:
    boxes = pd.DataFrame(
        {"image_id": ["7"], "box_id": [0], "x1": [1.0], "y1": [2.0], "x2": [3.0], "y2": [4.0]}
    )
    assert list(annotated_regions(boxes)) == ["7"]
    assert annotated_regions(boxes.iloc[:0]) == {}
