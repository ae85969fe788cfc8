"""grounding.numerics: which CPU kernels each mode asks for, on which machines, and that the
setting takes effect only before torch loads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from grounding.errors import ConfigError
from grounding.numerics import (
    PORTABLE_ENVIRONMENT,
    bytes_are_portable,
    check_numerics,
    cpu_flags,
    numerics_environment,
    use_numerics,
)

AVX2 = frozenset({"sse4_2", "avx", "avx2", "fma"})
AVX512 = AVX2 | {"avx512f", "avx512bw", "amx_tile"}


def test_portable_asks_every_x86_64_cpu_with_avx2_for_the_avx2_kernels() -> None:
    for flags in (AVX2, AVX512):
        assert numerics_environment("portable", "x86_64", flags) == {
            "MKL_CBWR": "AVX2",
            "ONEDNN_MAX_CPU_ISA": "AVX2",
            "ATEN_CPU_CAPABILITY": "avx2",
            "OMP_NUM_THREADS": "2",
        }
        assert bytes_are_portable("portable", "x86_64", flags)


@pytest.mark.parametrize(
    ("mode", "machine", "flags"),
    [
        ("fast", "x86_64", AVX512),  # this CPU's newest kernels
        ("portable", "x86_64", frozenset({"sse4_2", "avx"})),  # no AVX2: avx2 would crash
        ("portable", "aarch64", frozenset({"asimd"})),  # another architecture
    ],
)
def test_nothing_is_set_where_the_bytes_cannot_be_the_portable_ones(
    mode: str, machine: str, flags: frozenset[str]
) -> None:
    assert numerics_environment(mode, machine, flags) == {}  # type: ignore[arg-type]
    assert not bytes_are_portable(mode, machine, flags)  # type: ignore[arg-type]


def test_cpu_flags_reads_the_first_cpu(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 fma\n\nflags\t\t: other\n")
    assert cpu_flags(cpuinfo) == {"fpu", "avx2", "fma"}
    assert cpu_flags(tmp_path / "missing") == frozenset()


def test_a_misspelled_mode_names_the_setting() -> None:
    with pytest.raises(ConfigError, match=r"runtime\.numerics: 'portabel' is not one of portable"):
        check_numerics("portabel")


def test_portable_overrides_what_the_environment_says(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "torch", raising=False)  # as in a fresh stage process
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx512")
    monkeypatch.setenv("MKL_CBWR", "AUTO")
    set_ = use_numerics("portable")
    if not bytes_are_portable("portable"):
        pytest.skip("this CPU has no AVX2: portable sets nothing here")
    assert set_ == PORTABLE_ENVIRONMENT
    assert {name: os.environ[name] for name in PORTABLE_ENVIRONMENT} == PORTABLE_ENVIRONMENT


def test_fast_leaves_the_environment_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", sys)  # loaded: fast still has nothing to refuse
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx512")
    assert use_numerics("fast") == {}
    assert os.environ["ATEN_CPU_CAPABILITY"] == "avx512"


def test_refuses_once_torch_is_loaded_with_other_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    if not bytes_are_portable("portable"):
        pytest.skip("this CPU has no AVX2: portable sets nothing here")
    monkeypatch.setitem(sys.modules, "torch", sys)
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")
    with pytest.raises(ConfigError, match="torch was loaded before the CPU kernels were fixed"):
        use_numerics("portable", "runtime.numerics")
    assert os.environ["ATEN_CPU_CAPABILITY"] == "default"  # nothing half-set


@pytest.mark.slow
def test_torch_loaded_afterwards_runs_the_avx2_kernels() -> None:
    if not bytes_are_portable("portable"):
        pytest.skip("this CPU has no AVX2")
    code = (
        "from grounding.numerics import use_numerics; use_numerics('portable'); "
        "import torch; print(torch.backends.cpu.get_cpu_capability())"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "AVX2"
