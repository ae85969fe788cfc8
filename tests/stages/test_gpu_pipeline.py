"""On a machine with a GPU, the pipeline gives the CPU's results: the shipped sample's test
Recall@1 of `dvc exp run -S runtime.device=cuda` is within :data:`TOLERANCE` of the same
experiment on the CPU. Skipped where torch sees no GPU (`benchmarks/gpu.py` measures the
speed on the same machine)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from repository import run, scratch_repo

#: The most the test Recall@1 of CUDA and the CPU may differ (mixed precision, other kernels).
TOLERANCE = 0.005

pytestmark = [
    pytest.mark.slow,
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU on this machine"),
]


def test_cuda_gives_the_cpus_test_recall_at_1(tmp_path: Path) -> None:
    env = scratch_repo(tmp_path)
    recall = {}
    for device in ("cpu", "cuda"):
        run(
            ["dvc", "exp", "run", "-n", f"on-{device}", "-S", f"runtime.device={device}"],
            tmp_path,
            env,
        )
        metrics = json.loads((tmp_path / "reports" / "metrics.json").read_text())
        recall[device] = metrics["recall_at_1"]
    assert abs(recall["cpu"] - recall["cuda"]) <= TOLERANCE, recall
