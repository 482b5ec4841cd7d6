"""The public entry point: explain ViT predictions with trained DiffMask gates in one forward pass."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import masks
from .backbone import Backbone, load_backbone
from .gates import Gates, WideProbes, finish_probes, project_depth
from .masks import kl_divergence
from .outputs import EXPLAIN_OUTPUTS
from .ops import Ops, probe_layout_for, select_ops
from .provenance import GatesProvenance, classify_source
from .registry import registered_gates, registry_home

__all__ = ["Explainer", "Explanation", "Verification", "GatesNotFoundError", "kl_divergence", "EXPLAIN_OUTPUTS"]

#: What ``Explainer.run`` can compute, in graph order (the ONNX graph's outputs).


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
        patch_rank: (B, N) one-pass ranking of K-level gates (``masks.patch_rank``: higher = kept by
            sparser levels); None for single-level gates.
    """

    logits: torch.Tensor
    patch_mask: torch.Tensor
    layer_masks: torch.Tensor
    grid: tuple[int, int]
    image_size: tuple[int, int]
    gates_source: str | None = None
    gates_sha256: str | None = None
    patch_rank: torch.Tensor | None = None

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
            None if self.patch_rank is None else self.patch_rank.to(device),
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


class Explainer(nn.Module):
    """A frozen backbone and its trained gates.

    ``explain`` costs one backbone forward plus the gate probes. ``ops`` holds the probe and
    patch-masking functions ``select_ops`` chose for the backbone's device and dtype; they are
    chosen again whenever the explainer moves or changes dtype (``.to``, ``.cuda``, ``.half``, ...).

    Saved gates must carry the fingerprint of ``backbone`` (``Gates.check_backbone``);
    ``allow_backbone_mismatch=True`` accepts gates recorded for another backbone, with a warning.

    Args:
        kernels: ``auto``, ``reference`` or ``triton`` for ``select_ops``; default env ``VDM_KERNELS``.
    """

    def __init__(
        self, backbone: Backbone, gates: Gates, *, allow_backbone_mismatch: bool = False, kernels: str | None = None
    ):
        super().__init__()
        gates.check_backbone(backbone, allow_mismatch=allow_backbone_mismatch)
        self.backbone = backbone
        self.gates = gates
        self.kernels = kernels
        self.ops: Ops = select_ops(backbone.device, backbone.dtype, kernels)

    def set_kernels(self, mode: str | None) -> Ops:
        """Choose the ops again under ``mode`` (``auto``, ``reference``, ``triton``; None: env ``VDM_KERNELS``)."""
        self.kernels = mode
        self.ops = select_ops(self.backbone.device, self.backbone.dtype, mode)
        return self.ops

    def _apply(self, fn, *args, **kwargs):
        # Every device or dtype change (.to, .cuda, .half, .float, ...) passes here: choose the ops again.
        out = super()._apply(fn, *args, **kwargs)
        self.ops = select_ops(self.backbone.device, self.backbone.dtype, self.kernels)
        return out

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
        labels=None,
        prompt: str | None = None,
    ) -> "Explainer":
        """Load a backbone and its gates.

        Args:
            model: embedded name, preset, hub id or local directory (see ``load_backbone``).
            gates: a gates directory; default: the local gates registry (filled by ``vdm-train``),
                then the gates shipped with an embedded model.
            allow_backbone_mismatch: accept gates whose recorded backbone fingerprint differs from
                this backbone's (a fine-tuned copy), with a ``ProvenanceWarning``.
            labels, prompt: CLIP only: the zero-shot classes; default those recorded with the gates.

        Raises:
            BackboneMismatchError: the gates were trained on another backbone.
            GatesNotFoundError: no gates for ``model``.
        """
        gates_dir = gates if gates is not None else registered_gates(model)
        if gates_dir is None:
            raise GatesNotFoundError(
                f"no trained gates found for '{model}'. Train them with "
                f"`vdm-train --model {model} --data SRC --out DIR`, or pass gates=DIR"
            )
        zero_shot = {}
        if labels is None:  # CLIP: the zero-shot head the gates were trained with, text embeddings included
            zero_shot = Gates.recorded_zero_shot(gates_dir) or {}
        backbone = load_backbone(model, revision=revision, local_files_only=local_files_only,
                                 labels=labels or zero_shot.get("labels"), prompt=prompt or zero_shot.get("prompt"),
                                 text_embeds=zero_shot.get("text_embeds"))
        source = "path" if gates is not None else classify_source(gates_dir, registry_home())
        loaded = Gates.from_pretrained(gates_dir, source=source)
        explainer = cls(backbone, loaded, allow_backbone_mismatch=allow_backbone_mismatch)
        if device is not None or dtype is not None:
            explainer.backbone.to(device=device, dtype=dtype)
            explainer.gates.to(device=device)  # the gates stay float32
            explainer.set_kernels(explainer.kernels)
        return explainer

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
        """(B, 3, H, W) -> logits (B, C), log keep (B, L+2, T): one backbone pass and the probes. No checks."""
        logits, _, log_keep = self.probe_pass(pixel_values)
        return logits, log_keep

    def probe_pass(self, pixel_values: torch.Tensor, ops: Ops | None = None, *, levels: bool = False,
                   wide: WideProbes | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One backbone pass with the probes fed as each hidden state is produced.

        Only h0 is kept beyond its layer (every probe and the masked pass read it); no
        (L+2, B, T, D) stack is built. ``ops.probe_layout`` decides the order of the maths
        (``ops.probe_layout_for``): ``wide`` projects each depth (B*T, K*P) and finishes every probe
        after the last layer; ``per-depth`` runs each depth's whole probe (a kernel) as its state appears.

        Args:
            levels: run the probes of every level of K-level gates on the same hidden states.
            wide: the ``WideProbes`` to use in the wide layout (default the gates' own, cached); the
                ONNX export passes copies it holds as named buffers.

        Returns:
            logits (B, C), h0 (B, T, D), log keep per depth (B, L+2, T) float32 of the main level,
            or with ``levels`` of every level (B, K, L+2, T).
        """
        ops = ops or self.ops
        first: list[torch.Tensor] = []  # [h0]
        c, b = self.gates.config, self.backbone
        width = c.probe_size * (c.levels if levels else 1)
        if probe_layout_for(ops, pixel_values.shape[0] * b.num_tokens, b.num_hidden_states, width) == "wide":
            probes = wide if wide is not None else self.gates.wide_probes(levels)
            projections: list[torch.Tensor] = []

            def on_state(i: int, h: torch.Tensor) -> None:
                if i == 0:
                    first.append(h)
                projections.append(project_depth(h, probes, i))

            logits = self.backbone.forward_states(pixel_values, on_state)
            log_keep = finish_probes(first[0], projections, probes)  # (B, K, L+2, T)
            return logits, first[0], log_keep if levels else log_keep[:, 0]

        per_depth: list[torch.Tensor] = []  # in depth order: (B, T), or (B, K, T) with levels
        if levels:  # every level's probes joined per depth: one op chain per depth whatever K is
            probe, params = ops.gate_probe_levels, self.gates.fused_probes()
        else:
            probe, params = ops.gate_probe, self.gates.probe_params()

        def on_state_per_depth(i: int, h: torch.Tensor) -> None:
            if i == 0:
                first.append(h)
            per_depth.append(probe(first[0], h, params, i))

        logits = self.backbone.forward_states(pixel_values, on_state_per_depth)
        return logits, first[0], torch.stack(per_depth, -2)

    def run(
        self,
        pixel_values: torch.Tensor,
        outputs=("logits", "patch_mask", "layer_masks"),
        *,
        threshold: float = 0.5,
        ops: Ops | None = None,
        wide: WideProbes | None = None,
    ) -> dict[str, torch.Tensor]:
        """The explain core shared by ``explain``, the ONNX graph and benchmarks; no input checks.

        Each depth's probe runs as the backbone produces its hidden state (``probe_pass``).

        Args:
            pixel_values: (B, 3, H, W) on the backbone's device.
            outputs: names from ``EXPLAIN_OUTPUTS``; ``masked_logits`` / ``kl`` add the masked pass
                with the hard mask (keep probability > ``threshold``), reusing h0's patch embeddings;
                ``patch_rank`` (K-level gates only) runs every level's probes on the same hidden states.
            ops: the ops to use (default ``self.ops``; the export passes ``reference_ops()``).
            wide: ``probe_pass``'s ``wide``.

        Returns:
            float32 tensors: logits (B, C), patch_mask (B, N), and as asked layer_masks (B, L+2, N),
            masked_logits (B, C), kl (B,), patch_rank (B, N).
        """
        ops = ops or self.ops
        if "patch_rank" in outputs and self.gates.config.levels < 2:
            raise ValueError("patch_rank needs K-level gates (GateConfig.levels >= 2, see Gates.stack)")
        logits, h0, log_keep = self.probe_pass(pixel_values, ops, levels="patch_rank" in outputs, wide=wide)
        return self.finish(logits, h0, log_keep, outputs, threshold=threshold, ops=ops)

    def finish(self, logits: torch.Tensor, h0: torch.Tensor, log_keep: torch.Tensor, outputs, *,
               threshold: float = 0.5, ops: Ops | None = None) -> dict[str, torch.Tensor]:
        """``run``'s outputs from a probe pass (``probe_pass`` or a twin with its results).

        Args:
            logits (B, C), h0 (B, T, D); log_keep (B, L+2, T) of the main level, or (B, K, L+2, T)
            of every level when ``outputs`` holds ``patch_rank``.
        """
        ops = ops or self.ops
        rank = "patch_rank" in outputs
        level_keep = None
        if rank:
            level_keep, log_keep = log_keep, log_keep[:, self.gates.config.main_level]
        out = {"logits": logits.float()}
        if "layer_masks" in outputs:
            out["layer_masks"] = masks.layer_masks(log_keep)
            out["patch_mask"] = out["layer_masks"][:, -1]
        else:
            out["patch_mask"] = masks.patch_mask(log_keep)
        if "masked_logits" in outputs or "kl" in outputs:
            keep = masks.hard_mask(out["patch_mask"], threshold)
            checked = masks.masked_pass(self.backbone, h0[:, 1:], out["logits"], keep, self.gates.placeholder,
                                        ops.patch_mask)
            out["masked_logits"], out["kl"] = checked.masked_logits, checked.kl
        if rank:
            B, K, S, T = level_keep.shape
            levels = masks.patch_mask(level_keep.reshape(B * K, S, T)).view(B, K, T - 1)  # (B, K, N)
            out["patch_rank"] = masks.patch_rank(levels, threshold)
        return out

    @torch.no_grad()
    def explain(self, pixel_values: torch.Tensor) -> Explanation:
        """Explain a batch with exactly one backbone forward pass.

        Args:
            pixel_values: (B, 3, H, W) float, as from ``preprocess``.

        Returns:
            ``Explanation`` with logits (B, C), patch_mask (B, N), layer_masks (B, L+2, N), and
            patch_rank (B, N) for K-level gates.
        """
        self.backbone.check_pixels(pixel_values)
        outputs = ("logits", "patch_mask", "layer_masks") + (("patch_rank",) if self.gates.config.levels > 1 else ())
        out = self.run(pixel_values.to(self.backbone.device), outputs)
        return Explanation(
            logits=out["logits"],
            patch_mask=out["patch_mask"],
            layer_masks=out["layer_masks"],
            grid=self.backbone.grid,
            image_size=self.backbone.image_size,
            gates_source=self.gates.provenance.source,
            gates_sha256=self.gates.sha256,
            patch_rank=out.get("patch_rank"),
        )

    def compile(self, batch_sizes=(1, 2, 4, 8, 16, 32, 64), *, mode: str | None = None, backend: str = "inductor",
                warmup: bool = False):
        """``torch.compile`` explain and plain prediction once per batch bucket (``CompiledExplainer``).

        A batch is padded to the smallest bucket that holds it and the outputs are sliced back;
        batches above the largest bucket run in chunks. On CUDA the default ``mode`` is
        ``reduce-overhead`` (CUDA graphs), elsewhere ``default``.

        Args:
            batch_sizes: the buckets (static shapes) to compile.
            mode, backend: as ``torch.compile`` (``backend="aot_eager"`` traces without code generation).
            warmup: compile every bucket now instead of on first use.

        Returns:
            ``CompiledExplainer`` with ``explain(pixel_values) -> Explanation`` and ``predict(pixel_values) -> logits``.
        """
        from .compiled import CompiledExplainer

        return CompiledExplainer(self, batch_sizes, mode=mode, backend=backend, warmup=warmup)

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
        keep = masks.hard_mask(explanation.patch_mask.to(pixel_values.device), threshold)
        checked = masks.masked_pass(
            self.backbone, self.backbone.embed_patches(pixel_values), explanation.logits, keep,
            self.gates.placeholder, self.ops.patch_mask,
        )
        return Verification(
            kl=checked.kl, agree=checked.agree, masked_logits=checked.masked_logits, kept_fraction=checked.kept_fraction
        )
