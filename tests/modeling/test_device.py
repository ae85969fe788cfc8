"""Device resolution, threads, the precision each device gets and the out-of-memory message,
on a CPU machine: CUDA's answers are monkeypatched."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from grounding.config import RuntimeParams
from grounding.errors import ConfigError, run
from grounding.modeling import device as device_module
from grounding.modeling.device import (
    MAX_LOADER_WORKERS,
    _cgroup_cpu_quota,
    autocast,
    autocast_dtype,
    available_cpus,
    gpu_memory_hint,
    loader_workers,
    module_device,
    resolve_device,
    resolve_threads,
    use_runtime,
)


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture
def one_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


def test_cpu_is_the_cpu_whatever_the_machine(one_gpu: None) -> None:
    assert resolve_device("cpu") == torch.device("cpu")


def test_auto_is_the_cpu_without_a_gpu(no_gpu: None) -> None:
    assert resolve_device("auto") == torch.device("cpu")


def test_auto_is_cuda_with_a_gpu(one_gpu: None) -> None:
    assert resolve_device("auto") == torch.device("cuda")


def test_cuda_and_an_index_within_the_gpus(one_gpu: None) -> None:
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("cuda:0") == torch.device("cuda", 0)


def test_cuda_without_cuda_says_what_to_set(no_gpu: None) -> None:
    with pytest.raises(ConfigError) as error:
        resolve_device("cuda")
    message = str(error.value)
    assert "CUDA is not available on this machine" in message
    assert f"torch {torch.__version__}" in message
    assert message.endswith("set runtime.device to cpu or auto")
    assert "\n" not in message


def test_a_cpu_only_torch_build_is_named(no_gpu: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(ConfigError, match="a CPU-only build"):
        resolve_device("cuda:0", "--device")


def test_a_gpu_index_beyond_the_machine_names_the_count(one_gpu: None) -> None:
    with pytest.raises(ConfigError, match=r"--device cuda:3: this machine has 1 GPU \(cuda:0 to"):
        resolve_device("cuda:3", "--device")


@pytest.mark.parametrize("spec", ["gpu", "CUDA", "cuda:", "cuda:x", "cpu:0", ""])
def test_a_device_that_is_no_device_is_refused_naming_the_setting(spec: str) -> None:
    with pytest.raises(ConfigError, match=r"--device: .* is not one of auto, cpu, cuda, cuda:N"):
        resolve_device(spec, "--device")


def test_runtime_params_check_device_and_threads() -> None:
    assert RuntimeParams("cuda:1", "auto", "portable").threads == "auto"
    with pytest.raises(ConfigError, match=r"runtime\.device"):
        RuntimeParams("gpu", 1, "portable")
    with pytest.raises(ConfigError, match=r"runtime\.threads"):
        RuntimeParams("cpu", 0, "portable")


def test_threads_auto_is_the_cpus_this_process_may_use() -> None:
    assert resolve_threads("auto") == available_cpus()
    assert resolve_threads("auto", small_tensors=True) == 1
    # portable: a count that does not follow the machine (the feature bytes depend on it)
    assert resolve_threads("auto", numerics="portable") == 2
    assert resolve_threads("auto", small_tensors=True, numerics="portable") == 1
    assert resolve_threads(3, numerics="portable") == 3
    assert resolve_threads(2, small_tensors=True) == 2
    assert 1 <= available_cpus() <= (os.cpu_count() or 1)
    assert resolve_threads(3) == 3
    for bad in (0, -1, True, "four"):
        with pytest.raises(ConfigError, match="threads"):
            resolve_threads(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "cpus"),
    [("max 100000\n", None), ("150000 100000\n", 2), ("100000 100000", 1), ("50000 100000", 1)],
)
def test_a_cgroup_quota_caps_the_cpus(tmp_path: Path, text: str, cpus: int | None) -> None:
    (tmp_path / "cpu.max").write_text(text, encoding="ascii")
    assert _cgroup_cpu_quota(tmp_path / "cpu.max") == cpus


def test_no_cgroup_file_is_no_quota(tmp_path: Path) -> None:
    assert _cgroup_cpu_quota(tmp_path / "cpu.max") is None


def test_available_cpus_take_the_quota(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device_module, "_cgroup_cpu_quota", lambda path: 1)
    assert available_cpus() == 1


def test_use_runtime_sets_the_threads_and_resolves_the_device(no_gpu: None) -> None:
    threads = torch.get_num_threads()
    try:
        assert use_runtime(RuntimeParams("auto", 1, "portable")) == torch.device("cpu")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


def test_the_cpu_runs_in_float32_without_autocast() -> None:
    cpu = torch.device("cpu")
    assert autocast_dtype(cpu) is None
    with autocast(cpu):
        assert not torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


@pytest.mark.parametrize(("bf16", "dtype"), [(True, torch.bfloat16), (False, torch.float16)])
def test_a_gpu_runs_in_bfloat16_where_it_can(
    monkeypatch: pytest.MonkeyPatch, bf16: bool, dtype: torch.dtype
) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
    assert autocast_dtype(torch.device("cuda", 0)) == dtype


def test_loader_workers_feed_a_gpu_only() -> None:
    assert loader_workers(torch.device("cpu"), 8) == 0
    assert loader_workers(torch.device("cuda"), 2) == 2
    assert loader_workers(torch.device("cuda"), 64) == MAX_LOADER_WORKERS


def test_module_device_of_weights_and_of_none() -> None:
    assert module_device(torch.nn.Linear(2, 2)) == torch.device("cpu")
    assert module_device(torch.nn.AvgPool2d(2)) == torch.device("cpu")


def test_out_of_gpu_memory_is_one_line_saying_what_to_lower(
    capsys: pytest.CaptureFixture[str],
) -> None:
    def stage(argv: list[str] | None) -> None:
        with gpu_memory_hint(torch.device("cuda", 0), "lower train.batch_size (now 8)"):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(SystemExit) as exit_:
        run(stage)
    assert exit_.value.code == 1
    assert capsys.readouterr().err == (
        "error: out of GPU memory on cuda:0: lower train.batch_size (now 8)\n"
    )


def test_other_errors_pass_the_memory_hint() -> None:
    with (
        pytest.raises(RuntimeError, match="not memory"),
        gpu_memory_hint(torch.device("cuda"), "lower it"),
    ):
        raise RuntimeError("not memory")


def test_as_device_takes_a_spec_a_device_or_nothing() -> None:
    from grounding.modeling.device import as_device

    assert as_device(None) == torch.device("cpu")
    assert as_device("cpu") == torch.device("cpu")
    cpu = torch.device("cpu")
    assert as_device(cpu) is cpu
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"runtime.device cuda: CUDA is not available"):
            as_device("cuda")
