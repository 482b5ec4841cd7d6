"""The module that becomes the ONNX graph: pixels in, prediction and explanation out, one ViT pass.

``ExplainerGraph`` wraps an ``Explainer`` and computes what its explain core (``Explainer.run``)
computes, with plain-PyTorch ops (kernels cannot be traced into ONNX), so the exported graph holds
one encoder pass. By default the gate probes are written as few wide nodes (``export.probes``:
fewer thread-pool dispatches in onnxruntime); ``fused_probes=False`` runs ``Explainer.run`` itself
with ``reference_ops``. Only the optional ``masked_logits`` / ``kl`` outputs add the second, masked
pass (the check ``Explainer.verify`` makes).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from vdm_engine.explainer import Explainer
from vdm_engine.ops import reference_ops

from .defaults import DEFAULT_OUTPUTS, OUTPUTS
from .probes import GraphProbes

__all__ = ["ExplainerGraph", "OUTPUTS", "DEFAULT_OUTPUTS", "FLOAT_INPUT", "UINT8_INPUT", "normalize_outputs"]

#: Input names: normalised float pixels (Optimum's name) or raw uint8 images.
FLOAT_INPUT = "pixel_values"
UINT8_INPUT = "images"


def normalize_outputs(outputs: Sequence[str] | str) -> tuple[str, ...]:
    """Check requested output names and return them in graph order (``OUTPUTS``), without duplicates."""
    if isinstance(outputs, str):
        outputs = (outputs,)
    outputs = tuple(outputs)
    unknown = [o for o in outputs if o not in OUTPUTS]
    if unknown:
        raise ValueError(f"unknown output(s) {unknown}; expected a subset of {list(OUTPUTS)}")
    if not outputs:
        raise ValueError(f"no outputs requested; expected a non-empty subset of {list(OUTPUTS)}")
    return tuple(o for o in OUTPUTS if o in outputs)


class ExplainerGraph(nn.Module):
    """Export wrapper: one ViT forward, the gate probes on its hidden states, masks from them.

    Args:
        explainer: the explainer to export (its dtype is the graph's compute dtype).
        outputs: subset of ``OUTPUTS``; returned in ``OUTPUTS`` order.
        uint8_input: take raw ``images (B, H, W, 3)`` uint8 and fold rescale + normalisation into
            the graph (no resizing: images must already be the model's size); else take
            ``pixel_values (B, 3, H, W)`` float32.
        threshold: keep-probability threshold of the hard mask used by ``masked_logits`` / ``kl``.
        fused_probes: the probes in the wide layout (``Ops.probe_layout``; default): per depth one
            projection, every probe (and level) finished in one set of wide nodes after the last
            layer, weights from ``GraphProbes``; False: each depth's whole probe as it is produced.

    Outputs (all float32): logits (B, C), patch_mask (B, N), layer_masks (B, L+2, N),
    masked_logits (B, C), kl (B,), patch_rank (B, N) (K-level gates: every level's probes on the same
    hidden states, ``masks.patch_rank``).
    """

    def __init__(
        self,
        explainer: Explainer,
        outputs: Sequence[str] = DEFAULT_OUTPUTS,
        *,
        uint8_input: bool = False,
        threshold: float = 0.5,
        fused_probes: bool = True,
    ):
        super().__init__()
        self.explainer = explainer
        self.outputs = normalize_outputs(outputs)
        levels = explainer.gates.config.levels
        if "patch_rank" in self.outputs and levels < 2:  # the ranking needs K >= 2 nested masks
            raise ValueError(
                f"the patch_rank output needs K-level gates (levels >= 2, joined with Gates.stack; vit-digits ships "
                f"them in its gates-levels folder); the gates in use have {levels} level"
            )
        self.uint8_input = bool(uint8_input)
        if not 0.0 <= float(threshold) <= 1.0:
            raise ValueError(f"threshold must be a keep probability in [0, 1], got {threshold}")
        self.threshold = float(threshold)
        gates = explainer.gates
        rank = "patch_rank" in self.outputs
        self.probes = GraphProbes(gates, levels=rank) if fused_probes else None
        spec = explainer.backbone.image_spec
        scale = torch.full((3,), float(spec.rescale_factor) if spec.do_rescale else 1.0)
        mean = torch.tensor(spec.mean if spec.do_normalize else (0.0, 0.0, 0.0))
        std = torch.tensor(spec.std if spec.do_normalize else (1.0, 1.0, 1.0))
        # (x * rescale - mean) / std == x * (rescale / std) + (-mean / std), per channel.
        self.register_buffer("_in_scale", (scale / std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_in_bias", (-mean / std).view(1, 3, 1, 1), persistent=False)

    @property
    def input_name(self) -> str:
        return UINT8_INPUT if self.uint8_input else FLOAT_INPUT

    def example_input(self, batch: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> torch.Tensor:
        """A random input of the graph's kind: uint8 (B, H, W, 3) or float32 (B, 3, H, W)."""
        H, W = self.explainer.backbone.image_size
        if self.uint8_input:
            return torch.randint(0, 256, (batch, H, W, 3), dtype=torch.uint8, generator=generator).to(device)
        return torch.randn(batch, 3, H, W, generator=generator).to(device)

    def pixel_values(self, x: torch.Tensor) -> torch.Tensor:
        """Graph input -> (B, 3, H, W) float32 normalised pixels (identity for float input)."""
        if self.uint8_input:
            return x.permute(0, 3, 1, 2).to(torch.float32) * self._in_scale + self._in_bias
        return x.to(torch.float32)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(B, 3, H, W) float32 or (B, H, W, 3) uint8 -> the requested outputs, float32."""
        if self.probes is None:
            ops, wide = reference_ops(probe_layout="per-depth"), None
        else:
            ops, wide = reference_ops(probe_layout="wide"), self.probes.wide()
        out = self.explainer.run(self.pixel_values(x), self.outputs, threshold=self.threshold, ops=ops, wide=wide)
        return tuple(out[o] for o in self.outputs)
