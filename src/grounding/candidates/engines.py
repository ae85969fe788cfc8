"""Where a pixel generator's proposals are computed: a registry of engines (``pair.engine``).

Every engine returns ``{image_id: boxes (N, 4)}`` of ``propose(load_image(image_id))`` for
each image, and both read and fill the same proposal cache. The boxes are a function of the
pixels and settings (:mod:`grounding.candidates.selective_search` puts OpenCV's randomly
ordered boxes in a fixed order), so either engine fills the cache with the same boxes.

- ``local``: one image after another in this process.
- ``ray``: the image ids are a Ray Dataset, proposed by ``concurrency`` Ray tasks at once
  (``map_batches``); the boxes (a few kB an image) come back through Ray's object store, and
  the proposal cache (a folder) is written by the workers.

Ray joins the cluster of ``RAY_ADDRESS``, else starts a local one
(:func:`grounding.io.ray_cluster.connect`). On a cluster the images folder and the proposal
cache must be on storage every node sees at the same path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np
from PIL import Image

from grounding.config import PairRayParams
from grounding.errors import USER_ERRORS, ConfigError
from grounding.io.ray_cluster import connect, error_fields, raise_error
from grounding.registry import Registry

if TYPE_CHECKING:
    import pandas as pd

Propose = Callable[[Image.Image], np.ndarray]
Progress = Callable[[Iterable[str]], Iterable[str]]
# Images per Ray task: about 0.5 s of selective search each, so a task runs a few seconds.
_IMAGES_PER_TASK = 8


class ProposalEngine(Protocol):
    def __call__(
        self,
        propose: Propose,
        image_ids: Sequence[str],
        load_image: Callable[[str], Image.Image],
        *,
        progress: Progress,
        ray_settings: PairRayParams | None,
    ) -> dict[str, np.ndarray]: ...


def local_proposals(
    propose: Propose,
    image_ids: Sequence[str],
    load_image: Callable[[str], Image.Image],
    *,
    progress: Progress,
    ray_settings: PairRayParams | None = None,
) -> dict[str, np.ndarray]:
    """``{image_id: propose(load_image(image_id))}``, one image after another."""
    return {image_id: propose(load_image(image_id)) for image_id in progress(list(image_ids))}


def ray_proposals(
    propose: Propose,
    image_ids: Sequence[str],
    load_image: Callable[[str], Image.Image],
    *,
    progress: Progress,
    ray_settings: PairRayParams | None,
) -> dict[str, np.ndarray]:
    """The boxes of :func:`local_proposals`, from ``ray_settings.concurrency`` Ray tasks.
    ``propose`` and ``load_image`` are shipped to the workers (cloudpickle), so they must
    hold nothing but paths and settings."""
    if ray_settings is None:
        raise ConfigError("pair.engine: ray needs the pair.ray settings")
    if not image_ids:
        return {}
    import pandas as pd

    ray = connect()
    ray.data.DataContext.get_current().enable_progress_bars = False  # the stage draws one bar
    ids = pd.DataFrame({"image_id": list(image_ids)})
    blocks = [ids[i : i + _IMAGES_PER_TASK] for i in range(0, len(ids), _IMAGES_PER_TASK)]
    proposed = ray.data.from_pandas(blocks).map_batches(
        propose_batch,
        batch_size=None,
        batch_format="pandas",
        compute=ray.data.TaskPoolStrategy(size=ray_settings.concurrency),
        fn_kwargs={"propose": propose, "load_image": load_image},
    )
    regions: dict[str, np.ndarray] = {}

    def arrivals() -> Iterator[str]:
        for row in proposed.iter_rows():
            raise_error(row)
            regions[row["image_id"]] = np.asarray(row["boxes"], np.float64).reshape(-1, 4)
            yield row["image_id"]

    for _ in progress(_Sized(arrivals(), len(ids))):
        pass
    return regions


def propose_batch(
    batch: pd.DataFrame, propose: Propose, load_image: Callable[[str], Image.Image]
) -> pd.DataFrame:
    """One Ray task: ``batch`` (``image_id``) -> ``image_id, boxes`` (flattened ``(N, 4)``
    float64), or one row with the user error that stopped it."""
    import pandas as pd

    try:
        boxes = [np.asarray(propose(load_image(i)), np.float64).ravel() for i in batch["image_id"]]
    except USER_ERRORS as error:  # back to the stage as its one-line message
        return pd.DataFrame({"image_id": [""], "boxes": [np.empty(0)], **error_fields(error)})
    empty = error_fields(None)
    return pd.DataFrame(
        {
            "image_id": batch["image_id"].tolist(),
            "boxes": boxes,
            **{name: value * len(boxes) for name, value in empty.items()},
        }
    )


class _Sized:
    """An iterator with a known length (so a progress bar shows the total)."""

    def __init__(self, items: Iterator[str], length: int) -> None:
        self.items, self.length = items, length

    def __iter__(self) -> Iterator[str]:
        return self.items

    def __len__(self) -> int:
        return self.length


#: Where the work runs, ``pair.engine``: ``local`` (this process) or ``ray``.
ENGINES: Registry[ProposalEngine] = Registry("engine", "pair.engine")
ENGINES.add("local", lambda: local_proposals)
ENGINES.add("ray", lambda: ray_proposals)


def proposal_engine(name: str) -> ProposalEngine:
    """The engine called ``name``; :class:`ConfigError` listing the known ones otherwise."""
    return ENGINES.build(name)
