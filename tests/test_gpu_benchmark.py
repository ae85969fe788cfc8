"""benchmarks/gpu.py: a machine without a GPU gets a notice and exit 0; the verdict compares
Recall@1 within the tolerance."""

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
    assert gpu.main([]) == 0
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


@pytest.mark.parametrize(("cuda_recall", "passed"), [(0.6046, True), (0.5940, False)])
def test_recall_at_1_must_agree_within_the_tolerance(cuda_recall: float, passed: bool) -> None:
    verdict, text = gpu.compare(run_figures("cpu", 0.6000), run_figures("cuda:0", cuda_recall))
    assert verdict is passed
    assert ("agree" if passed else "DIFFER") in text.splitlines()[-1]
    assert "images/s" in text and "pairs/s" in text
