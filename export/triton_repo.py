"""Triton Inference Server model repository for an exported graph.

Layout::

    REPO/<name>/config.pbtxt
    REPO/<name>/labels.txt          class names, one a line (Triton's classification extension)
    REPO/<name>/1/model.onnx        (+ external data beside it for graphs over 2 GB)
    REPO/<name>/1/model.py          backend "python" only: a shim that runs OnnxExplainer (KIND_CPU)

Two backends read the same layout: ``onnxruntime`` (``platform: "onnxruntime_onnx"``, the default,
for GPU servers) and ``python`` (Triton's Python backend running ``vdm_engine.export.triton_python``
in the exporting environment, whose site folders the config names in the ``vdm_python_path``
parameter: the backend stub does not inherit ``PYTHONPATH``). With ``ensemble=True`` two more models
take encoded images as ``vdm-serve`` does: ``<name>_decode`` (Python backend: PNG/JPEG bytes,
``TYPE_STRING`` (B, 1) -> the graph's input) and ``<name>_ensemble`` (decode, then ``<name>``).

With a dynamic batch axis the config sets ``max_batch_size`` and lists each tensor's dims without
the batch dimension (Triton prepends it as -1), and turns on ``dynamic_batching``. A graph with a
fixed batch gets ``max_batch_size: 0`` and full dims. Ready means warm: the explainer's config
carries a ``model_warmup`` batch of zeros, so Triton reports it ready only after one ran. Every
config carries the provenance (gates sha256 and source, the graph's sha256) as ``parameters``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import sysconfig
from pathlib import Path
from typing import Sequence

from vdm_engine._io import atomic_path, atomic_write_bytes, sha256_file

from vdm_engine.metadata import ExportMetadata, read_metadata

from .defaults import BACKENDS, DEFAULT_BACKEND, DEFAULT_MAX_BATCH_SIZE, DEFAULT_QUEUE_DELAY_US

__all__ = [
    "write_triton_repo",
    "triton_config_text",
    "default_python_path",
    "ensemble_model_names",
    "python_model_text",
    "BACKENDS",
    "DEFAULT_BACKEND",
    "DEFAULT_MAX_BATCH_SIZE",
    "DEFAULT_QUEUE_DELAY_US",
]


_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "uint8": "TYPE_UINT8"}
_KINDS = ("KIND_GPU", "KIND_CPU", "KIND_AUTO")


def ensemble_model_names(name: str) -> tuple[str, str]:
    """(decode step, ensemble) model names that ``write_triton_repo(..., ensemble=True)`` adds beside ``name``."""
    return f"{name}_decode", f"{name}_ensemble"


def default_python_path() -> list[str]:
    """This interpreter's import folders outside the standard library (site-packages, the source
    tree of an editable install, ``PYTHONPATH``): what a python-backend model adds to ``sys.path``."""
    stdlib = os.path.realpath(sysconfig.get_path("stdlib"))
    out = []
    for p in sys.path:
        if not p or not os.path.isdir(p):
            continue
        real = os.path.realpath(p)
        # The stub has its own standard library (lib/python3.x, lib-dynload); site folders under it stay.
        in_stdlib = real == stdlib or real.startswith(stdlib + os.sep)
        if (in_stdlib and not re.search(r"(site|dist)-packages", real)) or real in out:
            continue
        out.append(real)
    return out


def _dims(dims: Sequence[int]) -> str:
    return "[ " + ", ".join(str(int(d)) for d in dims) + " ]"


def _quote(text: str) -> str:
    """A protobuf text-format string literal."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _parameters(params: dict[str, str]) -> str:
    return "\n".join(f"parameters {{ key: {_quote(k)} value: {{ string_value: {_quote(v)} }} }}" for k, v in params.items())


def _tensor_block(name: str, dtype: str, dims: Sequence[int], *, label_file: str | None = None) -> str:
    lines = [f'    name: "{name}"', f"    data_type: {dtype}"]
    if len(dims) == 0:
        # A per-request scalar, e.g. kl (B,): Triton wants dims [1] reshaped to a scalar.
        lines += ["    dims: [ 1 ]", "    reshape: { shape: [ ] }"]
    else:
        lines.append(f"    dims: {_dims(dims)}")
    if label_file:
        lines.append(f'    label_filename: "{label_file}"')
    return "  {\n" + "\n".join(lines) + "\n  }"


