"""The lock of the whole Python environment: every package, transitive ones included, pinned
to one version with the sha256 of its files, for CPython 3.11 on Linux x86-64 (glibc >= 2.28).

``python requirements/lock.py`` refreshes it from ``pyproject.toml`` (the dependencies and
every extra) and ``requirements/constraints.txt`` (exact pins the ranges cannot say) with
uv's resolver, which reads only the registry's metadata (no wheel is downloaded), and records
the digest of those inputs in the lock's first line, so that ``tests/test_lock.py`` sees a
lock that no longer matches them. A refresh keeps every pin that still fits and resolves only
what changed; ``--upgrade`` takes the newest releases within the ranges. Install with::

    pip install --require-hashes -r requirements/py311-linux-x86_64.txt
    pip install --no-deps -e .
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"
CONSTRAINTS = ROOT / "requirements" / "constraints.txt"
LOCK = ROOT / "requirements" / "py311-linux-x86_64.txt"
#: The one interpreter and platform the lock is resolved for (uv's names).
PYTHON_VERSION = "3.11"
PYTHON_PLATFORM = "x86_64-manylinux_2_28"
#: Where the markers of pyproject's requirements are evaluated (the lock's platform).
MARKER_ENVIRONMENT = {
    "python_version": PYTHON_VERSION,
    "python_full_version": f"{PYTHON_VERSION}.0",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
}
REFRESH = "python requirements/lock.py"
_DIGEST_LINE = "# inputs sha256: "
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def inputs(pyproject: Path = PYPROJECT, constraints: Path = CONSTRAINTS) -> list[str]:
    """What the lock is resolved from, one line each, sorted: ``dependency <requirement>``
    for pyproject's dependencies, ``<extra> <requirement>`` for each extra's, and
    ``constraint <requirement>`` for the constraints file's lines."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    lines = [f"dependency {Requirement(r)}" for r in project.get("dependencies", [])]
    for extra, requirements in project.get("optional-dependencies", {}).items():
        lines += [f"{extra} {Requirement(r)}" for r in requirements]
    lines += [f"constraint {Requirement(r)}" for r in _requirement_lines(constraints)]
    return sorted(lines)


def inputs_digest(pyproject: Path = PYPROJECT, constraints: Path = CONSTRAINTS) -> str:
    """sha256 of :func:`inputs`: changes with any requirement, not with other settings."""
    return hashlib.sha256("\n".join(inputs(pyproject, constraints)).encode()).hexdigest()


def pins(lock: Path = LOCK) -> dict[str, str]:
    """The lock's ``name==version`` lines: canonical name -> version."""
    found = {}
    for line in lock.read_text(encoding="utf-8").splitlines():
        match = _PIN.match(line)
        if match:
            found[canonicalize_name(match.group(1))] = match.group(2)
    return found


def disagreements(
    pyproject: Path = PYPROJECT, constraints: Path = CONSTRAINTS, lock: Path = LOCK
) -> list[str]:
    """Why the lock does not match pyproject.toml and the constraints, a line each: a
    requirement (of the dependencies, an extra or a constraint) that is not pinned, or pinned
    outside its range, and a recorded inputs digest that is not theirs. Empty when they agree."""
    if not lock.exists():
        return [f"{lock.name} is missing"]
    pinned = pins(lock)
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    wanted = [("dependencies", r) for r in project.get("dependencies", [])]
    for extra, requirements in project.get("optional-dependencies", {}).items():
        wanted += [(f"extra {extra}", r) for r in requirements]
    wanted += [(constraints.name, r) for r in _requirement_lines(constraints)]
    problems = []
    for where, text in wanted:
        requirement = Requirement(text)
        if requirement.marker and not requirement.marker.evaluate(MARKER_ENVIRONMENT):
            continue
        version = pinned.get(canonicalize_name(requirement.name))
        if version is None:
            problems.append(f"{requirement} ({where}) is not in {lock.name}")
        elif not requirement.specifier.contains(version, prereleases=True):
            problems.append(f"{requirement} ({where}) is pinned at {version} in {lock.name}")
    recorded = _recorded_digest(lock)
    if recorded != inputs_digest(pyproject, constraints):
        problems.append(
            f"{lock.name} was resolved from other requirements than pyproject.toml and "
            f"{constraints.name} now list (inputs sha256 {recorded or 'not recorded'})"
        )
    return problems


def _recorded_digest(lock: Path) -> str | None:
    for line in lock.read_text(encoding="utf-8").splitlines():
        if line.startswith(_DIGEST_LINE):
            return line.removeprefix(_DIGEST_LINE).strip()
    return None


def _requirement_lines(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [line for line in lines if line]


def compile_command(uv: list[str], out: Path) -> list[str]:
    """uv's resolution of pyproject.toml with every extra, under the constraints, for
    :data:`PYTHON_VERSION` on :data:`PYTHON_PLATFORM`, with the sha256 of every file of each
    pinned release, written to ``out``."""
    return [
        *uv,
        "pip",
        "compile",
        str(PYPROJECT.relative_to(ROOT)),
        "--all-extras",
        "--constraint",
        str(CONSTRAINTS.relative_to(ROOT)),
        "--generate-hashes",
        "--python-version",
        PYTHON_VERSION,
        "--python-platform",
        PYTHON_PLATFORM,
        "--custom-compile-command",
        REFRESH,
        "--quiet",
        "--output-file",
        str(out),
    ]


def _uv() -> list[str]:
    if found := shutil.which("uv"):
        return [found]
    try:
        import uv  # noqa: F401
    except ImportError:
        raise SystemExit(
            "error: uv is not installed: `pip install uv` (or the dev extra), then run "
            f"`{REFRESH}` again"
        ) from None
    return [sys.executable, "-m", "uv"]


def main(argv: list[str] | None = None) -> None:
    upgrade = "--upgrade" in (sys.argv[1:] if argv is None else argv)
    out = LOCK.with_suffix(".tmp")
    if LOCK.exists() and not upgrade:  # uv keeps the pins of the file it writes where it can
        shutil.copyfile(LOCK, out)
    command = compile_command(_uv(), out) + (["--upgrade"] if upgrade else [])
    print(
        f"resolving pyproject.toml (dependencies and every extra) under "
        f"{CONSTRAINTS.relative_to(ROOT)} for Python {PYTHON_VERSION} on {PYTHON_PLATFORM}, "
        f"from the registry's metadata:\n  {' '.join(command)}",
        flush=True,
    )
    done = subprocess.run(command, cwd=ROOT, env={**os.environ, "UV_NO_CONFIG": "1"})
    if done.returncode:
        out.unlink(missing_ok=True)
        raise SystemExit(f"error: uv pip compile failed (exit {done.returncode}); lock unchanged")
    body = out.read_text(encoding="utf-8")
    out.write_text(f"{_DIGEST_LINE}{inputs_digest()}\n{body}", encoding="utf-8")
    out.replace(LOCK)
    count = len(pins(LOCK))
    print(f"wrote {LOCK.relative_to(ROOT)}: {count} packages, each with its files' sha256")


if __name__ == "__main__":
    main()
