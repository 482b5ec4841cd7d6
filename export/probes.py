"""The gate probes' weights as named graph initializers, for the wide probe layout.

The explain graph runs the core's wide layout (``Ops.probe_layout == "wide"``: per depth only the
first-layer matmul on that depth's hidden state; the h0 halves, biases, activations and the
block-diagonal second layer of every probe once after the last layer, on the concatenated (B, T, P)
projections). ``GraphProbes`` holds those ``gates.WideProbes`` tensors as buffers, so the graph
reads them as initializers named ``probes.w_hs_<s>`` etc. instead of rebuilding them from the gate
parameters inside the graph.
"""

from __future__ import annotations

from torch import nn

from vdm_engine.gates import Gates, WideProbes

__all__ = ["GraphProbes"]


class GraphProbes(nn.Module):
    """``gates.wide_probes(levels)`` as buffers: w_h0, w_hs_<s> (one per depth), b1, w2, b2, bias."""

    def __init__(self, gates: Gates, levels: bool = False):
        super().__init__()
        wide = gates.wide_probes(levels)
        self.depths, self.mul = len(wide.w_hs), wide.mul
        for name in ("w_h0", "b1", "w2", "b2", "bias"):
            self.register_buffer(name, getattr(wide, name).detach().clone(), persistent=False)
        for s, w in enumerate(wide.w_hs):  # one initializer per depth, not a gather from a stack
            self.register_buffer(f"w_hs_{s}", w.detach().clone(), persistent=False)

    def wide(self) -> WideProbes:
        """The buffers as ``WideProbes`` (for ``Explainer.run(..., wide=...)``)."""
        w_hs = tuple(getattr(self, f"w_hs_{s}") for s in range(self.depths))
        return WideProbes(self.w_h0, w_hs, self.b1, self.w2, self.b2, self.bias, self.mul)
