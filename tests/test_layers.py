"""Imports run one way: each part of the package imports only parts listed before it here.

The order is the design: errors and box arithmetic at the bottom, then the table schemas and
the params types, files, the data and candidates, the metrics, the models, inference, and the
edges (validation, tracking, the command line) on top.
"""

from __future__ import annotations

from pathlib import Path

from imports import SOURCE, imported_modules, module_file

LAYERS = (
    "errors",
    "numerics",
    "boxes",
    "schemas",
    "config",
    "registry",
    "io",
    "data",
    "evaluation",
    "modeling",
    "candidates",  # above modeling: a detector generator holds a model on a device
    "inference",
    "validation",
    "tracking",
    "cli",
)
PACKAGE = SOURCE / "grounding"


def part(path: Path) -> str:
    """``io`` for ``grounding/io/files.py``, ``boxes`` for ``grounding/boxes.py``."""
    return path.relative_to(PACKAGE).with_suffix("").parts[0]


def test_every_part_of_the_package_has_a_layer() -> None:
    parts = {part(path) for path in PACKAGE.rglob("*.py")} - {"__init__"}
    assert parts == set(LAYERS)


def test_no_part_imports_a_part_above_it() -> None:
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if part(path) == "__init__":
            continue
        rank = LAYERS.index(part(path))
        for name in imported_modules(path):
            target = module_file(name)
            if target is None or part(target) == "__init__":
                continue
            if LAYERS.index(part(target)) > rank:
                upward.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert not upward, upward