def _io_dims(m: ExportMetadata) -> tuple[tuple, str, dict]:
    """(input dims without batch, input type, {output: dims without batch}) of a graph."""
    H, W = m.image_size
    S, N, C = m.num_hidden_states, m.patch_grid[0] * m.patch_grid[1], m.num_labels
    in_dims = (H, W, 3) if m.uint8_input else (3, H, W)
    in_type = _TYPES["uint8"] if m.uint8_input else _TYPES["float32"]
    out_dims = {"logits": (C,), "patch_mask": (N,), "layer_masks": (S, N), "masked_logits": (C,), "kl": (), "patch_rank": (N,)}
    return in_dims, in_type, {o: out_dims[o] for o in m.outputs}


def _batching(max_batch_size: int, preferred_batch_sizes, max_queue_delay_us: int) -> str:
    pref = preferred_batch_sizes
    if pref is None:
        pref = [b for b in (4, 8, 16, 32) if b <= max_batch_size] or [max_batch_size]
    bad = [b for b in pref if not 1 <= int(b) <= max_batch_size]
    if bad:
        raise ValueError(f"preferred batch sizes {bad} are outside [1, max_batch_size={max_batch_size}]")
    return ("dynamic_batching {\n"
            f"  preferred_batch_size: {_dims(sorted(set(int(b) for b in pref)))}\n"
            f"  max_queue_delay_microseconds: {int(max_queue_delay_us)}\n"
            "}")


def _instances(count: int, kind: str) -> str:
    return f"instance_group [\n  {{\n    count: {int(count)}\n    kind: {kind}\n  }}\n]"


def _provenance(m: ExportMetadata, model_sha256: str | None) -> dict[str, str]:
    out = {"vdm_gates_sha256": m.gates_sha256, "vdm_gates_source": m.gates_source or "unknown",
           "vdm_backbone_id": m.backbone_id, "vdm_untrained_gates": "true" if m.untrained_gates else "false"}
    if model_sha256:
        out["vdm_model_sha256"] = model_sha256
    return out


