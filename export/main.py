"""``main_export``: everything ``vdm-export`` does, as one Python call with the CLI's defaults.

Load the explainer (``Explainer.from_pretrained``, or random weights / untrained gates for
benchmarks), export and validate one ONNX graph (``export_onnx``), time it in onnxruntime and
optionally add it to a Triton model repository. The console script only parses its arguments,
checks them and prints ``MainExportResult.summary()``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from vdm_engine.backbone import SHAPES, load_backbone, random_backbone, resolve_model_source
import numpy as np

from vdm_engine.data import digits_split, open_source, toy_batch
from vdm_engine.explainer import Explainer, GatesNotFoundError
from vdm_engine.gates import GateConfig, Gates
from vdm_engine.registry import registered_gates

from .graph import DEFAULT_OUTPUTS, normalize_outputs
from .onnx import DEFAULT_OPSET, ExportResult, check_export_options, export_onnx
from .quantize import MIN_AGREEMENT, MIN_IOU, QUANTIZE_MODES, Int8Report, export_int8
from .triton_repo import BACKENDS, DEFAULT_BACKEND, DEFAULT_MAX_BATCH_SIZE, DEFAULT_QUEUE_DELAY_US, write_triton_repo
from .validate import graph_inputs, structured_images, time_onnx

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
        int8: with ``quantize="int8"``: how the int8 graph (at ``path``) compares with its fp32 graph.
    """

    export: ExportResult
    provider: str
    timing_ms: dict[int, float]
    triton_model_dir: Path | None = None
    int8: Int8Report | None = None

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
        if self.int8 is not None:
            lines[0] = lines[0].replace(f"{m.dtype}, opset", f"int8 {self.int8.method} from {m.dtype}, opset")
            lines[4] = lines[4].replace("  max diff  ", "  max diff  fp32 graph vs PyTorch: ")
            lines.insert(5, f"  int8      vs the fp32 graph: {self.int8.summary()}")
        if self.triton_model_dir is not None:
            lines.append(f"  triton    {self.triton_model_dir / 'config.pbtxt'}")
        return "\n".join(lines)


def _fmt_shape(dims) -> str:
    return "[" + ", ".join(str(d) for d in dims) + "]"


def _random_gates(backbone) -> Gates:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Gates(GateConfig(backbone.hidden_size, backbone.num_hidden_states))


