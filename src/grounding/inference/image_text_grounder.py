"""A zero-training grounder from a CLIP or SigLIP model (a family of
:mod:`grounding.inference.zero_shot`).

:class:`ImageTextScorer`: the default candidate generator
(:data:`~grounding.candidates.DEFAULT_PROPOSER` with its default settings) proposes boxes;
each box is cropped, resized to the image tower's square input and embedded by the image
tower (pooled and projected, as CLIP is meant to be used: one whole picture per embedding);
its score for a phrase is the cosine similarity of that embedding with the phrase's text
embedding (in [-1, 1]). The threshold for ``above_threshold`` is :data:`CLIP_THRESHOLD` for
CLIP and, for SigLIP, the cosine at which SigLIP's own match probability ``sigmoid(scale *
cosine + bias)`` is one half (read from the checkpoint). Neither is calibrated on Flickr30k
Entities: pass ``--threshold`` to choose another.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from grounding.errors import DataError
from grounding.inference.grounder import Grounder
from grounding.modeling.hugging_face import HF_SCHEME
from grounding.schemas import FeaturesMeta

if TYPE_CHECKING:
    import torch

    from grounding.modeling.clip import ImageText


#: CLIP's default threshold on the cosine similarity of a crop and a phrase: CLIP ViT models
#: give matching image-caption pairs cosines around 0.3 and unrelated ones below 0.2.
CLIP_THRESHOLD = 0.25

#: Crops embedded in one pass of the image tower.
CROP_BATCH = 32

#: The image side this grounder asks for (its ``features.image_size``, which the server
#: decodes JPEGs at least as large as), in the tower's input sides: the crops are cut from
#: the image, so a box a quarter of the image wide still fills the tower's square.
CROP_SOURCE_SIDES = 4


class ImageTextScorer:
    """A :class:`~grounding.inference.grounder.Scorer` from a CLIP or SigLIP model: the
    cosine similarity ``(P, N)`` of each phrase's text embedding with each box's crop's image
    embedding."""

    def __init__(self, loaded: ImageText) -> None:
        from grounding.modeling.clip import encoder_of, image_embedding

        self.loaded = loaded
        self.images = image_embedding(loaded)
        self.encoder = encoder_of(loaded)
        self.device: torch.device | None = None
        self._features = FeaturesMeta(
            backbone=self.encoder.name,
            backbone_weights=None,
            text_encoder=self.encoder.name,
            image_size=CROP_SOURCE_SIDES * loaded.image_size,
            context=False,
            region_dim=self.encoder.dim,
            phrase_dim=self.encoder.dim,
            regions=0,
            phrases=0,
        )

    @property
    def features(self) -> FeaturesMeta:
        return self._features

    def score(self, image: Image.Image, boxes: np.ndarray, phrases: Sequence[str]) -> np.ndarray:
        from grounding.modeling.text import encode_phrases

        regions = self.crop_embeddings(image, boxes)
        texts = encode_phrases(self.encoder, list(phrases))
        return (texts @ regions.T).astype(np.float32)

    def crop_embeddings(self, image: Image.Image, boxes: np.ndarray) -> np.ndarray:
        """Unit-norm image embeddings ``(N, dim)`` float32 of ``boxes (N, 4)`` (``x1, y1, x2,
        y2`` in ``image``'s pixels), each box cropped and resized to the tower's square."""
        import torch

        from grounding.modeling.device import autocast, module_device

        side = self.loaded.image_size
        mean = torch.tensor(self.loaded.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.loaded.std).view(1, 3, 1, 1)
        device = module_device(self.images)
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        embeddings = []
        with torch.inference_mode():
            for start in range(0, len(boxes), CROP_BATCH):
                crops = np.stack(
                    [
                        np.asarray(crop(image, box).resize((side, side), Image.Resampling.BICUBIC))
                        for box in boxes[start : start + CROP_BATCH]
                    ]
                )
                pixels = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255
                pixels = ((pixels - mean) / std).to(device)
                with autocast(device):
                    embeddings.append(self.images(pixels).float().cpu().numpy())
        return np.concatenate(embeddings) if embeddings else np.zeros((0, self.encoder.dim))

    def place(self, device: str, where: str) -> None:
        from grounding.modeling.device import resolve_device

        placed = resolve_device(device, where)
        self.images.to(placed)
        self.encoder.model.to(placed)
        self.device = placed

    def out_of_memory_hint(self, advice: str) -> AbstractContextManager[object]:
        from grounding.modeling.device import gpu_memory_hint

        return gpu_memory_hint(self.device, advice) if self.device else nullcontext()

    def onnx_parts(self) -> tuple[dict[str, bytes], str, dict[str, Any]]:
        raise DataError(
            f"{HF_SCHEME}:{self.loaded.reference} is a zero-training grounder with no "
            "trained head: only a grounder the pipeline trained can be exported"
        )


def crop(image: Image.Image, box: Sequence[float]) -> Image.Image:
    """The pixels of ``box`` ``(x1, y1, x2, y2)`` in ``image``, rounded to whole pixels and at
    least one pixel on each side."""
    x1, y1, x2, y2 = (round(float(value)) for value in box)
    x1, y1 = min(max(x1, 0), image.width - 1), min(max(y1, 0), image.height - 1)
    return image.crop((x1, y1, max(x2, x1 + 1), max(y2, y1 + 1)))


def image_text_threshold(loaded: ImageText) -> float:
    """:data:`CLIP_THRESHOLD` for CLIP; for SigLIP the cosine where its match probability
    ``sigmoid(scale * cosine + bias)`` is 0.5 (``-bias / scale``), within [0, 1]."""
    if loaded.family == "clip":
        return CLIP_THRESHOLD
    scale = float(loaded.model.logit_scale.exp())
    bias = float(loaded.model.logit_bias)
    return min(max(-bias / scale, 0.0), 1.0)


def image_text_grounder(reference: str) -> Grounder:
    from grounding import candidates
    from grounding.modeling.clip import load_image_text

    loaded = load_image_text(reference, "a zero-training grounder")
    name = candidates.DEFAULT_PROPOSER
    return Grounder(
        ImageTextScorer(loaded),
        threshold=image_text_threshold(loaded),
        candidates=name,
        settings=candidates.settings_of(name),
        pretrained_on=f"the image-text pairs {loaded.family} was pretrained on (zero-training)",
    )
