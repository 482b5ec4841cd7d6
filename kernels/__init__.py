"""Triton kernels for the two hot spots outside the ViT, each next to its plain-PyTorch reference.

- ``patch_mask``: blend patch embeddings with the placeholder under (B, N) or (B, K, N) gates.
- ``gate_probe``: all L+2 gate probes in one launch; ``gate_probe_patch_mask`` aggregates over depth.

Importing this package never imports triton: the kernel functions load on first access, and the
references work without triton. ``vdm_engine.kernels.dispatch.install`` chooses the path per device.
"""

from __future__ import annotations

import importlib
import sys
import types

from vdm_engine.backbone import patch_mask_reference
from vdm_engine.gates import gate_probe_reference

__all__ = [
    "PatchMaskFunction",
    "gate_probe",
    "gate_probe_patch_mask",
    "gate_probe_patch_mask_reference",
    "gate_probe_reference",
    "not_supported_reasons",
    "patch_mask",
    "patch_mask_reference",
]

_LAZY = {
    "PatchMaskFunction": "patch_mask",
    "patch_mask": "patch_mask",
    "gate_probe": "gate_probe",
    "gate_probe_patch_mask": "gate_probe",
    "gate_probe_patch_mask_reference": "gate_probe",
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


class _Package(types.ModuleType):
    """Keeps ``vdm_engine.kernels.patch_mask`` / ``.gate_probe`` the functions, not their same-named modules.

    Importing a submodule makes Python set it as an attribute of this package, which would shadow
    the function of the same name; the modules stay reachable through ``sys.modules`` and
    ``from vdm_engine.kernels.patch_mask import ...``.
    """

    def __setattr__(self, name, value):
        if name in ("patch_mask", "gate_probe") and isinstance(value, types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
