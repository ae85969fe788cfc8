"""Candidate regions: the boxes a phrase may be grounded to, from a registry of generators.

A generator is one entry of :data:`GENERATORS` (a :class:`~grounding.registry.Registry`): its
name (``pair.candidates`` in ``params.yaml``, the ``source`` column of the candidates table),
the dataclass of its settings (``candidates.<name>`` in ``params.yaml``) and ``make(settings,
*, device)``, which builds a :class:`Proposer` once (a detector loads its weights there). The
one generator that does not work from pixels is :data:`ANNOTATED`: each image's own annotated
boxes. The pair stage, the candidates table's checks, the sweep stage (which picks the
generator the grounder proposes with) and the grounder all read this registry.

A new generator is one module that calls ``GENERATORS.add(...)``, imported at the end of this
one (its registration).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from PIL import Image

from grounding.boxes import BOX_COLUMNS
from grounding.candidates.annotated import annotated_regions
from grounding.candidates.engines import proposal_engine
from grounding.config import PairRayParams
from grounding.errors import ConfigError
from grounding.io.proposal_cache import ProposalCache
from grounding.registry import Registry
from grounding.schemas import CANDIDATES

if TYPE_CHECKING:  # pandas costs about 0.5 s to import: grounding one image needs none
    import pandas as pd

Propose = Callable[[Image.Image], np.ndarray]


class Proposer(Protocol):
    """A generator built with its settings: ``propose(image)`` gives boxes ``(N, 4)`` (``x1,
    y1, x2, y2`` in the image's pixels, best first; ``N`` at most the generator's budget);
    ``version``, part of the proposal cache's key, goes up whenever the same pixels and
    settings would give other boxes."""

    version: int

    def propose(self, image: Image.Image) -> np.ndarray: ...


class FromAnnotations:
    """What :data:`ANNOTATED` builds: no proposer, the candidates are the annotated boxes (so
    it cannot serve an image nobody annotated)."""

    version = 1

    def propose(self, image: Image.Image) -> np.ndarray:
        raise ConfigError(f"candidate generator {ANNOTATED!r} needs annotations; it cannot propose")


ANNOTATED = "annotated"
SELECTIVE_SEARCH = "selective_search"

#: The candidate generators ``pair.candidates`` may name.
GENERATORS: Registry[Proposer] = Registry("candidate generator", "pair.candidates", "candidates")

GENERATORS.add(ANNOTATED, lambda *, device=None: FromAnnotations())

#: What proposes boxes in new images when the pipeline was trained on annotated ones.
DEFAULT_PROPOSER = SELECTIVE_SEARCH


def suppress_overlaps(boxes: np.ndarray, max_iou: float, limit: int) -> np.ndarray:
    """Indices of ``boxes (N, 4)``, given best first, kept greedily in that order: a box is
    dropped when its IoU with one kept before it is above ``max_iou`` (1.0 keeps every box);
    at most ``limit``. Non-maximum suppression by rank, as the detectors' generators use it
    (:func:`torchvision.ops.nms` on the ranks, so ties keep the given order)."""
    import torch
    from torchvision.ops import nms

    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    ranks = -torch.arange(len(boxes), dtype=torch.float32)  # strictly decreasing: no ties
    kept = nms(torch.from_numpy(boxes), ranks, max_iou).numpy()
    return np.sort(kept)[:limit]


def from_pixels(name: str) -> bool:
    """Whether generator ``name`` proposes from pixels (every one but :data:`ANNOTATED`);
    :class:`ConfigError` listing the known ones for an unknown name."""
    return GENERATORS.choose(name).name != ANNOTATED


def proposer_for_new_images(name: str) -> str:
    """The generator that gives candidates in an image nobody annotated: ``name`` itself when it
    works from pixels, else :data:`DEFAULT_PROPOSER`."""
    return name if from_pixels(name) else DEFAULT_PROPOSER


def section(name: str, settings: Mapping[str, Any] | None) -> dict[str, Any]:
    """Generator ``name``'s own ``settings`` as the ``candidates`` section they would be in
    (under the scheme's name for ``scheme:<ref>``)."""
    return {GENERATORS.choose(name).name: dict(settings or {})}


def settings_of(name: str, sections: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Generator ``name``'s checked settings from the ``candidates`` section as a plain
    mapping (defaults filled in: what a grounder saves beside its weights)."""
    settings = GENERATORS.settings(name, sections)
    return dataclasses.asdict(settings) if settings is not None else {}


def build_proposer(
    name: str, settings: Mapping[str, Any] | None = None, *, device: Any = None
) -> Proposer:
    """Generator ``name`` built once with its ``settings`` (a mapping, checked) on ``device``."""
    return GENERATORS.build(name, section(name, settings), device=device)


def proposer(
    name: str,
    settings: Mapping[str, Any],
    cache: ProposalCache | None = None,
    *,
    device: Any = None,
    built: Proposer | None = None,
) -> Propose:
    """``image -> boxes (N, 4)`` of the pixel generator ``name`` under its ``settings``,
    computed once per image and settings when a ``cache`` is given; ``built``: that generator
    already built (a detector whose model a grounder shares), else it is built here.
    :class:`ConfigError` for a generator that cannot propose or settings it refuses."""
    if not from_pixels(name):
        raise ConfigError(f"candidate generator {name!r} needs annotations; it cannot propose")
    built = built or build_proposer(name, settings, device=device)
    if cache is None:
        return built.propose
    key = cache_key(name, settings_of(name, section(name, settings)), built)
    return lambda image: cache.get(image, key, partial(built.propose, image))


def cache_key(name: str, settings: Mapping[str, Any], built: Proposer | None = None) -> tuple:
    """What the proposal cache keys generator ``name``'s boxes by, beside the pixels."""
    version = (built or build_proposer(name, settings)).version
    return (name, version, sorted(settings.items()))


def candidate_regions(
    name: str,
    sections: Mapping[str, Any],
    images: pd.DataFrame,
    boxes: pd.DataFrame,
    load_image: Callable[[str], Image.Image],
    *,
    cache: ProposalCache | None = None,
    progress: Callable[[Iterable[str]], Iterable[str]] = iter,
    engine: str = "local",
    ray_settings: PairRayParams | None = None,
    device: Any = None,
) -> dict[str, np.ndarray]:
    """The candidate boxes ``{image_id: boxes (N, 4)}`` of every image in ``images`` (its
    ``image_id`` column) by generator ``name`` with its settings in ``sections`` (the
    ``candidates`` params section, every entry of which is checked first): the image's
    distinct annotated ``boxes``, or the boxes proposed from its pixels
    (``load_image(image_id)``; cached when ``cache`` is given) by ``engine``
    (:data:`grounding.candidates.engines.ENGINES`: ``local``, or ``ray`` with
    ``ray_settings``). ``progress`` wraps the loop over images (a progress bar). A generator
    that holds a model runs it on ``device`` (a torch device, or a ``runtime.device`` spec it
    resolves; default the CPU)."""
    run_engine = proposal_engine(engine)  # checked even when annotations need no engine
    GENERATORS.check_section(sections)
    if not from_pixels(name):
        return annotated_regions(boxes[boxes["image_id"].isin(set(images["image_id"]))])
    return run_engine(
        proposer(name, settings_of(name, sections), cache, device=device),
        images["image_id"].tolist(),
        load_image,
        progress=progress,
        ray_settings=ray_settings,
    )


def candidates_table(regions: Mapping[str, np.ndarray], source: str) -> pd.DataFrame:
    """Each image's boxes ``{image_id: boxes (N, 4)}`` as the candidates table, images sorted,
    boxes in order: ``region_id`` (the row number, which indexes the region features),
    ``image_id``, the box, ``source`` (the generator's name)."""
    import pandas as pd

    image_ids = sorted(regions)
    boxes = [np.asarray(regions[i], dtype=np.float64).reshape(-1, 4) for i in image_ids]
    table = pd.DataFrame(
        np.concatenate(boxes) if boxes else np.empty((0, 4)), columns=BOX_COLUMNS
    ).astype(np.float32)
    table.insert(0, "image_id", np.repeat(image_ids, [len(b) for b in boxes]).astype(object))
    table.insert(0, "region_id", np.arange(len(table), dtype=np.int64))
    table["source"] = source
    return table[list(CANDIDATES.columns)]


# Each generator's module registers it (below GENERATORS, which they import).
from grounding.candidates import (  # noqa: E402,F401
    centernet,  # CenterNet (ONNX) + selective search
    detection,  # torchvision:<builder>
    selective_search,
    zero_shot,  # hf:<ref>
)
