"""Triton kernels for the two hot spots outside the ViT, each next to its plain-PyTorch reference.

- ``mask_patches`` (module ``patch_mask``): blend patch embeddings with the placeholder under (B, N)
  or (B, K, N) gates.
- ``probe_gates`` (module ``gate_probe``): one depth's gate probe per launch, as each hidden state is produced;
  ``probe_gates_levels`` the probes of all K levels of K-level gates in the same one launch.

Importing this package never imports triton: the kernel functions load on first access, and the
references work without triton. ``vdm_engine.ops.select_ops`` chooses the path per device, through
the ``triton`` provider in ``dispatch.py``.
"""

from __future__ import annotations

import importlib

from vdm_engine.backbone import patch_mask_reference
from vdm_engine.gates import gate_probe_reference

__all__ = [
    "PatchMaskFunction",
    "gate_probe_reference",
    "mask_patches",
    "not_supported_reasons",
    "patch_mask_reference",
    "probe_gates",
    "probe_gates_levels",
]

_LAZY = {
    "PatchMaskFunction": "patch_mask",
    "mask_patches": "patch_mask",
    "probe_gates": "gate_probe",
    "probe_gates_levels": "gate_probe",
    "not_supported_reasons": "_triton",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
