"""One gate-training step: ``TrainState`` (what a step reads and updates) and ``train_step``.

``train_step`` is the whole per-step work of ``train_gates`` (and what the training benchmark
times): warm-up of the probe learning rate, the depth choice, the clean and masked passes, the
backward pass through the ``GradScaler``, clipping, gradient ascent on the Lagrange multipliers,
the optimiser steps. It reads nothing back from the device but the multipliers for the adaptive
depth choice (and, with fp16 loss scaling, the GradScaler's own overflow check per optimiser):
whether the loss, a gradient or a gate parameter became NaN/Inf is returned as an on-device
``health`` vector, which the loop reads once per log window or checkpoint (see
``first_divergence``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from vdm_engine.gates import Gates

from .config import TrainConfig
from .objective import GateObjective, StepStats, clean_pass, depth_weights

__all__ = ["TrainState", "StepOutput", "TrainingDiverged", "train_step", "first_divergence", "HEALTH_FIELDS"]

# The entries of ``StepOutput.health``: the loss value, then 1.0 where something became NaN/Inf.
HEALTH_FIELDS = ("loss", "loss_bad", "grad_bad", "param_bad")
_HEALTH_MESSAGES = {
    "loss_bad": "the loss became NaN/Inf ({loss}) at step {step}",
    "grad_bad": "a gradient became NaN/Inf at step {step}",
    "param_bad": "a gate parameter became NaN/Inf at step {step}",
}


class TrainingDiverged(RuntimeError):
    """The loss or a gradient became NaN/Inf; the last good checkpoint is kept."""


@dataclass
class TrainState:
    """What one training step reads and updates (everything a checkpoint holds, except the step count).

    Attributes:
        config: the run's ``TrainConfig``.
        objective: ``GateObjective`` (the gates and one Lagrange multiplier per depth).
        model: what the step calls: ``objective``, or it wrapped in ``DistributedDataParallel``.
        opt: Adam over the probes (group 0) and the placeholder (group 1, when it is a parameter).
        opt_alpha: centred RMSprop over the multipliers (gradient ascent).
        scaler: ``GradScaler``, enabled for fp16 on CUDA; it scales and unscales both optimisers.
        gen_depth: CPU generator of the depth choice (the same on every rank).
        gen_noise: device generator of the hard-concrete noise (one stream per rank).
    """

    config: TrainConfig
    objective: GateObjective
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    opt_alpha: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    gen_depth: torch.Generator
    gen_noise: torch.Generator

    @classmethod
    def create(cls, backbone, gates: Gates, config: TrainConfig, *, rank: int = 0,
               mask_fn: Callable | None = None) -> "TrainState":
        """Fresh optimisers, multipliers and generators for training ``gates`` (moved to the backbone's device).

        Args:
            rank: this process's rank; seeds its own noise stream.
            mask_fn: the patch-masking op of the masked passes (``Ops.patch_mask``); default the reference.
        """
        cfg, device = config, backbone.device
        gates.to(device).train()
        obj = GateObjective(backbone, gates, alpha_init=cfg.alpha_init, eps=cfg.eps, l0=cfg.l0,
                            precision=cfg.precision, mask_fn=mask_fn, replacement=cfg.replacement,
                            objective=cfg.objective)
        obj.alpha.data = obj.alpha.data.to(device)
        groups = [{"params": _probe_params(gates), "lr": cfg.lr_probe}]
        if isinstance(gates.placeholder, torch.nn.Parameter):
            groups.append({"params": [gates.placeholder], "lr": cfg.lr_placeholder})
        return cls(
            config=cfg,
            objective=obj,
            model=obj,
            opt=torch.optim.Adam(groups),
            opt_alpha=torch.optim.RMSprop([obj.alpha], lr=cfg.lr_alpha, centered=True),
            scaler=torch.amp.GradScaler("cuda", enabled=cfg.precision == "fp16" and device.type == "cuda"),
            gen_depth=torch.Generator().manual_seed(cfg.seed),  # all ranks pick the same depth
            gen_noise=torch.Generator(device=device).manual_seed(cfg.seed * 7919 + rank + 1),
        )

    @property
    def gates(self) -> Gates:
        return self.objective.gates

    @property
    def generators(self) -> dict[str, torch.Generator]:
        return {"depth": self.gen_depth, "noise": self.gen_noise}


class StepOutput(NamedTuple):
    """What ``train_step`` returns; every tensor stays on the device.

    loss: 0-d detached loss. stats: ``StepStats``. depth: the aggregation depth trained.
    health: (4,) float32, see ``HEALTH_FIELDS``: the loss, then 1.0 if the loss, a gradient (only
    checked without loss scaling: with it, an overflow skips the step) or a gate parameter after the
    update is NaN/Inf, else 0.0.
    """

    loss: torch.Tensor
    stats: StepStats
    depth: int
    health: torch.Tensor


def _probe_params(gates: Gates) -> list[torch.nn.Parameter]:
    return [gates.w1, gates.b1, gates.w2, gates.b2, gates.add]


def _all_finite(tensors) -> torch.Tensor:
    """0-d bool on the device: every element of every tensor is finite (no host read)."""
    return torch.stack([torch.isfinite(t).all() for t in tensors]).all()


def train_step(state: TrainState, pixel_values: torch.Tensor, step: int, *, depth: int | None = None) -> StepOutput:
    """One optimisation step of the Lagrangian DiffMask objective.

    Args:
        state: ``TrainState``; its gates, multipliers, optimisers, scaler and generators are updated.
        pixel_values: (B, 3, H, W) on the backbone's device.
        step: steps completed so far (sets the warm-up learning rate of the probes).
        depth: train this aggregation depth instead of drawing one (benchmarks; the draw then
            consumes no random numbers).

    Returns:
        ``StepOutput``.

    Raises:
        TrainingDiverged: the multipliers are NaN/Inf, so no depth can be drawn (an earlier step
            diverged; its ``health`` says which).
    """
    cfg, obj = state.config, state.objective
    gates, alpha = obj.gates, obj.alpha
    lr_scale = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    state.opt.param_groups[0]["lr"] = cfg.lr_probe * lr_scale
    if depth is None:
        w = depth_weights(alpha, cfg.depth_sampling, cfg.alpha_init, cfg.last_depth_weight)  # (L+2,) on CPU
        if not bool(torch.isfinite(w).all()):
            raise TrainingDiverged(f"the Lagrange multipliers became NaN/Inf before step {step + 1}")
        depth = int(torch.multinomial(w, 1, generator=state.gen_depth))
    logits, hidden = clean_pass(obj.backbone, pixel_values, cfg.precision)
    loss, stats = state.model(logits, hidden, depth, state.gen_noise, pixel_values=pixel_values)

    state.opt.zero_grad(set_to_none=True)
    state.opt_alpha.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    # Both optimisers' gradients are unscaled (no-ops without fp16 loss scaling); the scaler skips
    # an optimiser's step when its gradients overflowed.
    state.scaler.unscale_(state.opt)
    state.scaler.unscale_(state.opt_alpha)
    trained = _probe_params(gates) + [gates.placeholder]
    grads = [p.grad for p in trained if p.grad is not None] + [alpha.grad]
    grad_bad = torch.zeros((), dtype=torch.bool, device=loss.device) if state.scaler.is_enabled() else ~_all_finite(grads)
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(trained, cfg.grad_clip)
    alpha.grad.neg_()  # gradient ascent on the multipliers
    state.scaler.step(state.opt)
    state.scaler.step(state.opt_alpha)
    state.scaler.update()
    with torch.no_grad():
        alpha.clamp_(0.0, cfg.alpha_max)
    loss = loss.detach()
    flags = torch.stack([~torch.isfinite(loss), grad_bad, ~_all_finite(gates.parameters())])
    health = torch.cat([loss.float().view(1), flags.float()])
    return StepOutput(loss, stats, depth, health)


def first_divergence(health: torch.Tensor, first_step: int) -> str | None:
    """The message for the first step whose ``health`` flags a NaN/Inf, or None when every step is clean.

    Args:
        health: (S, 4) on the host, ``StepOutput.health`` of S consecutive steps.
        first_step: the number (1-based) of the first of them.
    """
    bad = health[:, 1:] > 0
    if not bool(bad.any()):
        return None
    row = int(bad.any(1).nonzero()[0])
    kind = HEALTH_FIELDS[1 + int(bad[row].nonzero()[0])]
    return _HEALTH_MESSAGES[kind].format(loss=float(health[row, 0]), step=first_step + row)
