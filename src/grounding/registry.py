"""One shape for every seam: a :class:`Registry` of named components of one kind.

Every place where the field varies (dataset formats, candidate generators, engines, backbones,
text encoders, heads, export formats) is a registry. An entry is a name, a ``make`` that builds
the component, and the frozen dataclass of the settings it owns (or none). A new component is
one module that calls :meth:`Registry.add` (or decorates its factory with
:meth:`Registry.register`); nothing else changes:

- ``params.yaml`` keeps each kind's settings in one section keyed by component name (for
  example ``candidates: {selective_search: {max_proposals: 100}}``), read by :mod:`config` as
  plain mappings; the registry checks them against the entry's dataclass, with the dotted key of
  a wrong value in the error, and fills what a section leaves out from the dataclass' defaults.
- A *scheme* names a family of components by reference: ``hf:openai/clip-vit-base-patch32`` or
  ``torchvision:fasterrcnn_resnet50_fpn``. Its ``make`` takes the reference first; its settings
  live under the scheme's name (``candidates: {hf: {...}}``).

Components that hold a model are objects ``make`` builds once with their settings and the
keyword context the caller passes (a device); stateless ones are plain functions or records.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from grounding.config import parse_settings
from grounding.errors import ConfigError

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

SCHEME_SEPARATOR = ":"


@dataclass(frozen=True)
class Entry(Generic[T]):
    """A registered component: ``make(settings, **context)`` builds it (a scheme's
    ``make(reference, settings, **context)``); ``settings`` is the frozen dataclass of what it
    may be configured with (None: nothing); ``scheme``: the entry names a family by reference."""

    name: str
    make: Callable[..., T]
    settings: type | None = None
    scheme: bool = False


@dataclass(frozen=True)
class Choice(Generic[T]):
    """What a setting's value chose: the entry, the reference after a scheme's ``:`` (empty
    for a plain name) and the name its settings live under."""

    entry: Entry[T]
    reference: str = ""

    @property
    def name(self) -> str:
        return self.entry.name


class Registry(Generic[T]):
    """The components of one ``kind`` (``"candidate generator"``), chosen by the setting
    ``key`` (``"pair.candidates"``) and configured under the params section ``section``
    (``"candidates"``; None when no component of the kind has settings in ``params.yaml``)."""

    def __init__(self, kind: str, key: str, section: str | None = None) -> None:
        self.kind = kind
        self.key = key
        self.section = section
        self._entries: dict[str, Entry[T]] = {}

    def add(
        self,
        name: str,
        make: Callable[..., T],
        *,
        settings: type | None = None,
        scheme: bool = False,
    ) -> None:
        """Register ``make`` as ``name`` (a scheme when ``scheme``: chosen as ``name:<ref>``)."""
        if SCHEME_SEPARATOR in name:
            raise ValueError(f"{self.kind} {name!r}: a name cannot contain {SCHEME_SEPARATOR!r}")
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        if settings is not None and not dataclasses.is_dataclass(settings):
            raise TypeError(f"{self.kind} {name!r}: settings must be a dataclass")
        self._entries[name] = Entry(name, make, settings, scheme)

    def register(
        self, name: str, *, settings: type | None = None, scheme: bool = False
    ) -> Callable[[F], F]:
        """Decorator form of :meth:`add`."""

        def decorate(make: F) -> F:
            self.add(name, make, settings=settings, scheme=scheme)
            return make

        return decorate

    def remove(self, name: str) -> None:
        """Forget ``name`` (tests that register a stand-in clean up with this)."""
        self._entries.pop(name, None)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._lookup(name) is not None

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def names(self) -> list[str]:
        """Every registered name, schemes as ``name:<ref>``."""
        return [f"{e.name}:<ref>" if e.scheme else e.name for e in map(self._entries.get, self)]

    def plain_names(self) -> list[str]:
        """The names that choose a component on their own (not schemes, which need a ``:ref``)."""
        return [name for name in self if not self._entries[name].scheme]

    def choose(self, value: str) -> Choice[T]:
        """The entry ``value`` names (``name`` or ``scheme:reference``); :class:`ConfigError`
        naming the setting, the closest known name and every known one otherwise."""
        choice = self._lookup(value)
        if choice is not None:
            return choice
        name = str(value).partition(SCHEME_SEPARATOR)[0]
        entry = self._entries.get(name)
        if entry is not None:  # a scheme without its reference, or a plain name with one
            wanted = f"{name}:<ref>" if entry.scheme else name
            raise ConfigError(f"{self.key}: {value!r}: the {self.kind} is named {wanted}")
        close = difflib.get_close_matches(str(value), list(self._entries), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"{self.key}: unknown {self.kind} {value!r}{hint}; known: {', '.join(self.names())}"
        )

    def _lookup(self, value: str) -> Choice[T] | None:
        name, separator, reference = value.partition(SCHEME_SEPARATOR)
        entry = self._entries.get(name)
        if entry is None or entry.scheme != bool(separator):
            return None
        if entry.scheme and not reference:
            return None
        return Choice(entry, reference)

    def settings(self, value: str, sections: Mapping[str, Any] | None = None) -> Any:
        """The checked settings of the component ``value`` names, from ``sections`` (the
        kind's params section: ``{name: {key: value}}``); its dataclass' defaults where the
        section is silent; None for a component without settings."""
        return self._settings(self.choose(value).entry, sections)

    def _settings(self, entry: Entry[T], sections: Mapping[str, Any] | None) -> Any:
        values = (sections or {}).get(entry.name)
        if entry.settings is None:
            if values:
                raise ConfigError(
                    f"{self._where(entry.name)}: {self.kind} {entry.name!r} takes no settings"
                )
            return None
        return parse_settings(entry.settings, values or {}, self._where(entry.name))

    def check_section(self, sections: Mapping[str, Any]) -> None:
        """Check every component's settings in the kind's params section: each key must be a
        registered name and its values must fit (a typo fails before any work starts)."""
        for name in sections:
            if name not in self._entries:
                close = difflib.get_close_matches(str(name), list(self._entries), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(
                    f"{self._where(name)}: no {self.kind} is called {name!r}{hint}; "
                    f"known: {', '.join(self)}"
                )
            self._settings(self._entries[name], sections)

    def build(self, value: str, sections: Mapping[str, Any] | None = None, /, **context: Any) -> T:
        """Build the component ``value`` names with its checked settings (see
        :meth:`settings`) and the caller's ``context`` (a device, ...)."""
        choice = self.choose(value)
        settings = self._settings(choice.entry, sections)
        arguments = [choice.reference] if choice.entry.scheme else []
        if choice.entry.settings is not None:
            arguments.append(settings)
        return choice.entry.make(*arguments, **context)

    def _where(self, name: str) -> str:
        return f"{self.section}.{name}" if self.section else self.key
