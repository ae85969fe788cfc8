"""Benchmarks that anyone can rerun, and the locations they and the tests share."""

from pathlib import Path

#: The repository's root.
REPO = Path(__file__).resolve().parents[1]
#: The real Flickr30k Entities annotations and images beside the project (never committed).
SHARED_DATA = REPO.parent / "shared" / "flickr30k_entities"
