"""The grounder's three models as ONNX graphs, for onnxruntime: region features (trunk and
RoIAlign), the text encoder (transformer and mean pooling) and the head (every phrase with
every region). The graphs are traced from the very modules the eager path runs
(:mod:`grounding.modeling.pooling`, :class:`~grounding.modeling.scoring.GridScorer`): no
second copy of a computation. Written to files by :mod:`grounding.inference.onnx_grounder`.

The graphs are traced by torch's TorchScript exporter (``dynamo=False``: seconds where the
dynamo exporter took over half an hour for EfficientNet here, and torchvision registers its
``roi_align`` as ONNX ``RoiAlign`` for it), with the image size and the numbers of boxes,
phrases and tokens as dynamic axes. Tracing records Python arithmetic on shapes as constants,
so the EfficientNet-Lite convolutions that compute their "same" padding from the input size
are replaced by a fixed padding first: for sides that are multiples of the trunk's stride, as
:func:`~grounding.modeling.region_features.normalised_image` pads them, that padding is the
same for every size (tests compare the graphs with torch on images of several shapes).
"""

from __future__ import annotations

import copy
import dataclasses
import io
import warnings
from typing import Any

import torch
from torch import nn

from grounding.modeling.backbones import Backbone
from grounding.modeling.head import Head
from grounding.modeling.pooling import RegionPooling
from grounding.modeling.scoring import GridScorer
from grounding.modeling.text import TextEncoder

#: ONNX opset of the exported graphs (RoiAlign with ``coordinate_transformation_mode`` needs 16;
#: torchvision maps ``aligned=True`` to ``half_pixel`` from there).
OPSET = 17


def onnx_models(backbone: Backbone, encoder: TextEncoder, head: Head) -> dict[str, bytes]:
    """The serialised ONNX graphs ``{"regions", "text", "head"}`` of the modules the eager path
    runs: :class:`~grounding.modeling.pooling.RegionPooling` (``image (1, 3, H, W), rois (N,
    5) -> features (N, channels)``), the encoder's own pooling
    (:attr:`~grounding.modeling.text.TextEncoder.pooling`: ``input_ids, attention_mask (P, T)
    -> embeddings (P, dim)``) and
    :class:`~grounding.modeling.scoring.GridScorer` (``regions (N, region_dim), phrases (P,
    phrase_dim) -> probabilities (P, N)``)."""
    stride = backbone.stride
    trunk = _with_fixed_padding(backbone).trunk
    ids = torch.tensor([[1, 2, 3, 2], [1, 3, 2, 0]])  # ids every vocabulary has
    mask = (ids != 0).to(torch.int64)
    phrases, tokens = {0: "phrases", 1: "tokens"}, {0: "phrases", 1: "tokens"}
    return {
        "regions": _export(
            RegionPooling(trunk, stride),
            (
                torch.zeros(1, 3, 3 * stride, 2 * stride),
                torch.tensor(
                    [[0.0, 0.0, 0.0, 2.0 * stride, 3.0 * stride], [0.0, 1.0, 2.0, 9.0, 7.0]]
                ),
            ),
            {"image": {2: "height", 3: "width"}, "rois": {0: "boxes"}},
            {"features": {0: "boxes"}},
        ),
        "text": _export(
            encoder.pooling,
            (ids, mask),
            {"input_ids": phrases, "attention_mask": tokens},
            {"embeddings": {0: "phrases"}},
        ),
        "head": _export(
            GridScorer(head),
            (
                torch.zeros(3, head.config.region_dim),
                torch.zeros(2, head.config.phrase_dim),
            ),
            {"regions": {0: "boxes"}, "phrases": {0: "phrases"}},
            {"probabilities": {0: "phrases", 1: "boxes"}},
        ),
    }


def _export(
    model: nn.Module,
    example: tuple[torch.Tensor, ...],
    inputs: dict[str, dict[int, str]],
    outputs: dict[str, dict[int, str]],
) -> bytes:
    model.eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # the tracer's notes on shapes read as constants
        torch.onnx.export(
            model,
            example,
            buffer,
            dynamo=False,
            input_names=list(inputs),
            output_names=list(outputs),
            dynamic_axes={**inputs, **outputs},
            opset_version=OPSET,
        )
    return buffer.getvalue()


def _with_fixed_padding(backbone: Backbone) -> Backbone:
    """``backbone`` with every convolution that computes its "same" padding from the input's
    size (EfficientNet-Lite's ``Conv2dDynamicSamePadding``) replaced by a copy with the padding
    that sides divisible by the stride get; other trunks are returned as they are."""
    try:
        from efficientnet_lite_pytorch.utils import Conv2dDynamicSamePadding
    except ModuleNotFoundError:
        return backbone
    dynamic = [m for m in backbone.trunk.modules() if isinstance(m, Conv2dDynamicSamePadding)]
    if not dynamic:
        return backbone
    trunk = copy.deepcopy(backbone.trunk)
    _replace_same_padding(trunk, Conv2dDynamicSamePadding)
    return dataclasses.replace(backbone, trunk=trunk.eval())


def _replace_same_padding(module: nn.Module, kind: type) -> None:
    for name, child in module.named_children():
        if isinstance(child, kind):
            setattr(module, name, _fixed_padding(child))
        else:
            _replace_same_padding(child, kind)


def _fixed_padding(conv: nn.Conv2d) -> nn.Sequential:
    """TensorFlow's "same" padding of ``conv`` for an input side divisible by its stride:
    ``(k - 1) * d + 1 - s`` in all, the smaller half first (the top and left)."""
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation

    def total(kernel: int, stride: int, dilation: int) -> int:
        return max((kernel - 1) * dilation + 1 - stride, 0)

    ph, pw = total(kh, sh, dh), total(kw, sw, dw)
    fixed = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        0,
        conv.dilation,
        conv.groups,
        conv.bias is not None,
    )
    fixed.load_state_dict(conv.state_dict())
    return nn.Sequential(nn.ZeroPad2d((pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)), fixed)


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
        "text_encoder": {"dim": int(encoder.dim), "max_tokens": encoder.max_tokens},
    }