def _load_explainer(model, *, gates, revision, allow_backbone_mismatch, untrained_gates, random_weights, warn,
                    labels=None):
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
            model, gates, revision=revision, allow_backbone_mismatch=allow_backbone_mismatch, labels=labels
        )
        return explainer.eval(), False
    except GatesNotFoundError:
        if not untrained_gates:
            raise
    backbone = load_backbone(model, revision=revision, labels=labels)
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
    labels: Sequence[str] | None = None,
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
    quantize: str | None = None,
    calibration_data: str | None = None,
    calibration_images: int = 64,
    held_out_images: int = 300,
    min_agreement: float = MIN_AGREEMENT,
    min_iou: float = MIN_IOU,
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
        labels: CLIP only: the zero-shot classes (default: those recorded with the gates).
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
        quantize: ``"int8"``: write an int8 graph for the CPU (``export.quantize``) to ``out``,
            quantized from the validated fp32 graph: static, calibrated on ``calibration_images``
            images of the data source ``calibration_data`` (``toy``, ``digits``, ``imagefolder:PATH``,
            ``hf:NAME``) when given, else dynamic. It must agree with the fp32 graph on
            ``held_out_images`` held-out images (the model's own test images where the install has
            them, else the calibration source's validation images, else structured images) in at
            least ``min_agreement`` of the predictions and ``min_iou`` mean kept-set IoU.
        status: called with progress lines (gates provenance, warnings); default: logged at INFO.

    Returns:
        MainExportResult; ``summary()`` is what ``vdm-export`` prints.

    Raises:
        ValueError: a bad option. FileExistsError: ``out`` exists and not ``overwrite``.
        GatesNotFoundError, WeightsUnavailableError, BackboneMismatchError: loading failed.
        ExportError, ExportValidationError: the export or its validation failed (nothing at ``out``).
        QuantizationError (a ValueError): the int8 graph missed a threshold (nothing at ``out``).
    """
    from vdm_engine.runtime import resolve_providers

    say = status or logger.info
    normalize_outputs(outputs)  # checked here, before loading; export_onnx puts them in graph order
    check_export_options(opset=opset, dtype=dtype, batch=batch, atol=atol, threshold=threshold)
    if random_weights and model not in SHAPES:
        raise ValueError(f"random_weights needs an architecture name for model, one of {sorted(SHAPES)}; got {model!r}")
    if random_weights and gates is not None:
        raise ValueError("gates cannot be combined with random_weights (random weights get random gates)")
    if quantize is not None:
        _check_quantize(quantize, dtype, calibration_data, calibration_images, held_out_images, min_agreement, min_iou)
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
        untrained_gates=untrained_gates, random_weights=random_weights, labels=labels,
        warn=(lambda msg: say(f"warning: {msg}")) if status else logger.warning,
    )
    say(explainer.provenance.describe())
    say(f"exporting {model} ({dtype}, opset {opset}, batch {batch}) ...")
    export_kw = dict(
        opset=opset, dtype=dtype, batch=batch, outputs=outputs, uint8_input=uint8_input,
        threshold=threshold, atol=atol, images=None if random_weights else _validation_images(model),
        untrained_gates=untrained, random_weights=random_weights, providers=providers,
    )
    int8 = None
    if quantize is None:
        result = export_onnx(explainer, out, **export_kw)
    else:
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".fp32", dir=out.parent))
        try:
            fp32 = export_onnx(explainer, staging / out.name, **export_kw)
            held_out, calibration = _int8_inputs(
                explainer, model, batch=batch, uint8_input=uint8_input, calibration_data=calibration_data,
                calibration_images=calibration_images, held_out_images=held_out_images, say=say,
            )
            say(f"quantizing to int8 ({'static' if calibration is not None else 'dynamic'}) ...")
            int8 = export_int8(
                fp32.path, out, held_out, calibration=calibration, calibration_source=calibration_data,
                threshold=0.5, min_agreement=min_agreement, min_iou=min_iou,
            )
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        meta = dataclasses.replace(fp32.metadata, extra={**fp32.metadata.extra, **{
            k.split("extra.", 1)[1]: v for k, v in int8.to_props().items()}})
        result = dataclasses.replace(fp32, path=out, size_bytes=out.stat().st_size, metadata=meta, data_files=[])
    timing = time_onnx(result.path, list(_TIMED_BATCHES) if batch == "dynamic" else [batch], providers=providers)
    model_dir = None
    if triton_repo is not None:
        model_dir = write_triton_repo(
            result.path, triton_repo, name=triton_name, max_batch_size=triton_max_batch, tensorrt=tensorrt,
            backend=triton_backend, ensemble=triton_ensemble, max_queue_delay_us=triton_queue_delay_us,
        )
    return MainExportResult(export=result, provider=provider, timing_ms=timing, triton_model_dir=model_dir, int8=int8)


def _check_quantize(quantize, dtype, calibration_data, calibration_images, held_out_images, min_agreement, min_iou):
    if quantize not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {list(QUANTIZE_MODES)}, got {quantize!r}")
    if dtype != "fp32":
        raise ValueError(f"int8 quantization starts from the fp32 graph; got dtype {dtype!r} (drop --fp16)")
    for name, v in (("min_agreement", min_agreement), ("min_iou", min_iou)):
        if not 0.0 <= float(v) <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {v}")
    for name, v in (("calibration_images", calibration_images), ("held_out_images", held_out_images)):
        if int(v) < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if calibration_data is not None:
        open_source(calibration_data)  # an unknown spec fails here, before the export


def _take(source, n: int, *, held_out: bool) -> list:
    """``n`` images of a data source: its validation images, or its first training images / stream items."""
    if held_out:
        return list(source.validation(n))
    if source.indexed:
        return list(source.images(np.arange(min(n, len(source)))))
    it = source.stream(seed=0)
    return [next(it) for _ in range(n)]


def _int8_inputs(explainer, model, *, batch, uint8_input, calibration_data, calibration_images, held_out_images, say):
    """(held-out graph inputs, calibration graph inputs or None) as numpy arrays the graph takes."""
    source = open_source(calibration_data) if calibration_data is not None else None
    images = _held_out_for(model, held_out_images)
    where = f"{model}'s test images"
    if images is None and source is not None:
        images, where = _take(source, held_out_images, held_out=True), f"{calibration_data} validation images"
    if images is None:
        size = explainer.backbone.image_size
        images, where = structured_images(held_out_images, size, seed=7), "structured images"
    calibration = None
    if source is not None:
        calibration = graph_inputs(explainer, _take(source, calibration_images, held_out=False),
                                   uint8_input=uint8_input)[0].numpy()
    held = graph_inputs(explainer, images, uint8_input=uint8_input)[0].numpy()
    if batch != "dynamic":  # a fixed-batch graph is fed whole batches
        held = held[: len(held) - len(held) % int(batch)]
        if calibration is not None:
            calibration = calibration[: max(int(batch), len(calibration) - len(calibration) % int(batch))]
        if len(held) == 0:
            raise ValueError(f"held_out_images ({held_out_images}) must be at least the fixed batch size {batch}")
    say(f"int8 check on {len(held)} held-out images ({where})")
    return held, calibration


def _held_out_for(model: str, n: int):
    """The model's own held-out test images where this install has them, else None."""
    try:
        if model == "vit-digits":
            return digits_split("test")[0][:n]
    except ValueError as e:  # scikit-learn (a dev dependency) is missing
        logger.info("no digits test images: %s", e)
        return None
    if model == "vit-toy":
        return toy_batch(n, seed=2_000_003)[0]
    return None
