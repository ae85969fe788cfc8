"""Which CPU kernels torch's libraries run: ``runtime.numerics`` of params.yaml (the stages),
``grounding predict|export --numerics`` and ``GROUNDING_NUMERICS`` (a served model).

- ``portable`` (the default): the code paths every x86-64 CPU with AVX2 has, whatever newer
  instructions this one has, so that the same inputs give the same float bytes on any such
  machine: MKL's conditional numerical reproducibility on its AVX2 path (``MKL_CBWR``),
  oneDNN capped at AVX2 (``ONEDNN_MAX_CPU_ISA``) and ATen's vectorised kernels at AVX2
  (``ATEN_CPU_CAPABILITY``). These override whatever the environment says: a value left in a
  shell (``ATEN_CPU_CAPABILITY=avx512``, say) would otherwise change the bytes without a
  trace in params.yaml or dvc.lock. On a CPU without AVX2, or not x86-64, nothing can give
  those bytes (:func:`bytes_are_portable` says so) and nothing is set.
- ``fast``: whatever this CPU and the environment choose (AVX-512, AMX ...): the same bytes
  run after run on one machine, other bytes on another.

The thread count changes the bytes too: ``portable`` runs :data:`PORTABLE_THREADS` threads
where ``runtime.threads`` is ``auto`` (:mod:`grounding.modeling.device`), and sets
``OMP_NUM_THREADS`` (torch's default count: predict, a served model) to it. These variables
are read when torch's libraries load, so :func:`use_numerics` must run before anything
imports torch; it refuses (``ConfigError``) when torch is already loaded with other settings
rather than leave them silently ineffective.
This module imports nothing heavy.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Literal

from grounding.errors import ConfigError

Numerics = Literal["portable", "fast"]
NUMERICS: tuple[Numerics, ...] = ("portable", "fast")
#: The environment variable a served model reads its numerics from (default ``portable``).
NUMERICS_VARIABLE = "GROUNDING_NUMERICS"
#: Torch's CPU threads in ``portable`` where ``runtime.threads`` is ``auto``, and for predict
#: and a served model: the backbone's sums are split by thread (1 and 2 threads give other
#: feature bytes), so the count must not follow the machine's CPUs.
PORTABLE_THREADS = 2
#: What ``portable`` sets on an x86-64 CPU with AVX2 (each is read as torch's libraries load).
PORTABLE_ENVIRONMENT = {
    # MKL's conditional numerical reproducibility: its AVX2 code path on every CPU that has
    # AVX2 (unset, MKL picks the newest path this CPU has: AVX-512 here, other bytes)
    "MKL_CBWR": "AVX2",
    # oneDNN (convolutions, linear layers) capped at AVX2: no AVX-512 or AMX kernels
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    # ATen's vectorised kernels (pooling, RoIAlign's arithmetic, softmax ...) at AVX2
    "ATEN_CPU_CAPABILITY": "avx2",
    # torch's default thread count where none is set (predict, a served model)
    "OMP_NUM_THREADS": str(PORTABLE_THREADS),
}
_CPUINFO = Path("/proc/cpuinfo")


def check_numerics(mode: object, where: str = "runtime.numerics") -> Numerics:
    """``mode`` if it is ``portable`` or ``fast``; else :class:`ConfigError` naming ``where``."""
    if mode not in NUMERICS:
        raise ConfigError(f"{where}: {mode!r} is not one of {', '.join(NUMERICS)}")
    return mode  # type: ignore[return-value]


def cpu_flags(cpuinfo: Path = _CPUINFO) -> frozenset[str]:
    """The instruction set flags of this machine's first CPU (``/proc/cpuinfo``); empty where
    that file is missing (not Linux)."""
    try:
        text = cpuinfo.read_text(encoding="ascii", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def bytes_are_portable(
    mode: Numerics, machine: str | None = None, flags: frozenset[str] | None = None
) -> bool:
    """Whether ``mode`` on this machine (``machine`` as :func:`platform.machine` names it,
    its CPU ``flags``) gives the bytes of every other x86-64 CPU with AVX2 in ``portable``:
    only ``portable`` on such a CPU. A GPU's bytes differ as well (the caller knows its
    device)."""
    machine = platform.machine() if machine is None else machine
    flags = cpu_flags() if flags is None else flags
    return mode == "portable" and machine in ("x86_64", "AMD64") and {"avx2", "fma"} <= flags


def numerics_environment(
    mode: Numerics, machine: str | None = None, flags: frozenset[str] | None = None
) -> dict[str, str]:
    """The environment variables ``mode`` sets on this machine: :data:`PORTABLE_ENVIRONMENT`
    where :func:`bytes_are_portable`, else none."""
    return dict(PORTABLE_ENVIRONMENT) if bytes_are_portable(mode, machine, flags) else {}


def use_numerics(mode: Numerics, where: str = "runtime.numerics") -> dict[str, str]:
    """Fix the CPU kernels of ``mode`` for this process and the processes it starts, before
    torch loads: set :func:`numerics_environment` in ``os.environ`` (over the values there)
    and return it. :class:`ConfigError` naming ``where`` if torch is loaded already and those
    variables had other values when it was (their setting would not take effect)."""
    check_numerics(mode, where)
    wanted = numerics_environment(mode)
    stale = {name: value for name, value in wanted.items() if os.environ.get(name) != value}
    if stale and "torch" in sys.modules:
        names = ", ".join(f"{name}={value}" for name, value in stale.items())
        raise ConfigError(
            f"{where} {mode}: torch was loaded before the CPU kernels were fixed; set {names} "
            "in the environment, or fix the numerics before anything imports torch"
        )
    os.environ.update(wanted)
    return wanted
