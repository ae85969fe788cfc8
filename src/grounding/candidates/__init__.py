"""Candidate regions: the boxes a phrase may be grounded to, from a registry of generators.

A generator is one entry of :data:`GENERATORS`: its name (``pair.candidates`` in
``params.yaml``, the ``source`` column of the candidates table) and, for a generator that works
from pixels, ``propose(image, **settings) -> boxes (N, 4)`` with the check of its settings.
The pair stage, the candidates table's checks, the sweep stage (which picks the generator the
grounder proposes with) and the grounder all read this registry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from grounding.boxes import BOX_COLUMNS
from grounding.candidates import selective_search
from grounding.candidates.annotated import annotated_regions
from grounding.candidates.engines import proposal_engine
from grounding.config import PairRayParams
from grounding.errors import ConfigError
from grounding.io.proposal_cache import ProposalCache
from grounding.schemas import CANDIDATES

if TYPE_CHECKING:  # pandas costs about 0.5 s to import: grounding one image needs none
    import pandas as pd

Propose = Callable[[Image.Image], np.ndarray]


@dataclass(frozen=True)
class Generator:
    """``propose(image, **settings)``: boxes from an image's pixels (None: the boxes come from
    the annotations, so it cannot serve an image nobody annotated); ``check(**settings)``
    raises :class:`ValueError` for settings out of range; ``version``, part of the proposal
    cache's key, goes up whenever the same pixels and settings would give other boxes."""

    name: str
    propose: Callable[..., np.ndarray] | None = None
    check: Callable[..., None] | None = None
    version: int = 1


ANNOTATED = "annotated"
SELECTIVE_SEARCH = "selective_search"

GENERATORS: dict[str, Generator] = {
    ANNOTATED: Generator(ANNOTATED),
    SELECTIVE_SEARCH: Generator(
        SELECTIVE_SEARCH,
        selective_search.propose,
        selective_search.check_settings,
        selective_search.VERSION,
    ),
}

#: What proposes boxes in new images when the pipeline was trained on annotated ones.
DEFAULT_PROPOSER = SELECTIVE_SEARCH


def generator(name: str) -> Generator:
    """The generator called ``name``; :class:`ConfigError` listing the known ones otherwise."""
    try:
        return GENERATORS[name]
    except KeyError:
        raise ConfigError(
            f"unknown candidate generator {name!r}; known: {sorted(GENERATORS)}"
        ) from None


def proposer_for_new_images(name: str) -> str:
    """The generator that gives candidates in an image nobody annotated: ``name`` itself when it
    works from pixels, else :data:`DEFAULT_PROPOSER`."""
    return name if generator(name).propose is not None else DEFAULT_PROPOSER


def proposer(name: str, settings: Mapping[str, Any], cache: ProposalCache | None = None) -> Propose:
    """``image -> boxes (N, 4)`` of the pixel generator ``name`` under its keyword
    ``settings``, computed once per image and settings when a ``cache`` is given.
    :class:`ConfigError` for a generator that cannot propose or settings it refuses."""
    chosen = generator(name)
    if chosen.propose is None:
        raise ConfigError(f"candidate generator {name!r} needs annotations; it cannot propose")
    try:
        if chosen.check is not None:
            chosen.check(**settings)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"candidates.{name}: {error}") from None
    propose = partial(chosen.propose, **settings)
    if cache is None:
        return propose
    key = cache_key(name, settings)
    return lambda image: cache.get(image, key, partial(propose, image))


def cache_key(name: str, settings: Mapping[str, Any]) -> tuple:
    """What the proposal cache keys generator ``name``'s boxes by, beside the pixels."""
    return (name, generator(name).version, sorted(settings.items()))


def candidate_regions(
    name: str,
    settings: Mapping[str, Any],
    images: pd.DataFrame,
    boxes: pd.DataFrame,
    load_image: Callable[[str], Image.Image],
    *,
    cache: ProposalCache | None = None,
    progress: Callable[[Iterable[str]], Iterable[str]] = iter,
    engine: str = "local",
    ray_settings: PairRayParams | None = None,
) -> dict[str, np.ndarray]:
    """The candidate boxes ``{image_id: boxes (N, 4)}`` of every image in ``images`` (its
    ``image_id`` column) by generator ``name``: the image's distinct annotated ``boxes``, or the
    boxes proposed from its pixels (``load_image(image_id)``; cached when ``cache`` is given)
    by ``engine`` (:data:`grounding.candidates.engines.ENGINES`: ``local``, or ``ray`` with
    ``ray_settings``). ``progress`` wraps the loop over images (a progress bar)."""
    run_engine = proposal_engine(engine)  # checked even when annotations need no engine
    if generator(name).propose is None:
        return annotated_regions(boxes[boxes["image_id"].isin(set(images["image_id"]))])
    return run_engine(
        proposer(name, settings, cache),
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
