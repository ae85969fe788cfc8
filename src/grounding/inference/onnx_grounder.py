"""A grounder exported to ONNX, run with onnxruntime: the same answers as the torch grounder
without importing torch, transformers or mlflow (a fresh ``grounding predict`` starts in about
a second instead of several).

``grounding export --format onnx`` writes a folder (:func:`export_onnx`):

- ``regions.onnx``: :class:`~grounding.modeling.pooling.RegionPooling` (the backbone's trunk
  and RoIAlign), ``image (1, 3, H, W)`` (normalised and padded as
  :func:`~grounding.modeling.region_features.normalised_image` makes it) and ``rois (N, 5)``
  (0, then the box in pixels of that image) -> ``features (N, channels)``;
- ``text_encoder.onnx``: the text encoder's own pooling
  (:class:`~grounding.modeling.pooling.PhrasePooling`, a transformer and its mean pooling, or
  a CLIP or SigLIP text tower), ``input_ids, attention_mask (P, T)`` -> unit-norm
  ``embeddings (P, dim)``; ``tokenizer.json`` its tokenizer (read with the ``tokenizers``
  package);
- ``head.onnx``: :class:`~grounding.modeling.scoring.GridScorer`, ``regions (N, region_dim),
  phrases (P, phrase_dim)`` -> match ``probabilities (P, N)``;
- ``grounder.json``: the threshold, the candidate generator and its settings, how the
  features are made (image size, context, the backbone's stride and normalisation), the
  head's config and the data the grounder was trained on. JSON and ONNX only: loading an
  export never unpickles anything.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from grounding import io
from grounding.errors import ConfigError, DataError
from grounding.inference.grounder import Grounder, TrainedOn, proposer_of
from grounding.modeling.region_features import (
    assemble_features,
    normalised_image,
    scaled_boxes,
    with_whole_image,
)
from grounding.registry import Registry
from grounding.schemas import FeaturesMeta

if TYPE_CHECKING:
    import onnxruntime

#: The file that marks a folder as an ONNX export, and holds everything but the models.
CONFIG_FILE = "grounder.json"
#: What ``grounder.json`` says it is, and the layout version this module reads.
FORMAT = "grounding-onnx"
VERSION = 2  # 2: regions.onnx takes ``rois (N, 5)``
MODEL_FILES = {"regions": "regions.onnx", "text": "text_encoder.onnx", "head": "head.onnx"}
TOKENIZER_FILE = "tokenizer.json"


def is_onnx_export(path: Path) -> bool:
    """Whether ``path`` is a folder written by :func:`export_onnx`."""
    return (Path(path) / CONFIG_FILE).is_file()


def export_onnx(grounder: Grounder, folder: Path) -> list[Path]:
    """Write ``grounder`` as an ONNX export into ``folder`` (see the module docstring); return
    the files written. ``grounder.json`` is written last: a folder without it is no export.
    :class:`DataError` if the grounder's scorer cannot be exported (it is an export already)."""
    models, tokenizer, settings = grounder.scorer.onnx_parts()
    folder = Path(folder)
    written = []
    for key, content in models.items():
        io.write_bytes(content, folder / MODEL_FILES[key])
        written.append(folder / MODEL_FILES[key])
    io.write_text(tokenizer, folder / TOKENIZER_FILE)
    written.append(folder / TOKENIZER_FILE)
    config = {
        "format": FORMAT,
        "version": VERSION,
        "threshold": float(grounder.threshold),
        "candidates": {"name": grounder.candidates, "settings": dict(grounder.settings)},
        "features": grounder.features.to_dict(),
        **settings,
    }
    if grounder.trained_on is not None:
        config["data"] = grounder.trained_on.to_dict()
    io.write_json(config, folder / CONFIG_FILE)
    return [*written, folder / CONFIG_FILE]