def triton_config_text(
    onnx_path: str | os.PathLike,
    name: str,
    *,
    backend: str = DEFAULT_BACKEND,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    preferred_batch_sizes: Sequence[int] | None = None,
    max_queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
    instance_count: int = 1,
    instance_kind: str | None = None,
    tensorrt: bool = False,
    tensorrt_fp16: bool = True,
    label_file: str | None = "labels.txt",
    warmup: bool = True,
    python_path: Sequence[str] | None = None,
    intra_op_threads: int = 0,
    model_sha256: str | None = None,
) -> str:
    """The ``config.pbtxt`` text for an exported graph (shapes and types read from its metadata).

    Args:
        backend: ``onnxruntime`` (``platform: "onnxruntime_onnx"``) or ``python`` (``model.py``
            running ``OnnxExplainer``; CPU only, so ``instance_kind`` must be ``KIND_CPU``).
        instance_kind: default ``KIND_GPU`` for onnxruntime, ``KIND_CPU`` for python.
        warmup: a ``model_warmup`` batch of zeros (batch 1) before the model reports ready.
        python_path: python backend: folders added to the stub's ``sys.path`` (default
            ``default_python_path()``); intra_op_threads: its onnxruntime threads (0: onnxruntime's default).
        model_sha256: the graph's sha256, recorded as the ``vdm_model_sha256`` parameter.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    m = read_metadata(onnx_path)
    in_dims, in_type, out_dims = _io_dims(m)
    fixed = m.fixed_batch
    kind = instance_kind or ("KIND_CPU" if backend == "python" else "KIND_GPU")
    if kind not in _KINDS:
        raise ValueError(f"instance_kind must be KIND_GPU, KIND_CPU or KIND_AUTO, got {instance_kind!r}")
    if backend == "python" and kind != "KIND_CPU":
        raise ValueError(f"the python backend runs OnnxExplainer on the CPU: instance_kind must be KIND_CPU, got {kind}")
    if backend == "python" and tensorrt:
        raise ValueError("tensorrt needs the onnxruntime backend (the python backend runs on the CPU)")
    if instance_count < 1:
        raise ValueError(f"instance_count must be >= 1, got {instance_count}")
    if fixed is None and max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1 for a dynamic-batch graph, got {max_batch_size}")
    if max_queue_delay_us < 0:
        raise ValueError(f"max_queue_delay_us must be >= 0, got {max_queue_delay_us}")
    if intra_op_threads < 0:
        raise ValueError(f"intra_op_threads must be >= 0, got {intra_op_threads}")

    def batched(dims):
        return dims if fixed is None else (fixed, *dims)

    inputs = [_tensor_block(m.input_name, in_type, batched(in_dims))]
    outputs = [
        _tensor_block(o, _TYPES["float32"], batched(d), label_file=label_file if o in ("logits", "masked_logits") else None)
        for o, d in out_dims.items()
    ]
    parts = [
        f'name: "{name}"',
        'backend: "python"' if backend == "python" else 'platform: "onnxruntime_onnx"',
        f"max_batch_size: {0 if fixed is not None else int(max_batch_size)}",
        "input [\n" + ",\n".join(inputs) + "\n]",
        "output [\n" + ",\n".join(outputs) + "\n]",
    ]
    if fixed is None:
        parts.append(_batching(max_batch_size, preferred_batch_sizes, max_queue_delay_us))
    parts.append(_instances(instance_count, kind))
    if warmup:
        parts.append(
            "model_warmup [\n  {\n    name: \"zeros\"\n    batch_size: 1\n"
            f"    inputs {{ key: \"{m.input_name}\" value: {{ data_type: {in_type} dims: {_dims(batched(in_dims))} "
            "zero_data: true } }\n  }\n]"
        )
    if tensorrt:
        params = [("precision_mode", "FP16" if tensorrt_fp16 else "FP32"), ("max_workspace_size_bytes", str(1 << 30)),
                  ("trt_engine_cache_enable", "1")]
        body = "\n".join(f'        parameters {{ key: "{k}" value: "{v}" }}' for k, v in params)
        parts.append(
            "optimization {\n  execution_accelerators {\n    gpu_execution_accelerator: [\n      {\n"
            '        name: "tensorrt"\n' + body + "\n      }\n    ]\n  }\n}"
        )
    params = _provenance(m, model_sha256)
    if backend == "python":
        params.update(_python_parameters(python_path))
        params["intra_op_threads"] = str(int(intra_op_threads))
    parts.append(_parameters(params))
    return _header(m, fixed, in_dims) + "\n".join(parts) + "\n"


def _header(m: ExportMetadata, fixed, in_dims) -> str:
    return (
        f"# vdm-engine {m.engine_version}: {m.backbone_id} explainer, {m.dtype}, opset {m.opset}.\n"
        f"# Full input shape: [{'-1' if fixed is None else fixed}, {', '.join(map(str, in_dims))}] "
        f"({'uint8 RGB images' if m.uint8_input else 'normalised pixel_values'}).\n"
        f"# Metadata: {json.dumps({'gates_sha256': m.gates_sha256, 'untrained_gates': m.untrained_gates})}\n"
    )


def _python_parameters(python_path: Sequence[str] | None) -> dict[str, str]:
    paths = [str(p) for p in (default_python_path() if python_path is None else python_path)]
    return {"vdm_python_path": json.dumps(paths), "vdm_python_version": "%d.%d" % sys.version_info[:2]}


def _decode_config_text(m: ExportMetadata, name: str, *, max_batch_size: int, max_queue_delay_us: int,
                        python_path: Sequence[str] | None, max_pixels: int | None) -> str:
    in_dims, in_type, _ = _io_dims(m)
    params = {"image_processor": json.dumps(m.image_processor, sort_keys=True), "image_size": json.dumps(list(m.image_size)),
              "uint8_input": "true" if m.uint8_input else "false", "max_pixels": str(int(max_pixels or 0)),
              **_provenance(m, None), **_python_parameters(python_path)}
    return "\n".join([
        f"# vdm-engine {m.engine_version}: PNG/JPEG bytes -> {m.input_name} for {m.backbone_id} (the ensemble's first step).",
        f'name: "{name}"',
        'backend: "python"',
        f"max_batch_size: {int(max_batch_size)}",
        "input [\n" + _tensor_block("images", "TYPE_STRING", (1,)) + "\n]",
        "output [\n" + _tensor_block(m.input_name, in_type, in_dims) + "\n]",
        _batching(max_batch_size, None, max_queue_delay_us),
        _instances(1, "KIND_CPU"),
        _parameters(params),
    ]) + "\n"


def _ensemble_config_text(m: ExportMetadata, name: str, *, explainer: str, decode: str, max_batch_size: int) -> str:
    _, _, out_dims = _io_dims(m)
    outputs = ",\n".join(_tensor_block(o, _TYPES["float32"], d) for o, d in out_dims.items())
    out_map = "\n".join(f'      output_map {{ key: "{o}" value: "{o}" }}' for o in out_dims)
    return "\n".join([
        f"# vdm-engine {m.engine_version}: encoded images -> {decode} -> {explainer}.",
        f'name: "{name}"',
        'platform: "ensemble"',
        f"max_batch_size: {int(max_batch_size)}",
        "input [\n" + _tensor_block("images", "TYPE_STRING", (1,)) + "\n]",
        "output [\n" + outputs + "\n]",
        "ensemble_scheduling {\n  step [\n"
        f'    {{\n      model_name: "{decode}"\n      model_version: -1\n'
        f'      input_map {{ key: "images" value: "images" }}\n'
        f'      output_map {{ key: "{m.input_name}" value: "{m.input_name}" }}\n    }},\n'
        f'    {{\n      model_name: "{explainer}"\n      model_version: -1\n'
        f'      input_map {{ key: "{m.input_name}" value: "{m.input_name}" }}\n{out_map}\n    }}\n  ]\n}}',
        _parameters(_provenance(m, None)),
    ]) + "\n"


def python_model_text(cls: str) -> str:
    """The ``model.py`` of a python-backend model: extend ``sys.path``, then delegate to ``cls`` of
    ``vdm_engine.export.triton_python``."""
    from vdm_engine import __version__

    return f'''\
"""Triton Python-backend entry point written by vdm-engine {__version__}: vdm_engine.export.triton_python.{cls}.

