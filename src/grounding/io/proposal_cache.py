"""A cache on disk of each image's generated candidate boxes."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from grounding.io.files import read_array, write_array


class ProposalCache:
    """Boxes of each image on disk, computed once: ``<folder>/<key>.npy`` where the key hashes
    the image's pixels and the settings that made them, so an edited image or other settings
    never read stale boxes. Safe to delete; safe to share between processes (writes are
    atomic)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def get(
        self, image: Image.Image, settings: object, compute: Callable[[], np.ndarray]
    ) -> np.ndarray:
        """The cached boxes of ``image`` under ``settings``, else ``compute()``'s, then cached."""
        path = self.folder / f"{self.key(image, settings)}.npy"
        if path.exists():
            try:
                return read_array(path)
            except (OSError, ValueError):
                pass  # a damaged entry is recomputed
        boxes = compute()
        write_array(boxes, path)
        return boxes

    @staticmethod
    def key(image: Image.Image, settings: object) -> str:
        digest = hashlib.sha256(repr(settings).encode())
        digest.update(f"{image.mode} {image.size}".encode())
        digest.update(image.tobytes())
        return digest.hexdigest()[:32]
