"""Triton Inference Server model repository for an exported graph.

Layout (Triton's ``onnxruntime_onnx`` backend)::

    REPO/<name>/config.pbtxt
    REPO/<name>/labels.txt          class names, one a line (Triton's classification extension)
    REPO/<name>/1/model.onnx        (+ external data beside it for graphs over 2 GB)

With a dynamic batch axis the config sets ``max_batch_size`` and lists each tensor's dims without
the batch dimension (Triton prepends it as -1), and turns on ``dynamic_batching``. A graph with a
fixed batch gets ``max_batch_size: 0`` and full dims.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Sequence

from vdm_engine._io import atomic_path, atomic_write_bytes

from vdm_engine.metadata import read_metadata

__all__ = ["write_triton_repo", "triton_config_text", "DEFAULT_MAX_BATCH_SIZE"]

#: ``max_batch_size`` of a dynamic-batch graph's config (``vdm-export --triton-max-batch``).
DEFAULT_MAX_BATCH_SIZE = 32

_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "uint8": "TYPE_UINT8"}


def _dims(dims: Sequence[int]) -> str:
    return "[ " + ", ".join(str(int(d)) for d in dims) + " ]"


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


def triton_config_text(
    onnx_path: str | os.PathLike,
    name: str,
    *,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    preferred_batch_sizes: Sequence[int] | None = None,
    max_queue_delay_us: int = 100,
    instance_count: int = 1,
    instance_kind: str = "KIND_GPU",
    tensorrt: bool = False,
    tensorrt_fp16: bool = True,
    label_file: str | None = "labels.txt",
) -> str:
    """The ``config.pbtxt`` text for an exported graph (shapes and types read from its metadata)."""
    m = read_metadata(onnx_path)
    H, W = m.image_size
    S, N, C = m.num_hidden_states, m.patch_grid[0] * m.patch_grid[1], m.num_labels
    in_dims = (H, W, 3) if m.uint8_input else (3, H, W)
    in_type = _TYPES["uint8"] if m.uint8_input else _TYPES["float32"]
    out_dims = {"logits": (C,), "patch_mask": (N,), "layer_masks": (S, N), "masked_logits": (C,), "kl": (), "patch_rank": (N,)}
    fixed = m.fixed_batch
    if instance_kind not in ("KIND_GPU", "KIND_CPU", "KIND_AUTO"):
        raise ValueError(f"instance_kind must be KIND_GPU, KIND_CPU or KIND_AUTO, got {instance_kind!r}")
    if instance_count < 1:
        raise ValueError(f"instance_count must be >= 1, got {instance_count}")
    if fixed is None and max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1 for a dynamic-batch graph, got {max_batch_size}")
    if max_queue_delay_us < 0:
        raise ValueError(f"max_queue_delay_us must be >= 0, got {max_queue_delay_us}")

    def batched(dims):
        return dims if fixed is None else (fixed, *dims)

    inputs = [_tensor_block(m.input_name, in_type, batched(in_dims))]
    outputs = [
        _tensor_block(o, _TYPES["float32"], batched(out_dims[o]), label_file=label_file if o in ("logits", "masked_logits") else None)
        for o in m.outputs
    ]
    parts = [
        f'name: "{name}"',
        'platform: "onnxruntime_onnx"',
        f"max_batch_size: {0 if fixed is not None else int(max_batch_size)}",
        "input [\n" + ",\n".join(inputs) + "\n]",
        "output [\n" + ",\n".join(outputs) + "\n]",
    ]
    if fixed is None:
        pref = preferred_batch_sizes
        if pref is None:
            pref = [b for b in (4, 8, 16, 32) if b <= max_batch_size] or [max_batch_size]
        bad = [b for b in pref if not 1 <= int(b) <= max_batch_size]
        if bad:
            raise ValueError(f"preferred batch sizes {bad} are outside [1, max_batch_size={max_batch_size}]")
        parts.append(
            "dynamic_batching {\n"
            f"  preferred_batch_size: {_dims(sorted(set(int(b) for b in pref)))}\n"
            f"  max_queue_delay_microseconds: {int(max_queue_delay_us)}\n"
            "}"
        )
    parts.append(f"instance_group [\n  {{\n    count: {int(instance_count)}\n    kind: {instance_kind}\n  }}\n]")
    if tensorrt:
        params = [("precision_mode", "FP16" if tensorrt_fp16 else "FP32"), ("max_workspace_size_bytes", str(1 << 30)),
                  ("trt_engine_cache_enable", "1")]
        body = "\n".join(f'        parameters {{ key: "{k}" value: "{v}" }}' for k, v in params)
        parts.append(
            "optimization {\n  execution_accelerators {\n    gpu_execution_accelerator: [\n      {\n"
            '        name: "tensorrt"\n' + body + "\n      }\n    ]\n  }\n}"
        )
    header = (
        f"# vdm-engine {m.engine_version}: {m.backbone_id} explainer, {m.dtype}, opset {m.opset}.\n"
        f"# Full input shape: [{'-1' if fixed is None else fixed}, {', '.join(map(str, in_dims))}] "
        f"({'uint8 RGB images' if m.uint8_input else 'normalised pixel_values'}).\n"
        f"# Metadata: {json.dumps({'gates_sha256': m.gates_sha256, 'untrained_gates': m.untrained_gates})}\n"
    )
    return header + "\n".join(parts) + "\n"


def write_triton_repo(
    onnx_path: str | os.PathLike,
    repo_dir: str | os.PathLike,
    *,
    name: str | None = None,
    version: int = 1,
    **config,
) -> Path:
    """Add an exported graph to a Triton model repository.

    Args:
        onnx_path: a graph written by ``export_onnx`` (its external data files are copied too).
        repo_dir: the repository root (created if missing).
        name: model name (default: the file's stem, sanitised).
        version: version folder.
        config: options of ``triton_config_text`` (max_batch_size, preferred_batch_sizes,
            max_queue_delay_us, instance_count, instance_kind, tensorrt, tensorrt_fp16).

    Returns:
        The model folder ``repo_dir/name``.
    """
    onnx_path = Path(onnx_path)
    name = name or re.sub(r"[^A-Za-z0-9_.-]+", "_", onnx_path.stem).strip("._") or "vdm_explainer"
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name.startswith("."):
        raise ValueError(f"Triton model name {name!r} must use letters, digits, '_', '-' or '.' and not start with '.'")
    if int(version) < 1:
        raise ValueError(f"Triton model version must be >= 1, got {version}")
    text = triton_config_text(onnx_path, name, **config)
    meta = read_metadata(onnx_path)
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
    labels = "".join(f"{meta.id2label.get(str(i), str(i))}\n" for i in range(meta.num_labels))
    atomic_write_bytes(model_dir / "labels.txt", labels.encode())
    atomic_write_bytes(model_dir / "config.pbtxt", text.encode())
    return model_dir
