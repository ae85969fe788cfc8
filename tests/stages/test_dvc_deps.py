"""Every module a stage runs is a dependency of that stage in ``dvc.yaml``: edit the code of a
stage and ``dvc repro`` reruns it. The imports are walked with ``ast``, transitively, from each
stage script (imports inside functions included: they run too)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from imports import SOURCE, reached_files
from repository import REPO


def stages() -> dict[str, dict]:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def covered(file: Path, deps: list[str]) -> bool:
    relative = file.relative_to(REPO)
    return any(relative == Path(dep) or Path(dep) in relative.parents for dep in deps)


def missing_deps(script: Path, deps: list[str]) -> list[str]:
    """The package files ``script`` can import that none of ``deps`` covers."""
    return sorted(
        str(file.relative_to(REPO)) for file in reached_files(script) if not covered(file, deps)
    )


@pytest.mark.parametrize("stage", sorted(stages()))
def test_every_module_a_stage_runs_is_one_of_its_deps(stage: str) -> None:
    definition = stages()[stage]
    script = REPO / "stages" / f"{stage}.py"
    assert f"stages/{stage}.py" in definition["cmd"], "one name per stage: stage = script"
    deps = [str(dep) for dep in definition["deps"]]
    assert f"stages/{stage}.py" in deps
    missing = missing_deps(script, deps)
    assert not missing, f"stage {stage} runs these modules but does not depend on them: {missing}"


def test_a_stage_missing_a_dep_its_script_reaches_is_reported() -> None:
    deps = [str(dep) for dep in stages()["train"]["deps"]]
    assert "src/grounding/modeling" in deps
    # without the folder dep, every modeling module train.py reaches is missing, and only those
    missing = missing_deps(
        REPO / "stages" / "train.py", [d for d in deps if d != "src/grounding/modeling"]
    )
    assert "src/grounding/modeling/train.py" in missing  # imported by the script
    assert "src/grounding/modeling/losses.py" in missing  # imported by modeling/train.py
    assert "src/grounding/modeling/__init__.py" in missing  # run by importing a submodule
    assert all(path.startswith("src/grounding/modeling/") for path in missing), missing


def test_a_dep_on_one_file_does_not_cover_its_neighbours(tmp_path: Path) -> None:
    script = tmp_path / "stage.py"
    script.write_text("from grounding.evaluation.report import evaluate\n")
    deps = [
        "src/grounding/__init__.py",
        "src/grounding/config.py",
        "src/grounding/numerics.py",
        "src/grounding/boxes.py",
        "src/grounding/errors.py",
        "src/grounding/schemas.py",
        "src/grounding/evaluation/__init__.py",
        "src/grounding/evaluation/report.py",
    ]
    assert missing_deps(script, deps) == [
        "src/grounding/evaluation/metrics.py",
        "src/grounding/evaluation/plots.py",
    ]
    assert missing_deps(script, [*deps, "src/grounding/evaluation"]) == []


def test_the_walk_follows_imports_inside_functions(tmp_path: Path) -> None:
    script = tmp_path / "stage.py"
    script.write_text("def main():\n    from grounding.evaluation.report import evaluate\n")
    reached = {str(f.relative_to(SOURCE)) for f in reached_files(script)}
    assert "grounding/evaluation/report.py" in reached
    assert "grounding/evaluation/metrics.py" in reached  # imported by report.py
    assert "grounding/evaluation/__init__.py" in reached


def test_the_walk_skips_type_checking_blocks_and_lazy_attributes(tmp_path: Path) -> None:
    module = tmp_path / "module.py"
    module.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from grounding.evaluation.report import evaluate\n"
        "def __getattr__(name):\n    from grounding.inference.loading import load_grounder\n"
        "def main():\n    from grounding.evaluation.metrics import recall_at_k\n"
    )
    reached = {str(f.relative_to(SOURCE)) for f in reached_files(module)}
    assert "grounding/evaluation/metrics.py" in reached
    assert "grounding/evaluation/report.py" not in reached
    assert "grounding/inference/loading.py" not in reached
