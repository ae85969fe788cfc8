"""Where the models run: ``runtime.device`` and ``runtime.threads`` of params.yaml resolved
against this machine, the mixed precision each device gets, and a GPU running out of memory
as a one-line error.

``auto`` is ``cuda`` when torch sees a GPU, else ``cpu``. On the CPU nothing changes from a
plain float32 run (no autocast, no loader workers): results are bit-identical whatever the
machine's GPU. On CUDA, the backbone and the text encoder run under autocast (bfloat16 where
the GPU supports it, else float16) and loader workers prepare the images; the head trains
and scores in float32 (it is small, and its loss sums many pairs).
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from grounding.config import RuntimeParams, check_device_spec
from grounding.errors import ConfigError
from grounding.numerics import PORTABLE_THREADS, Numerics

if TYPE_CHECKING:
    import torch
    from torch import nn

#: Loader workers that prepare images for a GPU, at most (each holds a batch of images).
MAX_LOADER_WORKERS = 4


def as_device(device: str | torch.device | None, where: str = "runtime.device") -> torch.device:
    """``device`` as a torch device: a spec (``auto``, ``cpu``, ``cuda:N``) is resolved on this
    machine (:func:`resolve_device`), None is the CPU (a component that holds a model takes
    either from its caller)."""
    import torch

    if device is None:
        return torch.device("cpu")
    if isinstance(device, str):
        return resolve_device(device, where)
    return device


def resolve_device(spec: str, where: str = "runtime.device") -> torch.device:
    """The device ``spec`` names on this machine: ``auto`` -> ``cuda`` if torch sees a GPU,
    else ``cpu``. :class:`ConfigError` saying what to change (``where``: the setting that
    named the device) for ``cuda`` on a machine without one, or ``cuda:N`` beyond its GPUs."""
    import torch

    spec = check_device_spec(spec, where)
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        cuda = torch.version.cuda
        built = f"built with CUDA {cuda}" if cuda else "a CPU-only build"
        raise ConfigError(
            f"{where} {spec}: CUDA is not available on this machine (torch "
            f"{torch.__version__}, {built}, sees no GPU); set {where} to cpu or auto"
        )
    device = torch.device(spec)
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ConfigError(
            f"{where} {spec}: this machine has {count} GPU{'s' if count != 1 else ''} "
            f"(cuda:0 to cuda:{count - 1}); set {where} to one of those, cpu or auto"
        )
    return device


def module_device(module: nn.Module) -> torch.device:
    """Where ``module``'s weights (or buffers) are; the CPU for a module without any."""
    import torch

    for tensor in itertools.chain(module.parameters(), module.buffers()):
        return tensor.device
    return torch.device("cpu")


def available_cpus() -> int:
    """The CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota
    (``cpu.max`` of a container), at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    quota = _cgroup_cpu_quota(Path("/sys/fs/cgroup/cpu.max"))
    return max(1, min(cpus, quota) if quota else cpus)


def _cgroup_cpu_quota(path: Path) -> int | None:
    """CPUs allowed by a cgroup v2 ``cpu.max`` file (``"<quota> <period>"`` or ``"max ..."``),
    rounded up; None without a quota."""
    try:
        quota, period = path.read_text(encoding="ascii").split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, -(-int(quota) // int(period)))


def resolve_threads(
    spec: int | str, *, small_tensors: bool = False, numerics: Numerics = "fast"
) -> int:
    """Torch's CPU threads for ``runtime.threads``: the number given (>= 1), or for ``auto``
    :func:`available_cpus` (``numerics`` fast) or :data:`~grounding.numerics.PORTABLE_THREADS`
    (portable: the backbone's float sums are split by thread, so their bytes depend on the
    count), but 1 for work on ``small_tensors`` (training the head: its matrices are a few
    hundred wide, and a second thread costs more in waiting than it saves; one thread also
    trains the same head bit for bit every run, two do not: docs/gpu-and-ray.md)."""
    if spec == "auto":
        if small_tensors:
            return 1
        return PORTABLE_THREADS if numerics == "portable" else available_cpus()
    if isinstance(spec, bool) or not isinstance(spec, int) or spec < 1:
        raise ConfigError(f"threads {spec!r}: expected auto or an integer >= 1")
    return spec


def use_runtime(runtime: RuntimeParams, *, small_tensors: bool = False) -> torch.device:
    """Set torch's CPU threads (:func:`resolve_threads`) and return the resolved device (what
    a stage calls after :func:`grounding.numerics.use_numerics`)."""
    import torch

    threads = resolve_threads(
        runtime.threads, small_tensors=small_tensors, numerics=runtime.numerics
    )
    torch.set_num_threads(threads)
    return resolve_device(runtime.device)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The reduced precision the backbone and the text encoder run in on ``device``:
    bfloat16 on a GPU that supports it (the range of float32: no overflow), else float16;
    None (float32, bit-identical to a plain run) on the CPU."""
    import torch

    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """Mixed precision for a forward pass on ``device`` (:func:`autocast_dtype`); a no-op on
    the CPU."""
    import torch

    dtype = autocast_dtype(device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def loader_workers(device: torch.device, threads: int) -> int:
    """Processes that read and resize images for the backbone: none on the CPU (the same
    process, the same numbers as ever), up to ``threads`` (at most
    :data:`MAX_LOADER_WORKERS`) feeding a GPU."""
    return 0 if device.type != "cuda" else max(1, min(threads, MAX_LOADER_WORKERS))


@contextlib.contextmanager
def gpu_memory_hint(device: torch.device, advice: str) -> Iterator[None]:
    """Turn a GPU running out of memory inside the block into a one-line
    :class:`ConfigError`: ``out of GPU memory on cuda:0: <advice>`` (``advice`` says which
    setting to lower)."""
    import torch

    try:
        yield
    except torch.cuda.OutOfMemoryError:
        raise ConfigError(f"out of GPU memory on {device}: {advice}") from None
