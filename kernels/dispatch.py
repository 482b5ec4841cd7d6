"""The Triton ops provider: ``vdm_engine.ops.select_ops`` calls ``triton_ops`` through the
``vdm_engine.ops`` entry point (``triton``), so the core never imports this package.

``choose`` says whether the kernels serve a device and dtype and why not; ``triton_ops`` turns that
into ``Ops`` or ``KernelsUnavailableError``. Under ``auto`` the kernels serve CUDA tensors only; under
``triton`` CPU tensors are accepted when the Triton interpreter runs (``TRITON_INTERPRET=1``).
Nothing here imports triton unless the kernels were chosen.
"""

from __future__ import annotations

import torch

from vdm_engine.ops import ENV_VAR, Ops, OpsUnavailableError, resolve_mode

from ._triton import not_supported_reasons

__all__ = ["KernelsUnavailableError", "choose", "triton_ops"]


class KernelsUnavailableError(OpsUnavailableError):
    """The Triton kernels cannot run for this device and dtype (the message lists why)."""


def choose(device: torch.device | str, dtype: torch.dtype, mode: str | None = None) -> tuple[bool, list[str]]:
    """Whether the Triton kernels serve tensors on ``device`` with ``dtype`` under ``mode``.

    Returns:
        (use_triton, reasons): reasons say why not (empty when the kernels are used).
    """
    mode = resolve_mode(mode)
    if mode == "reference":
        return False, [f"{ENV_VAR}=reference"]
    device = torch.device(device)
    reasons = not_supported_reasons(device, dtype)
    if mode == "auto" and device.type != "cuda":
        # Auto never interprets: the interpreter is a testing tool, not a CPU fast path.
        reasons = reasons or [f"tensors are on {device.type}; auto mode uses the kernels for CUDA only"]
    return not reasons, reasons


def triton_ops(device: torch.device | str, dtype: torch.dtype, mode: str | None = None) -> Ops:
    """The Triton ``probe_gates``, ``probe_gates_levels`` and ``mask_patches`` for ``device`` / ``dtype``.

    Raises:
        KernelsUnavailableError: the kernels cannot serve; the message lists the reasons (and, when
            ``mode == "triton"``, says that they were requested).
    """
    mode = resolve_mode(mode)
    use, reasons = choose(device, dtype, mode)
    if not use:
        why = "; ".join(reasons)
        if mode == "triton":
            raise KernelsUnavailableError(
                f"{ENV_VAR}=triton was requested, but the Triton kernels cannot run for {device} {dtype}: {why}. "
                f"Unset {ENV_VAR} (or set it to auto/reference) to use the PyTorch references"
            )
        raise KernelsUnavailableError(why)
    from .gate_probe import probe_gates, probe_gates_levels
    from .patch_mask import mask_patches

    return Ops(probe_gates, mask_patches, "triton", f"Triton kernels for {torch.device(device)} {dtype}",
               gate_probe_levels=probe_gates_levels)
