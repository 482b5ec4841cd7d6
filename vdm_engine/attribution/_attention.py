"""An explicit ViT forward that keeps the attention probabilities (SDPA does not expose them).

Reads the backbone's layer submodules directly, for both Hugging Face layouts:

- transformers 5.x: ``layer.attention.{q,k,v,o}_proj``, ``layer.mlp.fc1/fc2``;
- transformers 4.x: ``layer.attention.attention.{query,key,value}``, ``layer.attention.output.dense``,
  ``layer.intermediate.dense``, ``layer.output.dense``.

Both use ``layer.layernorm_before`` / ``layer.layernorm_after`` (pre-norm blocks). Geometry (heads,
head size) comes from the config; nothing is hard-coded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

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
        tokens: (B, T, D) encoder input (CLS + patches + position embeddings); the leaf that
            ``traced_forward(..., requires_grad=True)`` differentiates from.
    """

    logits: torch.Tensor
    attentions: list[torch.Tensor]
    attention_inputs: list[torch.Tensor]
    tokens: torch.Tensor


@dataclass
class _Block:
    ln1: nn.Module
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    ln2: nn.Module
    fc1: nn.Linear
    act: Callable
    fc2: nn.Linear


def _block(layer: nn.Module) -> _Block:
    att = layer.attention
    if hasattr(att, "q_proj"):  # transformers >= 5
        return _Block(
            layer.layernorm_before, att.q_proj, att.k_proj, att.v_proj, att.o_proj,
            layer.layernorm_after, layer.mlp.fc1, layer.mlp.activation_fn, layer.mlp.fc2,
        )
    if hasattr(att, "attention") and hasattr(att.attention, "query"):  # transformers 4.x
        return _Block(
            layer.layernorm_before, att.attention.query, att.attention.key, att.attention.value, att.output.dense,
            layer.layernorm_after, layer.intermediate.dense, layer.intermediate.intermediate_act_fn, layer.output.dense,
        )
    raise ValueError(
        f"unsupported ViT layer layout {type(layer).__name__}: expected attention.q_proj (transformers 5) "
        "or attention.attention.query (transformers 4)"
    )


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
        cls = (backbone.cls_token + backbone.pos_embed[0]).to(patches.dtype).expand(B, 1, D)
        tokens = torch.cat([cls, patches + backbone.pos_embed[1:].to(patches.dtype)], dim=1)
        if requires_grad:
            tokens = tokens.detach().requires_grad_(True)
        h = tokens
        T = h.shape[1]
        attentions, inputs = [], []
        for layer in backbone.layers:
            blk = _block(layer)
            x = blk.ln1(h)
            inputs.append(x)
            q = blk.q(x).view(B, T, H, hd).transpose(1, 2)  # (B, H, T, hd)
            k = blk.k(x).view(B, T, H, hd).transpose(1, 2)
            v = blk.v(x).view(B, T, H, hd).transpose(1, 2)
            att = ((q @ k.transpose(-1, -2)) * scale).softmax(-1)  # (B, H, T, T)
            attentions.append(att)
            ctx = (att @ v).transpose(1, 2).reshape(B, T, H * hd)
            h = h + blk.o(ctx)
            h = h + blk.fc2(blk.act(blk.fc1(blk.ln2(h))))
        logits = backbone.head(h)
    return AttentionTrace(logits=logits, attentions=attentions, attention_inputs=inputs, tokens=tokens)
