"""One explainer per replica: load it, run batches, describe its tensors. No Ray here.

``ServingModel`` wraps the PyTorch ``Explainer`` or an ``OnnxExplainer`` behind what the server
needs: ``preprocess`` (decoded images -> model input), ``explain_batch`` (one forward pass for the
whole batch, optionally the masked check for some of its rows) and ``predict_batch`` (plain
inference: the backbone alone, or for a graph its logits).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import ServeConfig

__all__ = ["ServingModel", "TensorSpec"]


@dataclass(frozen=True)
class TensorSpec:
    """An Open Inference Protocol tensor: name, datatype and shape with -1 for the batch axis."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def to_json(self) -> dict:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


class ServingModel:
    """The explainer one replica holds, with its provenance.

    Attributes:
        name: the model as given (``--model`` value or ``--onnx`` path).
        model_sha256, gates_sha256, gates_source: provenance copied into every record.
        id2label: class names.
        model_size: (H, W) images are reduced to while decoding (None: decode at full size).
        input_spec, output_specs: the Open Inference Protocol tensors (the exported graph's names).
    """

    def __init__(self, config: ServeConfig, *, prog: str = "vdm-serve"):
        from vdm_engine._io import sha256_file

        self.config = config
        if config.onnx:
            from vdm_engine.runtime import OnnxExplainer

            if not Path(config.onnx).is_file():
                raise FileNotFoundError(f"--onnx {config.onnx}: no such file")
            impl = OnnxExplainer(config.onnx, "cuda" if config.cuda else "cpu")
            missing = [o for o in ("logits", "patch_mask") if o not in impl.output_names]
            if missing:
                raise ValueError(f"{config.onnx} lacks outputs {missing}; export with --outputs logits,patch_mask")
            meta = impl.metadata
            self.platform = "onnxruntime_onnx"
            self.name = str(config.onnx)
            self.model_sha256 = sha256_file(config.onnx)
            self.gates_sha256 = meta.gates_sha256 or None
            self.gates_source = meta.gates_source or None
            self.backbone_mismatch = meta.backbone_mismatch
            self.id2label = dict(impl.id2label)
            self.image_spec = impl.image_spec
            self.grid = tuple(impl.grid)
            in_name, in_type = impl.input_name, ("UINT8" if impl.uint8_input else "FP32")
            H, W = impl.image_size
            in_shape = (-1, H, W, 3) if impl.uint8_input else (-1, 3, H, W)
            self.num_labels = impl.num_labels
            self.device = torch.device("cuda" if config.cuda else "cpu")
        else:
            from vdm_engine import Explainer
            from vdm_engine.records import model_sha256

            impl = Explainer.from_pretrained(config.model, gates=config.gates, device=config.device,
                                             allow_backbone_mismatch=config.allow_backbone_mismatch).eval()
            print(f"{prog}: {impl.provenance.describe()}", file=sys.stderr)
            self.platform = "pytorch"
            self.name = str(config.model)
            self.model_sha256 = model_sha256(impl.backbone)
            self.gates_sha256 = impl.gates.sha256
            self.gates_source = impl.provenance.source
            self.backbone_mismatch = impl.provenance.backbone_mismatch
            self.id2label = dict(impl.backbone.id2label)
            self.image_spec = impl.backbone.image_spec
            self.grid = tuple(impl.grid)
            H, W = impl.backbone.image_size
            in_name, in_type, in_shape = "pixel_values", "FP32", (-1, 3, H, W)
            self.num_labels = impl.backbone.num_labels
            self.device = impl.backbone.device
        self.impl = impl
        self.onnx = bool(config.onnx)
        self.compiled = None
        if config.compile:
            self.compiled = impl.compile(batch_sizes=config.compile_buckets, backend=config.compile_backend)
            print(f"{prog}: compiling explain and predict for batch sizes {list(self.compiled.buckets)} "
                  f"({config.compile_backend}, mode {self.compiled.mode}) ...", file=sys.stderr)
            self.compiled.warmup()
        self.image_size = (H, W)
        spec = self.image_spec
        self.model_size = tuple(spec.size) if spec is not None and spec.do_resize else None
        n = self.grid[0] * self.grid[1]
        self.input_spec = TensorSpec(in_name, in_type, in_shape)
        self.output_specs = (TensorSpec("logits", "FP32", (-1, self.num_labels)),
                             TensorSpec("patch_mask", "FP32", (-1, n)))
        if self.has_patch_rank:
            self.output_specs += (TensorSpec("patch_rank", "FP32", (-1, n)),)

    @property
    def has_patch_rank(self) -> bool:
        """Whether every explanation carries ``patch_rank``: K-level gates, or a graph exported with that output."""
        if self.onnx:
            return "patch_rank" in self.impl.output_names
        return self.impl.gates.config.levels > 1

    @property
    def can_verify(self) -> bool:
        """``verify`` needs the masked pass: the PyTorch explainer, or a graph with a ``kl`` output."""
        return not self.onnx or {"kl", "masked_logits"} <= set(self.impl.output_names)

    def preprocess(self, images: list[np.ndarray]) -> torch.Tensor:
        """(h, w, 3) uint8 images -> the model input for them, on the CPU (B, ...)."""
        return self.impl.preprocess(images)

    @torch.no_grad()
    def explain_batch(self, x: torch.Tensor, verify: list[bool] | None = None,
                      layer_masks: bool = False) -> dict[str, torch.Tensor]:
        """One forward pass for a batch (B, ...): logits (B, C) and patch_mask (B, N) on the CPU; with
        ``verify`` (B,) bools also kl, agree and masked_kept for every row (computed for the rows that
        asked, in one extra masked pass; NaN elsewhere); with ``layer_masks`` also layer_masks
        (B, L+2, N) (a graph must have that output); ``patch_rank`` (B, N) whenever ``has_patch_rank``."""
        want = verify is not None and any(verify)
        if self.onnx:
            out = self.impl.run(x.to(self.device))
            res = {"logits": out["logits"].float().cpu(), "patch_mask": out["patch_mask"].float().cpu()}
            if layer_masks:
                res["layer_masks"] = out["layer_masks"].float().cpu()
            if self.has_patch_rank:
                res["patch_rank"] = out["patch_rank"].float().cpu()
            if want:
                masked = out["masked_logits"].float().cpu()
                res["kl"] = out["kl"].float().cpu().reshape(-1)
                res["agree"] = masked.argmax(-1) == res["logits"].argmax(-1)
                res["masked_kept"] = (res["patch_mask"] > self.config.threshold).float().mean(-1)
            return res
        if self.compiled is not None:
            exp = self.compiled.explain(x.to(self.device))
            out = {"logits": exp.logits, "patch_mask": exp.patch_mask, "layer_masks": exp.layer_masks,
                   "patch_rank": exp.patch_rank}
        else:  # only the outputs asked for: the per-depth masks cost ops a tiny model notices
            self.impl.backbone.check_pixels(x)
            asked = ("logits", "patch_mask") + (("layer_masks",) if layer_masks else ()) + \
                (("patch_rank",) if self.has_patch_rank else ())
            out = self.impl.run(x.to(self.device), asked)
        res = {"logits": out["logits"].float().cpu(), "patch_mask": out["patch_mask"].float().cpu()}
        if layer_masks:
            res["layer_masks"] = out["layer_masks"].float().cpu()
        if self.has_patch_rank:
            res["patch_rank"] = out["patch_rank"].float().cpu()
        if want:
            from vdm_engine.explainer import Explanation

            rows = torch.tensor([i for i, v in enumerate(verify) if v])
            on = rows.to(out["logits"].device)
            sub = Explanation(out["logits"][on], out["patch_mask"][on], None, self.impl.grid, self.impl.backbone.image_size)
            checked = self.impl.verify(x[rows].to(self.device), sub, threshold=self.config.threshold)
            B = x.shape[0]
            res["kl"] = torch.full((B,), float("nan"))
            res["agree"] = torch.zeros(B, dtype=torch.bool)
            res["masked_kept"] = torch.full((B,), float("nan"))
            res["kl"][rows] = checked.kl.float().cpu()
            res["agree"][rows] = checked.agree.cpu()
            res["masked_kept"][rows] = checked.kept_fraction.float().cpu()
        return res

    @torch.no_grad()
    def predict_batch(self, x: torch.Tensor) -> torch.Tensor:
        """Plain inference for a batch: (B, C) float32 logits on the CPU (the backbone without the
        gates; for a graph, its ``logits`` output)."""
        if self.onnx:
            return self.impl.run(x.to(self.device))["logits"].float().cpu()
        self.impl.backbone.check_pixels(x)
        if self.compiled is not None:
            return self.compiled.predict(x.to(self.device)).float().cpu()
        return self.impl.backbone(x.to(self.device)).float().cpu()

    def check_input(self, x: torch.Tensor) -> torch.Tensor:
        """Validate a client's input tensor (Open Inference Protocol) as the explainer would; ``ValueError``."""
        if self.onnx:
            return self.impl.check_inputs(x)
        self.impl.backbone.check_pixels(x)
        return x

    def describe(self) -> dict:
        return {
            "model": self.name,
            "model_sha256": self.model_sha256,
            "gates_sha256": self.gates_sha256,
            "gates_source": self.gates_source,
            "backbone_mismatch": self.backbone_mismatch,
        }
