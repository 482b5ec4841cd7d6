"""The one fast-path policy: which gate-probe and patch-masking functions serve a device and dtype.

``select_ops`` is the only place that reads ``VDM_KERNELS`` (auto | reference | triton) and decides.
The references live in the core; fast paths are plugins registered under the ``vdm_engine.ops``
entry-point group (``vdm_engine.kernels`` registers ``triton``), so the core never names them. A
provider is called as ``provider(device, dtype, mode)`` and returns ``Ops`` or raises
``OpsUnavailableError`` with the reasons it cannot serve; ``auto`` then falls back to the
references (reasons logged once) and ``triton`` re-raises.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from typing import Callable

import torch

from .backbone import patch_mask_reference
from .gates import gate_probe_levels_reference, gate_probe_reference

__all__ = ["Ops", "OpsUnavailableError", "select_ops", "reference_ops", "probe_layout_for", "resolve_mode", "MODES",
           "PROBE_LAYOUTS", "WIDE_MAX_ELEMENTS", "ENV_VAR", "ENTRY_POINT_GROUP"]

MODES = ("auto", "reference", "triton")
#: ``Ops.probe_layout`` values.
PROBE_LAYOUTS = ("auto", "wide", "per-depth")
#: ``auto`` runs the wide layout while a call's first-layer outputs, B*T*S*K*P (the size of each of
#: the wide layout's three buffers: projections, pre-activations, tanh), stay under this many
#: elements (16 MiB in fp32), and per depth above it: a large call is bound by its matmuls, not by
#: the op count the wide layout saves, and per depth its extra memory is one depth's (B, T, K*P).
WIDE_MAX_ELEMENTS = 1 << 22
ENV_VAR = "VDM_KERNELS"
ENTRY_POINT_GROUP = "vdm_engine.ops"

logger = logging.getLogger("vdm_engine.ops")
_logged: set[str] = set()


class OpsUnavailableError(ValueError):
    """A fast path was requested (``VDM_KERNELS=triton``) but cannot serve this device and dtype."""


@dataclass(frozen=True)
class Ops:
    """The functions the explain path calls, and why they were chosen.

    Attributes:
        gate_probe: ``(h0 (B, T, D), hs (B, T, D), ProbeParams, depth) -> log_keep (B, T)`` float32,
            one depth's probe (signature of ``gates.gate_probe_reference``).
        patch_mask: ``(x (B, N, D), gates (B, N) | (B, K, N), placeholder, cls_token, pos_embed)
            -> tokens (B*K, N+1, D)`` (signature of ``backbone.patch_mask_reference``).
        backend: ``reference`` or the provider's name (``triton``).
        reason: why this backend serves (or why the fast path does not).
        gate_probe_levels: ``(h0, hs, FusedProbes, depth) -> log_keep (B, K, T)`` float32, one
            depth's probes of every level of K-level gates (signature of
            ``gates.gate_probe_levels_reference``, the default).
        probe_layout: how ``Explainer.probe_pass`` runs the probes (``probe_layout_for`` decides).
            ``wide``: each depth's hidden state is only projected (``gates.project_depth``, one
            matmul) and every probe is finished at once after the last layer
            (``gates.finish_probes``), the fewest ops, for small calls and for graphs;
            ``per-depth``: the whole probe of each depth as it is produced (``gate_probe`` /
            ``gate_probe_levels``), one kernel launch per depth and the least memory; ``auto`` (the
            references): wide for calls under ``WIDE_MAX_ELEMENTS``, else per depth.
    """

    gate_probe: Callable
    patch_mask: Callable
    backend: str
    reason: str
    gate_probe_levels: Callable = gate_probe_levels_reference
    probe_layout: str = "per-depth"

    def __post_init__(self):
        if self.probe_layout not in PROBE_LAYOUTS:
            raise ValueError(f"probe_layout must be one of {PROBE_LAYOUTS}, got {self.probe_layout!r}")


def reference_ops(reason: str = "plain-PyTorch references", probe_layout: str = "auto") -> Ops:
    """The references: the CPU path, the ONNX export path and the ground truth of every kernel.

    ``probe_layout``: ``auto`` (see ``Ops``), or force ``wide`` (the graph) or ``per-depth`` (the
    layout a kernel replaces; for comparisons).
    """
    return Ops(gate_probe_reference, patch_mask_reference, "reference", reason, probe_layout=probe_layout)


def probe_layout_for(ops: Ops, rows: int, depths: int, width: int) -> str:
    """``wide`` or ``per-depth`` for a probe pass of ``rows`` = B*T tokens, ``depths`` = S hidden states
    and probes ``width`` = K*P wide, under ``ops.probe_layout``."""
    if ops.probe_layout != "auto":
        return ops.probe_layout
    return "wide" if rows * depths * width <= WIDE_MAX_ELEMENTS else "per-depth"


def resolve_mode(mode: str | None = None) -> str:
    """Normalise ``mode`` (default: env ``VDM_KERNELS``, else ``auto``); ``ValueError`` if unknown."""
    raw = os.environ.get(ENV_VAR, "auto") if mode is None else mode
    m = str(raw).strip().lower() or "auto"
    if m not in MODES:
        raise ValueError(f"{ENV_VAR} must be one of {', '.join(MODES)}; got {raw!r}")
    return m


@functools.lru_cache(maxsize=None)
def _provider(name: str) -> Callable | None:
    """The provider registered under ``name`` (installed entry points do not change while we run)."""
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            return ep.load()
    return None


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.info(message)


def select_ops(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, mode: str | None = None) -> Ops:
    """Choose the ops for tensors on ``device`` with ``dtype``.

    Args:
        device, dtype: where the backbone and gates run.
        mode: ``auto`` (fast path where it serves, else the references), ``reference`` or
            ``triton`` (the fast path or an error); default the env ``VDM_KERNELS``, else ``auto``.

    Raises:
        OpsUnavailableError: ``mode == "triton"`` and the kernels cannot serve ``device`` / ``dtype``.
    """
    mode = resolve_mode(mode)
    if mode == "reference":
        return reference_ops("reference mode requested")
    device = torch.device(device)
    provider = _provider("triton")
    if provider is None:
        reason = "no fast-path provider is installed (vdm_engine.kernels)"
        if mode == "triton":
            raise OpsUnavailableError(f"{ENV_VAR}=triton was requested, but {reason}")
        return reference_ops(reason)
    try:
        return provider(device, dtype, mode)
    except OpsUnavailableError as e:
        if mode == "triton":
            raise
        _log_once(f"vdm_engine: using the PyTorch references on {device} {dtype} ({e})")
        return reference_ops(str(e))