The backend stub does not inherit PYTHONPATH: the folders of the environment that wrote this
repository come from the config's vdm_python_path parameter (edit it to use another environment).
"""

import json
import site
import sys


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"]).get("parameters", {{}})
        want = params.get("vdm_python_version", {{}}).get("string_value")
        have = "%d.%d" % sys.version_info[:2]
        if want and want != have:
            raise RuntimeError(f"this repository was written for Python {{want}} but the backend stub runs Python "
                               f"{{have}}; give Triton the stub for Python {{want}} or write the repository again")
        before = list(sys.path)
        for folder in json.loads(params.get("vdm_python_path", {{}}).get("string_value", "[]")):
            site.addsitedir(folder)  # runs its .pth files too (editable installs)
        # The environment's folders go first, so its packages win over the stub's own site-packages.
        sys.path[:] = [p for p in sys.path if p not in before] + before
        from vdm_engine.export.triton_python import {cls}

        self.model = {cls}()
        self.model.initialize(args)

    def execute(self, requests):
        return self.model.execute(requests)

    def finalize(self):
        self.model.finalize()
'''


def write_triton_repo(
    onnx_path: str | os.PathLike,
    repo_dir: str | os.PathLike,
    *,
    name: str | None = None,
    version: int = 1,
    backend: str = DEFAULT_BACKEND,
    ensemble: bool = False,
    max_pixels: int | None = None,
    **config,
) -> Path:
    """Add an exported graph to a Triton model repository.

    Args:
        onnx_path: a graph written by ``export_onnx`` (its external data files are copied too).
        repo_dir: the repository root (created if missing).
        name: model name (default: the file's stem, sanitised).
        version: version folder.
        backend: ``onnxruntime`` (default) or ``python`` (``model.py`` running ``OnnxExplainer``).
        ensemble: also write ``<name>_decode`` and ``<name>_ensemble`` (``ensemble_model_names``):
            PNG/JPEG bytes in (``images``, TYPE_STRING (B, 1)), the graph's outputs out. Needs a
            dynamic-batch graph. The decode step is a python-backend model whatever ``backend`` is.
        max_pixels: the decode step's decoded-pixel limit (default ``vdm_engine.images``'s).
        config: options of ``triton_config_text`` (max_batch_size, preferred_batch_sizes,
            max_queue_delay_us, instance_count, instance_kind, tensorrt, tensorrt_fp16, warmup,
            python_path, intra_op_threads).

    Returns:
        The model folder ``repo_dir/name``.
    """
    onnx_path = Path(onnx_path)
    name = name or re.sub(r"[^A-Za-z0-9_.-]+", "_", onnx_path.stem).strip("._") or "vdm_explainer"
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name.startswith("."):
        raise ValueError(f"Triton model name {name!r} must use letters, digits, '_', '-' or '.' and not start with '.'")
    if int(version) < 1:
        raise ValueError(f"Triton model version must be >= 1, got {version}")
    if "model_sha256" in config:
        raise ValueError("model_sha256 is computed from the graph; do not pass it")
    meta = read_metadata(onnx_path)
    if ensemble and meta.fixed_batch is not None:
        raise ValueError(f"an ensemble needs a dynamic-batch graph; {onnx_path} has a fixed batch of {meta.fixed_batch}")
    triton_config_text(onnx_path, name, backend=backend, **config)  # every option checked before anything is written
    model_dir = Path(repo_dir) / name
    vdir = model_dir / str(int(version))
    vdir.mkdir(parents=True, exist_ok=True)
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    data_files = {
        e.value
        for t in proto.graph.initializer
        if t.data_location == onnx.TensorProto.EXTERNAL
        for e in t.external_data
        if e.key == "location"
    }
    for rel in sorted(data_files):
        with atomic_path(vdir / rel) as tmp:
            shutil.copyfile(onnx_path.parent / rel, tmp)
    with atomic_path(vdir / "model.onnx") as tmp:
        shutil.copyfile(onnx_path, tmp)
    text = triton_config_text(onnx_path, name, backend=backend, model_sha256=sha256_file(vdir / "model.onnx"), **config)
    if backend == "python":
        atomic_write_bytes(vdir / "model.py", python_model_text("ExplainerModel").encode())
    labels = "".join(f"{meta.id2label.get(str(i), str(i))}\n" for i in range(meta.num_labels))
    atomic_write_bytes(model_dir / "labels.txt", labels.encode())
    atomic_write_bytes(model_dir / "config.pbtxt", text.encode())
    if ensemble:
        decode, whole = ensemble_model_names(name)
        max_batch = int(config.get("max_batch_size", DEFAULT_MAX_BATCH_SIZE))
        delay = int(config.get("max_queue_delay_us", DEFAULT_QUEUE_DELAY_US))
        decode_dir = Path(repo_dir) / decode
        atomic_write_bytes(decode_dir / str(int(version)) / "model.py", python_model_text("DecodeModel").encode())
        atomic_write_bytes(decode_dir / "config.pbtxt", _decode_config_text(
            meta, decode, max_batch_size=max_batch, max_queue_delay_us=delay, python_path=config.get("python_path"),
            max_pixels=max_pixels).encode())
        whole_dir = Path(repo_dir) / whole
        (whole_dir / str(int(version))).mkdir(parents=True, exist_ok=True)  # Triton wants a version folder
        atomic_write_bytes(whole_dir / "config.pbtxt", _ensemble_config_text(
            meta, whole, explainer=name, decode=decode, max_batch_size=max_batch).encode())
    return model_dir
