"""Heads: what scores a (phrase, region) pair from their features.

Every head has one interface, :class:`Head`: embed regions, embed phrases, score aligned pairs
of embeddings. Embedding each distinct region and phrase once and scoring the pairs of them is
what makes scoring a grid of ``P x N`` pairs cheap; :mod:`grounding.modeling.scoring` is the
one path that does it, for training, the threshold sweep, the report and the grounder. A head
is one entry of :data:`HEADS` (``train.head`` in ``params.yaml``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from grounding.boxes import GEOMETRY_COLUMNS
from grounding.errors import ConfigError, DataError


@dataclass(frozen=True)
class HeadConfig:
    """The shape of a head (saved with its weights)."""

    region_dim: int
    phrase_dim: int
    hidden: int
    dropout: float


class Head(nn.Module):
    """The interface of a head: ``embed_regions (N, region_dim) -> (N, D)``, ``embed_phrases
    (P, phrase_dim) -> (P, D)``, ``score (B, D), (B, D) -> logits (B,)`` of aligned pairs."""

    config: HeadConfig

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


#: The heads ``train.head`` may name: name -> constructor from a :class:`HeadConfig`.
HEADS: dict[str, Callable[[HeadConfig], Head]] = {
    "matching": MatchingHead,
    "matching_prior": PriorMatchingHead,
}


def build_head(name: str, config: HeadConfig) -> Head:
    """A new head ``name``; :class:`ConfigError` listing the known heads otherwise."""
    if name not in HEADS:
        raise ConfigError(f"train.head: unknown head {name!r}; known: {sorted(HEADS)}")
    return HEADS[name](config)


def head_name(head: Head) -> str:
    """The registry name of ``head``'s type."""
    return next(name for name, make in HEADS.items() if make is type(head))


def head_config(head: Head) -> dict[str, Any]:
    """What rebuilds ``head`` beside its weights: ``{"name": ..., "config": {...}}``."""
    return {"name": head_name(head), "config": asdict(head.config)}


def head_from_weights(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Head:
    """Rebuild a head from :func:`head_config`'s output and its ``state_dict``, in eval mode;
    :class:`DataError` when they do not describe a head of this package."""
    try:
        head = build_head(config["name"], HeadConfig(**config["config"]))
        head.load_state_dict(tensors)
    except (KeyError, TypeError, RuntimeError, ConfigError) as error:
        raise DataError(f"not a head of this project ({error})") from None
    return head.eval()
