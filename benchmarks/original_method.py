"""The original Vision-DiffMask way of explaining a batch, for timing against the engine.

Written here from the method's description (Nalmpantis et al. 2023, following De Cao et al. 2020),
not from its code. One explanation costs two full ViT passes, run eagerly through the Hugging Face
model with forward hooks:

1. **Getter pass**: hooks on the patch embedding, on the input of every encoder layer and on the
   last layer's output record the L+2 hidden states while the model computes its logits.
2. **Gates**: one small MLP per depth, run one after another, maps each token's
   ``[h0 ; h_i]`` to a gate logit; keep probabilities multiply across depths (the expected-L0
   mask), and a hard-concrete sample of every depth's gate, multiplied across depths, is the mask
   the next pass applies.
3. **Setter pass**: a hook on the patch embedding replaces each patch by
   ``g * x + (1 - g) * placeholder`` and the model runs again, giving the masked logits and the
   KL divergence between the original and masked predictions.

The probe weights are a ``vdm_engine.Gates``'s, so the mask matches ``Explainer.explain`` and the
masked logits match ``Backbone.masked_logits`` with the same gates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vdm_engine.explainer import kl_divergence
from vdm_engine.gates import hard_concrete_sample

__all__ = ["OriginalResult", "OriginalTwoPass"]


@dataclass
class OriginalResult:
    """What the original method returns for a batch.

    Attributes:
        mask: (B, N) expected keep probability of each patch over all depths.
        logits: (B, C) unmasked prediction (getter pass).
        masked_logits: (B, C) prediction with the sampled gates applied (setter pass).
        kl: (B,) KL(original || masked).
        gates: (B, N) sampled gates the setter pass applied.
    """

    mask: torch.Tensor
    logits: torch.Tensor
    masked_logits: torch.Tensor
    kl: torch.Tensor
    gates: torch.Tensor


def _first(value):
    return value[0] if isinstance(value, (tuple, list)) else value


class OriginalTwoPass:
    """Two-pass, hook-based DiffMask on a ``vdm_engine.Backbone``'s Hugging Face model.

    Args:
        backbone: a ``vdm_engine.Backbone`` (its ``.model`` is what runs, twice).
        gates: ``vdm_engine.Gates`` fitting the backbone.
        seed: seed of the hard-concrete noise for the setter pass.
    """

    def __init__(self, backbone, gates, seed: int = 0):
        gates.check_backbone(backbone)
        self.backbone = backbone
        self.gates = gates
        self.model = backbone.model
        self.seed = seed

    # ----- pass 1: record hidden states -------------------------------------------------------
    def _getter(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Run the model once with recording hooks; returns logits (B, C), patches (B, N, D), L+1 states (B, T, D)."""
        recorded: dict = {"patches": None, "states": []}
        layers = list(self.backbone.layers)

        def on_patches(_module, _inputs, output):
            recorded["patches"] = output

        def on_layer_input(_module, args, kwargs):
            recorded["states"].append(args[0] if args else kwargs["hidden_states"])

        def on_last_output(_module, _inputs, output):
            recorded["states"].append(_first(output))

        handles = [self.model.vit.embeddings.patch_embeddings.register_forward_hook(on_patches)]
        handles += [layer.register_forward_pre_hook(on_layer_input, with_kwargs=True) for layer in layers]
        handles.append(layers[-1].register_forward_hook(on_last_output))
        try:
            logits = self.model(pixel_values=pixel_values).logits
        finally:
            for h in handles:
                h.remove()
        return logits, recorded["patches"], recorded["states"]

    # ----- gates: one MLP per depth, eagerly ----------------------------------------------------
    def _gate_logits(self, h0: torch.Tensor, states: list[torch.Tensor]) -> list[torch.Tensor]:
        """h0 (B, T, D) and the L+1 other states -> L+2 gate logits (B, T), one probe at a time."""
        g = self.gates
        mul = float(g.config.mul)
        out = []
        for i, h in enumerate([h0, *states]):
            x = torch.cat([h0, h], dim=-1).to(g.w1.dtype)  # (B, T, 2D)
            hidden = torch.tanh(F.linear(x, g.w1[i], g.b1[i]))  # (B, T, P)
            z = mul * torch.tanh(F.linear(hidden, g.w2[i : i + 1], g.b2[i : i + 1])).squeeze(-1) + g.add[i]
            out.append(z)
        return out

    # ----- pass 2: masked forward ---------------------------------------------------------------
    def _setter(self, pixel_values: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """Run the model with patch embeddings replaced under ``gates`` (B, N); returns (B, C) logits."""
        placeholder = self.gates.placeholder

        def replace_patches(_module, _inputs, output):
            g = gates.to(output.dtype).unsqueeze(-1)
            return g * output + (1 - g) * placeholder.to(output.dtype)

        handle = self.model.vit.embeddings.patch_embeddings.register_forward_hook(replace_patches)
        try:
            return self.model(pixel_values=pixel_values).logits
        finally:
            handle.remove()

    @torch.no_grad()
    def get_mask(self, pixel_values: torch.Tensor) -> OriginalResult:
        """Explain a batch: (B, 3, H, W) -> ``OriginalResult`` (two full passes)."""
        c = self.gates.config
        logits, patches, states = self._getter(pixel_values)
        if patches is None or len(states) != self.backbone.num_layers + 1:
            raise RuntimeError(
                f"hooks recorded {len(states)} layer states, expected {self.backbone.num_layers + 1}: "
                "the model's layer layout is not the one these hooks expect"
            )
        cls = self.model.vit.embeddings.cls_token.expand(patches.shape[0], -1, -1).to(patches.dtype)
        h0 = torch.cat([cls, patches], dim=1)  # (B, T, D): CLS and patch projections, no positions
        z = self._gate_logits(h0, states)
        generator = torch.Generator(device=pixel_values.device).manual_seed(self.seed)
        log_keep = torch.zeros_like(z[0])
        sampled = torch.ones_like(z[0])
        for zi in z:
            log_keep = log_keep - F.softplus(c.log_keep_offset - zi)
            sampled = sampled * hard_concrete_sample(zi, c.beta, c.l, c.r, generator)
        mask = log_keep[:, 1:].exp()
        gates = sampled[:, 1:]
        masked = self._setter(pixel_values, gates)
        return OriginalResult(
            mask=mask, logits=logits.float(), masked_logits=masked.float(),
            kl=kl_divergence(logits, masked), gates=gates,
        )

    __call__ = get_mask
