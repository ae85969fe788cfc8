"""Region pooling and phrase pooling as torch modules: the one implementation that the
features stage, the grounder and the ONNX export (:mod:`grounding.modeling.export`) all run.

:class:`RegionPooling` is a trunk and RoIAlign: what a backbone sees in each box.
:class:`PhrasePooling` is a transformer and the mean of its token states over the attention
mask, L2-normalised: a sentence encoder's phrase embedding (an image-text model's text tower
pools its own way: :class:`~grounding.modeling.clip.TextTowerPooling`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.ops import roi_align


class RegionPooling(nn.Module):
    """``images (B, 3, H, W)`` (normalised and padded as
    :func:`~grounding.modeling.region_features.normalised_image` makes them) and ``rois (K,
    5)`` (``batch index, x1, y1, x2, y2`` in the pixels of those images) -> ``features (K,
    channels)``: the trunk's map average-pooled in each box with
    :func:`torchvision.ops.roi_align` (one output cell, about one sample per map cell the box
    covers, pixel-aligned)."""

    def __init__(self, trunk: nn.Module, stride: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.stride = stride

    def forward(self, images: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        maps = self.trunk(images)
        return roi_align(  # float32 under autocast (torchvision casts its inputs)
            maps,
            rois,
            output_size=1,
            spatial_scale=1 / self.stride,
            sampling_ratio=0,
            aligned=True,
        ).flatten(1)


def rois(boxes: list[torch.Tensor]) -> torch.Tensor:
    """Each image's ``boxes (N_i, 4)`` as one ``(sum N_i, 5)`` tensor whose first column is
    the image's index in the batch (what :class:`RegionPooling` takes)."""
    return torch.cat(
        [
            torch.cat([torch.full_like(image_boxes[:, :1], index), image_boxes], dim=1)
            for index, image_boxes in enumerate(boxes)
        ]
    )


class PhrasePooling(nn.Module):
    """``input_ids, attention_mask (P, T)`` -> unit-norm embeddings ``(P, dim)`` float32: the
    mean of the encoder's token states (``last_hidden_state``) over the mask."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = self.model(input_ids=input_ids, attention_mask=attention_mask)
        states = states.last_hidden_state.float()
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        mean = (states * mask).sum(1) / mask.sum(1).clamp(min=1)
        return F.normalize(mean, dim=1)
