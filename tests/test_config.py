"""params.yaml types: the repo's file loads; bad keys and values fail naming the dotted key."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO_ROOT

from grounding.config import (
    ConfigError,
    Params,
    flatten,
    load_params,
    params_from_dict,
)

PARAMS_FILE = REPO_ROOT / "params.yaml"


@pytest.fixture
def raw() -> dict[str, Any]:
    with open(PARAMS_FILE, encoding="utf-8") as handle:
        return copy.deepcopy(yaml.safe_load(handle))


def test_repo_params_load_with_their_types() -> None:
    params = load_params(PARAMS_FILE)
    assert isinstance(params, Params)
    assert isinstance(params.data.root, Path)
    assert params.data.images_dir == params.data.root / params.data.images
    assert params.data.splits_dir == params.data.root / params.data.splits
    assert isinstance(params.paths.parsed, Path)
    assert isinstance(params.parse.skip_bad_files, bool)
    assert params.pair.candidates == "annotated"
    assert type(params.pair.pos_iou) is float and 0 < params.pair.pos_iou <= 1
    assert params.split.strategy in ("official", "random")
    assert type(params.split.seed) is int
    assert type(params.split.train_pos_share) is float


def test_params_are_frozen() -> None:
    params = load_params(PARAMS_FILE)
    with pytest.raises(AttributeError):
        params.split.seed = 3  # type: ignore[misc]


def test_misspelled_key_is_named(raw: dict[str, Any]) -> None:
    raw["split"]["sed"] = raw["split"].pop("seed")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['split\.sed'\]"):
        params_from_dict(raw)


def test_unknown_section_is_named(raw: dict[str, Any]) -> None:
    raw["trian"] = {"lr": 0.1}
    with pytest.raises(ConfigError, match=r"\['trian'\]"):
        params_from_dict(raw)


def test_missing_key_is_named(raw: dict[str, Any]) -> None:
    del raw["pair"]["pos_iou"]
    with pytest.raises(ConfigError, match=r"missing key\(s\) \['pair\.pos_iou'\]"):
        params_from_dict(raw)


def test_missing_section_is_named(raw: dict[str, Any]) -> None:
    del raw["parse"]
    with pytest.raises(ConfigError, match=r"missing key\(s\) \['parse'\]"):
        params_from_dict(raw)


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("split", "seed", "zero"),
        ("split", "seed", 1.5),  # a float where an int is declared is not cast
        ("split", "seed", True),
        ("split", "val_fraction", "0.15"),
        ("pair", "pos_iou", True),
        ("parse", "skip_bad_files", 1),
        ("parse", "skip_bad_files", "no"),
        ("data", "root", 3),
        ("pair", "candidates", "detector"),  # Literal["annotated", "proposals"]
        ("split", "strategy", "stratified"),  # Literal["official", "random"]
    ],
)
def test_wrong_type_or_value_is_named(
    raw: dict[str, Any], section: str, key: str, value: Any
) -> None:
    raw[section][key] = value
    with pytest.raises(ConfigError, match=rf"^{section}\.{key}: "):
        params_from_dict(raw)


def test_section_that_is_not_a_mapping_is_named(raw: dict[str, Any]) -> None:
    raw["pair"] = 0.5
    with pytest.raises(ConfigError, match=r"^pair: expected a mapping"):
        params_from_dict(raw)


def test_empty_file_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("", encoding="utf-8")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_params(tmp_path / "params.yaml")


def test_int_where_a_float_is_declared_is_cast(raw: dict[str, Any], tmp_path: Path) -> None:
    # `dvc exp run -S pair.pos_iou=1` writes the int 1
    raw["pair"]["pos_iou"] = 1
    raw["split"]["val_fraction"] = 0
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    params = load_params(path)
    assert params.pair.pos_iou == 1.0 and type(params.pair.pos_iou) is float
    assert params.split.val_fraction == 0.0 and type(params.split.val_fraction) is float


def test_flatten() -> None:
    assert flatten({"split": {"seed": 0, "fractions": {"val": 0.1}}, "x": 1}) == {
        "split.seed": 0,
        "split.fractions.val": 0.1,
        "x": 1,
    }


def test_a_section_that_checks_its_own_values_is_named(raw: dict[str, Any]) -> None:
    raw["proposals"]["max_side"] = 8
    with pytest.raises(ConfigError, match=r"^proposals: proposals need max_side >= 16"):
        params_from_dict(raw)
