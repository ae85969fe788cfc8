"""Small stand-ins for the real models, for the fast tests: a backbone whose region features
are known by hand, a text encoder of word vectors, seeded random heads, and a grounder made of
them. The slow tests load the packaged models instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.normalizers import Lowercase
from tokenizers.pre_tokenizers import WhitespaceSplit

from grounding.inference.grounder import Grounder, TorchScorer
from grounding.modeling import backbones, text
from grounding.modeling.backbones import IMAGENET_MEAN, IMAGENET_STD, Backbone
from grounding.modeling.head import HeadConfig, MatchingHead
from grounding.modeling.scoring import TrainedHead
from grounding.modeling.text import TextEncoder
from grounding.registry import Entry, Registry
from grounding.schemas import FeaturesMeta

#: The name under which :func:`install` registers :func:`pooling_backbone`.
POOLING = "average-pooling"
#: The name under which :func:`install` serves :func:`word_encoder`.
WORDS = "word-vectors"

#: Word vectors of :func:`word_encoder` (3 values each); any other word is ``UNKNOWN``.
WORD_VECTORS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "blue": (0.0, 1.0, 0.0),
    "box": (0.0, 0.0, 1.0),
    "a": (1.0, 1.0, 1.0),
}
UNKNOWN = (0.0, 2.0, 1.0)
#: The vector of the padding token: far from every word, so padding that leaks into a mean shows.
PADDING = (50.0, -50.0, 50.0)

#: Selective search settings that find the two rectangles of :func:`two_shapes`.
SETTINGS = {"mode": "fast", "max_side": 300, "min_size": 8, "dedupe_iou": 0.7, "max_proposals": 50}


def pooling_backbone() -> Backbone:
    """A trunk of 8 x 8 average pooling: a region's feature is its mean normalised colour."""
    return Backbone(POOLING, torch.nn.AvgPool2d(8), 8, 3, IMAGENET_MEAN, IMAGENET_STD)


class WordTokenizer:
    """Splits on spaces; called as a Hugging Face tokenizer is by ``encode_phrases``."""

    def __init__(self, words: Sequence[str]) -> None:
        self.ids = {word: index + 2 for index, word in enumerate(words)}  # 0: padding, 1: unknown

    @property
    def backend_tokenizer(self) -> Tokenizer:
        """The same tokenizer as a ``tokenizers`` one (what an ONNX export saves)."""
        vocab = {"[PAD]": 0, "[UNK]": 1, **self.ids}
        tokenizer = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
        tokenizer.normalizer = Lowercase()
        tokenizer.pre_tokenizer = WhitespaceSplit()
        return tokenizer

    def __call__(
        self, texts: list[str], *, padding: bool, truncation: bool, max_length: int, **_: object
    ) -> dict[str, torch.Tensor]:
        rows = [[self.ids.get(word, 1) for word in t.lower().split()][:max_length] for t in texts]
        width = max([len(row) for row in rows] + [1])
        return {
            "input_ids": torch.tensor([row + [0] * (width - len(row)) for row in rows]),
            "attention_mask": torch.tensor(
                [[1] * len(row) + [0] * (width - len(row)) for row in rows]
            ),
        }


class WordVectorModel(torch.nn.Module):
    """Each token's state is its word vector (no context)."""

    def __init__(self, vectors: torch.Tensor) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding.from_pretrained(vectors)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(last_hidden_state=self.embedding(input_ids))


def word_encoder() -> TextEncoder:
    """A text encoder whose embedding of a phrase is the normalised mean of its word vectors."""
    vectors = torch.tensor([PADDING, UNKNOWN, *WORD_VECTORS.values()], dtype=torch.float32)
    return TextEncoder(WORDS, WordTokenizer(list(WORD_VECTORS)), WordVectorModel(vectors), 3)


def random_head(
    region_dim: int, phrase_dim: int, *, hidden: int = 8, seed: int = 0
) -> MatchingHead:
    """An untrained matching head in eval mode, the same for the same seed."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return MatchingHead(HeadConfig(region_dim, phrase_dim, hidden, 0.0)).eval()


def features_meta(**changes: object) -> FeaturesMeta:
    """How features would be made with the stand-ins (context on: region_dim 2 * 3 + 7)."""
    values = {
        "backbone": POOLING,
        "backbone_weights": None,
        "text_encoder": WORDS,
        "image_size": 64,
        "context": True,
        "region_dim": 13,
        "phrase_dim": 3,
        "regions": 10,
        "phrases": 4,
        **changes,
    }
    return FeaturesMeta(**values)  # type: ignore[arg-type]


def trained_head(seed: int = 0) -> TrainedHead:
    meta = features_meta()
    return TrainedHead(random_head(meta.region_dim, meta.phrase_dim, seed=seed), meta)


def grounder(threshold: float = 0.5, seed: int = 0) -> Grounder:
    """A grounder of the stand-ins, proposing with selective search under :data:`SETTINGS`."""
    return Grounder(
        TorchScorer(trained_head(seed), pooling_backbone(), word_encoder()),
        threshold=threshold,
        candidates="selective_search",
        settings=dict(SETTINGS),
    )


def write_grounder(path: Path) -> Path:
    """Write the weights file of :func:`trained_head` as a selective-search grounder to
    ``path`` (loadable by name once :func:`install` ran); return ``path``."""
    from grounding.inference.grounder import grounder_weights
    from grounding.io import write_weights

    weights = grounder_weights(
        trained_head(), threshold=0.5, candidates="selective_search", settings=SETTINGS
    )
    write_weights(*weights, path)
    return path


def packaged_head() -> TrainedHead:
    """An untrained head on the packaged models' features (EfficientNet-Lite0 with context at
    224 px, all-MiniLM-L6-v2): for the plumbing around the real models, not their quality."""
    meta = FeaturesMeta(
        backbone="efficientnet-lite0",
        backbone_weights=None,
        text_encoder="all-minilm-l6-v2",
        image_size=224,
        context=True,
        region_dim=2 * 1280 + 7,
        phrase_dim=384,
        regions=0,
        phrases=0,
    )
    return TrainedHead(random_head(meta.region_dim, meta.phrase_dim, hidden=16), meta)


@contextmanager
def registered(
    registry: Registry[Any], name: str, make: Callable[..., Any], settings: type | None = None
) -> Iterator[None]:
    """``make`` registered in ``registry`` as ``name`` for the ``with`` block."""
    registry.add(name, make, settings=settings)
    try:
        yield
    finally:
        registry.remove(name)


def install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the stand-ins loadable by name (:data:`POOLING`, :data:`WORDS`), so that a weights
    file of :func:`trained_head` rebuilds into a grounder without the packaged models."""
    for registry, name, make in [
        (backbones.BACKBONES, POOLING, lambda **_: pooling_backbone()),
        (text.TEXT_ENCODERS, WORDS, lambda **_: word_encoder()),
    ]:
        monkeypatch.setitem(registry._entries, name, Entry(name, make))  # undone after the test


def two_shapes() -> Image.Image:
    """A grey image with a red and a blue rectangle: what any proposal method must find."""
    image = Image.new("RGB", (240, 160), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    draw.rectangle((20, 30, 89, 119), fill=(220, 30, 30))  # box (20, 30, 90, 120)
    draw.rectangle((140, 50, 219, 99), fill=(30, 30, 220))  # box (140, 50, 220, 100)
    return image


#: The rectangles of :func:`two_shapes` as ``(x1, y1, x2, y2)``.
TWO_SHAPES = np.array([[20, 30, 90, 120], [140, 50, 220, 100]], dtype=np.float32)
