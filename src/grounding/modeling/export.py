"""The grounder's three models as ONNX graphs, for onnxruntime: region features (trunk and
RoIAlign), the text encoder (transformer and mean pooling) and the head (every phrase with
every region). Written to files by :mod:`grounding.inference.onnx_grounder`.

The graphs are made with torch's dynamo exporter (``torch.onnx.export(..., dynamo=True)``),
whose symbolic shapes keep the image size, the number of boxes, phrases and tokens dynamic
(the TorchScript exporter bakes the traced image's padding into EfficientNet's "same"
convolutions). The image's sides are multiples of the trunk's stride, as
:func:`~grounding.modeling.region_features.normalised_image` pads them.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.ops import roi_align

from grounding.modeling.backbones import Backbone
from grounding.modeling.head import Head
from grounding.modeling.text import _MAX_TOKENS, TextEncoder

if TYPE_CHECKING:
    from collections.abc import Sequence

#: ONNX opset of the exported graphs (RoiAlign with ``coordinate_transformation_mode`` needs 16).
OPSET = 18


class RegionModel(nn.Module):
    """``image (1, 3, H, W)``, ``boxes (N, 4)`` in its pixels -> ``features (N, channels)``:
    the trunk's map average-pooled in each box as
    :func:`~grounding.modeling.region_features.region_features` pools it."""

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.trunk = backbone.trunk
        self.stride = backbone.stride

    def forward(self, image: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        maps = self.trunk(image)
        rois = torch.cat([torch.zeros_like(boxes[:, :1]), boxes], dim=1)
        return roi_align(
            maps,
            rois,
            output_size=1,
            spatial_scale=1 / self.stride,
            sampling_ratio=0,
            aligned=True,
        ).flatten(1)


class TextModel(nn.Module):
    """``input_ids, attention_mask (P, T)`` -> unit-norm mean token states ``(P, dim)``, as
    :func:`~grounding.modeling.text.encode_phrases` computes them."""

    def __init__(self, encoder: TextEncoder) -> None:
        super().__init__()
        self.model = encoder.model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        mean = (states * mask).sum(1) / mask.sum(1).clamp(min=1)
        return F.normalize(mean, dim=1)


class GridModel(nn.Module):
    """``regions (N, region_dim)``, ``phrases (P, phrase_dim)`` -> probabilities ``(P, N)``,
    as :func:`~grounding.modeling.scoring.score_grid` computes them."""

    def __init__(self, head: Head) -> None:
        super().__init__()
        self.head = head

    def forward(self, regions: torch.Tensor, phrases: torch.Tensor) -> torch.Tensor:
        region_embeddings = self.head.embed_regions(regions)
        phrase_embeddings = self.head.embed_phrases(phrases)
        n_phrases, n_regions = phrase_embeddings.shape[0], region_embeddings.shape[0]
        logits = self.head.score(
            region_embeddings.unsqueeze(0).expand(n_phrases, -1, -1),
            phrase_embeddings.unsqueeze(1).expand(-1, n_regions, -1),
        )
        return torch.sigmoid(logits)


def onnx_models(backbone: Backbone, encoder: TextEncoder, head: Head) -> dict[str, bytes]:
    """The serialised ONNX graphs ``{"regions", "text", "head"}`` (inputs and outputs named as
    in :mod:`grounding.inference.onnx_grounder`)."""
    stride, dim = backbone.stride, head.config.region_dim
    height, width = torch.export.Dim("height", max=512), torch.export.Dim("width", max=512)
    boxes, phrases = torch.export.Dim("boxes", max=100_000), torch.export.Dim("phrases")
    tokens = torch.export.Dim("tokens", max=_MAX_TOKENS)
    ids = torch.tensor([[101, 1037, 2158, 102], [101, 2158, 102, 0]])
    mask = (ids != 0).to(torch.int64)
    return {
        "regions": _export(
            RegionModel(backbone),
            (
                torch.zeros(1, 3, 3 * stride, 2 * stride),
                torch.tensor([[0.0, 0.0, 2.0 * stride, 3.0 * stride], [1.0, 2.0, 9.0, 7.0]]),
            ),
            ("image", "boxes"),
            ("features",),
            {"image": {2: stride * height, 3: stride * width}, "boxes": {0: boxes}},
        ),
        "text": _export(
            TextModel(encoder),
            (ids, mask),
            ("input_ids", "attention_mask"),
            ("embeddings",),
            {"input_ids": {0: phrases, 1: tokens}, "attention_mask": {0: phrases, 1: tokens}},
        ),
        "head": _export(
            GridModel(head),
            (torch.zeros(3, dim), torch.zeros(2, head.config.phrase_dim)),
            ("regions", "phrases"),
            ("probabilities",),
            {"regions": {0: boxes}, "phrases": {0: phrases}},
        ),
    }


def _roi_align(
    maps: Any,
    rois: Any,
    spatial_scale: float,
    pooled_height: int,
    pooled_width: int,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Any:
    """``torchvision.ops.roi_align`` as ONNX ``RoiAlign`` (the exporter has no translation of
    it): ``rois (K, 5)`` are ``(batch index, x1, y1, x2, y2)``; ``aligned`` is ONNX's
    ``half_pixel`` mode and ``sampling_ratio`` 0 is adaptive in both."""
    from onnxscript import INT64
    from onnxscript import opset18 as op

    batch = op.Cast(op.Squeeze(op.Slice(rois, [0], [1], [1]), [1]), to=INT64.dtype)
    boxes = op.Slice(rois, [1], [5], [1])
    return op.RoiAlign(
        maps,
        boxes,
        batch,
        coordinate_transformation_mode="half_pixel" if aligned else "output_half_pixel",
        mode="avg",
        output_height=pooled_height,
        output_width=pooled_width,
        sampling_ratio=max(int(sampling_ratio), 0),
        spatial_scale=float(spatial_scale),
    )


def _export(
    model: nn.Module,
    example: tuple[torch.Tensor, ...],
    inputs: Sequence[str],
    outputs: Sequence[str],
    dynamic: dict[str, Any],
) -> bytes:
    model.eval()
    with warnings.catch_warnings(), torch.inference_mode(False):
        warnings.simplefilter("ignore")  # the exporter's notes on its own internals
        program = torch.onnx.export(
            model,
            example,
            dynamo=True,
            input_names=list(inputs),
            output_names=list(outputs),
            dynamic_shapes=dynamic,
            opset_version=OPSET,
            custom_translation_table={torch.ops.torchvision.roi_align.default: _roi_align},
            verbose=False,
        )
    if program is None:
        raise RuntimeError("torch.onnx.export returned no program")
    return program.model_proto.SerializeToString()


def tokenizer_json(encoder: TextEncoder) -> str:
    """The encoder's tokenizer as a ``tokenizers`` JSON document; :class:`ValueError` if it is
    not a fast (Rust) tokenizer, the only kind that can be read without transformers."""
    backend = getattr(encoder.tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(
            f"text encoder {encoder.name!r}: its tokenizer is not a fast tokenizer "
            "(no tokenizer.json); it cannot be exported"
        )
    return str(backend.to_str())


def export_settings(backbone: Backbone, encoder: TextEncoder) -> dict[str, Any]:
    """What running the graphs needs beside them: the backbone's stride, channels and
    normalisation, the text encoder's width and token limit."""
    return {
        "backbone": {
            "stride": int(backbone.stride),
            "channels": int(backbone.channels),
            "mean": [float(v) for v in backbone.mean],
            "std": [float(v) for v in backbone.std],
        },
        "text_encoder": {"dim": int(encoder.dim), "max_tokens": _MAX_TOKENS},
    }
