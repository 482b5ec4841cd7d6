"""DiffMask gate probes and hard-concrete maths (De Cao et al. 2020; Vision DiffMask, Nalmpantis et al. 2023).

One probe per hidden state i = 0..L+1 maps each token t to a logit

    z_i,t = mul * tanh(w2_i . tanh(W1_i [h0_t ; hi_t] + b1_i) + b2_i) + add_i

and the hard-concrete gate (temperature beta, stretched to (l, r)) keeps the token with probability
P(g > 0) = sigmoid(z - beta * log(-l / r)). Probabilities multiply across depth.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import masks
from ._io import atomic_path, atomic_write_json, dataclass_from_dict, sha256_file
from .provenance import BackboneMismatchError, GatesProvenance, check_fingerprint, trained_eps, validation_figures

__all__ = ["GateConfig", "Gates", "ProbeParams", "FusedProbes", "WideProbes", "fuse_levels", "widen",
           "gate_probe_reference", "gate_probe_levels_reference", "project_depth", "finish_probes", "gate_probe_stacked",
           "probe_depths", "hard_concrete_sample", "GATES_WEIGHTS", "GATES_CONFIG"]

GATES_WEIGHTS = "gates.safetensors"
GATES_CONFIG = "gates_config.json"
#: CLIP backbones: the zero-shot head's text embeddings (C, E), saved beside the gates.
ZERO_SHOT_WEIGHTS = "zero_shot.safetensors"
_FORMAT_VERSION = 1


@dataclass(frozen=True)
class GateConfig:
    """Shape and maths of the gate probes.

    Attributes:
        hidden_size: D of the backbone.
        num_hidden_states: L+2 (patch embeddings, each layer input, last output).
        probe_size: width of each probe's hidden layer (default D // 4).
        mul: fixed scale of the probe's output tanh.
        add_init: initial value of the learnable offset ``add_i``.
        beta, l, r: hard-concrete temperature and stretch interval.
        placeholder: learn a placeholder vector (else patches are replaced by zeros).
        levels: K probe sets trained at K sparsity levels, ordered from the least to the most sparse
            (``Gates.stack``); all read the same hidden states, and a patch's rank is the sparsest
            level that keeps it (``masks.patch_rank``). 1 (default): plain single-level DiffMask.
        main_level: the level whose mask is ``patch_mask`` (and whose placeholder the gates hold).
    """

    hidden_size: int
    num_hidden_states: int
    probe_size: int | None = None
    mul: float = 10.0
    add_init: float = 5.0
    beta: float = 0.2
    l: float = -0.2  # noqa: E741
    r: float = 1.0
    placeholder: bool = True
    levels: int = 1
    main_level: int = 0

    def __post_init__(self):
        if self.hidden_size <= 0:
            raise ValueError(f"GateConfig.hidden_size must be positive, got {self.hidden_size}")
        if self.num_hidden_states < 2:
            raise ValueError(f"GateConfig.num_hidden_states must be >= 2 (L+2), got {self.num_hidden_states}")
        if self.probe_size is None:
            object.__setattr__(self, "probe_size", max(1, self.hidden_size // 4))
        if self.probe_size <= 0:
            raise ValueError(f"GateConfig.probe_size must be positive, got {self.probe_size}")
        if not self.beta > 0:
            raise ValueError(f"GateConfig.beta must be > 0, got {self.beta}")
        if not (self.l < 0 < 1 <= self.r):
            raise ValueError(f"GateConfig needs l < 0 and r >= 1 (stretched interval), got l={self.l}, r={self.r}")
        if not self.mul > 0:
            raise ValueError(f"GateConfig.mul must be > 0, got {self.mul}")
        if not isinstance(self.levels, int) or self.levels < 1:
            raise ValueError(f"GateConfig.levels must be an integer >= 1, got {self.levels!r}")
        if not 0 <= self.main_level < self.levels:
            raise ValueError(f"GateConfig.main_level must be in [0, levels={self.levels}), got {self.main_level}")

    @property
    def log_keep_offset(self) -> float:
        """beta * log(-l / r): P(keep) = sigmoid(z - offset)."""
        return self.beta * math.log(-self.l / self.r)

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.levels == 1:  # single-level files stay exactly as before
            d.pop("levels"), d.pop("main_level")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "GateConfig":
        return dataclass_from_dict(cls, d)


class ProbeParams(NamedTuple):
    """Stacked probe weights for S = L+2 probes of width P over hidden size D.

    w1 (S, P, 2D), b1 (S, P), w2 (S, P), b2 (S,), add (S,); mul and offset are floats.
    """

    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor
    add: torch.Tensor
    mul: float
    offset: float


class FusedProbes(NamedTuple):
    """The probes of all K levels joined per depth (``Gates.fused_probes``): one probe of width K*P
    per depth whose second layer is block-diagonal, so K levels cost one chain of matmuls, not K.

    w1 (S, K*P, 2D): depth s's first layers, level-major rows (level k: rows kP .. (k+1)P-1);
    b1 (S, K*P); w2 (S, K*P): second layers side by side; w2_block (S, K*P, K): the same as a
    block-diagonal matrix (column k reads level k's rows only); b2 (S, K); bias (S, K) = add - offset;
    mul a float.
    """

    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    w2_block: torch.Tensor
    b2: torch.Tensor
    bias: torch.Tensor
    mul: float

    @property
    def levels(self) -> int:
        return self.b2.shape[1]


def gate_probe_reference(h0: torch.Tensor, hs: torch.Tensor, probes: ProbeParams, depth: int) -> torch.Tensor:
    """Log keep probability of every token at one depth, from that depth's hidden state.

    The explain path calls it as each hidden state is produced, so no (L+2, B, T, D) stack exists.

    Args:
        h0: (B, T, D) the first hidden state (patch projections and CLS), read by every probe.
        hs: (B, T, D) hidden state ``depth`` (``hs is h0`` at depth 0).
        probes: stacked weights of all depths (see ``ProbeParams``); row ``depth`` is used.
        depth: 0 <= depth < S = L+2.

    Returns:
        log_keep (B, T) float32: -softplus(offset - z_depth).
    """
    D = hs.shape[-1]
    w1 = probes.w1[depth]  # (P, 2D): columns [0, D) act on h0, [D, 2D) on hs
    dt = w1.dtype
    # Two matmuls on the (B, T, D) states (no (BT, 2D) concatenation, no reshapes): in an ONNX graph
    # every op here is repeated at each depth, so the formula is written with as few ops as it needs.
    pre = torch.matmul(h0.to(dt), w1[:, :D].t()) + torch.matmul(hs.to(dt), w1[:, D:].t()) + probes.b1[depth]
    out = torch.matmul(torch.tanh(pre), probes.w2[depth]) + probes.b2[depth]  # (B, T)
    # -softplus(offset - z) == logsigmoid(z - offset), with z = mul * tanh(out) + add.
    return F.logsigmoid(probes.mul * torch.tanh(out) + (probes.add[depth] - probes.offset)).float()


def gate_probe_levels_reference(h0: torch.Tensor, hs: torch.Tensor, probes: FusedProbes, depth: int) -> torch.Tensor:
    """Log keep probability of every token at one depth for all K levels at once (``FusedProbes``).

    Equals ``gate_probe_reference`` run on each level's ``ProbeParams`` and stacked on dim 1, with
    the K levels' first layers as one matmul per half and their second layers as one block-diagonal
    matmul (the chain of ops does not grow with K).

    Args:
        h0: (B, T, D) the first hidden state; hs: (B, T, D) hidden state ``depth``.
        probes: ``Gates.fused_probes()``; row ``depth`` is used.
        depth: 0 <= depth < S = L+2.

    Returns:
        log_keep (B, K, T) float32.
    """
    D = hs.shape[-1]
    w1 = probes.w1[depth]  # (K*P, 2D): columns [0, D) act on h0, [D, 2D) on hs
    dt = w1.dtype
    pre = torch.matmul(h0.to(dt), w1[:, :D].t()) + torch.matmul(hs.to(dt), w1[:, D:].t()) + probes.b1[depth]
    out = torch.matmul(torch.tanh(pre), probes.w2_block[depth]) + probes.b2[depth]  # (B, T, K)
    return F.logsigmoid(probes.mul * torch.tanh(out) + probes.bias[depth]).float().transpose(1, 2)


def fuse_levels(levels: list[ProbeParams]) -> FusedProbes:
    """Join K levels' ``ProbeParams`` (S rows each, one shape and ``mul``/``offset``) into ``FusedProbes``."""
    K = len(levels)
    S, P, D2 = levels[0].w1.shape
    w1 = torch.stack([p.w1 for p in levels], 1)  # (S, K, P, 2D)
    w2 = torch.stack([p.w2 for p in levels], 1)  # (S, K, P)
    # Block-diagonal second layer: entry (s, k*P + p, j) = w2[s, k, p] if j == k else 0.
    eye = torch.eye(K, device=w2.device, dtype=w2.dtype)
    w2_block = (w2.unsqueeze(-1) * eye.view(1, K, 1, K)).reshape(S, K * P, K)
    b2 = torch.stack([p.b2 for p in levels], 1)
    bias = torch.stack([p.add for p in levels], 1) - levels[0].offset
    b1 = torch.stack([p.b1 for p in levels], 1).reshape(S, K * P)
    return FusedProbes(w1.reshape(S, K * P, D2), b1, w2.reshape(S, K * P), w2_block, b2, bias, float(levels[0].mul))


class WideProbes(NamedTuple):
    """Every probe of every depth (and level) as one wide layer pair (``widen``): the layout of a probe
    pass that keeps one small projection per depth and finishes all probes at once after the last layer.

    Probe (s, k) owns columns ``(s*K + k)*P .. (s*K + k + 1)*P - 1`` of the first layers' output.

    w_h0 (D, S*K*P): the h0 half of every first layer; w_hs: S tensors (D, K*P), depth s's own half;
    b1 (S*K*P,); w2 (S*K*P, S*K): every second layer on one block diagonal; b2 (S*K,);
    bias (S*K,) = add - offset; mul a float.
    """

    w_h0: torch.Tensor
    w_hs: tuple
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor
    bias: torch.Tensor
    mul: float

    @property
    def levels(self) -> int:
        return self.b2.shape[0] // len(self.w_hs)


def widen(probes: FusedProbes) -> WideProbes:
    """``FusedProbes`` (S depths, K levels each) -> ``WideProbes`` of the same maths."""
    S, KP, D2 = probes.w1.shape
    D = D2 // 2
    K = probes.levels
    w_h0 = probes.w1[..., :D].reshape(S * KP, D).t().contiguous()
    w_hs = tuple(probes.w1[s, :, D:].t().contiguous() for s in range(S))
    w2 = torch.block_diag(*probes.w2_block.unbind(0)).contiguous()  # (S*K*P, S*K)
    return WideProbes(w_h0, w_hs, probes.b1.reshape(S * KP).contiguous(), w2, probes.b2.reshape(S * K).contiguous(),
                      probes.bias.reshape(S * K).contiguous(), float(probes.mul))


def project_depth(hs: torch.Tensor, probes: WideProbes, depth: int) -> torch.Tensor:
    """Hidden state ``depth`` (B, T, D) -> its half of that depth's first layers (B*T, K*P), probes' dtype."""
    w = probes.w_hs[depth]
    h = hs if hs.dtype == w.dtype else hs.to(w.dtype)
    return torch.mm(h.reshape(-1, h.shape[-1]), w)


def finish_probes(h0: torch.Tensor, projections, probes: WideProbes) -> torch.Tensor:
    """h0 (B, T, D) and the S ``project_depth`` outputs -> log keep (B, K, S, T) float32.

    Equals ``gate_probe_levels_reference`` at every depth (``gate_probe_reference`` for K = 1), with the
    h0 halves, biases, activations and second layers of all S*K probes as single wide ops.
    """
    B, T, D = h0.shape
    S, K = len(probes.w_hs), probes.levels
    h = h0 if h0.dtype == probes.w_h0.dtype else h0.to(probes.w_h0.dtype)
    # matmul + add, not addmm: graph optimisers rewrite Gemm nodes under new names, and the int8
    # recipe finds the probes' matmuls by name to keep them float32.
    pre = torch.mm(h.reshape(B * T, D), probes.w_h0) + torch.cat(list(projections), 1) + probes.b1  # (B*T, S*K*P)
    out = torch.mm(torch.tanh(pre), probes.w2) + probes.b2  # (B*T, S*K)
    # -softplus(offset - z) == logsigmoid(z - offset), with z = mul * tanh(out) + add.
    log_keep = F.logsigmoid(torch.add(probes.bias, torch.tanh(out), alpha=probes.mul))
    return log_keep.float().view(B, T, S, K).permute(0, 3, 2, 1)


def probe_depths(gate_probe, hidden_states, probes: ProbeParams) -> torch.Tensor:
    """Run a per-depth probe op (``Ops.gate_probe``) over already stacked or listed hidden states.

    Args:
        gate_probe: ``gate_probe_reference`` or a twin with its signature.
        hidden_states: (S, B, T, D) tensor or a list of S (B, T, D) tensors.

    Returns:
        log_keep (B, S, T) float32.
    """
    return torch.stack([gate_probe(hidden_states[0], h, probes, s) for s, h in enumerate(hidden_states)], 1)


def gate_probe_stacked(hidden_states: torch.Tensor, probes: ProbeParams) -> torch.Tensor:
    """All depths at once from stacked hidden states (the training path, which keeps them for gradients).

    Args:
        hidden_states: (S, B, T, D), S = L+2; h0 = hidden_states[0].
        probes: stacked weights (see ``ProbeParams``).

    Returns:
        log_keep (B, S, T): -softplus(offset - z), in the probes' dtype.
    """
    z = _probe_logits(hidden_states, probes)
    return -F.softplus(probes.offset - z)


def _probe_logits(hidden_states: torch.Tensor, probes: ProbeParams) -> torch.Tensor:
    """(S, B, T, D) -> (B, S, T) gate logits z, computed in the probes' dtype."""
    S, B, T, D = hidden_states.shape
    w1 = probes.w1
    P = w1.shape[1]
    H = hidden_states.to(w1.dtype).reshape(S, B * T, D)
    # h0 is shared by all probes: one (BT, D) x (D, S*P) matmul for the h0 half of W1.
    w1_h0 = w1[:, :, :D].permute(2, 0, 1).reshape(D, S * P)
    a = (H[0] @ w1_h0).view(B * T, S, P).transpose(0, 1)  # (S, BT, P)
    # Each probe's own state: one batched matmul over depth for the hi half of W1.
    pre = torch.baddbmm(probes.b1.unsqueeze(1) + a, H, w1[:, :, D:].transpose(1, 2))  # (S, BT, P)
    out = torch.bmm(torch.tanh(pre), probes.w2.unsqueeze(-1)).squeeze(-1) + probes.b2.unsqueeze(1)  # (S, BT)
    z = probes.mul * torch.tanh(out) + probes.add.unsqueeze(1)
    return z.view(S, B, T).permute(1, 0, 2)


def hard_concrete_sample(
    z: torch.Tensor, beta: float, l: float, r: float, generator: torch.Generator | None = None  # noqa: E741
) -> torch.Tensor:
    """Reparameterised hard-concrete sample g in [0, 1] with the shape of the logits ``z``."""
    u = torch.rand(z.shape, device=z.device, dtype=z.dtype, generator=generator).clamp(1e-6, 1 - 1e-6)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + z) / beta)
    return (s * (r - l) + l).clamp(0.0, 1.0)


