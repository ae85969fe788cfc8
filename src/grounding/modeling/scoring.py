"""Scoring pairs: the one path from features to a head's logits, and a trained head with the
features it expects.

:func:`pair_logits` embeds each distinct region and phrase once and scores the pairs of them;
training, the threshold sweep, the report and the grounder (:class:`GridScorer`, also what the
ONNX export runs) all score through it.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from grounding.errors import DataError
from grounding.io import StoredFeatures
from grounding.modeling.device import module_device
from grounding.modeling.head import Head, head_config, head_from_weights
from grounding.schemas import FeaturesMeta


def pair_logits(
    head: Head,
    regions: torch.Tensor,
    phrases: torch.Tensor,
    region_index: torch.Tensor,
    phrase_index: torch.Tensor,
) -> torch.Tensor:
    """Logits ``(B,)`` of the pairs ``(regions[region_index[i]], phrases[phrase_index[i]])``.

    ``regions (N, region_dim)`` and ``phrases (P, phrase_dim)`` are features, each embedded
    once; ``region_index, phrase_index (B,)`` pick the pairs.
    """
    return head.score(
        head.embed_regions(regions)[region_index], head.embed_phrases(phrases)[phrase_index]
    )


class GridScorer(nn.Module):
    """``regions (N, region_dim)``, ``phrases (P, phrase_dim)`` -> match probabilities ``(P,
    N)`` of every phrase with every region: :func:`pair_logits` of the whole grid (what the
    grounder runs, eager and as ONNX)."""

    def __init__(self, head: Head) -> None:
        super().__init__()
        self.head = head

    def forward(self, regions: torch.Tensor, phrases: torch.Tensor) -> torch.Tensor:
        n_phrases, n_regions = phrases.shape[0], regions.shape[0]
        grid = (n_phrases, n_regions)
        region_index = torch.arange(n_regions, device=regions.device)[None, :].expand(grid)
        phrase_index = torch.arange(n_phrases, device=phrases.device)[:, None].expand(grid)
        logits = pair_logits(
            self.head, regions, phrases, region_index.reshape(-1), phrase_index.reshape(-1)
        )
        return torch.sigmoid(logits).reshape(grid)


@torch.inference_mode()
def score_grid(head: Head, regions: np.ndarray, phrases: np.ndarray) -> np.ndarray:
    """Match probabilities ``(P, N)`` of every phrase ``(P, phrase_dim)`` with every region
    ``(N, region_dim)`` (:class:`GridScorer`, where the head's weights are)."""
    head.eval()
    device = module_device(head)
    probabilities = GridScorer(head)(
        torch.from_numpy(regions).to(device), torch.from_numpy(phrases).to(device)
    )
    return probabilities.cpu().numpy()


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

    @classmethod
    def stored(cls, features: StoredFeatures) -> PairFeatures:
        """From the features stage's folder as :func:`grounding.io.read_features` reads it."""
        return cls.from_arrays(features.regions, features.phrases, features.phrase_rows)

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
        self, region_rows: np.ndarray, phrase_rows: np.ndarray, device: torch.device | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The features of the given rows as tensors ``(B, region_dim), (B, phrase_dim)`` (on
        ``device``, default the CPU)."""
        return (
            torch.from_numpy(np.ascontiguousarray(self.regions[region_rows])).to(device),
            torch.from_numpy(np.ascontiguousarray(self.phrases[phrase_rows])).to(device),
        )

    def release_pages(self) -> None:
        """Hand back to the kernel the pages of memory-mapped features read so far: they stay
        in the page cache (a later read is fast) but leave this process's resident memory, so
        reading every region's features once per epoch never makes it hold the whole file.
        Arrays in memory are left alone."""
        for array in (self.regions, self.phrases):
            mapping = getattr(array, "_mmap", None)  # set by numpy.memmap (np.load mmap_mode)
            if mapping is not None:
                mapping.madvise(mmap.MADV_DONTNEED)

    def logits(self, head: Head, region_rows: np.ndarray, phrase_rows: np.ndarray) -> torch.Tensor:
        """:func:`pair_logits` of the pairs of feature rows ``(B,), (B,)``, each distinct row
        gathered and embedded once (on the head's device)."""
        device = module_device(head)
        regions, region_index = np.unique(region_rows, return_inverse=True)
        phrases, phrase_index = np.unique(phrase_rows, return_inverse=True)
        region_features, phrase_features = self.gather(regions, phrases, device)
        return pair_logits(
            head,
            region_features,
            phrase_features,
            torch.from_numpy(region_index.reshape(-1)).to(device),
            torch.from_numpy(phrase_index.reshape(-1)).to(device),
        )

    def chunks(
        self, pairs: pd.DataFrame, chunk_size: int
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The feature rows of ``pairs`` in consecutive chunks: memory bounded by a chunk."""
        region_rows, phrase_rows = self.rows(pairs)
        for start in range(0, len(region_rows), chunk_size):
            stop = start + chunk_size
            yield region_rows[start:stop], phrase_rows[start:stop]


@torch.inference_mode()
def score_pairs(
    head: Head, features: PairFeatures, pairs: pd.DataFrame, *, chunk_size: int = 4096
) -> np.ndarray:
    """Probabilities ``(N,)`` that each pair matches (sigmoid of the head's logits), computed
    where the head's weights are."""
    head.eval()
    scores = []
    for index, (region_rows, phrase_rows) in enumerate(features.chunks(pairs, chunk_size)):
        scores.append(torch.sigmoid(features.logits(head, region_rows, phrase_rows)).cpu().numpy())
        if index % 256 == 255:  # every million pairs or so: memory bounded by the chunks
            features.release_pages()
    features.release_pages()
    return np.concatenate(scores) if scores else np.empty(0, dtype=np.float32)


@dataclass(frozen=True)
class TrainedHead:
    """A head and how the features it was trained on were made."""

    head: Head
    features: FeaturesMeta

    def to_weights(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors and JSON config for :func:`grounding.io.write_weights`."""
        config = {"head": head_config(self.head), "features": self.features.to_dict()}
        return self.head.state_dict(), config

    @classmethod
    def from_weights(cls, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> TrainedHead:
        """From :meth:`to_weights`'s output (or a grounder's, which holds more keys)."""
        if "head" not in config or "features" not in config:
            raise DataError("not a trained head of this project (no head or features config)")
        return cls(
            head_from_weights(config["head"], tensors), FeaturesMeta.from_dict(config["features"])
        )

    def to(self, device: torch.device) -> TrainedHead:
        """This head with its weights moved to ``device`` (where it then scores)."""
        self.head.to(device)
        return self

    def score(self, features: StoredFeatures, pairs: pd.DataFrame) -> np.ndarray:
        """Probabilities ``(N,)`` of ``pairs`` on the features stage's output (as
        :func:`grounding.io.read_features` reads it), after checking that they were made as
        this head's training features were."""
        self.check_features(features.meta)
        return score_pairs(self.head, PairFeatures.stored(features), pairs)

    def check_features(self, features: FeaturesMeta) -> None:
        """Raise :class:`DataError` unless ``features`` were made as the head's were."""
        if features != self.features:
            raise DataError(
                f"the model was trained on other features ({self.features.to_dict()}) than "
                f"these ({features.to_dict()}); retrain it (`dvc repro train`)"
            )
