"""What a dropped patch becomes while the gates train: the replacement policy of ``TrainConfig.replacement``.

The default (``"placeholder"``) replaces every dropped patch by the gates' placeholder vector (learned, or
zeros), as the explanation does. A policy naming several kinds joined by ``+`` (``"placeholder+zeros"``,
``"mean+noise"``) gives row b of a batch the kind ``b mod len(kinds)``, so the mask learned holds under
each kind of replacement. The kinds:

- ``placeholder``: the gates' placeholder (D,), trained through these rows when it is learned;
- ``zeros``: a zero patch embedding;
- ``mean``: the patch embedding of the image's per-channel mean (evaluation's ``mean`` replacement);
- ``noise``: the patch embedding of uniform pixel noise, fresh per step (evaluation's ``noise`` replacement).
"""

from __future__ import annotations

from typing import Callable

import torch

from vdm_engine.evaluation.metrics import normalised_noise, perturbed_logits, replacement_pixels

__all__ = ["REPLACEMENT_KINDS", "replacement_kinds", "row_replacements", "masked_logits_replaced"]

REPLACEMENT_KINDS = ("placeholder", "zeros", "mean", "noise")
_PIXEL_KINDS = ("mean", "noise")


def replacement_kinds(policy: str) -> tuple[str, ...]:
    """``"placeholder+zeros"`` -> ``("placeholder", "zeros")``; ``ValueError`` naming an unknown kind."""
    kinds = tuple(policy.split("+"))
    bad = [k for k in kinds if k not in REPLACEMENT_KINDS]
    if bad or not policy:
        raise ValueError(f"replacement {policy!r}: kinds must be {'/'.join(REPLACEMENT_KINDS)} joined by '+', "
                         f"got {bad[0] if bad else 'nothing'!r}")
    return kinds


def _noise_pixels(shape, image_spec, generator: torch.Generator | None, device, dtype) -> torch.Tensor:
    """Uniform raw-pixel noise normalised like the images, as ``evaluation.replacement_pixels(.., "noise")``."""
    return normalised_noise(torch.rand(shape, generator=generator, device=device), image_spec).to(dtype)


def row_replacements(
    policy: str,
    patches: torch.Tensor,
    placeholder: torch.Tensor,
    *,
    backbone=None,
    pixel_values: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The replacement of every patch of every row under ``policy``.

    Args:
        policy: kinds joined by ``+``; row b takes kind ``b mod len(kinds)``.
        patches: (B, N, D) patch embeddings (their shape, device and dtype set the output's).
        placeholder: (D,) the gates' placeholder (gradients flow into it from ``placeholder`` rows).
        backbone: embeds the ``mean`` / ``noise`` pixels (``embed_patches``, ``image_spec``).
        pixel_values: (B, 3, H, W) the rows' images, needed for ``mean`` and ``noise`` rows.
        generator: RNG of the ``noise`` pixels (on the images' device).

    Returns:
        (B, N, D) replacements.
    """
    kinds = replacement_kinds(policy)
    B, N, D = patches.shape
    if any(k in _PIXEL_KINDS for k in kinds) and (pixel_values is None or backbone is None):
        raise ValueError(f"replacement {policy!r} needs the batch's pixel_values and the backbone")
    if pixel_values is not None and pixel_values.shape[0] != B:
        raise ValueError(f"pixel_values must have the patches' batch {B}, got {tuple(pixel_values.shape)}")
    kind_of_row = torch.arange(B, device=patches.device) % len(kinds)  # (B,)
    out = patches.new_zeros(B, N, D)
    for i, kind in enumerate(kinds):
        if kind == "zeros":
            continue
        rows = (kind_of_row == i).view(B, 1, 1)
        if kind == "placeholder":
            r = placeholder.to(patches.dtype).view(1, 1, D)
        elif kind == "mean":
            r = backbone.embed_patches(replacement_pixels(pixel_values, "mean", backbone.image_spec, ()))
        else:
            noise = _noise_pixels(pixel_values.shape, backbone.image_spec, generator, pixel_values.device,
                                  pixel_values.dtype)
            r = backbone.embed_patches(noise)
        out = torch.where(rows, r.to(patches.dtype), out)
    return out


def masked_logits_replaced(
    backbone, patches: torch.Tensor, gates: torch.Tensor, replacement: torch.Tensor, *, mask_fn: Callable | None = None
) -> torch.Tensor:
    """Masked forward with a replacement per patch: x'_n = g_n * x_n + (1 - g_n) * r_n.

    Args:
        patches: (B, N, D) patch embeddings; gates: (B, N) keep values; replacement: (B, N, D).
        mask_fn: the patch-masking op (``Ops.patch_mask``); default the reference.

    Returns:
        (B, C) logits.
    """
    # evaluation's batched perturbation path: it blends precomputed embeddings through the masking op
    logits = perturbed_logits(backbone, None, None, gates.unsqueeze(1), patches=patches,
                              replacement_patches=replacement, mask_fn=mask_fn)
    return logits[:, 0]
