"""Optional Triton import and the capability check shared by the kernels.

Triton is optional: without it ``vdm_engine.kernels`` still imports (the kernel modules get a stub
``triton``/``tl`` whose kernels raise on launch) and dispatch falls back to the references. The
checks here never import triton; ``triton``/``tl`` are imported when a kernel module asks for them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from types import SimpleNamespace

import torch

__all__ = [
    "SUPPORTED_DTYPES",
    "TRITON_IMPORT_ERROR",
    "device_guard",
    "launch_device",
    "interpreting",
    "next_power_of_2",
    "not_supported_reasons",
    "tl",
    "triton",
    "triton_importable",
]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET`` asks for the CPU interpreter (read now, as Triton reads it at import)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")


def triton_importable() -> bool:
    """Whether ``import triton`` can work, without importing it."""
    return importlib.util.find_spec("triton") is not None


class _Unavailable:
    """Stands in for a ``@triton.jit`` kernel when Triton is missing; launching it raises."""

    def __init__(self, fn):
        self.fn = fn
        self.__name__ = getattr(fn, "__name__", "kernel")

    def __getitem__(self, grid):
        raise RuntimeError(
            f"cannot launch {self.__name__}: triton is not installed ({__getattr__('TRITON_IMPORT_ERROR')}); "
            "install triton or use the reference path (VDM_KERNELS=reference)"
        )


def _import_triton():
    """(triton, triton.language, error): the real modules, or stubs and the import error."""
    try:
        import triton as triton_mod
        import triton.language as tl_mod

        return triton_mod, tl_mod, None
    except ImportError as e:  # exercised where triton is absent
        stub = SimpleNamespace(jit=_Unavailable, cdiv=lambda a, b: -(-a // b))
        return stub, SimpleNamespace(constexpr=object), f"{type(e).__name__}: {e}"


def __getattr__(name: str):
    # ``triton``, ``tl`` and ``TRITON_IMPORT_ERROR`` import triton on first access only, so the
    # capability checks below (used by dispatch) never pay for it.
    if name in ("triton", "tl", "TRITON_IMPORT_ERROR"):
        values = dict(zip(("triton", "tl", "TRITON_IMPORT_ERROR"), _import_triton()))
        globals().update(values)
        return values[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (n >= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


def not_supported_reasons(device: torch.device | str | torch.Tensor, dtype: torch.dtype | None = None) -> list[str]:
    """Why the Triton kernels cannot run for tensors on ``device`` with ``dtype``; empty when they can.

    Args:
        device: a device, or a tensor whose device and dtype are checked.
        dtype: the activation dtype (default: the tensor's dtype, else unchecked).

    Returns:
        Human-readable reasons; ``[]`` means the kernels are usable. CPU tensors are allowed only
        under the Triton interpreter (``TRITON_INTERPRET=1``). Does not import triton.
    """
    if isinstance(device, torch.Tensor):
        dtype = device.dtype if dtype is None else dtype
        device = device.device
    device = torch.device(device)
    reasons: list[str] = []
    if not triton_importable():
        reasons.append("triton is not installed")
    interp = interpreting()
    if device.type == "cuda":
        if interp:
            reasons.append("TRITON_INTERPRET=1 is set, so Triton would interpret CUDA tensors on the CPU")
        elif not torch.cuda.is_available():
            reasons.append("CUDA is not available in this process")
        else:
            major, minor = torch.cuda.get_device_capability(device)
            if (major, minor) < (7, 0):
                reasons.append(f"GPU compute capability {major}.{minor} < 7.0 (Triton needs Volta or newer)")
            elif dtype == torch.bfloat16 and major < 8:
                reasons.append(f"bfloat16 needs compute capability >= 8.0, this GPU has {major}.{minor}")
    elif device.type == "cpu":
        if not interp:
            reasons.append("tensors are on the CPU; the Triton kernels need CUDA (or TRITON_INTERPRET=1)")
    else:
        reasons.append(f"device type {device.type!r} is not supported by the Triton kernels (CUDA only)")
    if dtype is not None and dtype not in SUPPORTED_DTYPES:
        reasons.append(f"dtype {dtype} is not supported (expected float32, float16 or bfloat16)")
    return reasons


def launch_device(op: str, reference: str, *tensors: torch.Tensor) -> torch.device:
    """The one device of ``tensors``, if ``op``'s Triton kernel can run there.

    Raises ``ValueError`` for tensors on several devices, or on a device the kernel cannot use
    (CPU without ``TRITON_INTERPRET=1``), naming ``reference`` as the function to call instead.
    """
    device = tensors[0].device
    for t in tensors[1:]:
        if t.device != device:
            raise ValueError(f"{op}: all tensors must be on one device, got {device} and {t.device}")
    if device.type != "cuda" and not (device.type == "cpu" and interpreting()):
        raise ValueError(
            f"{op}: the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got {device}; "
            f"use {reference} on this device"
        )
    return device


def device_guard(device: torch.device):
    """Make ``device`` current for a launch (nothing to do off CUDA)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
