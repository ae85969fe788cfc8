"""The one registry type: names, schemes, settings with their defaults, did-you-mean."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from grounding.errors import ConfigError
from grounding.registry import Registry


@dataclass(frozen=True)
class Size:
    side: int = 4

    def __post_init__(self) -> None:
        if self.side < 1:
            raise ValueError(f"side must be >= 1, got {self.side}")


def registry() -> Registry[tuple]:
    things: Registry[tuple] = Registry("thing", "stage.thing", "things")
    things.add("plain", lambda: ("plain",))
    things.add("sized", lambda settings, *, where: ("sized", settings.side, where), settings=Size)
    things.add("hub", lambda ref, settings, *, where: ("hub", ref, settings.side), settings=Size,
               scheme=True)  # fmt: skip
    return things


def test_entries_are_built_with_their_settings_and_the_callers_context() -> None:
    things = registry()
    assert things.build("plain") == ("plain",)
    assert things.build("sized", {"sized": {"side": 7}}, where="here") == ("sized", 7, "here")
    assert things.build("sized", {}, where="x") == ("sized", 4, "x")  # the dataclass' default
    assert things.build("hub:org/model", {"hub": {"side": 2}}, where="x") == ("hub", "org/model", 2)


def test_names_and_membership_tell_schemes_from_plain_names() -> None:
    things = registry()
    assert list(things) == ["hub", "plain", "sized"]
    assert things.names() == ["hub:<ref>", "plain", "sized"]
    assert things.plain_names() == ["plain", "sized"]
    assert "hub:x" in things and "hub" not in things and "plain:x" not in things


@pytest.mark.parametrize(
    "value, message",
    [
        (
            "plian",
            r"stage\.thing: unknown thing 'plian' \(did you mean 'plain'\?\); known: hub:<ref>",
        ),
        ("hub", r"stage\.thing: 'hub': the thing is named hub:<ref>"),
        ("plain:x", r"stage\.thing: 'plain:x': the thing is named plain"),
    ],
)
def test_a_wrong_name_says_what_is_known(value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        registry().choose(value)


def test_settings_are_checked_naming_their_key() -> None:
    things = registry()
    with pytest.raises(ConfigError, match=r"things\.sized: side must be >= 1"):
        things.settings("sized", {"sized": {"side": 0}})
    with pytest.raises(ConfigError, match=r"things\.sized\.sid: did you mean `side`"):
        things.settings("sized", {"sized": {"sid": 2}})
    with pytest.raises(ConfigError, match=r"things\.plain: thing 'plain' takes no settings"):
        things.settings("plain", {"plain": {"x": 1}})
    with pytest.raises(ConfigError, match=r"things\.sizd: no thing is called 'sizd' \(did you"):
        things.check_section({"sizd": {}})
    things.check_section({"sized": {"side": 3}, "hub": {"side": 1}, "plain": {}})


def test_a_name_is_registered_once_and_can_be_removed() -> None:
    things = registry()
    with pytest.raises(ValueError, match="registered twice"):
        things.add("plain", lambda: ())
    with pytest.raises(ValueError, match="cannot contain ':'"):
        things.add("a:b", lambda: ())
    things.remove("plain")
    assert "plain" not in things
