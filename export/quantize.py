"""int8 graphs for the CPU: quantize an exported graph and check it against the fp32 graph it came from.

``quantize_onnx`` follows one recipe, ``INT8_RECIPE`` (``Int8Recipe``: what is fused first, which
node types are quantized, how weights are scaled); it uses ``onnxruntime.quantization``: static
quantization (QDQ, int8 activations and weights, MinMax calibration) when calibration inputs are
given, else dynamic quantization (int8 weights, activations quantized per call). ``compare_int8``
runs both graphs on held-out images and reports how often the predicted class agrees and the mean
IoU of the kept patch sets (keep probability > threshold); ``check_int8`` raises
``QuantizationError`` below the thresholds (default 0.99 agreement, 0.95 mean IoU).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from vdm_engine.metadata import METADATA_PREFIX

__all__ = [
    "QUANTIZE_MODES",
    "Int8Recipe",
    "INT8_RECIPE",
    "MATMUL_ONLY_RECIPE",
    "MIN_AGREEMENT",
    "MIN_IOU",
    "QuantizationError",
    "Int8Report",
    "quantize_onnx",
    "compare_int8",
    "check_int8",
    "kept_iou",
]

QUANTIZE_MODES = ("int8",)
MIN_AGREEMENT = 0.99
MIN_IOU = 0.95


@dataclass(frozen=True)
class Int8Recipe:
    """How an fp32 graph becomes int8: the one place that decides it (``INT8_RECIPE``).

    Attributes:
        fuse: first run onnxruntime's transformer optimizer fusions (``optimize_model``, model type
            ``vit``, no hardware-specific passes): residual add + layer norm -> SkipLayerNormalization,
            bias + GELU -> BiasGelu. Fewer float32 nodes around the int8 matmuls.
        op_types: node types quantized (None: every type onnxruntime quantizes, Conv included).
        per_channel: dynamic quantization: one weight scale per output channel instead of per tensor
            (static quantization always scales weights per channel, as before).
        reduce_range: 7-bit weights: the int8 kernels of CPUs without VNNI (AVX2) can saturate their
            16-bit intermediate sums with full 8-bit weights.
        keep_probes_fp32: leave the gate probes' nodes (initializers named ``probes.*``) in float32.
    """

    fuse: bool = True
    op_types: tuple[str, ...] | None = ("MatMul", "Gemm")
    per_channel: bool = False
    reduce_range: bool = True
    keep_probes_fp32: bool = True

    def describe(self) -> str:
        ops = "all op types" if self.op_types is None else "/".join(self.op_types)
        flags = [f for f, on in (("fused", self.fuse), ("per-channel", self.per_channel),
                                 ("7-bit weights", self.reduce_range), ("probes fp32", self.keep_probes_fp32)) if on]
        return f"{ops} in int8" + (f" ({', '.join(flags)})" if flags else "")


#: The recipe ``quantize_onnx``, ``export_int8`` and ``vdm-export --quantize int8`` use. Chosen on the
#: ViT-B/16 shape on a 2-core AVX2 CPU (benchmarks/results/latency-cpu-s6-2026-12-01): the fusions
#: and the int8 matmuls give the speed; quantizing Conv as well gave no more and cost agreement on
#: vit-digits; 7-bit weights raised vit-digits' kept-set IoU (0.997 -> 0.998) at no cost in speed;
#: the probes stay float32: quantized they cost vit-digits' kept-set IoU 1.000 -> 0.998, and in
#: float32 they are a few percent of the ViT-B/16 work.
INT8_RECIPE = Int8Recipe()
#: The recipe before session 6 (MatMul/Gemm only, nothing fused, 8-bit weights): kept for comparisons.
MATMUL_ONLY_RECIPE = Int8Recipe(fuse=False, reduce_range=False, keep_probes_fp32=False)


class QuantizationError(ValueError):
    """The int8 graph disagrees with the fp32 graph more than the thresholds allow."""


@dataclass(frozen=True)
class Int8Report:
    """How the int8 graph compares with its fp32 graph on held-out images.

    Attributes:
        method: ``static`` (calibrated) or ``dynamic``.
        images: held-out images compared.
        agreement: fraction whose predicted class is the same.
        mean_iou: mean over images of the IoU of the kept patch sets (None without ``patch_mask``).
        min_agreement, min_iou: the thresholds checked.
        calibration: the calibration source (static) or None.
    """

    method: str
    images: int
    agreement: float
    mean_iou: float | None
    min_agreement: float = MIN_AGREEMENT
    min_iou: float = MIN_IOU
    calibration: str | None = None

    @property
    def passed(self) -> bool:
        return self.agreement >= self.min_agreement and (self.mean_iou is None or self.mean_iou >= self.min_iou)

    def summary(self) -> str:
        iou = "n/a (no patch_mask output)" if self.mean_iou is None else f"{self.mean_iou:.4f} (min {self.min_iou})"
        cal = f", calibrated on {self.calibration}" if self.calibration else ""
        return (f"int8 {self.method}{cal}: prediction agreement {self.agreement:.4f} (min {self.min_agreement}), "
                f"kept-set IoU {iou} on {self.images} held-out images")

    def to_props(self) -> dict[str, str]:
        """The report as ``vdm.extra.*`` metadata of the int8 graph."""
        p = {"quantization": f"int8-{self.method}", "int8_agreement": f"{self.agreement:.6f}",
             "int8_images": str(self.images)}
        if self.mean_iou is not None:
            p["int8_mean_iou"] = f"{self.mean_iou:.6f}"
        if self.calibration:
            p["int8_calibration"] = self.calibration
        return {f"{METADATA_PREFIX}extra.{k}": v for k, v in p.items()}


def _check_thresholds(min_agreement: float, min_iou: float) -> None:
    for name, v in (("min_agreement", min_agreement), ("min_iou", min_iou)):
        if not 0.0 <= float(v) <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {v}")


def _no_preprocess_hint(record) -> bool:
    # onnxruntime.quantization advises shape-inference pre-processing on every call; our graphs come
    # from the dynamo exporter with shapes inferred, so the hint is noise.
    return "pre-processing before quantization" not in record.getMessage()


class _Calibration:
    """``CalibrationDataReader`` over (N, ...) inputs in batches (duck-typed: ``get_next`` / ``rewind``)."""

    def __init__(self, input_name: str, inputs: np.ndarray, batch: int):
        self.input_name, self.inputs, self.batch, self.pos = input_name, inputs, batch, 0

    def get_next(self):
        if self.pos >= len(self.inputs):
            return None
        chunk = self.inputs[self.pos : self.pos + self.batch]
        self.pos += self.batch
        return {self.input_name: chunk}

    def rewind(self):
        self.pos = 0


def quantize_onnx(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    calibration: np.ndarray | None = None,
    calibration_batch: int = 8,
    extra_props: dict[str, str] | None = None,
    recipe: Int8Recipe = INT8_RECIPE,
) -> str:
    """Write an int8 copy of the graph ``src`` to ``out`` atomically; returns ``static`` or ``dynamic``.

    Args:
        src: an fp32 graph written by ``export_onnx`` (its metadata is copied).
        out: the int8 ``.onnx`` file.
        calibration: graph inputs (N, ...) as the graph takes them (float32 pixel values or uint8
            images): static quantization calibrated on them; None: dynamic quantization.
        extra_props: more ``metadata_props`` to record.
        recipe: how to quantize (default ``INT8_RECIPE``); recorded as ``vdm.extra.int8_recipe``.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    src, out = Path(src), Path(out)
    logging.getLogger().addFilter(_no_preprocess_hint)  # the root logger: where onnxruntime logs it
    method = "dynamic" if calibration is None else "static"
    props = {p.key: p.value for p in onnx.load(str(src), load_external_data=False).metadata_props}
    props[f"{METADATA_PREFIX}extra.int8_recipe"] = recipe.describe()
    props.update(extra_props or {})
    if calibration is not None and len(calibration) == 0:
        raise ValueError("calibration holds no images; pass some, or None for dynamic quantization")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".staging", dir=out.parent))
    try:
        staged = staging / out.name
        source = src
        if recipe.fuse:
            source = staging / "fused.onnx"
            _fuse(src, source)
        common = dict(
            op_types_to_quantize=None if recipe.op_types is None else list(recipe.op_types),
            reduce_range=recipe.reduce_range,
            nodes_to_exclude=_probe_nodes(source) if recipe.keep_probes_fp32 else None,
        )
        if calibration is None:
            quantize_dynamic(source, staged, weight_type=QuantType.QInt8, per_channel=recipe.per_channel, **common)
        else:
            reader = _Calibration(_input_name(src), np.ascontiguousarray(calibration), calibration_batch)
            quantize_static(
                source, staged, reader, quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8, per_channel=True, calibrate_method=CalibrationMethod.MinMax,
                extra_options={"ActivationSymmetric": False, "WeightSymmetric": True}, **common,
            )
        model = onnx.load(str(staged))
        del model.metadata_props[:]
        for k, v in props.items():
            model.metadata_props.add(key=k, value=v)
        model.producer_name = "vdm-engine"
        onnx.save(model, str(staged))
        os.replace(staged, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return method


def _fuse(src: Path, out: Path) -> None:
    """onnxruntime's transformer fusions (``Int8Recipe.fuse``) of ``src`` into ``out``, weights inline."""
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    # Only the fusions that match our graphs (layer norm, skip layer norm, GELU, bias GELU); attention,
    # rotary and embedding fusions never match the dynamo exporter's SDPA graphs, and without them the
    # shape inference they need is skipped (0.1 s instead of 4 s on vit-digits). num_heads /
    # hidden_size 0: read from the graph. opt_level 0: no onnxruntime passes that would tie the file
    # to this CPU.
    options = FusionOptions("vit")
    options.enable_attention = options.enable_rotary_embeddings = options.enable_embed_layer_norm = False
    options.enable_shape_inference = False
    level = logging.root.manager.disable
    logging.disable(logging.WARNING)  # its "producer not matched" / "specify num_heads" warnings
    try:
        model = optimizer.optimize_model(str(src), model_type="vit", num_heads=0, hidden_size=0, opt_level=0,
                                         optimization_options=options)
    finally:
        logging.disable(level)
    model.save_model_to_file(str(out))


def _probe_nodes(path: Path) -> list[str]:
    """Names of the nodes that read a gate-probe initializer (``probes.*``, see ``export.probes``)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    probes = {t.name for t in model.graph.initializer if t.name.startswith("probes.")}
    return [n.name for n in model.graph.node if probes.intersection(n.input)]


def _input_name(path: Path) -> str:
    import onnx

    return onnx.load(str(path), load_external_data=False).graph.input[0].name


def kept_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(B,) IoU of two (B, N) boolean kept sets; 1 where both are empty."""
    inter = np.logical_and(a, b).sum(-1)
    union = np.logical_or(a, b).sum(-1)
    return np.where(union == 0, 1.0, inter / np.maximum(union, 1))


def compare_int8(
    fp32_path: str | os.PathLike,
    int8_path: str | os.PathLike,
    inputs: np.ndarray,
    *,
    method: str,
    threshold: float = 0.5,
    batch: int = 32,
    min_agreement: float = MIN_AGREEMENT,
    min_iou: float = MIN_IOU,
    calibration: str | None = None,
    providers: str | Sequence = "cpu",
) -> Int8Report:
    """Run both graphs on held-out ``inputs`` (N, ...) and compare predictions and kept patch sets.

    Fixed-batch graphs are fed in their batch size (``inputs`` must then be a multiple of it).
    """
    from vdm_engine.runtime import create_session

    _check_thresholds(min_agreement, min_iou)
    sessions = [create_session(p, providers) for p in (fp32_path, int8_path)]
    inp = sessions[0].get_inputs()[0]
    fixed = inp.shape[0] if isinstance(inp.shape[0], int) else None
    step = fixed or batch
    if fixed and len(inputs) % fixed:
        raise ValueError(f"the graph takes batches of {fixed}; got {len(inputs)} held-out images")
    names = [o.name for o in sessions[0].get_outputs() if o.name in ("logits", "patch_mask")]
    got: list[dict[str, list]] = [{n: [] for n in names} for _ in sessions]
    for i in range(0, len(inputs), step):
        feed = {inp.name: np.ascontiguousarray(inputs[i : i + step])}
        for s, acc in zip(sessions, got):
            for n, v in zip(names, s.run(names, feed)):
                acc[n].append(v)
    ref, q = ({n: np.concatenate(v) for n, v in g.items()} for g in got)
    agreement = float((ref["logits"].argmax(-1) == q["logits"].argmax(-1)).mean())
    mean_iou = None
    if "patch_mask" in names:
        mean_iou = float(kept_iou(ref["patch_mask"] > threshold, q["patch_mask"] > threshold).mean())
    return Int8Report(method, len(inputs), agreement, mean_iou, float(min_agreement), float(min_iou), calibration)


def check_int8(report: Int8Report) -> Int8Report:
    """Raise ``QuantizationError`` (one line, with the figures) unless ``report`` meets its thresholds."""
    if not report.passed:
        raise QuantizationError(
            f"the int8 graph is not faithful enough: {report.summary()}. Try static quantization with "
            "calibration images of the model's domain (--calibration-data SRC), or lower --min-agreement / "
            "--min-iou if this loss is acceptable"
        )
    return report


def export_int8(
    fp32_path: str | os.PathLike,
    out: str | os.PathLike,
    held_out: np.ndarray,
    *,
    calibration: np.ndarray | None = None,
    calibration_source: str | None = None,
    threshold: float = 0.5,
    min_agreement: float = MIN_AGREEMENT,
    min_iou: float = MIN_IOU,
) -> Int8Report:
    """Quantize ``fp32_path``, compare on ``held_out`` graph inputs, and only if the thresholds hold
    move the int8 graph to ``out`` with the figures in its metadata.

    Raises:
        QuantizationError: below ``min_agreement`` / ``min_iou`` (nothing is written to ``out``).
    """
    import onnx

    _check_thresholds(min_agreement, min_iou)
    out = Path(out)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".int8", dir=out.parent))
    try:
        staged = staging / out.name
        method = quantize_onnx(fp32_path, staged, calibration=calibration)
        report = check_int8(compare_int8(
            fp32_path, staged, held_out, method=method, threshold=threshold, min_agreement=min_agreement,
            min_iou=min_iou, calibration=calibration_source if calibration is not None else None,
        ))
        model = onnx.load(str(staged))
        for k, v in report.to_props().items():
            model.metadata_props.add(key=k, value=v)
        onnx.save(model, str(staged))
        os.replace(staged, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report
