"""Phrase grounding on Flickr30k Entities: the library behind the DVC pipeline's stages.

The public API is one function, loaded on first use (``import grounding`` stays light)::

    from grounding import load_grounder

    grounder = load_grounder("pretrained")  # or a weights file, an export, an MLflow URI
    for found in grounder.ground(image, ["a dog", "the red ball"]):
        print(found.phrase, found.box, found.score, found.above_threshold)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from grounding.inference.loading import load_grounder

__all__ = ["load_grounder"]


def __getattr__(name: str) -> Any:
    if name == "load_grounder":
        from grounding.inference.loading import load_grounder

        return load_grounder
    raise AttributeError(f"module 'grounding' has no attribute {name!r}")
