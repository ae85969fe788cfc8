"""The types of ``params.yaml``: one frozen dataclass per section, checked at load.

A misspelled, missing or mistyped key fails here with its dotted name in the message, so the
library only ever sees well-typed values. ``dvc exp run -S train.pos_weight=3`` writes the int
``3`` for ``3.0``: :func:`load_params` casts ints to floats where a float is declared.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from grounding.errors import ConfigError
from grounding.numerics import check_numerics

#: A params section of component settings, ``{component name: {key: value}}``: each
#: component's registry (:class:`grounding.registry.Registry`) checks its own entry.
Sections = dict[str, dict[str, Any]]


#: Marks the field of a params dataclass that collects its component sections.
SECTIONS = "sections"


@dataclass(frozen=True)
class DataParams:
    """Where the dataset lives and in which format (an entry of
    :data:`grounding.data.formats.FORMATS`, checked when the parse stage opens the data).

    ``images`` and ``splits`` (the folder of Flickr30k's split lists) are relative to ``root``
    unless absolute. ``formats`` holds every other key of ``data`` whose value is a mapping:
    each format's own settings by format name (``data.odvg: {train: ...}``: the file of each
    split, relative to ``root``), checked by that registry.
    """

    format: str
    root: Path
    images: Path
    splits: Path
    formats: Sections = field(default_factory=dict, metadata={SECTIONS: True})

    @property
    def images_dir(self) -> Path:
        return self.root / self.images

    @property
    def splits_dir(self) -> Path:
        return self.root / self.splits


@dataclass(frozen=True)
class PathParams:
    """Where the stages write their artifacts (read by dvc.yaml, passed to stages as arguments)."""

    parsed: Path
    pairs: Path
    split: Path
    features: Path
    model: Path
    grounder: Path
    reports: Path
    proposals: Path  # cache of each image's proposed candidates (not a DVC output: kept)


@dataclass(frozen=True)
class ParseParams:
    skip_bad_files: bool


@dataclass(frozen=True)
class PairRayParams:
    """How the pair stage's proposals run with ``engine: ray``: ``concurrency`` Ray tasks at
    once."""

    concurrency: int

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"ray.concurrency must be >= 1, got {self.concurrency}")


@dataclass(frozen=True)
class PairParams:
    """``candidates``: a generator of :data:`grounding.candidates.GENERATORS` (checked, with
    its settings in the section ``candidates``, by that registry); ``engine``: where proposals are
    computed, a key of :data:`grounding.candidates.engines.ENGINES` (``local`` or ``ray``)."""

    candidates: str
    pos_iou: float
    engine: str
    ray: PairRayParams


@dataclass(frozen=True)
class SplitParams:
    strategy: Literal["official", "random"]
    val_fraction: float
    test_fraction: float
    seed: int
    train_pos_share: float


@dataclass(frozen=True)
class FeaturesRayParams:
    """How the features stage runs with ``engine: ray``: ``concurrency`` backbone actors, each
    holding ``num_gpus`` GPUs (0: CPU only)."""

    concurrency: int
    num_gpus: float

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"ray.concurrency must be >= 1, got {self.concurrency}")
        if self.num_gpus < 0:
            raise ValueError(f"ray.num_gpus must be >= 0, got {self.num_gpus}")


@dataclass(frozen=True)
class FeaturesParams:
    """``backbone``: an entry of :data:`grounding.modeling.backbones.BACKBONES`, with a local
    weights file ``backbone_weights`` (its packaged one when empty); ``text_encoder``: an
    entry of :data:`grounding.modeling.text.TEXT_ENCODERS`; ``engine``: where the backbone
    runs, an entry of :data:`grounding.modeling.engines.ENGINES` (``local`` or ``ray``)."""

    backbone: str
    backbone_weights: Path | None
    text_encoder: str
    image_size: int
    context: bool
    batch_size: int
    text_batch_size: int
    engine: str
    ray: FeaturesRayParams


@dataclass(frozen=True)
class TrainParams:
    """``head``: a head of :data:`grounding.modeling.head.HEADS`, whose settings are in the
    section ``heads`` (checked by that registry when the head is built: it lives beside torch,
    which this module does not import)."""

    head: str
    pos_weight: float
    rank_weight: float
    epochs: int
    batch_size: int
    learning_rate: float
    weight_decay: float
    seed: int


#: What a device setting (``runtime.device``, ``grounding predict --device``) accepts.
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device_spec(spec: str, where: str = "runtime.device") -> str:
    """``spec`` if it is ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; else :class:`ConfigError`
    naming ``where`` (the setting). Whether the machine has that device is checked when a
    stage resolves it (:func:`grounding.modeling.device.resolve_device`)."""
    if not isinstance(spec, str) or not DEVICE_PATTERN.fullmatch(spec):
        raise ConfigError(f"{where}: {spec!r} is not one of auto, cpu, cuda, cuda:N")
    return spec


@dataclass(frozen=True)
class RuntimeParams:
    """Where the stages that compute (features, train, sweep, report) run: ``device`` is
    ``auto`` (a GPU if torch sees one), ``cpu``, ``cuda`` or ``cuda:N``; ``threads`` is torch's
    CPU threads, ``auto`` for the CPUs this process may use; ``numerics`` is ``portable`` (the
    same float bytes on every x86-64 CPU with AVX2) or ``fast`` (this CPU's newest kernels):
    :mod:`grounding.numerics`."""

    device: str
    threads: int | Literal["auto"]
    numerics: Literal["portable", "fast"]

    def __post_init__(self) -> None:
        check_device_spec(self.device)
        check_numerics(self.numerics)
        if self.threads != "auto" and self.threads < 1:
            raise ConfigError(f"runtime.threads: expected auto or >= 1, got {self.threads}")


@dataclass(frozen=True)
class ReportParams:
    gallery_examples: int
    seed: int


@dataclass(frozen=True)
class Params:
    data: DataParams
    paths: PathParams
    parse: ParseParams
    pair: PairParams
    candidates: Sections  # each candidate generator's settings (grounding.candidates)
    split: SplitParams
    features: FeaturesParams
    train: TrainParams
    heads: Sections  # each head's settings (grounding.modeling.head)
    report: ReportParams
    runtime: RuntimeParams


def _cast(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against the type ``annotation`` and cast where that is lossless."""
    if annotation is Any:
        return value
    origin = get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        return _build(annotation, value, key)
    if origin is Literal:
        if value not in get_args(annotation):
            raise ConfigError(f"{key}: {value!r} is not one of {list(get_args(annotation))}")
        return value
    if origin in (types.UnionType, typing.Union):
        options = get_args(annotation)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _cast(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} is not a {annotation}")
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        key_type, value_type = get_args(annotation)
        return {
            _cast(k, key_type, f"{key}.{k}"): _cast(v, value_type, f"{key}.{k}")
            for k, v in value.items()
        }
    if origin is tuple:
        (item_type, _) = get_args(annotation)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_cast(v, item_type, f"{key}[{i}]") for i, v in enumerate(value))
    if annotation is Path:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a path, got {value!r}")
        return Path(value)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if annotation is int and isinstance(value, bool):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if not isinstance(value, annotation):
        raise ConfigError(f"{key}: expected {annotation.__name__}, got {value!r}")
    return value


