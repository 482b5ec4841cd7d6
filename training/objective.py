"""The Lagrangian DiffMask objective (De Cao et al. 2020; Vision DiffMask, Nalmpantis et al. 2023).

Per step: one clean forward gives the original logits and the L+2 hidden states; gates sampled up to
a depth k mask the patch embeddings; the masked forward gives ``p_masked``; the loss

    alpha_k * (KL(p_orig || p_masked) - eps) + L0_k

is minimised over the probes and the placeholder and maximised over ``alpha_k``. The ``delete``
objective (a necessity level) reads the gate value g as "removed": the masked pass keeps ``1 - g``
and the loss is ``alpha_k * (eps - KL) + L0_k`` (fewest patches removed such that the prediction
changes), so its gates rank the patches whose removal hurts most with no change to inference.
"""

from __future__ import annotations

import contextlib
from typing import Callable, NamedTuple

import torch
from torch import nn

from vdm_engine import masks
from vdm_engine.gates import Gates
from vdm_engine.masks import kl_divergence

from .config import OBJECTIVES
from .replacement import masked_logits_replaced, replacement_kinds, row_replacements

__all__ = ["GateObjective", "StepStats", "autocast_context", "clean_pass", "depth_weights", "hard_mask_validation"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_context(device: torch.device, precision: str):
    """``torch.autocast`` for the frozen ViT in ``precision`` (``fp32`` -> no autocast)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=_DTYPES[precision])


@torch.no_grad()
def clean_pass(backbone, pixel_values: torch.Tensor, precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """Original logits (B, C) float32 and hidden states (L+2, B, T, D) from one frozen forward."""
    with autocast_context(pixel_values.device, precision):
        logits, hidden = backbone.hidden_states(pixel_values)
    return logits.float(), hidden


class StepStats(NamedTuple):
    """Per-step training numbers (0-d tensors, detached).

    kl: mean KL(orig || masked); kept: mean sampled gate value; l0: mean L0 term; agree: fraction
    of images whose masked argmax equals the original.
    """

    kl: torch.Tensor
    kept: torch.Tensor
    l0: torch.Tensor
    agree: torch.Tensor


class GateObjective(nn.Module):
    """Trainable state of one run: the gates and one Lagrange multiplier per depth.

    The frozen backbone is held by reference (not a submodule), so wrapping this module in
    ``DistributedDataParallel`` synchronises only the gates and ``alpha``.

    Args:
        backbone: frozen ``Backbone``.
        gates: ``Gates`` to train.
        alpha_init: initial value of every alpha_k.
        eps: KL budget.
        l0: ``"prob"`` (mean keep probability) or ``"log"`` (mean log keep probability).
        precision: autocast dtype of the masked forward.
        mask_fn: the patch-masking op (``Ops.patch_mask``); default the reference.
        replacement: what dropped patches become (``TrainConfig.replacement``); default the gates'
            placeholder for every row.
        objective: ``"keep"`` (default) or ``"delete"`` (``TrainConfig.objective``).
    """

    def __init__(
        self, backbone, gates: Gates, *, alpha_init: float, eps: float, l0: str = "prob", precision: str = "fp32",
        mask_fn: Callable | None = None, replacement: str = "placeholder", objective: str = "keep",
    ):
        super().__init__()
        object.__setattr__(self, "backbone", backbone)  # not registered: frozen and never synchronised
        self.gates = gates
        self.alpha = nn.Parameter(torch.full((gates.config.num_hidden_states,), float(alpha_init)))
        self.eps, self.l0, self.precision = float(eps), l0, precision
        self.mask_fn = mask_fn
        replacement_kinds(replacement)  # validates
        self.replacement = replacement
        if objective not in OBJECTIVES:
            raise ValueError(f"GateObjective.objective must be one of {OBJECTIVES}, got {objective!r}")
        self.objective = objective

    def forward(
        self, logits: torch.Tensor, hidden: torch.Tensor, depth: int, generator: torch.Generator | None = None,
        pixel_values: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, StepStats]:
        """Loss of one step.

        Args:
            logits: (B, C) original logits (no grad).
            hidden: (L+2, B, T, D) hidden states of the clean pass (no grad).
            depth: aggregation depth k in [0, L+1].
            generator: RNG of the hard-concrete noise (and of ``noise`` replacement pixels).
            pixel_values: (B, 3, H, W) the batch, needed by ``mean`` / ``noise`` replacements.

        Returns:
            scalar loss and ``StepStats`` (with ``delete``, ``kept`` is the mean gate value: the fraction removed).
        """
        gates, log_keep = self.gates.sample(hidden.float(), depth, generator)  # (B, N), (B, N)
        delete = self.objective == "delete"
        keep = 1.0 - gates if delete else gates  # (B, N) what the masked pass keeps
        patches = hidden[0, :, 1:]  # (B, N, D) patch projections without position embeddings
        with autocast_context(patches.device, self.precision):
            if self.replacement == "placeholder":
                masked = self.backbone.masked_logits_from_patches(patches, keep, self.gates.placeholder, mask_fn=self.mask_fn)
            else:  # one replacement per row (and patch), blended in by the same masking op
                r = row_replacements(self.replacement, patches, self.gates.placeholder, backbone=self.backbone,
                                     pixel_values=pixel_values, generator=generator)
                masked = masked_logits_replaced(self.backbone, patches, keep, r, mask_fn=self.mask_fn)
        masked = masked.float()
        kl = kl_divergence(logits, masked)  # (B,)
        l0 = (log_keep.exp() if self.l0 == "prob" else log_keep).mean(-1)  # (B,)
        # keep: KL <= eps; delete: KL >= eps (the prediction must change). alpha_k >= 0 in both.
        slack = self.eps - kl.mean() if delete else kl.mean() - self.eps
        loss = self.alpha[depth] * slack + l0.mean()
        with torch.no_grad():
            stats = StepStats(
                kl.mean(), gates.mean(), l0.mean(), (masked.argmax(-1) == logits.argmax(-1)).float().mean()
            )
        return loss, stats


def depth_weights(alpha: torch.Tensor, mode: str, alpha_init: float, last_weight: float = 0.0) -> torch.Tensor:
    """Sampling weights over depths k = 0..L+1 (sum to 1).

    ``uniform``: equal. ``adaptive``: proportional to alpha_k + max(alpha_init, 1) / 4, so depths
    whose constraint is still active (alpha high) are trained more but none starves.
    ``last_weight`` adds that many uniform shares to the last depth (the explanation's mask).
    """
    S = alpha.numel()
    if mode == "uniform":
        w = torch.ones(S, dtype=torch.float64)
    else:
        w = alpha.detach().double().cpu().clamp_min(0) + max(alpha_init, 1.0) / 4
        w = w / w.mean()
    w[-1] += last_weight
    return w / w.sum()


@torch.no_grad()
def hard_mask_validation(
    backbone,
    gates: Gates,
    pixel_values: torch.Tensor,
    *,
    threshold: float = 0.5,
    precision: str = "fp32",
    batch_size: int = 256,
    mask_fn: Callable | None = None,
    invert: bool = False,
) -> dict[str, torch.Tensor]:
    """Sums over a validation batch with the deterministic hard mask (keep prob > ``threshold``).

    Args:
        pixel_values: (V, 3, H, W).
        invert: the ``delete`` objective: the masked pass removes the patches above ``threshold``
            (and keeps the rest); ``kept`` / ``kept_depth`` still count the patches above it.

    Returns:
        sums (0-d float64 tensors) ``kl``, ``agree``, ``kept``, ``count``, and ``kept_depth`` (L+2,):
        fraction of patches kept by the mask aggregated up to each depth.
    """
    dev = pixel_values.device
    out = {k: torch.zeros((), dtype=torch.float64, device=dev) for k in ("kl", "agree", "kept", "count")}
    out["kept_depth"] = torch.zeros(gates.config.num_hidden_states, dtype=torch.float64, device=dev)
    for i in range(0, len(pixel_values), batch_size):
        pv = pixel_values[i : i + batch_size]
        logits, hidden = clean_pass(backbone, pv, precision)
        layer = masks.layer_masks(gates.log_keep_prob(hidden.float()))  # (B, L+2, N)
        keep = masks.hard_mask(layer[:, -1], threshold)
        with autocast_context(dev, precision):
            checked = masks.masked_pass(backbone, hidden[0, :, 1:], logits, ~keep if invert else keep,
                                        gates.placeholder, mask_fn)
        out["kl"] += checked.kl.double().sum()
        out["agree"] += checked.agree.double().sum()
        out["kept"] += keep.float().mean(-1).double().sum()  # as MaskedPass.kept_fraction
        out["count"] += len(pv)
        out["kept_depth"] += (layer > threshold).double().mean(-1).sum(0)
    return out