class Gates(nn.Module):
    """The L+2 gate probes (vectorised across depth) and the placeholder vector.

    Stochastic gates are only sampled through ``sample`` (training); every other method is
    deterministic.
    """

    def __init__(self, config: GateConfig):
        super().__init__()
        self.config = config
        D, P = config.hidden_size, config.probe_size
        S = config.num_hidden_states * config.levels  # K levels: level-major rows, level k = rows kS..(k+1)S-1
        bound1, bound2 = 1 / math.sqrt(2 * D), 1 / math.sqrt(P)
        self.w1 = nn.Parameter(torch.empty(S, P, 2 * D).uniform_(-bound1, bound1))
        self.b1 = nn.Parameter(torch.empty(S, P).uniform_(-bound1, bound1))
        self.w2 = nn.Parameter(torch.empty(S, P).uniform_(-bound2, bound2))
        self.b2 = nn.Parameter(torch.empty(S).uniform_(-bound2, bound2))
        self.add = nn.Parameter(torch.full((S,), float(config.add_init)))
        if config.placeholder:
            self.placeholder = nn.Parameter(torch.zeros(D))
        else:
            self.register_buffer("placeholder", torch.zeros(D))
        # The backbone these gates were trained on; written to gates_config.json.
        self.backbone_id: str | None = None
        self.backbone_revision: str | None = None
        self.backbone_fingerprint: str | None = None
        self.backbone_zero_shot: dict | None = None  # CLIP: {"labels": [...], "prompt": "..."} of the head
        self.metrics: dict = {}
        self.provenance = GatesProvenance("memory")
        self._verified_for: str | None = None  # fingerprint of the backbone last checked and accepted
        self._derived: dict = {}  # name -> (key, FusedProbes | WideProbes): see _derive

    # ----- maths ------------------------------------------------------------------------------
    def probe_params(self, level: int | None = None) -> ProbeParams:
        """The stacked probes of one level (default ``config.main_level``): S = L+2 rows each."""
        c = self.config
        k = c.main_level if level is None else level
        if not 0 <= k < c.levels:
            raise ValueError(f"level {level} out of range for gates with {c.levels} level(s)")
        if c.levels == 1:
            return ProbeParams(self.w1, self.b1, self.w2, self.b2, self.add, float(c.mul), c.log_keep_offset)
        rows = slice(k * c.num_hidden_states, (k + 1) * c.num_hidden_states)
        return ProbeParams(self.w1[rows], self.b1[rows], self.w2[rows], self.b2[rows], self.add[rows], float(c.mul),
                           c.log_keep_offset)

    def level_params(self) -> list[ProbeParams]:
        """The K levels' probes, least sparse first."""
        return [self.probe_params(k) for k in range(self.config.levels)]

    def fused_probes(self) -> FusedProbes:
        """Every level's probes joined per depth (``FusedProbes``, for ``gate_probe_levels_reference``)."""
        return self._derive("fused", lambda: fuse_levels(self.level_params()))

    def wide_probes(self, levels: bool = False) -> WideProbes:
        """The probes as ``WideProbes`` (for ``project_depth`` / ``finish_probes``): the main level's,
        or with ``levels`` every level's (K columns per depth)."""
        return self._derive(f"wide{int(levels)}",
                            lambda: widen(fuse_levels(self.level_params() if levels else [self.probe_params()])))

    def _derive(self, name: str, build):
        """``build()``, cached under ``name`` while the weights stay the same tensors (same storage,
        device, dtype and in-place version): moving the gates, changing their dtype or loading /
        training new values rebuilds it. With autograd recording, or while tracing (``torch.compile``,
        export), it is built fresh and not cached, so gradients reach the parameters and no traced
        tensor is kept."""
        params = (self.w1, self.b1, self.w2, self.b2, self.add)
        if torch.compiler.is_compiling() or any(p.is_inference() for p in params) or \
                (torch.is_grad_enabled() and any(p.requires_grad for p in params)):  # inference tensors have no version
            return build()
        key = tuple((p.data_ptr(), p._version, p.device, p.dtype) for p in params)
        hit = self._derived.get(name)
        if hit is None or hit[0] != key:
            with torch.no_grad():
                hit = self._derived[name] = (key, build())
        return hit[1]

    def level_masks(self, hidden_states) -> torch.Tensor:
        """Keep probability of each patch at each level, all depths aggregated: (L+2, B, T, D) -> (B, K, N)."""
        hs = self._stack(hidden_states)
        return torch.stack([masks.patch_mask(gate_probe_stacked(hs, p)) for p in self.level_params()], 1)

    def level_budgets(self) -> list[float | None]:
        """The KL budget each level was trained with, as its metrics record it (``provenance.trained_eps``;
        None where they do not), least sparse level first; one entry for single-level gates."""
        recorded = self.metrics.get("levels", []) if self.config.levels > 1 else [self.metrics]
        return [trained_eps(m) for m in recorded]

    @classmethod
    def stack(cls, levels: list["Gates"], *, main_level: int = 0) -> "Gates":
        """Join single-level gates trained at increasing sparsity into K-level gates (one forward pass).

        Args:
            levels: K >= 2 single-level ``Gates`` of one shape and one backbone (the fingerprints they
                record, and their CLIP zero-shot head if any, must agree), least sparse first.
            main_level: the level whose mask and placeholder the joined gates use as ``patch_mask``.
        """
        if len(levels) < 2:
            raise ValueError(f"stack needs at least 2 single-level gates, got {len(levels)}")
        first = levels[0]
        for i, g in enumerate(levels[1:], 1):
            if g.backbone_fingerprint != first.backbone_fingerprint:
                raise ValueError(f"levels[{i}] was trained on another backbone ({g.backbone_id}, fingerprint "
                                 f"{str(g.backbone_fingerprint)[:12]}) than levels[0] ({first.backbone_id}, fingerprint "
                                 f"{str(first.backbone_fingerprint)[:12]}): stack gates of one backbone")
            if g.backbone_zero_shot != first.backbone_zero_shot:
                raise ValueError(f"levels[{i}] records another zero-shot head (CLIP labels or prompt) than levels[0]")
        c0 = levels[0].config
        for i, g in enumerate(levels):
            c = g.config
            if c.levels != 1:
                raise ValueError(f"levels[{i}] already has {c.levels} levels; stack single-level gates")
            if (c.hidden_size, c.num_hidden_states, c.probe_size, c.mul, c.beta, c.l, c.r, c.placeholder) != \
                    (c0.hidden_size, c0.num_hidden_states, c0.probe_size, c0.mul, c0.beta, c0.l, c0.r, c0.placeholder):
                raise ValueError(f"levels[{i}] has another shape or gate maths than levels[0]: {c} vs {c0}")
        out = cls(GateConfig(**{**asdict(c0), "levels": len(levels), "main_level": main_level}))
        with torch.no_grad():
            for name in ("w1", "b1", "w2", "b2", "add"):
                getattr(out, name).copy_(torch.cat([getattr(g, name).detach().float().cpu() for g in levels]))
            out.placeholder.copy_(levels[main_level].placeholder.detach().float().cpu())
        out.backbone_id, out.backbone_revision, out.backbone_fingerprint = \
            first.backbone_id, first.backbone_revision, first.backbone_fingerprint
        out.backbone_zero_shot = first.backbone_zero_shot
        out.metrics = {"levels": [dict(g.metrics) for g in levels], "main_level": main_level}
        return out

    def _stack(self, hidden_states) -> torch.Tensor:
        if isinstance(hidden_states, (list, tuple)):
            hidden_states = torch.stack(list(hidden_states))
        S, D = self.config.num_hidden_states, self.config.hidden_size
        if hidden_states.dim() != 4 or hidden_states.shape[0] != S or hidden_states.shape[-1] != D:
            raise ValueError(
                f"hidden_states must be (L+2={S}, B, T, D={D}) or a list of {S} (B, T, {D}) tensors; "
                f"got {tuple(hidden_states.shape)}"
            )
        return hidden_states

    def logits(self, hidden_states) -> torch.Tensor:
        """Gate logits z: (L+2, B, T, D) -> (B, L+2, T)."""
        return _probe_logits(self._stack(hidden_states), self.probe_params())

    def log_keep_prob(self, hidden_states) -> torch.Tensor:
        """Per-depth log keep probability log P(g > 0): (L+2, B, T, D) -> (B, L+2, T)."""
        return gate_probe_stacked(self._stack(hidden_states), self.probe_params())

    def layer_masks(self, hidden_states) -> torch.Tensor:
        """Cumulative keep probabilities up to each depth, CLS dropped: (B, L+2, N)."""
        return masks.layer_masks(self.log_keep_prob(hidden_states))

    def patch_mask(self, hidden_states, upto: int = -1) -> torch.Tensor:
        """Keep probability aggregated up to depth ``upto`` (default the last), CLS dropped: (B, N)."""
        k = self._depth(upto)
        return masks.patch_mask(self.log_keep_prob(hidden_states)[:, : k + 1])

    def sample(self, hidden_states, upto: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Reparameterised training sample of the gates aggregated up to depth ``upto``.

        Returns:
            gates (B, N): product over depths i <= upto of hard-concrete samples, CLS dropped;
            log_keep (B, N): sum over i <= upto of log P(g_i > 0) (the expected-L0 term), CLS dropped.
        """
        k = self._depth(upto)
        hs = self._stack(hidden_states)[: k + 1]
        c = self.config
        if c.levels != 1:
            raise ValueError("training samples single-level gates; train each level alone and join them with Gates.stack")
        p = self.probe_params()
        p = p._replace(w1=p.w1[: k + 1], b1=p.b1[: k + 1], w2=p.w2[: k + 1], b2=p.b2[: k + 1], add=p.add[: k + 1])
        z = _probe_logits(hs, p)  # (B, k+1, T)
        g = hard_concrete_sample(z, c.beta, c.l, c.r, generator).prod(1)[:, 1:]
        log_keep = (-F.softplus(p.offset - z)).sum(1)[:, 1:]
        return g, log_keep

    def _depth(self, upto: int) -> int:
        S = self.config.num_hidden_states
        k = upto + S if upto < 0 else upto
        if not 0 <= k < S:
            raise ValueError(f"depth {upto} out of range for {S} hidden states (expected -{S} <= upto < {S})")
        return k

    # ----- checkpoints ------------------------------------------------------------------------
    def check_backbone(self, backbone, *, allow_mismatch: bool = False) -> None:
        """Check that these gates fit ``backbone``: shapes always, the recorded fingerprint for saved gates.

        Gates built in this process (``provenance.source == "memory"``) are only shape-checked. Saved
        gates without a fingerprint (reference checkpoints, older files) load with a
        ``ProvenanceWarning``; a fingerprint that differs from ``backbone.fingerprint`` raises unless
        ``allow_mismatch`` (then it warns and ``provenance.backbone_mismatch`` is set).

        Raises:
            BackboneMismatchError (a ``ValueError``): wrong shapes, or another backbone's fingerprint.
        """
        c = self.config
        trained_on = self.backbone_id or "?"
        if c.hidden_size != backbone.hidden_size or c.num_hidden_states != backbone.num_hidden_states:
            raise BackboneMismatchError(
                f"gates do not match the backbone: the gates (trained on '{trained_on}') were built for hidden size "
                f"{c.hidden_size} and {c.num_hidden_states - 2} layers, the backbone '{backbone.name_or_path}' has "
                f"hidden size {backbone.hidden_size} and {backbone.num_layers} layers"
            )
        if self.provenance.source == "memory":
            return
        actual = backbone.fingerprint
        if self._verified_for == actual:
            return
        where = f"the gates in {self.provenance.path}" if self.provenance.path else "the gates"
        mismatch = check_fingerprint(
            self.backbone_fingerprint, self.backbone_id, actual, str(backbone.name_or_path),
            where=where, allow_mismatch=allow_mismatch,
        )
        self._verified_for = actual
        if mismatch:
            self.provenance = self.provenance.replace(backbone_mismatch=True)

    def save_pretrained(self, directory: str | os.PathLike, *, backbone=None, metrics: dict | None = None) -> Path:
        """Write ``gates.safetensors`` and ``gates_config.json`` atomically; returns the directory.

        With ``backbone`` (the model the gates were trained on) its name, revision and fingerprint are
        recorded, so loading the gates onto another backbone fails (see ``check_backbone``).
        """
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if backbone is not None:
            self.backbone_id, self.backbone_revision = backbone.name_or_path, backbone.revision
            self.backbone_fingerprint = backbone.fingerprint
            self.backbone_zero_shot = getattr(backbone, "zero_shot", None)
            if self.backbone_zero_shot:
                with atomic_path(directory / ZERO_SHOT_WEIGHTS) as tmp:
                    text = backbone.family.text.detach().to("cpu", torch.float32).contiguous()
                    save_file({"text_embeds": text}, str(tmp), metadata={"format": "pt"})
                    self.backbone_zero_shot = dict(self.backbone_zero_shot, sha256=sha256_file(tmp))
        if metrics is not None:
            self.metrics = dict(metrics)
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.state_dict().items()}
        with atomic_path(directory / GATES_WEIGHTS) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
            digest = sha256_file(tmp)
        atomic_write_json(
            directory / GATES_CONFIG,
            {
                "format_version": _FORMAT_VERSION,
                "config": self.config.to_dict(),
                "backbone": {
                    "name_or_path": self.backbone_id,
                    "revision": self.backbone_revision,
                    "fingerprint": self.backbone_fingerprint,
                    **({"zero_shot": self.backbone_zero_shot} if self.backbone_zero_shot else {}),
                },
                "sha256": digest,
                "metrics": self.metrics,
            },
        )
        return directory

    @staticmethod
    def recorded_zero_shot(directory: str | os.PathLike) -> dict | None:
        """The CLIP zero-shot head recorded in a gates directory: ``{"labels", "prompt", "text_embeds"
        (C, E)}``, or None for gates of a model with its own head. ``ValueError`` if the saved text
        embeddings are missing or do not match their recorded sha256."""
        from safetensors.torch import load_file

        path = Path(directory) / GATES_CONFIG
        if not path.is_file():
            return None
        rec = (json.loads(path.read_text()).get("backbone") or {}).get("zero_shot")
        if not rec:
            return None
        w = Path(directory) / ZERO_SHOT_WEIGHTS
        if not w.is_file() or sha256_file(w) != rec.get("sha256"):
            raise ValueError(f"{w} is missing or does not match the sha256 in {path}: the gates directory is incomplete")
        return {"labels": list(rec["labels"]), "prompt": rec["prompt"], "text_embeds": load_file(str(w))["text_embeds"]}

    @property
    def sha256(self) -> str | None:
        return getattr(self, "_sha256", None)

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, backbone=None, *, allow_backbone_mismatch: bool = False, source: str = "path"
    ) -> "Gates":
        """Load gates written by ``save_pretrained``; validate the checksum and, if given, the backbone.

        Args:
            directory: a ``save_pretrained`` folder.
            backbone: check the gates against it (``check_backbone``).
            allow_backbone_mismatch: accept gates recorded for another backbone, with a warning.
            source: recorded in ``provenance.source`` (``path``, ``registry`` or ``shipped``).
        """
        from safetensors.torch import load_file

        directory = Path(directory)
        cfg_path, w_path = directory / GATES_CONFIG, directory / GATES_WEIGHTS
        if not cfg_path.is_file() or not w_path.is_file():
            raise ValueError(f"{directory} is not a gates directory: expected {GATES_CONFIG} and {GATES_WEIGHTS} in it")
        meta = json.loads(cfg_path.read_text())
        digest = sha256_file(w_path)
        if meta.get("sha256") and meta["sha256"] != digest:
            raise ValueError(f"{w_path} does not match the sha256 in {cfg_path}: the checkpoint is corrupt or mixed")
        gates = cls(GateConfig.from_dict(meta["config"]))
        state = load_file(str(w_path))
        missing = set(gates.state_dict()) - set(state)
        if missing:
            raise ValueError(f"{w_path} lacks tensors {sorted(missing)}")
        try:
            gates.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{w_path} does not fit its config: {e}") from e
        recorded = meta.get("backbone") or {}
        gates.backbone_id = recorded.get("name_or_path")
        gates.backbone_revision = recorded.get("revision")
        gates.backbone_fingerprint = recorded.get("fingerprint")
        gates.backbone_zero_shot = recorded.get("zero_shot")
        gates.metrics = meta.get("metrics", {}) or {}
        gates._sha256 = digest
        kept, agreement = validation_figures(gates.metrics)
        gates.provenance = GatesProvenance(
            source=source, path=str(directory), sha256=digest, trained_on=gates.backbone_id,
            fingerprint=gates.backbone_fingerprint, kept=kept, agreement=agreement,
        )
        if backbone is not None:
            gates.check_backbone(backbone, allow_mismatch=allow_backbone_mismatch)
        return gates

    @classmethod
    def from_reference_checkpoint(cls, path: str | os.PathLike, *, mul: float | None = None) -> "Gates":
        """Import a checkpoint of the original Vision-DiffMask implementation (Lightning ``.ckpt``).

        Reads ``gate.g_hat.{i}.f.{0,2}.weight_g/weight_v/bias``, ``gate.g_hat.{i}.add_activation``
        and ``gate.placeholder``; weight norm is folded as w = g * v / ||v||. The file is read with
        ``torch.load(weights_only=True)``; nothing is unpickled beyond tensors and plain containers.
        """
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(
                f"could not read {path} safely with torch.load(weights_only=True): {str(e).splitlines()[0]}. "
                "Re-save its state_dict with plain tensors, or convert it where the original code runs"
            ) from e
        state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
        if not isinstance(state, dict):
            raise ValueError(f"{path} holds no state_dict")
        S = 0
        while f"gate.g_hat.{S}.f.0.weight_v" in state:
            S += 1
        if S < 2:
            raise ValueError(f"{path} has no Vision-DiffMask gate keys ('gate.g_hat.{{i}}.f.0.weight_v')")

        def fold(prefix: str) -> torch.Tensor:
            if prefix + ".weight" in state:
                return state[prefix + ".weight"].float()
            g, v = state[prefix + ".weight_g"].float(), state[prefix + ".weight_v"].float()
            norm = v.flatten(1).norm(dim=1).view(-1, *([1] * (v.dim() - 1)))
            return g * v / norm

        w1 = torch.stack([fold(f"gate.g_hat.{i}.f.0") for i in range(S)])  # (S, P, 2D)
        P, D2 = w1.shape[1:]
        if D2 % 2:
            raise ValueError(f"{path}: first probe layer has input width {D2}, expected 2*D")
        if mul is None:
            hp = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
            mul = float(hp.get("mul_activation", GateConfig.mul)) if isinstance(hp, dict) else GateConfig.mul
        ph = state.get("gate.placeholder")
        config = GateConfig(hidden_size=D2 // 2, num_hidden_states=S, probe_size=P, mul=mul, placeholder=ph is not None)
        gates = cls(config)
        with torch.no_grad():
            gates.w1.copy_(w1)
            gates.b1.copy_(torch.stack([state[f"gate.g_hat.{i}.f.0.bias"].float() for i in range(S)]))
            gates.w2.copy_(torch.stack([fold(f"gate.g_hat.{i}.f.2").reshape(P) for i in range(S)]))
            gates.b2.copy_(torch.stack([state[f"gate.g_hat.{i}.f.2.bias"].float().reshape(()) for i in range(S)]))
            gates.add.copy_(torch.stack([state[f"gate.g_hat.{i}.add_activation"].float().reshape(()) for i in range(S)]))
            if ph is not None:
                gates.placeholder.copy_(ph.float().reshape(-1))
        gates.metrics = {"imported_from": os.path.basename(str(path))}
        gates.provenance = GatesProvenance(source="reference", path=str(path))
        return gates

