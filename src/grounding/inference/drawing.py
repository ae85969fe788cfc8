"""The picture of a grounding: the image with each phrase's boxes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from grounding.evaluation.plots import box_patch
from grounding.inference.grounder import Grounding

#: Colours of the phrases drawn by :func:`groundings` (cycled).
PHRASE_COLOURS = ("#e41a1c", "#377eb8", "#4daf4a", "#984ea3", "#ff7f00", "#a65628", "#f781bf")


def groundings(image: Image.Image, found: Sequence[Grounding]) -> Figure:
    """The image with each phrase's boxes (one colour per phrase; solid above the threshold,
    dashed below) and a legend of phrases with their best score."""
    width, height = image.size
    scale = 8 / max(width, height)
    size = (width * scale, height * scale + 0.4 * len(found))
    figure = Figure(figsize=size, layout="constrained")
    axes = figure.subplots()
    axes.imshow(image)
    axes.axis("off")
    for index, grounding in enumerate(found):
        colour = PHRASE_COLOURS[index % len(PHRASE_COLOURS)]
        for rank, box in enumerate(grounding.boxes):
            style = "-" if box.above_threshold else "--"
            patch = box_patch(np.asarray(box.box), colour, linestyle=style)
            if rank == 0:
                patch.set_label(f'"{grounding.phrase}"  {box.score:.2f}')
            axes.add_patch(patch)
        if not grounding.boxes:
            axes.plot([], [], color=colour, label=f'"{grounding.phrase}": {grounding.reason}')
    if found:
        figure.legend(loc="outside lower center", fontsize=9, frameon=False)
    return figure
