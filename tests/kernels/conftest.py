"""Kernel tests run on the card when there is one, else on the CPU under the Triton interpreter.

The tiny model fixtures are moved to that device here; tests about CPU behaviour move their
explainer back with ``.cpu()``.
"""

from __future__ import annotations

import importlib

import pytest
import torch

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
