"""The gate probes as few, wide ONNX nodes: the graph's twin of ``gates.gate_probe_reference``.

Run per depth, the reference probe is about a dozen small nodes (three matmuls, adds, tanh twice,
log-sigmoid) repeated at each of the S = L+2 depths. On a small model at two onnxruntime threads
each node costs a thread-pool dispatch that its work does not pay for, so the graph computes the
same maths in a different order:

- at each depth only the first-layer matmul on that depth's hidden state, ``h_s @ W1[s, :, D:]^T``
  (B, T, P) per probe row (all K levels of that depth in one matmul);
- the h0 half of every probe's first layer in one matmul, ``h0 @ [W1[r, :, :D]^T for all r]``;
- after the last layer, one concatenation of the (B, T, P) projections (width P = D/4 by default,
  not the (S, B, T, D) stack of hidden states) and the rest of every probe at once: bias, tanh, the
  second layer as one block-diagonal matmul, the output tanh and the log-sigmoid.

Same outputs as ``Explainer.probe_pass``; fp32 results match the reference to rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vdm_engine.gates import ProbeParams, fuse_levels

__all__ = ["FusedProbes", "fused_probe_pass"]


class FusedProbes(nn.Module):
    """The probes of ``levels`` (a list of K ``ProbeParams`` of S depths each) rearranged for the graph.

    Probe (k, s) owns columns ``[(s*K + k)*P, (s*K + k + 1)*P)`` of the first layer's output.

    Buffers (float32, or the probes' dtype):
        w_h0 (D, S*K*P): the h0 half of every first layer; b1 (S*K*P,).
        w_hs_<s> (D, K*P) for each depth s: the hidden-state half.
        w2 (S*K*P, S*K): second layers as a block-diagonal matrix; b2 (S*K,).
        z_bias (S*K,): add - offset (``z - offset`` folded into one add).
    """

    def __init__(self, levels: list[ProbeParams]):
        super().__init__()
        f = fuse_levels(levels)  # the core's join of the K levels per depth (w1 rows level-major)
        S, KP, D2 = f.w1.shape
        K, D = f.levels, D2 // 2
        self.S, self.K, self.P, self.D = S, K, KP // K, D
        self.mul = float(f.mul)
        with torch.no_grad():
            self.register_buffer("w_h0", f.w1[..., :D].reshape(S * KP, D).t().contiguous(), persistent=False)
            for s in range(S):  # one initializer per depth (``probes.w_hs_<s>`` in the graph), not a gather
                self.register_buffer(f"w_hs_{s}", f.w1[s, :, D:].t().contiguous(), persistent=False)
            self.register_buffer("b1", f.b1.reshape(S * KP).clone(), persistent=False)
            # every depth's block-diagonal second layer on the diagonal of one (S*K*P, S*K) matrix
            self.register_buffer("w2", torch.block_diag(*f.w2_block.unbind(0)).contiguous(), persistent=False)
            self.register_buffer("b2", f.b2.reshape(S * K).clone(), persistent=False)
            self.register_buffer("z_bias", f.bias.reshape(S * K).clone(), persistent=False)

    def project(self, depth: int, h: torch.Tensor) -> torch.Tensor:
        """(B, T, D) hidden state ``depth`` -> (B, T, K*P): its half of the first layers."""
        w = getattr(self, f"w_hs_{depth}")
        return torch.matmul(h.to(w.dtype), w)

    def finish(self, h0: torch.Tensor, projections: list[torch.Tensor]) -> torch.Tensor:
        """h0 (B, T, D) and the S projections of ``project`` -> log keep (B, K, S, T) float32."""
        B, T, _ = h0.shape
        pre = torch.matmul(h0.to(self.w_h0.dtype), self.w_h0) + torch.cat(projections, -1) + self.b1  # (B, T, S*K*P)
        out = torch.matmul(torch.tanh(pre), self.w2) + self.b2  # (B, T, S*K)
        # -softplus(offset - z) == logsigmoid(z - offset), with z = mul * tanh(out) + add.
        log_keep = F.logsigmoid(self.mul * torch.tanh(out) + self.z_bias).float()
        return log_keep.reshape(B, T, self.S, self.K).permute(0, 3, 2, 1)


def fused_probe_pass(backbone, probes: FusedProbes, pixel_values: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``Explainer.probe_pass`` with ``FusedProbes``: one backbone pass, each depth projected as produced.

    Returns:
        logits (B, C), h0 (B, T, D), log keep (B, K, L+2, T) float32 (K: the levels ``probes`` holds).
    """
    first: list[torch.Tensor] = []
    projections: list[torch.Tensor] = []

    def on_state(i: int, h: torch.Tensor) -> None:
        if i == 0:
            first.append(h)
        projections.append(probes.project(i, h))

    logits = backbone.forward_states(pixel_values, on_state)
    return logits, first[0], probes.finish(first[0], projections)
