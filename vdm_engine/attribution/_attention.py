"""An explicit ViT forward that keeps the attention probabilities (SDPA does not expose them).

The blocks come written out from the backbone's family adapter (``Family.trace_blocks``: the q/k/v/out
projections, norms, MLP, layer scales and any attention bias, for the transformers 5.x and 4.x
layouts). Geometry (heads, head size) comes from the config; nothing is hard-coded. Attention rows
and columns cover every token, prefix tokens (CLS, distillation, registers) first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["AttentionTrace", "traced_forward"]


@dataclass
class AttentionTrace:
    """What one traced forward pass recorded.

    Attributes:
        logits: (B, C).
        attentions: L tensors (B, H, T, T) of attention probabilities (rows sum to 1), in the
            autograd graph when the pass ran with gradients.
        attention_inputs: L tensors (B, T, D): each block's normed input to its attention
            (``layernorm_before`` output).
        tokens: (B, T, D) encoder input (prefix tokens + patches + position embeddings); the leaf that
            ``traced_forward(..., requires_grad=True)`` differentiates from.
    """

    logits: torch.Tensor
    attentions: list[torch.Tensor]
    attention_inputs: list[torch.Tensor]
    tokens: torch.Tensor


def traced_forward(backbone, pixel_values: torch.Tensor, *, requires_grad: bool = False) -> AttentionTrace:
    """Run the backbone with explicit attention and record probabilities and block inputs.

    Computes the same logits as ``backbone(pixel_values)`` (eager maths instead of SDPA).

    Args:
        backbone: a ``vdm_engine.Backbone``.
        pixel_values: (B, 3, H, W).
        requires_grad: make the encoder input a leaf that requires grad, so that gradients of the
            logits reach the attention probabilities and block inputs (the backbone's weights
            stay frozen). Runs under ``torch.enable_grad()`` in that case.

    Returns:
        ``AttentionTrace``.
    """
    cfg = backbone.config
    H = int(cfg.num_attention_heads)
    D = backbone.hidden_size
    hd = int(getattr(cfg, "head_dim", None) or D // H)
    scale = hd**-0.5
    with torch.set_grad_enabled(requires_grad or torch.is_grad_enabled()):
        patches = backbone.embed_patches(pixel_values)
        B = patches.shape[0]
        tokens = backbone._assemble(patches)  # (B, T, D) with every prefix token
        if requires_grad:
            tokens = tokens.detach().requires_grad_(True)
        h = tokens
        T = h.shape[1]
        attentions, inputs = [], []
        for blk in backbone.family.trace_blocks(T):
            x = blk.ln1(h)
            inputs.append(x)
            q = blk.q(x).view(B, T, H, hd).transpose(1, 2)  # (B, H, T, hd)
            k = blk.k(x).view(B, T, H, hd).transpose(1, 2)
            v = blk.v(x).view(B, T, H, hd).transpose(1, 2)
            logits = (q @ k.transpose(-1, -2)) * scale
            if blk.bias is not None:  # BEiT's relative position bias
                logits = logits + blk.bias.to(logits.dtype)
            att = logits.softmax(-1)  # (B, H, T, T)
            attentions.append(att)
            ctx = blk.o((att @ v).transpose(1, 2).reshape(B, T, H * hd))
            h = h + (blk.ls1(ctx) if blk.ls1 is not None else ctx)
            m = blk.mlp(blk.ln2(h))
            h = h + (blk.ls2(m) if blk.ls2 is not None else m)
        logits = backbone.head(h)
    return AttentionTrace(logits=logits, attentions=attentions, attention_inputs=inputs, tokens=tokens)
