"""``export_onnx``: one fused ONNX graph (ViT + gate probes), validated before it reaches its path.

Exporter: ``torch.onnx.export(..., dynamo=True)`` (``torch.export`` + onnxscript), the default and
maintained exporter in torch >= 2.9; it handles SDPA attention and a symbolic batch axis. The
graph is saved into a staging folder beside the target, checked, compared with PyTorch in
onnxruntime, and only then renamed onto the target path: a failed or interrupted export leaves
nothing behind. The staging folder's name holds the exporting process's id, so staging left by a
killed export (SIGKILL, power loss) is removed by the next export into that folder.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import re
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from vdm_engine.explainer import Explainer

from .defaults import DEFAULT_OPSET, DEFAULT_OUTPUTS, MIN_OPSET
from .graph import ExplainerGraph, normalize_outputs
from vdm_engine.metadata import ExportMetadata, gates_sha256
from .validate import TOLERANCES, ExportValidationError, check_onnx, validate_onnx

__all__ = [
    "export_onnx", "ExportResult", "ExportError", "ExportValidationError", "DTYPES", "MIN_OPSET", "DEFAULT_OPSET",
    "check_export_options", "remove_stale_staging",
]

logger = logging.getLogger("vdm_engine.export")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
#: Above this many bytes of weights the graph is saved with external data (protobuf's 2 GB limit).
EXTERNAL_DATA_BYTES = 2 * 1024**3 - 64 * 1024**2
_TRACED_BATCH = 2  # never 1: torch.export specialises size-1 dimensions
#: ``.<target name>.vdm-staging-<pid>-<random>.staging``: a folder beside the target while exporting.
_STAGING_TAG = "vdm-staging-"
_STAGING_RE = re.compile(r"^\..+\." + _STAGING_TAG + r"(\d+)-[^.]*\.staging$")


class ExportError(RuntimeError):
    """The exporter could not turn the explainer into an ONNX graph."""


@dataclass
class ExportResult:
    """What ``export_onnx`` wrote.

    Attributes:
        path: the model file; data_files: external-data files beside it (empty below 2 GB).
        input: (name, shape, dtype) with ``"batch"`` for a dynamic axis.
        outputs: {name: shape}.
        size_bytes: model plus external data.
        max_diffs: {output: max |onnxruntime - pytorch|} (empty if not validated).
        tolerance: the tolerance the diffs were held to.
        export_s, validate_s: wall-clock seconds.
        metadata: what was written into ``metadata_props``.
    """

    path: Path
    input: tuple[str, list, str]
    outputs: dict[str, list]
    size_bytes: int
    max_diffs: dict[str, float]
    tolerance: float
    export_s: float
    validate_s: float
    metadata: ExportMetadata
    data_files: list[Path] = field(default_factory=list)


def check_export_options(*, opset, dtype, batch, atol, threshold=0.5) -> None:
    """``ValueError`` naming the first bad option (cheap: callers run it before loading a model)."""
    import onnx

    max_opset = onnx.defs.onnx_opset_version()
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= max_opset:
        raise ValueError(f"opset must be an integer in [{MIN_OPSET}, {max_opset}] (this onnx's newest), got {opset!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    if batch != "dynamic" and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise ValueError(f"batch must be 'dynamic' or a positive integer, got {batch!r}")
    if atol is not None and not (isinstance(atol, (int, float)) and atol > 0):
        raise ValueError(f"atol must be a positive number, got {atol!r}")
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold must be a keep probability in [0, 1], got {threshold}")


def _process_start_time(pid: int) -> float | None:
    """Wall-clock start of process ``pid`` (Linux ``/proc``; to 1 s, as boot time is), else None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/stat") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _staging_owner_gone(entry: Path, pid: int) -> bool:
    """True when the export that made ``entry`` cannot be running any more."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        pass
    except OSError:
        return False
    started = _process_start_time(pid)  # alive: made by this process only if it started first
    try:
        return started is not None and entry.stat().st_mtime < started - 2.0
    except OSError:
        return False


def remove_stale_staging(folder: str | os.PathLike) -> list[Path]:
    """Remove staging folders in ``folder`` left by exports that were killed: their process is gone,
    or its id now belongs to a process started after the folder was written. Returns what was removed."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = _STAGING_RE.match(entry.name)
        if m is None or int(m.group(1)) == os.getpid() or not _staging_owner_gone(entry, int(m.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        if not entry.exists():
            removed.append(entry)
            logger.info("removed %s, left by an export that was killed", entry)
    return removed


@contextlib.contextmanager
def _training_restored(explainer: Explainer):
    """The export puts the explainer in eval mode; give it back in the mode it came in."""
    mode = explainer.training
    try:
        yield
    finally:
        explainer.train(mode)


def _is_fp32(explainer: Explainer) -> bool:
    return explainer.backbone.dtype == torch.float32 and explainer.gates.w1.dtype == torch.float32


@contextlib.contextmanager
def _quiet_exporter():
    """Silence the exporter's progress prints and advisory warnings (errors still raise)."""
    names = ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "onnx_ir")
    saved = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for n, lvl in saved.items():
            logging.getLogger(n).setLevel(lvl)


def _build_metadata(explainer, graph: ExplainerGraph, *, opset, dtype, batch, untrained_gates, random_weights, extra) -> ExportMetadata:
    from vdm_engine import __version__

    bb = explainer.backbone
    spec = bb.image_spec
    extra = {str(k): str(v) for k, v in (extra or {}).items()}
    if untrained_gates:
        extra.setdefault("warning", "untrained (random) gates: the masks carry no explanation; for benchmarks only")
    if bb.model_type != "vit":  # other families name themselves (ViT graphs keep their metadata as before)
        extra.setdefault("model_type", bb.model_type)
    if bb.zero_shot:  # CLIP: the text embeddings are constants of the graph; labels in id2label
        extra.setdefault("zero_shot_prompt", bb.zero_shot["prompt"])
    return ExportMetadata(
        engine_version=__version__,
        backbone_id=str(bb.name_or_path or ""),
        backbone_revision=str(bb.revision or ""),
        gates_sha256=gates_sha256(explainer.gates),
        image_size=tuple(bb.image_size),
        image_mean=tuple(spec.mean),
        image_std=tuple(spec.std),
        image_processor=spec.to_processor_dict(),
        patch_grid=tuple(bb.grid),
        num_layers=bb.num_layers,
        num_hidden_states=bb.num_hidden_states,
        num_labels=bb.num_labels,
        id2label={str(k): str(v) for k, v in bb.id2label.items()},
        opset=int(opset),
        dtype=dtype,
        batch=str(batch),
        input_name=graph.input_name,
        outputs=tuple(graph.outputs),
        uint8_input=graph.uint8_input,
        threshold=graph.threshold,
        untrained_gates=bool(untrained_gates),
        random_weights=bool(random_weights),
        gates_source=explainer.gates.provenance.source,
        backbone_fingerprint=bb.fingerprint,
        gates_backbone_fingerprint=explainer.gates.backbone_fingerprint or "",
        backbone_mismatch=explainer.gates.provenance.backbone_mismatch,
        extra=extra,
    )


def _io_shapes(path: Path) -> tuple[tuple[str, list, str], dict[str, list]]:
    import onnx

    m = onnx.load(str(path), load_external_data=False)

    def dims(vi):
        return [d.dim_param if d.HasField("dim_param") else d.dim_value for d in vi.type.tensor_type.shape.dim]

    (inp,) = m.graph.input
    elem = onnx.helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type).name
    return (inp.name, dims(inp), elem), {o.name: dims(o) for o in m.graph.output}


