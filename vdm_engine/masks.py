"""The mask maths, written once: log keep -> layer masks -> hard mask -> masked pass -> KL.

``Explainer.explain`` / ``verify``, the ONNX graph and the training validation all call these.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

__all__ = ["layer_masks", "patch_mask", "patch_rank", "hard_mask", "kl_divergence", "MaskedPass", "masked_pass"]


def layer_masks(log_keep: torch.Tensor) -> torch.Tensor:
    """Cumulative keep probability up to each depth, CLS dropped: (B, L+2, T) -> (B, L+2, N) float32."""
    return log_keep.float().cumsum(1)[:, :, 1:].exp()


def patch_mask(log_keep: torch.Tensor) -> torch.Tensor:
    """Keep probability aggregated over every depth, CLS dropped: (B, L+2, T) -> (B, N) float32.

    Equals ``layer_masks(log_keep)[:, -1]`` without materialising the other depths.
    """
    return log_keep.float().sum(1)[:, 1:].exp()


def patch_rank(level_masks: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """One-pass ranking from K nested masks (the "mask path"): (B, K, N) keep probabilities, least sparse
    level first -> (B, N) float32 rank scores, higher = more relevant.

    A patch's rank is r + 1 where r is the sparsest level that keeps it (keep probability > threshold;
    r = -1 when no level keeps it). Ties within a rank are broken by the keep probability at the level
    that dropped it (level r + 1; the sparsest level for patches every level keeps), which lies in
    [0, 1) below the next rank.
    """
    K = level_masks.shape[1]
    p = level_masks.float()
    kept = p > threshold
    levels = torch.arange(K, device=p.device).view(1, K, 1)
    r = torch.where(kept, levels, torch.full_like(levels, -1)).amax(1)  # (B, N) sparsest keeping level
    tie = p.gather(1, (r + 1).clamp(max=K - 1).unsqueeze(1)).squeeze(1)
    return (r + 1).float() + tie.clamp(max=1.0 - 1e-6)


def hard_mask(keep_prob: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """(B, N) bool: the patches a mask keeps (keep probability > ``threshold``)."""
    return keep_prob > threshold


def kl_divergence(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """KL(softmax(p) || softmax(q)) along the last dim, in float32."""
    lp, lq = logits_p.float().log_softmax(-1), logits_q.float().log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1)


class MaskedPass(NamedTuple):
    """The masked forward pass compared with the original prediction; every field (B,) but logits (B, C)."""

    masked_logits: torch.Tensor
    kl: torch.Tensor
    agree: torch.Tensor
    kept_fraction: torch.Tensor


def masked_pass(
    backbone,
    patches: torch.Tensor,
    logits: torch.Tensor,
    keep: torch.Tensor,
    placeholder: torch.Tensor | None,
    mask_fn: Callable | None = None,
) -> MaskedPass:
    """Run the backbone with dropped patches replaced by the placeholder; compare with ``logits``.

    Args:
        backbone: a ``Backbone``.
        patches: (B, N, D) patch embeddings (``Backbone.embed_patches``; h0[:, 1:] of the hidden states).
        logits: (B, C) the original prediction.
        keep: (B, N) bool or {0, 1} hard mask.
        placeholder: (D,) replacement vector, or None for zeros.
        mask_fn: the patch-masking op (``Ops.patch_mask``); default the reference.

    Returns:
        ``MaskedPass``: masked logits (B, C) float32, KL(original || masked), argmax agreement, kept fraction.
    """
    hard = keep.to(patches.dtype)
    masked = backbone.masked_logits_from_patches(patches, hard, placeholder, mask_fn=mask_fn).float()
    original = logits.float().to(masked.device)
    return MaskedPass(
        masked_logits=masked,
        kl=kl_divergence(original, masked),
        agree=masked.argmax(-1) == original.argmax(-1),
        kept_fraction=keep.float().mean(-1),
    )
