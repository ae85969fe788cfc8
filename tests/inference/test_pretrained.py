"""The packaged grounder on a real photo: its boxes land on the annotated objects.

The image is a held-out test image of the split the packaged grounder was built on
(``python -m release.pretrained``): the model never trained on it. It is one where the
grounder finds most phrases, chosen when the weights were built; this test guards that the
shipped weights, the packaged backbone and encoder and the proposals still give those boxes.
"""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
from repository import SHARED_DATA

from grounding import io
from grounding.boxes import box_iou
from grounding.data.formats.flickr30k import AnnotationFiles, parse_files
from grounding.inference.grounder import Grounder, pretrained_path

IMAGE_ID = "2090723611"  # 13 distinct phrases; 12 found at rank 1 in the pipeline's report
IMAGE = SHARED_DATA / "images" / f"{IMAGE_ID}.jpg"


def annotated_phrases(image_id: str) -> dict[str, np.ndarray]:
    """Each distinct phrase of the image's captions that has boxes -> its boxes ``(B, 4)``."""
    with zipfile.ZipFile(SHARED_DATA / "annotations.zip") as archive:
        names = (f"Annotations/{image_id}.xml", f"Sentences/{image_id}.txt")
        files = AnnotationFiles(
            image_id, archive.read(names[0]), names[0], archive.read(names[1]), names[1]
        )
    record = parse_files(files, None)
    entities = {entity.entity_id: entity.box_ids for entity in record.entities}
    phrases: dict[str, np.ndarray] = {}
    for caption in record.captions:
        for phrase in caption.phrases:
            box_ids = entities.get(phrase.entity_id, ())
            if box_ids and phrase.text.lower() not in phrases:
                boxes = [record.boxes[i] for i in box_ids]
                phrases[phrase.text.lower()] = np.array([[b.x1, b.y1, b.x2, b.y2] for b in boxes])
    return phrases


@pytest.mark.slow
@pytest.mark.real_data
@pytest.mark.skipif(not IMAGE.is_file(), reason=f"real image absent: {IMAGE}")
def test_the_packaged_grounder_finds_most_phrases_of_a_held_out_real_photo() -> None:
    grounder = Grounder.from_weights(*io.read_weights(pretrained_path()))
    truth = annotated_phrases(IMAGE_ID)
    found = grounder.ground(io.read_image(IMAGE), list(truth), top_k=1)
    ious = {
        grounding.phrase: float(
            box_iou(np.array([grounding.boxes[0].box]), truth[grounding.phrase]).max()
        )
        for grounding in found
    }
    hits = [phrase for phrase, iou in ious.items() if iou >= 0.5]
    assert len(truth) >= 4
    assert len(hits) > len(truth) / 2, ious
