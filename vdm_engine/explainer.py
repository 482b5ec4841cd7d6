"""The public entry point: explain ViT predictions with trained DiffMask gates in one forward pass."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import Backbone, load_backbone
from .gates import Gates, gate_probe_reference
from .provenance import GatesProvenance, classify_source
from .registry import registered_gates, registry_home

__all__ = ["Explainer", "Explanation", "Verification", "GatesNotFoundError", "install_kernels", "kl_divergence"]


def install_kernels(target) -> None:
    """Install the fast paths the kernels package chooses for ``target`` (an Explainer or a Backbone).

    ``VDM_KERNELS`` = auto (default) | reference | triton. The core never imports the kernels at
    module load; without them (or with ``reference``) the plain-PyTorch references stay in place.
    """
    mode = os.environ.get("VDM_KERNELS", "auto").strip().lower()
    if mode == "reference":
        return
    try:
        from vdm_engine.kernels import dispatch  # noqa: PLC0415 (lazy: the core must not import kernels)
    except ImportError:
        if mode == "triton":
            raise
        return
    if isinstance(target, Backbone):
        dispatch.install_backbone(target, mode)
    else:
        dispatch.install(target, mode)


class GatesNotFoundError(LookupError):
    """No trained gates were found for a model."""


@dataclass
class Explanation:
    """What the gates say about a batch.

    Attributes:
        logits: (B, C) the model's prediction (from the same forward pass).
        patch_mask: (B, N) keep probability of each patch, aggregated over all depths.
        layer_masks: (B, L+2, N) keep probability aggregated up to each depth (cumulative); None
            from an ``OnnxExplainer`` whose graph was exported without the ``layer_masks`` output.
        grid: (h, w) patch grid, N = h*w, row-major.
        image_size: (H, W) of the model input.
        gates_source: where the gates came from (``shipped``, ``registry``, ``path``, ...).
        gates_sha256: sha256 of the gates' weights file (None for gates never saved).
    """

    logits: torch.Tensor
    patch_mask: torch.Tensor
    layer_masks: torch.Tensor
    grid: tuple[int, int]
    image_size: tuple[int, int]
    gates_source: str | None = None
    gates_sha256: str | None = None

    def __len__(self) -> int:
        return self.logits.shape[0]

    @property
    def probs(self) -> torch.Tensor:
        """(B, C) softmax of the logits."""
        return self.logits.float().softmax(-1)

    @property
    def labels(self) -> torch.Tensor:
        """(B,) predicted class indices."""
        return self.logits.argmax(-1)

    def keep(self, threshold: float = 0.5) -> torch.Tensor:
        """(B, N) bool: patches whose keep probability exceeds ``threshold``."""
        return self.patch_mask > threshold

    def kept_fraction(self, threshold: float = 0.5) -> torch.Tensor:
        """(B,) fraction of patches kept at ``threshold``."""
        return self.keep(threshold).float().mean(-1)

    def grid_mask(self) -> torch.Tensor:
        """(B, h, w) patch mask laid out on the patch grid."""
        return self.patch_mask.reshape(-1, *self.grid)

    def pixel_mask(self, mode: str = "nearest", size: tuple[int, int] | None = None) -> torch.Tensor:
        """(B, H, W) patch mask upsampled to the input size (or ``size``) by ``nearest`` or ``bilinear``."""
        if mode not in ("nearest", "bilinear"):
            raise ValueError(f"mode must be 'nearest' or 'bilinear', got {mode!r}")
        size = tuple(size or self.image_size)
        kw = {"align_corners": False} if mode == "bilinear" else {}
        up = F.interpolate(self.grid_mask().unsqueeze(1).float(), size=size, mode=mode, **kw)
        return up.squeeze(1)

    def to(self, device) -> "Explanation":
        return Explanation(
            self.logits.to(device),
            self.patch_mask.to(device),
            None if self.layer_masks is None else self.layer_masks.to(device),  # None: a mask-only ONNX graph
            self.grid,
            self.image_size,
            self.gates_source,
            self.gates_sha256,
        )

    def cpu(self) -> "Explanation":
        return self.to("cpu")


@dataclass
class Verification:
    """Result of re-running the model on the hard-masked input.

    Attributes:
        kl: (B,) KL(original || masked) of the class distributions.
        agree: (B,) bool, masked argmax == original argmax.
        masked_logits: (B, C).
        kept_fraction: (B,) fraction of patches kept by the hard mask.
    """

    kl: torch.Tensor
    agree: torch.Tensor
    masked_logits: torch.Tensor
    kept_fraction: torch.Tensor


def kl_divergence(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """KL(softmax(p) || softmax(q)) along the last dim, in float32."""
    lp, lq = logits_p.float().log_softmax(-1), logits_q.float().log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1)


class Explainer(nn.Module):
    """A frozen backbone and its trained gates.

    ``explain`` costs one backbone forward plus the gate probes. The probe and masking functions
    are plain-PyTorch references unless a fast path is installed (``vdm_engine.kernels``).

    Saved gates must carry the fingerprint of ``backbone`` (``Gates.check_backbone``);
    ``allow_backbone_mismatch=True`` accepts gates recorded for another backbone, with a warning.
    """

    def __init__(self, backbone: Backbone, gates: Gates, *, allow_backbone_mismatch: bool = False):
        super().__init__()
        gates.check_backbone(backbone, allow_mismatch=allow_backbone_mismatch)
        self.backbone = backbone
        self.gates = gates
        self.gate_probe_fn: Callable = gate_probe_reference
        self._install_fast_paths()

    def _install_fast_paths(self) -> None:
        """Let the kernels package choose Triton or the references for this device (decided once)."""
        install_kernels(self)

    @classmethod
    def from_pretrained(
        cls,
        model: str = "vit-digits",
        gates: str | os.PathLike | None = None,
        *,
        revision: str | None = None,
        local_files_only: bool | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        allow_backbone_mismatch: bool = False,
    ) -> "Explainer":
        """Load a backbone and its gates.

        Args:
            model: embedded name, preset, hub id or local directory (see ``load_backbone``).
            gates: a gates directory; default: the local gates registry (filled by ``vdm-train``),
                then the gates shipped with an embedded model.
            allow_backbone_mismatch: accept gates whose recorded backbone fingerprint differs from
                this backbone's (a fine-tuned copy), with a ``ProvenanceWarning``.

        Raises:
            BackboneMismatchError: the gates were trained on another backbone.
            GatesNotFoundError: no gates for ``model``.
        """
        backbone = load_backbone(model, revision=revision, local_files_only=local_files_only)
        gates_dir = gates if gates is not None else registered_gates(model)
        if gates_dir is None:
            raise GatesNotFoundError(
                f"no trained gates found for '{model}'. Train them with "
                f"`vdm-train --model {model} --data SRC --out DIR`, or pass gates=DIR"
            )
        source = "path" if gates is not None else classify_source(gates_dir, registry_home())
        loaded = Gates.from_pretrained(gates_dir, source=source)
        explainer = cls(backbone, loaded, allow_backbone_mismatch=allow_backbone_mismatch)
        if device is not None or dtype is not None:
            explainer.backbone.to(device=device, dtype=dtype)
            explainer.gates.to(device=device)
            explainer._install_fast_paths()
        return explainer

    def to(self, *args, **kwargs):
        out = super().to(*args, **kwargs)
        out._install_fast_paths()
        return out

    @property
    def grid(self) -> tuple[int, int]:
        return self.backbone.grid

    @property
    def provenance(self) -> GatesProvenance:
        """Where the gates came from (``GatesProvenance``; ``describe()`` gives one line)."""
        return self.gates.provenance

    def preprocess(self, images) -> torch.Tensor:
        """Images -> (N, 3, H, W) float32 pixel values (see ``Backbone.preprocess``)."""
        return self.backbone.preprocess(images)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Graph-friendly core: (B, 3, H, W) -> logits (B, C), log keep (B, L+2, T). No input checks."""
        logits, hidden = self.backbone.hidden_states(pixel_values)
        return logits, self.gate_probe_fn(hidden, self.gates.probe_params())

    @torch.no_grad()
    def explain(self, pixel_values: torch.Tensor) -> Explanation:
        """Explain a batch with exactly one backbone forward pass.

        Args:
            pixel_values: (B, 3, H, W) float, as from ``preprocess``.

        Returns:
            ``Explanation`` with logits (B, C), patch_mask (B, N), layer_masks (B, L+2, N).
        """
        self.backbone.check_pixels(pixel_values)
        pixel_values = pixel_values.to(self.backbone.device)
        logits, log_keep = self(pixel_values)
        layer_masks = log_keep.float().cumsum(1)[:, :, 1:].exp()
        return Explanation(
            logits=logits.float(),
            patch_mask=layer_masks[:, -1],
            layer_masks=layer_masks,
            grid=self.backbone.grid,
            image_size=self.backbone.image_size,
            gates_source=self.gates.provenance.source,
            gates_sha256=self.gates.sha256,
        )

    @torch.no_grad()
    def verify(self, pixel_values: torch.Tensor, explanation: Explanation, threshold: float = 0.5) -> Verification:
        """Run the masked pass with the hard mask (keep prob > ``threshold``) and compare predictions."""
        self.backbone.check_pixels(pixel_values)
        pixel_values = pixel_values.to(self.backbone.device)
        if explanation.patch_mask.shape != (pixel_values.shape[0], self.backbone.num_patches):
            raise ValueError(
                f"explanation has patch_mask {tuple(explanation.patch_mask.shape)}, expected "
                f"({pixel_values.shape[0]}, {self.backbone.num_patches}) for these pixel values"
            )
        hard = explanation.keep(threshold).to(pixel_values.device, self.backbone.dtype)
        masked = self.backbone.masked_logits(pixel_values, hard, self.gates.placeholder).float()
        original = explanation.logits.to(masked.device)
        return Verification(
            kl=kl_divergence(original, masked),
            agree=masked.argmax(-1) == original.argmax(-1),
            masked_logits=masked,
            kept_fraction=hard.float().mean(-1),
        )
