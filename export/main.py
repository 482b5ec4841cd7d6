"""``main_export``: everything ``vdm-export`` does, as one Python call with the CLI's defaults.

Load the explainer (``Explainer.from_pretrained``, or random weights / untrained gates for
benchmarks), export and validate one ONNX graph (``export_onnx``), time it in onnxruntime and
optionally add it to a Triton model repository. The console script only parses its arguments,
checks them and prints ``MainExportResult.summary()``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from vdm_engine.backbone import SHAPES, load_backbone, random_backbone, resolve_model_source
from vdm_engine.data import digits_split, toy_batch
from vdm_engine.explainer import Explainer, GatesNotFoundError
from vdm_engine.gates import GateConfig, Gates
from vdm_engine.registry import registered_gates

from .graph import DEFAULT_OUTPUTS, normalize_outputs
from .onnx import DEFAULT_OPSET, ExportResult, check_export_options, export_onnx
from .triton_repo import BACKENDS, DEFAULT_BACKEND, DEFAULT_MAX_BATCH_SIZE, DEFAULT_QUEUE_DELAY_US, write_triton_repo
from .validate import time_onnx

__all__ = ["main_export", "MainExportResult"]

logger = logging.getLogger("vdm_engine.export")

#: Batch sizes timed in onnxruntime after a dynamic-batch export (a fixed batch is timed at its size).
_TIMED_BATCHES = (1, 8)


@dataclass
class MainExportResult:
    """What ``main_export`` did.

    Attributes:
        export: the validated graph (``ExportResult``: path, shapes, max diffs, metadata, ...).
        provider: the onnxruntime execution provider of validation and timing.
        timing_ms: {batch size: median milliseconds per ``session.run``}.
        triton_model_dir: the Triton model folder written, or None.
    """

    export: ExportResult
    provider: str
    timing_ms: dict[int, float]
    triton_model_dir: Path | None = None

    @property
    def path(self) -> Path:
        return self.export.path

    def summary(self) -> str:
        """The lines ``vdm-export`` prints: file, model, input, outputs, max diffs, timing, Triton config."""
        r, m = self.export, self.export.metadata
        name, dims, elem = r.input
        lines = [
            f"wrote {r.path} ({r.size_bytes / 1e6:.1f} MB{', external data' if r.data_files else ''}; "
            f"{m.dtype}, opset {m.opset})",
            f"  model     {m.backbone_id} (gates sha256 {m.gates_sha256[:12]}...)"
            + ("  [UNTRAINED GATES]" if m.untrained_gates else "") + ("  [RANDOM WEIGHTS]" if m.random_weights else ""),
            f"  input     {name} {elem} {_fmt_shape(dims)}",
            "  outputs   " + "; ".join(f"{o} {_fmt_shape(d)}" for o, d in r.outputs.items()),
            "  max diff  " + ", ".join(f"{o} {d:.2e}" for o, d in r.max_diffs.items()) + f" (tolerance {r.tolerance:.0e})",
            f"  onnxruntime {self.provider}: " + ", ".join(f"batch {b}: {ms:.1f} ms" for b, ms in self.timing_ms.items()),
            f"  time      export {r.export_s:.1f} s, check + validation {r.validate_s:.1f} s",
        ]
        if self.triton_model_dir is not None:
            lines.append(f"  triton    {self.triton_model_dir / 'config.pbtxt'}")
        return "\n".join(lines)


def _fmt_shape(dims) -> str:
    return "[" + ", ".join(str(d) for d in dims) + "]"


def _random_gates(backbone) -> Gates:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Gates(GateConfig(backbone.hidden_size, backbone.num_hidden_states))


def _load_explainer(model, *, gates, revision, allow_backbone_mismatch, untrained_gates, random_weights, warn):
    """(explainer in eval mode, whether its gates are untrained)."""
    if random_weights:
        backbone = random_backbone(model)
        return Explainer(backbone, _random_gates(backbone)).eval(), True
    resolve_model_source(model)  # a missing embedded model is reported before missing gates
    try:
        # Explainer.from_pretrained loads the weights before it looks for gates: look first, so that
        # missing gates are reported without a download and the fallback does not load the weights twice.
        if gates is None and registered_gates(model) is None:
            raise GatesNotFoundError(
                f"no trained gates found for '{model}'. Train them with `vdm-train --model {model} --data SRC "
                "--out DIR` (this registers them), pass --gates DIR, or add --untrained-gates to export random "
                "gates for benchmarks"
            )
        explainer = Explainer.from_pretrained(
            model, gates, revision=revision, allow_backbone_mismatch=allow_backbone_mismatch
        )
        return explainer.eval(), False
    except GatesNotFoundError:
        if not untrained_gates:
            raise
    backbone = load_backbone(model, revision=revision)
    warn(f"exporting RANDOM gates for '{model}' (--untrained-gates); the masks mean nothing")
    return Explainer(backbone, _random_gates(backbone)).eval(), True


def _validation_images(model: str):
    """Real uint8 images for the validation run, where this install has some for ``model``; else None."""
    try:
        if model == "vit-digits":
            return digits_split("test")[0][:8]
    except ValueError as e:  # scikit-learn (a dev dependency) is missing
        logger.info("validating on structured images: %s", e)
        return None
    if model == "vit-toy":
        return toy_batch(8, seed=12345)[0]
    return None


def main_export(
    model: str = "vit-digits",
    *,
    out: str | os.PathLike,
    gates: str | os.PathLike | None = None,
    revision: str | None = None,
    allow_backbone_mismatch: bool = False,
    untrained_gates: bool = False,
    random_weights: bool = False,
    dtype: str = "fp32",
    opset: int = DEFAULT_OPSET,
    batch: str | int = "dynamic",
    outputs: Sequence[str] = DEFAULT_OUTPUTS,
    uint8_input: bool = False,
    threshold: float = 0.5,
    atol: float | None = None,
    providers="auto",
    overwrite: bool = False,
    triton_repo: str | os.PathLike | None = None,
    triton_name: str | None = None,
    triton_max_batch: int = DEFAULT_MAX_BATCH_SIZE,
    triton_backend: str = DEFAULT_BACKEND,
    triton_ensemble: bool = False,
    triton_queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
    tensorrt: bool = False,
    status: Callable[[str], None] | None = None,
) -> MainExportResult:
    """Load ``model`` and its gates, export one validated ONNX graph to ``out``, time it.

    Every option is checked before anything is loaded.

    Args:
        model: embedded name (default ``vit-digits``, offline), preset, hub id or local directory.
        out: the ``.onnx`` file to write (required, keyword-only); an existing one is replaced only
            with ``overwrite``.
        gates: gates directory; default the registry, then the embedded gates.
        revision: hub revision of ``model``.
        allow_backbone_mismatch: accept gates recorded for another backbone (warns; recorded).
        untrained_gates: without trained gates, export random ones (benchmarks; recorded).
        random_weights: random backbone of the architecture ``model`` names (a key of
            ``vdm_engine.backbone.SHAPES``) and random gates, built offline: for timing only.
        dtype, opset, batch, outputs, uint8_input, threshold, atol, providers: as ``export_onnx``
            (``outputs`` default ``DEFAULT_OUTPUTS``: logits, patch_mask, layer_masks).
        triton_repo: also add the graph to this Triton model repository, as ``triton_name``
            (default: ``out``'s stem) with ``max_batch_size=triton_max_batch``, and a TensorRT
            FP16 accelerator block with ``tensorrt``; ``triton_backend`` ``onnxruntime`` (GPU servers)
            or ``python`` (``OnnxExplainer`` on the CPU, in this environment); ``triton_ensemble`` adds
            the models that take PNG/JPEG bytes; ``triton_queue_delay_us``: the dynamic batcher's
            ``max_queue_delay_microseconds``.
        status: called with progress lines (gates provenance, warnings); default: logged at INFO.

    Returns:
        MainExportResult; ``summary()`` is what ``vdm-export`` prints.

    Raises:
        ValueError: a bad option. FileExistsError: ``out`` exists and not ``overwrite``.
        GatesNotFoundError, WeightsUnavailableError, BackboneMismatchError: loading failed.
        ExportError, ExportValidationError: the export or its validation failed (nothing at ``out``).
    """
    from vdm_engine.runtime import resolve_providers

    say = status or logger.info
    normalize_outputs(outputs)  # checked here, before loading; export_onnx puts them in graph order
    check_export_options(opset=opset, dtype=dtype, batch=batch, atol=atol, threshold=threshold)
    if random_weights and model not in SHAPES:
        raise ValueError(f"random_weights needs an architecture name for model, one of {sorted(SHAPES)}; got {model!r}")
    if random_weights and gates is not None:
        raise ValueError("gates cannot be combined with random_weights (random weights get random gates)")
    if triton_repo is not None and triton_max_batch < 1:
        raise ValueError(f"triton_max_batch must be >= 1, got {triton_max_batch}")
    if triton_backend not in BACKENDS:
        raise ValueError(f"triton_backend must be one of {', '.join(BACKENDS)}, got {triton_backend!r}")
    if triton_queue_delay_us < 0:
        raise ValueError(f"triton_queue_delay_us must be >= 0, got {triton_queue_delay_us}")
    if triton_backend == "python" and tensorrt:
        raise ValueError("tensorrt needs triton_backend='onnxruntime' (the python backend runs on the CPU)")
    if triton_ensemble and batch != "dynamic":
        raise ValueError(f"triton_ensemble needs a dynamic batch, got batch={batch}")
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; expected a file path such as {out / 'model.onnx'}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it")
    provider = resolve_providers(providers)[0]  # before loading anything: 'cuda' without onnxruntime-gpu

    explainer, untrained = _load_explainer(
        model, gates=gates, revision=revision, allow_backbone_mismatch=allow_backbone_mismatch,
        untrained_gates=untrained_gates, random_weights=random_weights,
        warn=(lambda msg: say(f"warning: {msg}")) if status else logger.warning,
    )
    say(explainer.provenance.describe())
    say(f"exporting {model} ({dtype}, opset {opset}, batch {batch}) ...")
    result = export_onnx(
        explainer, out, opset=opset, dtype=dtype, batch=batch, outputs=outputs, uint8_input=uint8_input,
        threshold=threshold, atol=atol, images=None if random_weights else _validation_images(model),
        untrained_gates=untrained, random_weights=random_weights, providers=providers,
    )
    timing = time_onnx(result.path, list(_TIMED_BATCHES) if batch == "dynamic" else [batch], providers=providers)
    model_dir = None
    if triton_repo is not None:
        model_dir = write_triton_repo(
            result.path, triton_repo, name=triton_name, max_batch_size=triton_max_batch, tensorrt=tensorrt,
            backend=triton_backend, ensemble=triton_ensemble, max_queue_delay_us=triton_queue_delay_us,
        )
    return MainExportResult(export=result, provider=provider, timing_ms=timing, triton_model_dir=model_dir)