def _build(cls: type, values: Any, key: str, *, defaults: bool = False) -> Any:
    """``cls`` from the mapping ``values`` found at ``key``; with ``defaults``, a field the
    mapping leaves out takes its default (else every field must be given). A field marked
    :data:`SECTIONS` takes the keys no other field names whose values are mappings."""
    if values is None and defaults:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{key or 'params'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    rest = [f.name for f in dataclasses.fields(cls) if f.metadata.get(SECTIONS)]
    names = [f.name for f in dataclasses.fields(cls) if f.name not in rest]
    if rest:
        sections = {
            name: value or {}
            for name, value in values.items()
            if name not in names and isinstance(value, dict | None)
        }
        values = {name: value for name, value in values.items() if name not in sections}
        values[rest[0]] = sections
        names.append(rest[0])
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {[_join(key, u) for u in unknown]}; "
            + "".join(f"{hint}; " for hint in _closest_keys(key, unknown, names))
            + f"known: {names}"
        )
    optional = {
        field.name
        for field in dataclasses.fields(cls)
        if defaults
        and (
            field.default is not dataclasses.MISSING
            or field.default_factory is not dataclasses.MISSING
        )
    }
    missing = [name for name in names if name not in values and name not in optional]
    if missing:
        raise ConfigError(f"missing key(s) {[_join(key, m) for m in missing]}")
    fields = {
        name: _cast(values[name], hints[name], _join(key, name)) for name in names if name in values
    }
    try:
        return cls(**fields)
    except ConfigError:
        raise
    except ValueError as error:  # a section that checks its own values
        raise ConfigError(f"{key}: {error}") from None


def _closest_keys(prefix: str, unknown: list[str], names: list[str]) -> list[str]:
    """``train.pos_wieght: did you mean `pos_weight`?`` for each unknown key close to a known
    one (a typo in ``dvc exp run -S +train.pos_wieght=3``)."""
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
        if close:
            hints.append(f"{_join(prefix, name)}: did you mean `{close[0]}`?")
    return hints


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def parse_settings(cls: type, values: Any, key: str) -> Any:
    """A component's settings: the frozen dataclass ``cls`` from the mapping ``values`` of
    ``params.yaml`` at ``key`` (``candidates.selective_search``), checked like every section;
    a key the mapping leaves out takes the dataclass' default."""
    return _build(cls, values, key, defaults=True)


def params_from_dict(values: dict[str, Any]) -> Params:
    """Build and check :class:`Params` from a parsed ``params.yaml``."""
    return _build(Params, values, "")


def repo_root() -> Path:
    """The repository the pipeline belongs to: ``DVC_ROOT`` when DVC runs the stage (a queued
    experiment runs in a temporary copy, and caches belong to the original checkout)."""
    return Path(os.environ.get("DVC_ROOT", ".")).resolve()


def tracking_uri(root: Path) -> str:
    """The MLflow store the pipeline logs to and model URIs are looked up in:
    ``MLFLOW_TRACKING_URI`` if set, else the SQLite store ``<root>/mlflow.db``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"


def load_params(path: Path) -> Params:
    """Read and check ``params.yaml``."""
    with open(path, encoding="utf-8") as handle:
        return params_from_dict(yaml.safe_load(handle))


def params_as_dict(params: Any) -> dict[str, Any]:
    """A params dataclass as the mapping ``params.yaml`` holds: a :data:`SECTIONS` field's
    sections back at the level they were read from (``data.odvg``, not ``data.formats.odvg``)."""
    values: dict[str, Any] = {}
    for item in dataclasses.fields(params):
        value = getattr(params, item.name)
        if dataclasses.is_dataclass(value):
            value = params_as_dict(value)
        if item.metadata.get(SECTIONS):
            values.update(value)
        else:
            values[item.name] = value
    return values


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1e-3}}`` -> ``{"train.lr": 1e-3}`` (for experiment trackers and
    reports; the one flatten of the package)."""
    flat: dict[str, Any] = {}
    for name, value in values.items():
        key = _join(prefix, name)
        if isinstance(value, Mapping):
            flat.update(flatten(value, key))
        else:
            flat[key] = value
    return flat
