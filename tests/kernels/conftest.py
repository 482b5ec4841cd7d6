"""Kernel tests run on the card when there is one, else on the CPU under the Triton interpreter.

The tiny model fixtures are moved to that device here; tests about CPU behaviour move their
explainer back with ``.cpu()``.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import BackgroundRun

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def tiny_backbone(tiny_backbone):
    return tiny_backbone.to(DEV)


@pytest.fixture
def tiny_gates(tiny_gates):
    return tiny_gates.to(DEV)


@pytest.fixture
def pixels(pixels):
    return pixels.to(DEV)


@pytest.fixture
def poison(monkeypatch):
    """Every buffer the kernel launchers allocate starts as NaN, so an element a kernel skips fails."""

    def nan_empty(shape, *, device, dtype):
        return torch.full(shape, float("nan"), device=device, dtype=dtype)

    for module in ("patch_mask", "gate_probe"):
        monkeypatch.setattr(importlib.import_module(f"vdm_engine.kernels.{module}"), "_empty", nan_empty)


GPU_CHECK = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


class GpuCheckRun(BackgroundRun):
    """``benchmarks/gpu_check.py``'s CPU dry run (interpreter, tiny shapes, the sweep) in a subprocess,
    started at once; ``wait()`` -> the finished process (stdout and stderr read)."""

    def __init__(self, out: Path):
        self.out = out
        cmd = [sys.executable, str(GPU_CHECK), "--device", "cpu", "--tiny", "--no-compile", "--no-end-to-end",
               "--batches", "2", "--sweep", "--out", str(out)]
        env = dict(os.environ, TRITON_INTERPRET="1")
        super().__init__(cmd, env=env, timeout_s=300)



@pytest.fixture(scope="package")
def gpu_check_run(tmp_path_factory):
    run = GpuCheckRun(tmp_path_factory.mktemp("gpu_check"))
    yield run
    run.stop()


@pytest.fixture(scope="package", autouse=True)
def _start_first_in_kernels(request):
    """``START_FIRST`` (tests/conftest.py) for this folder: the dry run starts with its first test when
    selected, and runs on the second core beside the single-threaded interpreter tests."""
    if any("gpu_check_run" in item.fixturenames for item in request.session.items):
        request.getfixturevalue("gpu_check_run")
