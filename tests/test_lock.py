"""The environment lock agrees with pyproject.toml: every requirement pinned in its range, and
the lock resolved from the requirements pyproject.toml lists now (offline, no resolver)."""

from __future__ import annotations

import re
from pathlib import Path

from requirements.lock import CONSTRAINTS, LOCK, PYPROJECT, REFRESH, disagreements, pins


def test_the_lock_agrees_with_pyproject() -> None:
    problems = disagreements()
    assert not problems, (
        f"{LOCK.name} does not match pyproject.toml: run `{REFRESH}` and commit it\n  "
        + "\n  ".join(problems)
    )


def test_every_pin_has_hashes_and_torch_is_the_constrained_build() -> None:
    text = LOCK.read_text(encoding="utf-8")
    blocks = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 1)[1])
    pinned = [block for block in blocks if "==" in block.split("\n", 1)[0]]
    assert len(pinned) == len(pins()) > 100
    assert all("--hash=sha256:" in block for block in pinned)
    assert pins()["torch"] == "2.14.1" and pins()["torchvision"] == "0.29.1"


def _project(tmp_path: Path, pyproject: str) -> tuple[Path, Path]:
    path = tmp_path / "pyproject.toml"
    path.write_text(pyproject, encoding="utf-8")
    return path, CONSTRAINTS


def test_a_new_dependency_or_a_range_the_pin_leaves_is_a_disagreement(tmp_path: Path) -> None:
    original = PYPROJECT.read_text(encoding="utf-8")
    added = original.replace('"tqdm>=4.66",', '"tqdm>=4.66",\n    "hypothesis>=6",')
    problems = disagreements(*_project(tmp_path, added), LOCK)
    assert any(p.startswith("hypothesis>=6 (dependencies) is not in") for p in problems)
    assert any("resolved from other requirements" in p for p in problems)

    pinned = pins()["pandas"]
    narrowed = original.replace('"pandas>=2.2",', f'"pandas<{pinned}",')
    problems = disagreements(*_project(tmp_path, narrowed), LOCK)
    assert f"pandas<{pinned} (dependencies) is pinned at {pinned} in {LOCK.name}" in problems


def test_settings_beside_the_requirements_do_not_stale_the_lock(tmp_path: Path) -> None:
    original = PYPROJECT.read_text(encoding="utf-8")
    edited = original.replace("line-length = 100", "line-length = 99")
    assert edited != original
    assert disagreements(*_project(tmp_path, edited), LOCK) == []
