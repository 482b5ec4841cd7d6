"""Choose the Triton kernels or the plain-PyTorch references, once per model placement.

``install(explainer, mode)`` runs when an ``Explainer`` is built and after ``.to()``; it sets
``explainer.gate_probe_fn`` and ``explainer.backbone.patch_mask_fn``. Modes (env ``VDM_KERNELS``):

- ``auto`` (default): Triton for CUDA tensors when triton is importable; the references otherwise
  (CPU, missing triton, an old GPU), with the reasons logged once.
- ``triton``: force the kernels; raise ``KernelsUnavailableError`` listing the reasons when they
  cannot run. CPU tensors are accepted under the Triton interpreter (``TRITON_INTERPRET=1``).
- ``reference``: always the references (also the ONNX export path).

Nothing here imports triton unless the kernels were chosen, and the installed functions carry no
per-call fallback: the decision is made here, once.
"""

from __future__ import annotations

import logging
import os

import torch

from vdm_engine.backbone import patch_mask_reference
from vdm_engine.gates import gate_probe_reference

from ._triton import not_supported_reasons

__all__ = ["MODES", "KernelsUnavailableError", "choose", "install", "install_backbone", "resolve_mode"]

MODES = ("auto", "reference", "triton")
ENV_VAR = "VDM_KERNELS"

logger = logging.getLogger("vdm_engine.kernels")
_logged: set[str] = set()


class KernelsUnavailableError(ValueError):
    """``VDM_KERNELS=triton`` was requested but the kernels cannot run here."""


def resolve_mode(mode: str | None = None) -> str:
    """Normalise ``mode`` (default: env ``VDM_KERNELS``, else ``auto``); ``ValueError`` if unknown."""
    raw = os.environ.get(ENV_VAR, "auto") if mode is None else mode
    m = str(raw).strip().lower() or "auto"
    if m not in MODES:
        raise ValueError(f"{ENV_VAR} must be one of {', '.join(MODES)}; got {raw!r}")
    return m


def choose(device: torch.device | str, dtype: torch.dtype, mode: str | None = None) -> tuple[bool, list[str]]:
    """Decide whether the Triton kernels serve tensors on ``device`` with ``dtype``.

    Returns:
        (use_triton, reasons): reasons say why not (empty when the kernels are used).

    Raises:
        KernelsUnavailableError: ``mode == "triton"`` and the kernels cannot run.
    """
    mode = resolve_mode(mode)
    if mode == "reference":
        return False, [f"{ENV_VAR}=reference"]
    device = torch.device(device)
    reasons = not_supported_reasons(device, dtype)
    if mode == "auto" and device.type != "cuda":
        # Auto never interprets: the interpreter is a testing tool, not a CPU fast path.
        reasons = reasons or [f"tensors are on {device.type}; auto mode uses the kernels for CUDA only"]
    if reasons and mode == "triton":
        raise KernelsUnavailableError(
            f"{ENV_VAR}=triton was requested, but the Triton kernels cannot run for {device} {dtype}: "
            + "; ".join(reasons)
            + f". Unset {ENV_VAR} (or set it to auto/reference) to use the PyTorch references"
        )
    return not reasons, reasons


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.info(message)


def install_backbone(backbone, mode: str | None = None) -> bool:
    """Set ``backbone.patch_mask_fn`` for the backbone's device and dtype (the training loop's hook).

    Returns:
        True when the Triton ``mask_patches`` was installed.
    """
    use, reasons = choose(backbone.device, backbone.dtype, mode)
    if use:
        from .patch_mask import mask_patches

        backbone.patch_mask_fn = mask_patches
    else:
        backbone.patch_mask_fn = patch_mask_reference
        _log_once(f"vdm_engine.kernels: patch_mask uses the PyTorch reference ({'; '.join(reasons)})")
    return use


def install(explainer, mode: str | None = None) -> bool:
    """Install the gate-probe and patch-mask functions on an ``Explainer`` (decided once per call).

    Args:
        explainer: a ``vdm_engine.Explainer``; its backbone's device and dtype decide.
        mode: ``auto``, ``triton`` or ``reference``; default the env ``VDM_KERNELS``.

    Returns:
        True when the Triton kernels were installed.
    """
    backbone = explainer.backbone
    device, dtype = backbone.device, backbone.dtype
    use, reasons = choose(device, dtype, mode)
    if use:
        from .gate_probe import probe_gates
        from .patch_mask import mask_patches

        explainer.gate_probe_fn = probe_gates
        backbone.patch_mask_fn = mask_patches
        attn = getattr(backbone.config, "_attn_implementation", None)
        if device.type == "cuda" and dtype != torch.float32 and attn not in (None, "sdpa", "flash_attention_2"):
            _log_once(
                f"vdm_engine.kernels: the backbone uses {attn!r} attention; load it with "
                "attn_implementation='sdpa' for the fused attention kernels in fp16/bf16"
            )
    else:
        explainer.gate_probe_fn = gate_probe_reference
        backbone.patch_mask_fn = patch_mask_reference
        _log_once(f"vdm_engine.kernels: using the PyTorch references on {device} ({'; '.join(reasons)})")
    explainer.kernel_backend = "triton" if use else "reference"
    return use
