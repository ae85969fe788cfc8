"""Zero-training grounders: ``grounding predict --model hf:<model id or folder>``.

A Hugging Face model that already matches images with text grounds phrases with no training
on this project's data. The family of the model (the ``model_type`` of its config, read before
any weights) picks the grounder from :data:`ZERO_SHOT`:

- ``clip``, ``siglip``: selective search's boxes, each crop scored by the cosine of its image
  embedding with the phrase's (:mod:`grounding.inference.image_text_grounder`);
- ``owlv2``, ``owlvit``, ``grounding-dino``: the detector's own boxes, scored with the phrases
  as its text queries (:mod:`grounding.inference.detector_grounder`).
"""

from __future__ import annotations

from grounding.errors import ConfigError, DataError
from grounding.inference.detector_grounder import detector_grounder
from grounding.inference.grounder import Grounder
from grounding.inference.image_text_grounder import image_text_grounder
from grounding.modeling.detectors import GROUNDING_DINO, OWLV2, OWLVIT
from grounding.modeling.hugging_face import HF_SCHEME, model_type
from grounding.registry import Registry

#: How each family (a config's ``model_type``) grounds with no training: reference -> grounder.
ZERO_SHOT: Registry[Grounder] = Registry("zero-training family", f"--model {HF_SCHEME}:")
for _family in ("clip", "siglip"):
    ZERO_SHOT.add(_family, image_text_grounder)
for _family in (OWLV2, OWLVIT, GROUNDING_DINO):
    ZERO_SHOT.add(_family, detector_grounder)


def zero_shot_grounder(reference: str) -> Grounder:
    """The zero-training grounder of the Hugging Face model ``reference`` (a model id or
    folder: ``--model hf:<reference>``), on the CPU, by its family (:data:`ZERO_SHOT`).
    :class:`DataError` with one line for a model that cannot be read, is of a family without
    a zero-training grounder, or whose weights are not safetensors."""
    try:
        family = model_type(reference)
        if family not in ZERO_SHOT:
            raise ConfigError(
                f"{HF_SCHEME}:{reference} is a {family or 'unknown'!r} model; grounding with no "
                f"training knows the families {', '.join(ZERO_SHOT)}"
            )
        return ZERO_SHOT.build(family, reference=reference)
    except ValueError as error:  # ConfigError too
        raise DataError(str(error)) from None
