"""The matching head: a score for every (phrase, region) pair from their features.

Both inputs are projected to a shared space; the head scores their elementwise product (the
agreement of phrase and region) next to the projections themselves (what is being asked for,
and what is there), with a small MLP. Output: one logit per pair.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from grounding.errors import DataError


@dataclass(frozen=True)
class HeadConfig:
    """The shape of a :class:`MatchingHead` (saved with its weights)."""

    region_dim: int
    phrase_dim: int
    hidden: int
    dropout: float


class MatchingHead(nn.Module):
    """``(regions (B, region_dim), phrases (B, phrase_dim)) -> logits (B,)``."""

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        self.config = config
        hidden, dropout = config.hidden, config.dropout
        self.region = _projection(config.region_dim, hidden, dropout)
        self.phrase = _projection(config.phrase_dim, hidden, dropout)
        self.score = nn.Sequential(
            nn.Linear(3 * hidden, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, 1)
        )

    def forward(self, regions: torch.Tensor, phrases: torch.Tensor) -> torch.Tensor:
        return self.score_projected(self.region(regions), self.phrase(phrases))

    def score_projected(self, region: torch.Tensor, phrase: torch.Tensor) -> torch.Tensor:
        """Logits ``(B,)`` of pairs already projected by ``self.region`` and ``self.phrase``:
        project each distinct region and phrase once, score all their pairs."""
        return self.score(torch.cat([region * phrase, region, phrase], dim=-1)).squeeze(-1)


def _projection(dim: int, hidden: int, dropout: float) -> nn.Sequential:
    # LayerNorm first: backbone activations and box geometry live on very different scales
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, hidden),
        nn.GELU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, hidden),
    )


def head_state(model: MatchingHead) -> dict:
    """What a checkpoint holds: the config and the weights."""
    return {"config": asdict(model.config), "state_dict": model.state_dict()}


def check_trained_on(state: dict, features_meta: dict) -> None:
    """Raise :class:`DataError` unless the checkpoint ``state`` was trained on features made
    as ``features_meta`` says (same backbone, encoder, sizes)."""
    trained_on = state.get("features")
    if trained_on != features_meta:
        raise DataError(
            f"the model was trained on other features ({trained_on}) than these "
            f"({features_meta}); retrain it (`dvc repro train`)"
        )


def head_from_state(state: dict) -> MatchingHead:
    """Rebuild a :class:`MatchingHead` from :func:`head_state`'s output, in eval mode."""
    model = MatchingHead(HeadConfig(**state["config"]))
    model.load_state_dict(state["state_dict"])
    return model.eval()


@dataclass(frozen=True)
class PairFeatures:
    """Features the pairs point into.

    ``regions (R, region_dim)``: row ``region_id`` is that candidate's features;
    ``phrases (T, phrase_dim)``: one row per distinct phrase text; ``phrase_row``: a Series
    from ``phrase_id`` to its row in ``phrases``.
    """

    regions: np.ndarray
    phrases: np.ndarray
    phrase_row: pd.Series

    @classmethod
    def from_arrays(
        cls, regions: np.ndarray, phrases: np.ndarray, phrase_rows: pd.DataFrame
    ) -> PairFeatures:
        """From the features stage's arrays and its ``phrase_id, row`` table."""
        return cls(regions, phrases, phrase_rows.set_index("phrase_id")["row"])

    def rows(self, pairs: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """The region rows and phrase rows ``(N,), (N,)`` of ``pairs``' ``region_id, phrase_id``."""
        phrase_rows = self.phrase_row.reindex(pairs["phrase_id"]).to_numpy()
        if np.isnan(phrase_rows.astype(np.float64)).any():
            missing = pairs["phrase_id"][np.isnan(phrase_rows.astype(np.float64))].iloc[:5].tolist()
            raise DataError(
                f"phrases without features, e.g. phrase_id {missing}: the features were made "
                "from other pairs; rerun the features stage"
            )
        region_rows = pairs["region_id"].to_numpy()
        if len(region_rows) and region_rows.max() >= len(self.regions):
            raise DataError(
                f"region_id {region_rows.max()} has no features ({len(self.regions)} rows): the "
                "features were made from other candidates; rerun the features stage"
            )
        return region_rows.astype(np.int64), phrase_rows.astype(np.int64)

    def gather(
        self, region_rows: np.ndarray, phrase_rows: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The features of the given rows as tensors ``(B, region_dim), (B, phrase_dim)``."""
        return (
            torch.from_numpy(np.ascontiguousarray(self.regions[region_rows])),
            torch.from_numpy(np.ascontiguousarray(self.phrases[phrase_rows])),
        )

    def batches(
        self, region_rows: np.ndarray, phrase_rows: np.ndarray, batch_size: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`gather` over consecutive batches of rows: memory bounded by the batch."""
        for start in range(0, len(region_rows), batch_size):
            stop = start + batch_size
            yield self.gather(region_rows[start:stop], phrase_rows[start:stop])


@torch.inference_mode()
def score_pairs(
    model: MatchingHead, features: PairFeatures, pairs: pd.DataFrame, *, batch_size: int = 4096
) -> np.ndarray:
    """Probabilities ``(N,)`` that each pair matches (sigmoid of the head's logits)."""
    model.eval()
    region_rows, phrase_rows = features.rows(pairs)
    scores = [
        torch.sigmoid(model(regions, phrases)).numpy()
        for regions, phrases in features.batches(region_rows, phrase_rows, batch_size)
    ]
    return np.concatenate(scores) if scores else np.empty(0, dtype=np.float32)
