"""Heads: what scores a (phrase, region) pair from their features.

Every head has one interface, :class:`Head`: embed regions, embed phrases, score aligned pairs
of embeddings. Embedding each distinct region and phrase once and scoring the pairs of them is
what makes scoring a grid of ``P x N`` pairs cheap; :mod:`grounding.modeling.scoring` is the
one path that does it, for training, the threshold sweep, the report and the grounder. A head
is one entry of :data:`HEADS` (``train.head`` in ``params.yaml``) with the dataclass of its
settings (``heads.<name>``), built as ``make(settings, *, region_dim, phrase_dim)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from grounding.boxes import GEOMETRY_COLUMNS
from grounding.errors import ConfigError, DataError
from grounding.registry import Registry


@dataclass(frozen=True)
class MatchingSettings:
    """``heads.matching`` (and ``heads.matching_prior``) in ``params.yaml``: the width of the
    shared space and the dropout of the MLPs."""

    hidden: int = 256
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.hidden < 1 or not 0.0 <= self.dropout < 1.0:
            raise ValueError(
                f"expected hidden >= 1 and dropout in [0, 1), got {self.hidden}, {self.dropout}"
            )


@dataclass(frozen=True)
class HeadConfig:
    """The shape of a matching head (saved with its weights): its inputs' widths and its
    :class:`MatchingSettings`."""

    region_dim: int
    phrase_dim: int
    hidden: int
    dropout: float


class Head(nn.Module):
    """The interface of a head: ``embed_regions (N, region_dim) -> (N, D)``, ``embed_phrases
    (P, phrase_dim) -> (P, D)``, ``score (B, D), (B, D) -> logits (B,)`` of aligned pairs.
    ``name`` is its registry name; ``config`` (a dataclass with ``region_dim`` and
    ``phrase_dim`` and its settings) is saved with its weights."""

    name: ClassVar[str]
    config: Any

    def embed_regions(self, regions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def embed_phrases(self, phrases: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def score(self, regions: torch.Tensor, phrases: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class MatchingHead(Head):
    """Both inputs are projected to a shared space; a small MLP scores their elementwise
    product (the agreement of phrase and region) next to the projections themselves (what is
    being asked for, and what is there). Output: one logit per pair."""

    name = "matching"

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        self.config = config
        hidden, dropout = config.hidden, config.dropout
        self.region = _projection(config.region_dim, hidden, dropout)
        self.phrase = _projection(config.phrase_dim, hidden, dropout)
        self.scorer = nn.Sequential(
            nn.Linear(3 * hidden, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, 1)
        )

    def embed_regions(self, regions: torch.Tensor) -> torch.Tensor:
        return self.region(regions)

    def embed_phrases(self, phrases: torch.Tensor) -> torch.Tensor:
        return self.phrase(phrases)

    def score(self, regions: torch.Tensor, phrases: torch.Tensor) -> torch.Tensor:
        return self.scorer(torch.cat([regions * phrases, regions, phrases], dim=-1)).squeeze(-1)


class PriorMatchingHead(MatchingHead):
    """:class:`MatchingHead` plus a phrase-conditioned box prior: a second MLP scores the box's
    geometry (the last ``len(GEOMETRY_COLUMNS)`` region features: position and size relative to
    the image) against the phrase's projection, and its logit is added. "the sky" is wide and
    high, "a shirt" small and central: the matching MLP sees the geometry only after it is mixed
    into the visual channels by one LayerNorm and projection; here it has a path of its own."""

    name = "matching_prior"

    def __init__(self, config: HeadConfig) -> None:
        super().__init__(config)
        hidden, dropout = config.hidden, config.dropout
        self.prior = nn.Sequential(
            nn.Linear(hidden + _GEOMETRY, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, 1),
        )

    def embed_regions(self, regions: torch.Tensor) -> torch.Tensor:
        """``(N, region_dim) -> (N, hidden + 7)``: the projection, then the raw geometry."""
        return torch.cat([self.region(regions), regions[:, -_GEOMETRY:]], dim=-1)

    def score(self, regions: torch.Tensor, phrases: torch.Tensor) -> torch.Tensor:
        # ...: the grid of the ONNX export scores (P, N, dim) blocks, training (pairs, dim) rows
        projected, geometry = regions[..., :-_GEOMETRY], regions[..., -_GEOMETRY:]
        prior = self.prior(torch.cat([phrases, geometry], dim=-1)).squeeze(-1)
        return super().score(projected, phrases) + prior


_GEOMETRY = len(GEOMETRY_COLUMNS)


def _projection(dim: int, hidden: int, dropout: float) -> nn.Sequential:
    # LayerNorm first: backbone activations and box geometry live on very different scales
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, hidden),
        nn.GELU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, hidden),
    )


def _matching(head: type[MatchingHead]) -> Any:
    def make(settings: MatchingSettings, *, region_dim: int, phrase_dim: int) -> Head:
        return head(HeadConfig(region_dim, phrase_dim, settings.hidden, settings.dropout))

    return make


#: The heads ``train.head`` may name, with their settings in the section ``heads``.
HEADS: Registry[Head] = Registry("head", "train.head", "heads")
for _head in (MatchingHead, PriorMatchingHead):
    HEADS.add(_head.name, _matching(_head), settings=MatchingSettings)


def build_head(
    name: str, *, region_dim: int, phrase_dim: int, sections: Mapping[str, Any] | None = None
) -> Head:
    """A new head ``name`` for inputs of these widths, with its settings from ``sections`` (the
    ``heads`` params section); :class:`ConfigError` listing the known heads otherwise."""
    return HEADS.build(name, sections, region_dim=region_dim, phrase_dim=phrase_dim)


def head_config(head: Head) -> dict[str, Any]:
    """What rebuilds ``head`` beside its weights: ``{"name": ..., "config": {...}}``."""
    return {"name": head.name, "config": asdict(head.config)}


def head_from_weights(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Head:
    """Rebuild a head from :func:`head_config`'s output and its ``state_dict``, in eval mode;
    :class:`DataError` when they do not describe a head of this package."""
    try:
        shape = dict(config["config"])
        dims = {"region_dim": shape.pop("region_dim"), "phrase_dim": shape.pop("phrase_dim")}
        head = build_head(config["name"], **dims, sections={config["name"]: shape})
        head.load_state_dict(tensors)
    except (KeyError, TypeError, RuntimeError, ConfigError) as error:
        raise DataError(f"not a head of this project ({error})") from None
    return head.eval()