def export_onnx(
    explainer: Explainer,
    path: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    dtype: str = "fp32",
    batch: str | int = "dynamic",
    outputs: Sequence[str] = DEFAULT_OUTPUTS,
    uint8_input: bool = False,
    validate: bool = True,
    threshold: float = 0.5,
    atol: float | None = None,
    images=None,
    external_data: bool | None = None,
    untrained_gates: bool = False,
    random_weights: bool = False,
    extra_metadata: dict | None = None,
    providers="auto",
    fused_probes: bool = True,
) -> ExportResult:
    """Export ``explainer`` as one ONNX graph and validate it.

    The graph runs one ViT forward pass and the gate probes on its hidden states. Input
    ``pixel_values (B, 3, H, W)`` float32, or with ``uint8_input`` raw ``images (B, H, W, 3)``
    uint8 (rescale and normalisation folded in). Outputs, float32, chosen from
    ``logits (B, C)``, ``patch_mask (B, N)``, ``layer_masks (B, L+2, N)``, ``masked_logits (B, C)``
    and ``kl (B,)`` (the last two add the masked second pass of ``Explainer.verify``).

    Args:
        explainer: the PyTorch explainer (any fast paths are swapped for the references while
            exporting and restored afterwards).
        path: target ``.onnx`` file; replaced only after validation succeeds.
        opset: ONNX opset (>= 18).
        dtype: ``"fp32"`` or ``"fp16"`` weights and compute (inputs/outputs stay float32/uint8).
        batch: ``"dynamic"`` (default) or a fixed batch size.
        outputs: subset of ``vdm_engine.export.OUTPUTS``; default ``DEFAULT_OUTPUTS`` (logits,
            patch_mask, layer_masks).
        uint8_input: take uint8 NHWC images instead of normalised pixels.
        validate: compare onnxruntime with PyTorch (the checker always runs).
        threshold: hard-mask threshold for ``masked_logits`` / ``kl``.
        atol: max abs difference allowed; default ``TOLERANCES[dtype]`` (1e-4 fp32, 1e-2 fp16).
        images: real uint8 images for validation (default: ``structured_images``).
        external_data: force (True) or forbid (False) external weights; default only above 2 GB.
        untrained_gates, random_weights, extra_metadata: recorded in the metadata.
        providers: onnxruntime providers for validation (see ``vdm_engine.runtime``).
        fused_probes: the probes as few wide nodes (``export.probes``, the default); False writes
            them per depth as ``Explainer.run`` computes them (for comparisons).

    Raises:
        ValueError: bad arguments. ExportError: the exporter failed.
        ExportValidationError: checker or parity failure (nothing is written to ``path``).
    """
    if not isinstance(explainer, Explainer):
        raise ValueError(f"export_onnx needs a vdm_engine.Explainer, got {type(explainer).__name__}")
    check_export_options(opset=opset, dtype=dtype, batch=batch, atol=atol, threshold=threshold)
    outputs = normalize_outputs(outputs)
    tol = float(atol) if atol is not None else TOLERANCES[dtype]
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"--out {path} is a directory; expected a file path such as {path / 'model.onnx'}")
    remove_stale_staging(path.parent)

    with _training_restored(explainer):
        work = explainer
        if dtype != "fp32" or not _is_fp32(explainer):
            work = copy.deepcopy(explainer)
            work.backbone.to(DTYPES[dtype])
            work.gates.to(DTYPES[dtype])
        graph = ExplainerGraph(work, outputs, uint8_input=uint8_input, threshold=threshold,
                               fused_probes=fused_probes).eval()
        graph.to(work.backbone.device)
        traced = _TRACED_BATCH if batch == "dynamic" else int(batch)
        example = graph.example_input(traced, work.backbone.device)
        dynamic_shapes = {"x": {0: torch.export.Dim("batch", min=1)}} if batch == "dynamic" else None
        meta = _build_metadata(
            explainer, graph, opset=opset, dtype=dtype, batch=batch,
            untrained_gates=untrained_gates, random_weights=random_weights, extra=extra_metadata,
        )
        weight_bytes = sum(t.numel() * t.element_size() for t in list(graph.parameters()) + list(graph.buffers()))
        if external_data is None:
            external_data = weight_bytes > EXTERNAL_DATA_BYTES

        t0 = time.perf_counter()
        try:
            with _quiet_exporter(), torch.no_grad():
                program = torch.onnx.export(
                    graph, (example,), None,
                    input_names=[graph.input_name], output_names=list(outputs),
                    opset_version=opset, dynamo=True, dynamic_shapes=dynamic_shapes,
                    optimize=True, verbose=False, external_data=external_data,
                )
        except Exception as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ExportError(f"torch.onnx.export failed for {type(graph).__name__}: {msg}") from e
        program.model.metadata_props.update(meta.to_props())
        program.model.producer_name = "vdm-engine"
        export_s = time.perf_counter() - t0
        if work is not explainer:
            del work, graph

        # the reference is always the fp32 PyTorch explainer
        reference = explainer
        if validate and not _is_fp32(explainer):
            reference = copy.deepcopy(explainer)
            reference.backbone.to(torch.float32)
            reference.gates.to(torch.float32)

        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(
            prefix=f".{path.name}.{_STAGING_TAG}{os.getpid()}-", suffix=".staging", dir=path.parent
        ))
        try:
            staged = staging / path.name  # the final name, so external data locations stay valid
            with _quiet_exporter():
                program.save(staged, external_data=external_data)
            del program
            t1 = time.perf_counter()
            check_onnx(staged)
            diffs = {}
            if validate:
                diffs = validate_onnx(
                    staged, reference, outputs=outputs, uint8_input=uint8_input, batch=batch,
                    traced_batch=traced, atol=tol, threshold=threshold, images=images, providers=providers,
                )
            validate_s = time.perf_counter() - t1
            data_files = []
            for f in sorted(staging.iterdir()):
                if f != staged:
                    os.replace(f, path.parent / f.name)
                    data_files.append(path.parent / f.name)
            os.replace(staged, path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    inp, outs = _io_shapes(path)
    size = path.stat().st_size + sum(f.stat().st_size for f in data_files)
    for name, d in diffs.items():
        logger.info("validated %s: max |diff| %.3e <= %.1e", name, d, tol)
    return ExportResult(
        path=path, input=inp, outputs=outs, size_bytes=size, max_diffs=diffs, tolerance=tol,
        export_s=export_s, validate_s=validate_s, metadata=meta, data_files=data_files,
    )
