"""The picture of a grounding: each phrase's boxes on the image, read back from matplotlib."""

from __future__ import annotations

from matplotlib.colors import to_rgba
from PIL import Image

from grounding.inference.drawing import PHRASE_COLOURS, groundings
from grounding.inference.grounder import Found, Grounding

IMAGE = Image.new("RGB", (200, 100))


def test_each_phrase_has_its_colour_and_a_solid_box_above_the_threshold() -> None:
    found = [
        Grounding(
            "a dog",
            [Found((10.0, 20.0, 50.0, 60.0), 0.9, True), Found((0.0, 0.0, 5.0, 5.0), 0.2, False)],
        ),
        Grounding("a cat", [Found((100.0, 10.0, 150.0, 90.0), 0.4, False)]),
    ]
    figure = groundings(IMAGE, found)
    [axes] = figure.axes
    patches = list(axes.patches)
    assert [p.get_linestyle() for p in patches] == ["-", "--", "--"]
    assert [p.get_edgecolor() for p in patches] == [to_rgba(PHRASE_COLOURS[0])] * 2 + [
        to_rgba(PHRASE_COLOURS[1])
    ]
    assert (patches[0].get_xy(), patches[0].get_width(), patches[0].get_height()) == (
        (10.0, 20.0),
        40.0,
        40.0,
    )
    [legend] = figure.legends
    assert [t.get_text() for t in legend.get_texts()] == ['"a dog"  0.90', '"a cat"  0.40']


def test_a_phrase_without_boxes_shows_its_reason_in_the_legend() -> None:
    figure = groundings(IMAGE, [Grounding("a unicorn", reason="no candidate survived")])
    assert len(figure.axes[0].patches) == 0
    [legend] = figure.legends
    assert [t.get_text() for t in legend.get_texts()] == ['"a unicorn": no candidate survived']


def test_colours_cycle_and_no_phrase_draws_no_legend() -> None:
    many = [Grounding(f"p{i}", [Found((0.0, 0.0, 9.0, 9.0), 0.5, True)]) for i in range(8)]
    patches = list(groundings(IMAGE, many).axes[0].patches)
    assert patches[7].get_edgecolor() == to_rgba(PHRASE_COLOURS[0])
    assert groundings(IMAGE, []).legends == []
