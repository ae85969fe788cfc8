"""The picture of a grounding: labelled boxes in each phrase's colour, read back from the
pixels; stacked labels when phrases choose the same box."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageColor

from grounding.inference.drawing import (
    PHRASE_COLOURS,
    box_label,
    groundings,
    label_height,
    label_tops,
)
from grounding.inference.grounder import Found, Grounding

GREY = (128, 128, 128)


def colour_pixels(picture: Image.Image, colour: str) -> np.ndarray:
    """The ``(row, column)`` of every pixel of exactly ``colour`` (a ``#rrggbb``)."""
    pixels = np.asarray(picture)
    return np.argwhere((pixels == ImageColor.getrgb(colour)).all(axis=-1))


def test_each_phrase_has_its_colour_and_the_box_sits_where_it_should() -> None:
    image = Image.new("RGB", (300, 200), GREY)
    found = [
        Grounding("a dog", [Found((100.0, 80.0, 200.0, 180.0), 0.9, True)]),
        Grounding("a cat", [Found((10.0, 120.0, 60.0, 190.0), 0.4, False)]),
    ]
    picture = groundings(image, found)
    assert picture.size == image.size and image.getpixel((150, 130)) == GREY  # input untouched
    dog = colour_pixels(picture, PHRASE_COLOURS[0])
    cat = colour_pixels(picture, PHRASE_COLOURS[1])
    assert len(dog) and len(cat)
    # the dog's box line runs along its left edge, x = 100, from y 80 to 180
    left_edge = dog[(dog[:, 1] >= 99) & (dog[:, 1] <= 101)]
    assert left_edge[:, 0].min() <= 81 and left_edge[:, 0].max() >= 179
    # its label (filled with its colour) is right above the box, where the image was grey
    assert picture.getpixel((103, 75)) == ImageColor.getrgb(PHRASE_COLOURS[0])


def test_box_labels_carry_phrase_and_score_and_mark_a_score_below_the_threshold() -> None:
    assert box_label("a dog", 0.912, True) == "a dog 0.91"
    assert box_label("a cat", 0.3, False) == "a cat 0.30?"


def test_six_phrases_choosing_the_same_box_all_show_their_labels() -> None:
    image = Image.new("RGB", (400, 300), GREY)
    # in the corner: no room above the box, where a label goes by default
    same = (0.0, 0.0, 200.0, 140.0)
    phrases = [f"phrase {i}" for i in range(6)]
    found = [Grounding(phrase, [Found(same, 0.8, True)]) for phrase in phrases]
    picture = groundings(image, found)
    pixels = np.asarray(picture)
    for index in range(6):
        colour = PHRASE_COLOURS[index]
        hits = colour_pixels(picture, colour)
        # a label is a filled block: far more pixels of its colour than a box line leaves
        # where the other phrases' lines cover the same box
        assert len(hits) > 200, f"the label of phrase {index} ({colour}) is hidden"
    assert pixels.shape == (300, 400, 3)


def test_labels_of_one_box_stack_above_it_or_below_its_top_near_the_image_edge() -> None:
    height = 20
    boxes = np.array(
        [[10, 100, 50, 150], [10, 100, 50, 150], [10, 100, 50, 150], [0, 5, 9, 9], [0, 5, 9, 9]],
        dtype=np.float32,
    )
    assert label_tops(boxes, height).tolist() == [80, 60, 40, 5, 25]


def test_label_height_grows_with_the_text_scale() -> None:
    assert label_height(1.0) > label_height(0.5) > 8


def test_phrases_without_boxes_draw_nothing() -> None:
    image = Image.new("RGB", (64, 64), GREY)
    picture = groundings(image, [Grounding("a unicorn", reason="no candidate survived")])
    assert np.array_equal(np.asarray(picture), np.asarray(image))
