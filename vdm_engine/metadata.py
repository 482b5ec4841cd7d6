"""What an exported graph says about itself, stored in the ONNX ``metadata_props`` (string -> string).

The contract between ``vdm_engine.export`` (which writes it) and ``runtime.OnnxExplainer`` (which
reads it), so it lives in the core.

Scalars are stored as plain strings, structured values (sizes, mean/std, labels, the image
processor settings) as JSON. ``ExportMetadata.from_props`` is the exact inverse of ``to_props``.
"""

from __future__ import annotations

import json
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import torch

from .preprocessing import ImageSpec

__all__ = ["ExportMetadata", "read_metadata", "gates_sha256", "METADATA_PREFIX"]

#: Every key this module writes starts with this prefix, so foreign keys never collide.
METADATA_PREFIX = "vdm."
_JSON_FIELDS = ("image_size", "image_mean", "image_std", "patch_grid", "id2label", "outputs", "image_processor")
_INT_FIELDS = ("opset", "num_layers", "num_hidden_states", "num_labels")
_FLOAT_FIELDS = ("threshold",)
_BOOL_FIELDS = ("uint8_input", "untrained_gates", "random_weights", "backbone_mismatch")


@dataclass(frozen=True)
class ExportMetadata:
    """Provenance and preprocessing of an exported explainer graph.

    Attributes:
        engine_version: vdm-engine version that wrote the graph.
        backbone_id, backbone_revision: where the ViT came from (name, hub id or path; revision).
        gates_sha256: sha256 of the gates' ``gates.safetensors`` bytes.
        image_size: (H, W) model input; image_mean / image_std: per-channel normalisation.
        image_processor: the full processor settings (``ImageSpec.to_processor_dict``).
        patch_grid: (h, w); N = h * w. num_layers: L; num_hidden_states: L + 2; num_labels: C.
        id2label: class index (as a string) -> label.
        opset, dtype ("fp32" | "fp16"), batch ("dynamic" or a fixed size as a string).
        input_name, outputs: graph input name and output names in graph order.
        uint8_input: the input is raw (B, H, W, 3) uint8 images.
        threshold: hard-mask threshold of ``masked_logits`` / ``kl``.
        untrained_gates: the gates were random (benchmarks only; the masks mean nothing).
        random_weights: the backbone had random weights (timing only).
        gates_source: where the gates were loaded from (``shipped``, ``registry``, ``path``, ``memory``).
        backbone_fingerprint: fingerprint of the exported backbone (``Backbone.fingerprint``).
        gates_backbone_fingerprint: the fingerprint the gates recorded for their training backbone
            ("" when they recorded none).
        backbone_mismatch: the two fingerprints differ and the exporter allowed it
            (``--allow-backbone-mismatch``).
    """

    engine_version: str
    backbone_id: str
    backbone_revision: str
    gates_sha256: str
    image_size: tuple[int, int]
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    image_processor: dict
    patch_grid: tuple[int, int]
    num_layers: int
    num_hidden_states: int
    num_labels: int
    id2label: dict
    opset: int
    dtype: str
    batch: str
    input_name: str
    outputs: tuple[str, ...]
    uint8_input: bool = False
    threshold: float = 0.5
    untrained_gates: bool = False
    random_weights: bool = False
    gates_source: str = ""
    backbone_fingerprint: str = ""
    gates_backbone_fingerprint: str = ""
    backbone_mismatch: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def image_spec(self) -> ImageSpec:
        """The preprocessing settings as the core's ``ImageSpec``."""
        return ImageSpec.from_processor_dict(self.image_processor, tuple(self.image_size))

    @property
    def fixed_batch(self) -> int | None:
        """The fixed batch size, or None for a dynamic batch axis."""
        return None if self.batch == "dynamic" else int(self.batch)

    def to_props(self) -> dict[str, str]:
        """All fields as ``metadata_props`` strings under ``METADATA_PREFIX``."""
        props = {}
        for f in fields(self):
            if f.name == "extra":
                continue
            v = getattr(self, f.name)
            if f.name in _JSON_FIELDS:
                s = json.dumps(list(v) if isinstance(v, tuple) else v, sort_keys=True)
            elif f.name in _BOOL_FIELDS:
                s = "true" if v else "false"
            else:
                s = str(v)
            props[METADATA_PREFIX + f.name] = s
        for k, v in self.extra.items():
            props[METADATA_PREFIX + "extra." + k] = str(v)
        return props

    @classmethod
    def from_props(cls, props: dict[str, str]) -> "ExportMetadata":
        """Inverse of ``to_props``; ``ValueError`` if the model was not written by ``export_onnx``."""
        known = {f.name for f in fields(cls)} - {"extra"}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        mine = {k[len(METADATA_PREFIX):]: v for k, v in props.items() if k.startswith(METADATA_PREFIX)}
        missing = sorted(required - set(mine))
        if missing:
            raise ValueError(
                f"the ONNX model lacks vdm-engine metadata {[METADATA_PREFIX + m for m in missing]}; "
                "export it with vdm-export / vdm_engine.export.export_onnx"
            )
        kw: dict = {}
        for name in known & set(mine):
            s = mine[name]
            try:
                if name in _JSON_FIELDS:
                    v = json.loads(s)
                    kw[name] = tuple(v) if isinstance(v, list) else v
                elif name in _INT_FIELDS:
                    kw[name] = int(s)
                elif name in _FLOAT_FIELDS:
                    kw[name] = float(s)
                elif name in _BOOL_FIELDS:
                    if s not in ("true", "false"):
                        raise ValueError(s)
                    kw[name] = s == "true"
                else:
                    kw[name] = s
            except ValueError as e:
                raise ValueError(f"metadata {METADATA_PREFIX + name}={s!r} is malformed") from e
        kw["extra"] = {k[len("extra."):]: v for k, v in mine.items() if k.startswith("extra.")}
        return cls(**kw)

    def to_dict(self) -> dict:
        return asdict(self)


def read_metadata(model) -> ExportMetadata:
    """Metadata of an exported graph: a path or an ``onnx.ModelProto`` (weights are not loaded)."""
    import onnx

    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.is_file():
            raise FileNotFoundError(f"no ONNX model at {path}")
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as e:  # protobuf decode errors have no common type
            raise ValueError(f"{path} is not a readable ONNX model: {e}") from e
    return ExportMetadata.from_props({p.key: p.value for p in model.metadata_props})


def gates_sha256(gates) -> str:
    """sha256 of the gates' checkpoint bytes: ``gates.sha256`` when loaded from disk, else computed.

    The computed digest is that of the ``gates.safetensors`` file ``Gates.save_pretrained`` would
    write for the current parameters, so a saved-and-reloaded copy reports the same value.
    """
    known = getattr(gates, "sha256", None)
    if known:
        return known
    import hashlib

    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in gates.state_dict().items()}
    return hashlib.sha256(save(tensors, metadata={"format": "pt"})).hexdigest()
