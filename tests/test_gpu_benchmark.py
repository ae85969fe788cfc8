"""benchmarks/gpu.py: a machine without a GPU gets a notice and exit 0; the figures of both
devices and their Recall@1 difference are printed (the agreement itself is
tests/stages/test_gpu_pipeline.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT

from benchmarks import gpu


def run_figures(device: str, recall: float) -> dict[str, object]:
    return {
        "device": device,
        "images": 300,
        "images_per_s": 12.5,
        "pairs_per_s": 4000.0,
        "test_recall_at_1": recall,
    }


def test_without_a_gpu_it_says_so_and_exits_0(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    gpu.main([])
    out = capsys.readouterr().out
    assert out.startswith("no GPU on this machine (torch ")
    assert out.count("\n") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: it would compare")
def test_the_module_exits_0_on_this_machine() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu"], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "nothing to compare" in done.stdout


def test_the_figures_of_both_devices_and_their_difference_are_printed() -> None:
    text = gpu.compare(run_figures("cpu", 0.6000), run_figures("cuda:0", 0.5940))
    cpu, cuda, difference = text.splitlines()
    assert cpu.startswith("cpu ") and cuda.startswith("cuda:0 ")
    assert "images/s" in cpu and "pairs/s" in cuda
    assert difference == "test Recall@1 |difference| 0.0060"
