"""``ServeConfig``: everything a ``vdm-serve`` deployment is built from (no Ray needed to build one)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ServeConfig", "DEFAULT_MAX_BODY_BYTES", "check_field"]

DEFAULT_MAX_BODY_BYTES = 20 * 1024 * 1024  # 20 MB


def check_field(config, ok: bool, field: str, what: str) -> None:
    """``ValueError`` naming ``Class.field``, the rule and the value when ``ok`` is false."""
    if not ok:
        raise ValueError(f"{type(config).__name__}.{field} {what}, got {getattr(config, field)!r}")


@dataclass(frozen=True)
class ServeConfig:
    """How a deployment loads its explainer, batches and bounds its queues.

    Attributes:
        model: embedded name, preset, hub id or local directory (PyTorch ``Explainer``).
        gates: gates directory for ``model`` (default: registry, then the embedded gates).
        onnx: an exported graph (``vdm-export``) run with ``OnnxExplainer`` instead of ``model``.
        device: ``cpu`` or ``cuda`` (``cuda:N``); None is the explainer's default (cpu).
        allow_backbone_mismatch: accept gates recorded for another backbone (warns, recorded).
        model_name: the Open Inference Protocol model name (default: the ``--onnx`` file's stem or
            ``model``, sanitised as ``vdm-export --triton-repo`` names its model folder).
        max_batch: most images one forward pass answers (``@serve.batch`` ``max_batch_size``).
        batch_wait_ms: how long a batch waits to fill (``batch_wait_timeout_s`` in ms).
        replicas: explainers (Ray actors), each holding one model.
        num_cpus, num_gpus: Ray resources per replica (``num_gpus`` fractional allowed; default 1
            with ``device`` cuda, else 0).
        max_ongoing_requests: requests one replica works on at once (default 2 x ``max_batch``); a
            batch never holds more requests than this, so below ``max_batch`` it caps the batches.
        max_queued_requests: requests waiting for a replica before the server answers 503.
        max_body_bytes: largest request body (413 beyond).
        max_images: most images in one JSON request.
        max_pixels: pixel limit per image, checked before decoding (None: ``resolve_max_pixels()``).
        top_k, threshold: as ``vdm-explain``.
        compile: run explain and predict through ``Explainer.compile`` (``model`` only): one static
            shape per batch bucket (``compile_buckets``), CUDA graphs on a GPU; every bucket is
            compiled before the replica reports ready.
        compile_backend: the ``torch.compile`` backend (``aot_eager`` traces without code generation).
    """

    model: str = "vit-digits"
    gates: str | None = None
    onnx: str | None = None
    device: str | None = None
    allow_backbone_mismatch: bool = False
    model_name: str | None = None
    max_batch: int = 32
    batch_wait_ms: float = 5.0
    replicas: int = 1
    num_cpus: float = 1.0
    num_gpus: float | None = None
    max_ongoing_requests: int | None = None
    max_queued_requests: int = 256
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_images: int = 64
    max_pixels: int | None = None
    top_k: int = 5
    threshold: float = 0.5
    compile: bool = False
    compile_backend: str = "inductor"

    def __post_init__(self):
        def need(ok: bool, field: str, what: str):
            check_field(self, ok, field, what)

        if self.onnx is not None and self.gates is not None:
            raise ValueError("ServeConfig.gates applies to model; an exported graph (onnx) carries its gates")
        need(self.max_batch >= 1, "max_batch", "must be >= 1")
        need(self.batch_wait_ms >= 0, "batch_wait_ms", "must be >= 0")
        need(self.replicas >= 1, "replicas", "must be >= 1")
        need(self.num_cpus >= 0, "num_cpus", "must be >= 0")
        need(self.num_gpus is None or self.num_gpus >= 0, "num_gpus", "must be >= 0")
        need(self.max_ongoing_requests is None or self.max_ongoing_requests >= 1, "max_ongoing_requests",
             "must be >= 1")
        need(self.max_queued_requests >= 1 or self.max_queued_requests == -1, "max_queued_requests",
             "must be >= 1 (or -1: unbounded, not recommended)")
        need(self.max_body_bytes >= 1, "max_body_bytes", "must be >= 1")
        need(self.max_images >= 1, "max_images", "must be >= 1")
        need(self.max_pixels is None or self.max_pixels >= 1, "max_pixels", "must be >= 1")
        need(self.top_k >= 1, "top_k", "must be >= 1")
        need(0.0 <= self.threshold < 1.0, "threshold", "must be in [0, 1)")
        if self.compile and self.onnx is not None:
            raise ValueError("ServeConfig.compile applies to model (torch.compile); an exported graph (onnx) is "
                             "already compiled by onnxruntime")
        if self.model_name is not None:
            need(bool(re.fullmatch(r"[A-Za-z0-9_.-]+", self.model_name)) and not self.model_name.startswith("."),
                 "model_name", "must use letters, digits, '_', '-' or '.' and not start with '.'")

    @property
    def cuda(self) -> bool:
        return self.device is not None and str(self.device).startswith("cuda")

    @property
    def oip_name(self) -> str:
        """The model's name in ``/v2/models/{name}``."""
        if self.model_name:
            return self.model_name
        stem = Path(self.onnx).stem if self.onnx else Path(str(self.model)).name
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("._") or "vdm_explainer"

    @property
    def ongoing(self) -> int:
        """``max_ongoing_requests`` per replica: default twice ``max_batch`` (one batch running, one filling)."""
        return self.max_ongoing_requests if self.max_ongoing_requests is not None else 2 * self.max_batch

    @property
    def compile_buckets(self) -> tuple[int, ...]:
        """The batch sizes compiled: powers of two below ``max_batch``, and ``max_batch``."""
        powers = (1 << k for k in range(self.max_batch.bit_length()))
        return tuple(sorted({b for b in powers if b < self.max_batch} | {self.max_batch}))

    @property
    def gpus_per_replica(self) -> float:
        if self.num_gpus is not None:
            return self.num_gpus
        return 1.0 if self.cuda else 0.0
