"""params.yaml types: the repo's file loads; bad keys and values fail naming the dotted key."""

from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml
from conftest import REPO_ROOT

from grounding.config import (
    Params,
    flatten,
    load_params,
    params_as_dict,
    params_from_dict,
    parse_settings,
    repo_root,
)
from grounding.errors import ConfigError

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
    assert params.data.format == "flickr30k"
    assert params.pair.candidates == "annotated"
    assert params.train.head == "matching"
    assert params.paths.model.suffix == params.paths.grounder.suffix == ".safetensors"
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


def test_misspelled_key_names_the_closest_known_key(raw: dict[str, Any]) -> None:
    raw["train"]["pos_wieght"] = 3  # dvc exp run -S +train.pos_wieght=3
    with pytest.raises(ConfigError, match=r"train\.pos_wieght: did you mean `pos_weight`\?"):
        params_from_dict(raw)


def test_a_key_close_to_none_gets_no_guess(raw: dict[str, Any]) -> None:
    raw["train"]["zzz"] = 3
    with pytest.raises(ConfigError) as error:
        params_from_dict(raw)
    assert "did you mean" not in str(error.value)
    assert "['train.zzz']" in str(error.value)


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
        ("data", "format", 3),
        ("pair", "candidates", ["annotated"]),
        ("train", "head", None),
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


def test_nested_section_keys_are_named_with_their_full_path(raw: dict[str, Any]) -> None:
    raw["features"]["ray"]["num_gpus"] = "one"
    with pytest.raises(ConfigError, match=r"^features\.ray\.num_gpus: expected float, got 'one'"):
        params_from_dict(raw)
    del raw["features"]["ray"]["num_gpus"]
    with pytest.raises(ConfigError, match=r"missing key\(s\) \['features\.ray\.num_gpus'\]"):
        params_from_dict(raw)


def test_the_old_proposals_section_is_refused(raw: dict[str, Any]) -> None:
    # `proposals:` became `candidates: selective_search:`; a stale params.yaml fails by name
    raw["proposals"] = raw["candidates"].pop("selective_search")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['proposals'\]"):
        params_from_dict(raw)


def test_generator_format_and_head_names_are_left_to_their_registries(
    raw: dict[str, Any],
) -> None:
    # any string loads: the registries (candidates, data.formats, modeling.head) refuse it
    raw["data"]["format"] = "coco"
    raw["pair"]["candidates"] = "proposals"
    raw["train"]["head"] = "transformer"
    params = params_from_dict(raw)
    assert (params.data.format, params.pair.candidates, params.train.head) == (
        "coco",
        "proposals",
        "transformer",
    )


def test_component_sections_are_plain_mappings_for_their_registries() -> None:
    params = load_params(PARAMS_FILE)
    settings = params.candidates["selective_search"]
    assert set(settings) == {"mode", "max_side", "min_size", "dedupe_iou", "max_proposals"}
    assert set(params.heads) >= {"matching", "matching_prior"}


@dataclass(frozen=True)
class Knob:
    size: int = 3
    rate: float = 0.5
    mode: Literal["a", "b"] = "a"

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"size must be >= 1, got {self.size}")


def test_settings_are_checked_against_the_components_dataclass_with_its_defaults() -> None:
    assert parse_settings(Knob, {}, "x.knob") == Knob()
    assert parse_settings(Knob, None, "x.knob") == Knob()
    assert parse_settings(Knob, {"rate": 1}, "x.knob") == Knob(rate=1.0)  # int for a float
    with pytest.raises(ConfigError, match=r"x\.knob\.mode: 'c' is not one of"):
        parse_settings(Knob, {"mode": "c"}, "x.knob")
    with pytest.raises(ConfigError, match=r"x\.knob\.sise: did you mean `size`"):
        parse_settings(Knob, {"sise": 2}, "x.knob")
    with pytest.raises(ConfigError, match=r"x\.knob: size must be >= 1"):
        parse_settings(Knob, {"size": 0}, "x.knob")


def test_repo_root_is_dvc_root_when_dvc_runs_the_stage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert repo_root() == tmp_path.resolve()
    monkeypatch.delenv("DVC_ROOT")
    monkeypatch.chdir(tmp_path)
    assert repo_root() == tmp_path.resolve()


def test_data_collects_the_format_sections_and_still_names_a_typo(raw: dict[str, Any]) -> None:
    data = params_from_dict(raw).data
    assert set(data.formats) == {"odvg", "mdetr", "labelstudio"}
    assert data.formats["odvg"]["train"] == "train.jsonl"  # checked by the format's registry
    raw["data"]["rooot"] = "elsewhere"  # a scalar is not a section: an unknown key
    with pytest.raises(ConfigError, match=r"data\.rooot: did you mean `root`"):
        params_from_dict(raw)


@pytest.mark.parametrize(
    "override", ["train.pos_weight=3", "features.backbone_weights=/tmp/w.pth", "+train.new=1"]
)
def test_set_param_rewrites_only_the_line_it_sets(tmp_path: Path, override: str) -> None:
    # `dvc exp run -S` writes params.yaml back through DVC's YAML round trip: every line it
    # does not set must come back byte for byte (a `null` came back as an empty value)
    from dvc.utils.hydra import apply_overrides

    written = tmp_path / "params.yaml"
    written.write_text(PARAMS_FILE.read_text())
    apply_overrides(written, [override])
    before, after = PARAMS_FILE.read_text().splitlines(), written.read_text().splitlines()
    changed = list(difflib.unified_diff(before, after, lineterm="", n=0))
    removed = [line for line in changed if line.startswith("-") and not line.startswith("---")]
    key = override.lstrip("+").split("=")[0].split(".")[-1]
    assert all(line.lstrip("-").strip().startswith(f"{key}:") for line in removed), changed
    assert len(removed) == (0 if override.startswith("+") else 1), changed


def test_params_as_dict_is_the_file_s_layout(raw: dict[str, Any]) -> None:
    params = params_from_dict(raw)
    values = params_as_dict(params)
    assert values["data"]["odvg"]["train"] == "train.jsonl"  # not under data.formats
    assert "formats" not in values["data"]
    assert flatten(values)["heads.matching.hidden"] == raw["heads"]["matching"]["hidden"]
    assert set(values) == set(raw)
