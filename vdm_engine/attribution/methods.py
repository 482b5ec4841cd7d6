"""Patch attribution methods sharing one interface: pixel_values (B, 3, H, W) -> scores (B, N).

Higher scores mean more relevant. Every method explains one target class per image, by default
the class the backbone predicts; all are batched (a batch gives the same scores as its images one
by one).
"""

from __future__ import annotations

import hashlib

import torch

from ._attention import traced_forward

__all__ = [
    "Attribution",
    "RandomAttribution",
    "RolloutAttribution",
    "GradCamAttribution",
    "CheferAttribution",
    "IntegratedGradientsAttribution",
    "DiffMaskAttribution",
    "DiffMaskPathAttribution",
]


class Attribution:
    """Base class: ``method(pixel_values, target=None) -> (B, N)`` float32 patch scores.

    Subclasses implement ``_scores(pixel_values, target)``; the base checks the input, moves it to
    the backbone's device and checks the output shape.
    """

    name: str = ""

    def __init__(self, backbone):
        self.backbone = backbone

    def __call__(self, pixel_values: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """Score every patch of every image.

        Args:
            pixel_values: (B, 3, H, W) float, as from ``backbone.preprocess``.
            target: (B,) class indices to explain; default: the predicted classes.

        Returns:
            (B, N) float32 scores on the backbone's device, N = number of patches (row-major grid).
        """
        bb = self.backbone
        bb.check_pixels(pixel_values)
        pixel_values = pixel_values.to(bb.device, bb.dtype)
        B = pixel_values.shape[0]
        if target is not None:
            target = torch.as_tensor(target, device=bb.device).long().reshape(-1)
            if target.shape[0] != B:
                raise ValueError(f"target must hold one class per image ({B}), got shape {tuple(target.shape)}")
            if target.numel() and (int(target.min()) < 0 or int(target.max()) >= bb.num_labels):
                raise ValueError(f"target classes must be in [0, {bb.num_labels}), got {target.tolist()}")
        scores = self._scores(pixel_values, target)
        if scores.shape != (B, bb.num_patches):
            raise RuntimeError(f"{self.name} returned {tuple(scores.shape)}, expected ({B}, {bb.num_patches})")
        return scores.detach().float()

    def _scores(self, pixel_values: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _pick(logits: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """Sum over the batch of each image's target logit: (B, C) -> scalar (per-image gradients stay separate)."""
    if target is None:
        target = logits.argmax(-1)
    return logits.gather(1, target.view(-1, 1)).sum()


class RandomAttribution(Attribution):
    """Uniform random scores, a fixed function of (seed, image bytes): reproducible and batch-consistent."""

    name = "random"

    def __init__(self, backbone, seed: int = 0):
        super().__init__(backbone)
        self.seed = int(seed)

    def _scores(self, pixel_values, target):
        N = self.backbone.num_patches
        rows = []
        for img in pixel_values.detach().float().cpu():
            digest = hashlib.sha256(img.numpy().tobytes() + self.seed.to_bytes(8, "little", signed=True)).digest()
            g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
            rows.append(torch.rand(N, generator=g))
        return torch.stack(rows).to(pixel_values.device)


class RolloutAttribution(Attribution):
    """Attention rollout (Abnar & Zuidema, 2020) from the CLS token to every patch.

    Per block: fuse heads (mean, max or min), zero the lowest ``discard_ratio`` of the fused
    attentions of each image (the CLS->CLS entry is always kept), add the identity for the
    residual, renormalise rows, and multiply the blocks together. Class-agnostic: ``target`` is
    ignored.
    """

    name = "rollout"

    def __init__(self, backbone, discard_ratio: float = 0.9, head_fusion: str = "mean"):
        super().__init__(backbone)
        if not 0.0 <= discard_ratio < 1.0:
            raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
        if head_fusion not in ("mean", "max", "min"):
            raise ValueError(f"head_fusion must be 'mean', 'max' or 'min', got {head_fusion!r}")
        self.discard_ratio, self.head_fusion = float(discard_ratio), head_fusion

    def _scores(self, pixel_values, target):
        with torch.no_grad():
            trace = traced_forward(self.backbone, pixel_values)
        B, _, T, _ = trace.attentions[0].shape
        eye = torch.eye(T, device=pixel_values.device, dtype=torch.float32)
        result = eye.expand(B, T, T)
        n_discard = int(T * T * self.discard_ratio)
        for att in trace.attentions:
            att = att.float()
            fused = {"mean": att.mean(1), "max": att.amax(1), "min": att.amin(1)}[self.head_fusion]  # (B, T, T)
            if n_discard:
                flat = fused.reshape(B, T * T)
                low = flat.topk(n_discard, dim=-1, largest=False).indices  # per image
                keep = torch.ones_like(flat).scatter_(1, low, 0.0)
                keep[:, 0] = 1.0  # never discard CLS -> CLS
                fused = (flat * keep).view(B, T, T)
            a = fused + eye
            a = a / a.sum(-1, keepdim=True)
            result = a @ result
        return result[:, 0, self.backbone.num_prefix_tokens:]


class GradCamAttribution(Attribution):
    """Grad-CAM (Selvaraju et al., 2017) on the tokens the last block attends over.

    The feature map is the last block's normed input (B, T, D) — the last place where patch
    tokens still reach the CLS token; channel weights are the target logit's gradients averaged
    over patch tokens; score = ReLU(sum over channels of weight * activation) per patch.
    """

    name = "gradcam"

    def _scores(self, pixel_values, target):
        trace = traced_forward(self.backbone, pixel_values, requires_grad=True)
        feats = trace.attention_inputs[-1]
        (grad,) = torch.autograd.grad(_pick(trace.logits, target), feats)
        P = self.backbone.num_prefix_tokens
        feats, grad = feats[:, P:].float(), grad[:, P:].float()  # drop prefix tokens: (B, N, D)
        weights = grad.mean(1, keepdim=True)  # (B, 1, D)
        return (weights * feats).sum(-1).clamp(min=0)


class CheferAttribution(Attribution):
    """Gradient-weighted attention relevance (Chefer, Gur & Wolf, 2021, "Generic Attention-model
    Explainability for Interpreting Bi-Modal and Encoder-Decoder Transformers").

    R starts as the identity; for every block, A_bar = mean over heads of ReLU(grad(A) * A), and
    R <- R + A_bar @ R. The score of patch n is R[CLS, n].
    """

    name = "chefer"

    def _scores(self, pixel_values, target):
        trace = traced_forward(self.backbone, pixel_values, requires_grad=True)
        grads = torch.autograd.grad(_pick(trace.logits, target), trace.attentions)
        B, _, T, _ = trace.attentions[0].shape
        R = torch.eye(T, device=pixel_values.device, dtype=torch.float32).expand(B, T, T)
        for att, g in zip(trace.attentions, grads):
            cam = (g.float() * att.detach().float()).clamp(min=0).mean(1)  # (B, T, T)
            R = R + cam @ R
        return R[:, 0, self.backbone.num_prefix_tokens:]


class IntegratedGradientsAttribution(Attribution):
    """Integrated Gradients (Sundararajan et al., 2017) via captum, summed over each patch's pixels
    and channels.

    Args:
        n_steps: points on the path from the baseline to the image (default 50).
        baseline: ``"black"`` (the image processor's black image), ``"zeros"`` (zero pixel values)
            or ``"mean"`` (each image's per-channel mean).
        absolute: sum |attribution| instead of the signed attribution.
        internal_batch_size: images per forward/backward inside captum (bounds memory).
    """

    name = "ig"

    def __init__(self, backbone, n_steps: int = 50, baseline: str = "black", absolute: bool = False,
                 internal_batch_size: int = 256):
        super().__init__(backbone)
        try:
            from captum.attr import IntegratedGradients  # noqa: F401
        except ImportError as e:
            raise ValueError(
                "the 'ig' method needs the optional package captum: pip install captum"
            ) from e
        if n_steps < 1:
            raise ValueError(f"n_steps must be >= 1, got {n_steps}")
        if baseline not in ("black", "zeros", "mean"):
            raise ValueError(f"baseline must be 'black', 'zeros' or 'mean', got {baseline!r}")
        self.n_steps, self.baseline, self.absolute = int(n_steps), baseline, bool(absolute)
        self.internal_batch_size = int(internal_batch_size)

    def _baseline(self, pv: torch.Tensor) -> torch.Tensor:
        if self.baseline == "zeros":
            return torch.zeros_like(pv)
        if self.baseline == "mean":
            return pv.mean((2, 3), keepdim=True).expand_as(pv).contiguous()
        spec = self.backbone.image_spec
        black = torch.zeros(3, dtype=torch.float32)
        if spec.do_normalize:
            black = (black - torch.tensor(spec.mean)) / torch.tensor(spec.std)
        return black.to(pv.device, pv.dtype).view(1, 3, 1, 1).expand_as(pv).contiguous()

    def _scores(self, pixel_values, target):
        from captum.attr import IntegratedGradients

        bb = self.backbone
        if target is None:
            with torch.no_grad():
                target = bb(pixel_values).argmax(-1)
        ig = IntegratedGradients(lambda x: bb(x))
        with torch.enable_grad():
            attr = ig.attribute(
                pixel_values, baselines=self._baseline(pixel_values), target=target, n_steps=self.n_steps,
                internal_batch_size=max(self.internal_batch_size, pixel_values.shape[0]),
            )
        attr = attr.float().sum(1)  # (B, H, W)
        if self.absolute:
            attr = attr.abs()
        (gh, gw), (ph, pw) = bb.grid, bb.patch_size
        B = attr.shape[0]
        attr = attr[:, : gh * ph, : gw * pw].reshape(B, gh, ph, gw, pw)
        return attr.sum((2, 4)).reshape(B, gh * gw)


class DiffMaskAttribution(Attribution):
    """DiffMask's keep probabilities: ``explainer.explain(pixel_values).patch_mask`` (B, N).

    The gates explain the predicted class; ``target`` is ignored.
    """

    name = "diffmask"

    def __init__(self, explainer):
        super().__init__(explainer.backbone)
        self.explainer = explainer

    def _scores(self, pixel_values, target):
        return self.explainer.explain(pixel_values).patch_mask


class DiffMaskPathAttribution(Attribution):
    """DiffMask's one-pass ranking from K-level gates: ``explainer.explain(pixel_values).patch_rank``
    (B, N), the sparsest level that keeps each patch, ties by keep probability (``masks.patch_rank``).

    The explainer's gates must have ``levels >= 2``; ``target`` is ignored.
    """

    name = "diffmask-path"

    def __init__(self, explainer):
        if explainer.gates.config.levels < 2:
            raise ValueError("the 'diffmask-path' method needs K-level gates (levels >= 2); pass gates built "
                             "with Gates.stack, e.g. the shipped gates-levels of vit-digits")
        super().__init__(explainer.backbone)
        self.explainer = explainer

    def _scores(self, pixel_values, target):
        return self.explainer.explain(pixel_values).patch_rank