def load_export(folder: Path, *, threads: int = 0) -> Grounder:
    """The grounder of an export written by :func:`export_onnx`, scoring with onnxruntime;
    :class:`DataError` when ``folder`` is not one (or one of another layout version).
    ``threads``: onnxruntime's intra-op threads (0: its default, one per core)."""
    import onnxruntime
    from tokenizers import Tokenizer

    folder = Path(folder)
    config = io.read_json(folder / CONFIG_FILE)
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise DataError(f"{folder}: {CONFIG_FILE} is not a grounder's ONNX export")
    if config.get("version") != VERSION:
        raise DataError(
            f"{folder}: ONNX export version {config.get('version')}; this install reads "
            f"version {VERSION} (export the grounder again with `grounding export`)"
        )
    try:
        name, settings = proposer_of(config)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        sessions = {
            key: onnxruntime.InferenceSession(
                str(folder / file), options, providers=["CPUExecutionProvider"]
            )
            for key, file in MODEL_FILES.items()
        }
        tokenizer = Tokenizer.from_file(str(folder / TOKENIZER_FILE))
        scorer = OnnxScorer(sessions, tokenizer, config)
        trained_on = TrainedOn.from_config(config)
        threshold = float(config["threshold"])
    except (KeyError, TypeError) as error:
        raise DataError(f"{folder}: not a grounder's ONNX export (no {error})") from None
    except Exception as error:  # onnxruntime and tokenizers raise their own types
        if isinstance(error, DataError | ConfigError):
            raise
        message = " ".join(str(error).split())[:300]
        raise DataError(f"{folder}: cannot load the ONNX export ({message})") from None
    tokenizer.no_padding()
    tokenizer.enable_truncation(int(config["text_encoder"]["max_tokens"]))
    return Grounder(
        scorer, threshold=threshold, candidates=name, settings=settings, trained_on=trained_on
    )


class OnnxScorer:
    """A :class:`~grounding.inference.grounder.Scorer` of an ONNX export: the graphs of the
    pipeline's modules run with onnxruntime on the CPU, without torch."""

    def __init__(
        self,
        sessions: dict[str, onnxruntime.InferenceSession],
        tokenizer: Any,
        config: dict[str, Any],
    ) -> None:
        self.sessions = sessions
        self.tokenizer = tokenizer
        self.config = config
        self._features = FeaturesMeta.from_dict(config["features"])

    @property
    def features(self) -> FeaturesMeta:
        return self._features

    def place(self, device: str, where: str) -> None:
        """``auto`` and ``cpu`` keep the export on onnxruntime's CPU without importing torch;
        a GPU is refused."""
        if device not in ("auto", "cpu"):
            raise ConfigError(
                f"{where} {device}: an ONNX export runs on the CPU (onnxruntime); "
                "load the torch grounder (its .safetensors file) to use a GPU"
            )

    def out_of_memory_hint(self, advice: str) -> AbstractContextManager[object]:
        return nullcontext()

    def onnx_parts(self) -> tuple[dict[str, bytes], str, dict[str, Any]]:
        raise DataError("the grounder is an ONNX export already; export its torch grounder")

    def score(self, image: Image.Image, boxes: np.ndarray, phrases: Sequence[str]) -> np.ndarray:
        """Match probabilities ``(len(phrases), len(boxes))``, as
        :meth:`~grounding.inference.grounder.TorchScorer.score` computes them."""
        return self.sessions["head"].run(
            None,
            {"regions": self.region_features(image, boxes), "phrases": self.encode(phrases)},
        )[0]

    def region_features(self, image: Image.Image, boxes: np.ndarray) -> np.ndarray:
        """Features ``(N, region_dim)`` of ``boxes (N, 4)`` on ``image``, as
        :func:`~grounding.modeling.region_features.image_features` makes them."""
        backbone, features = self.config["backbone"], self.features
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        query = with_whole_image(boxes, image.size) if features.context else boxes
        pixels, scale = normalised_image(
            image,
            features.image_size,
            stride=backbone["stride"],
            mean=tuple(backbone["mean"]),
            std=tuple(backbone["std"]),
        )
        scaled = scaled_boxes(query, scale)
        rois = np.concatenate([np.zeros((len(scaled), 1), np.float32), scaled], axis=1)
        visual = self.sessions["regions"].run(None, {"image": pixels[None], "rois": rois})[0]
        return assemble_features(visual, boxes, image.size, features.context)

    def encode(self, phrases: Sequence[str]) -> np.ndarray:
        """Embeddings ``(P, dim)`` float32, unit norm, of ``phrases``, as
        :func:`~grounding.modeling.text.encode_phrases` makes them."""
        unique, inverse = np.unique(np.array(list(phrases), dtype=str), return_inverse=True)
        encodings = self.tokenizer.encode_batch([str(text) for text in unique])
        width = max(len(encoding.ids) for encoding in encodings)
        ids = np.zeros((len(encodings), width), dtype=np.int64)
        mask = np.zeros((len(encodings), width), dtype=np.int64)
        for row, encoding in enumerate(encodings):
            ids[row, : len(encoding.ids)] = encoding.ids
            mask[row, : len(encoding.ids)] = 1
        embeddings = self.sessions["text"].run(None, {"input_ids": ids, "attention_mask": mask})[0]
        return embeddings[inverse.reshape(-1)]


#: ``grounding export --format``: each builds the writer of a grounder into a folder.
EXPORT_FORMATS: Registry[Callable[[Grounder, Path], list[Path]]] = Registry(
    "export format", "--format"
)
EXPORT_FORMATS.add("onnx", lambda: export_onnx)
