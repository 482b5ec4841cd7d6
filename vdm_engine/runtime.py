"""OnnxExplainer: the same ``Explanation`` as the PyTorch explainer, from a graph written by ``vdm-export``.

Preprocessing comes from the graph's metadata, so a serving process needs onnxruntime, numpy,
Pillow and torch (for the returned tensors) but no checkpoint. With onnxruntime-gpu the CUDA
execution provider is used, and CUDA tensors are bound in place (IO binding: no host copies).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .preprocessing import check_pixel_values, preprocess_images, resize_images
from .explainer import Explanation

__all__ = ["OnnxExplainer", "create_session", "resolve_providers", "default_session_options"]

_CUDA = "CUDAExecutionProvider"
_CPU = "CPUExecutionProvider"


def _ort():
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ImportError(
            "onnxruntime is not installed: pip install 'vdm-engine[onnxruntime]' (CPU) or 'vdm-engine[onnxruntime-gpu]'"
        ) from e
    return ort


def resolve_providers(providers: str | Sequence = "auto") -> list:
    """Turn ``"auto"``, ``"cpu"``, ``"cuda"`` or an explicit onnxruntime provider list into a list.

    ``"auto"`` picks CUDA (then CPU as onnxruntime's own fallback for unsupported nodes) when
    onnxruntime-gpu offers it, else CPU. ``"cuda"`` raises if CUDA is not available.
    """
    available = _ort().get_available_providers()
    if isinstance(providers, str):
        key = providers.strip().lower()
        if key == "auto":
            return [_CUDA, _CPU] if _CUDA in available else [_CPU]
        if key == "cpu":
            return [_CPU]
        if key == "cuda":
            if _CUDA not in available:
                raise ValueError(
                    f"providers='cuda' but onnxruntime offers only {available}; install onnxruntime-gpu "
                    "(and a matching CUDA) or use providers='auto'"
                )
            return [_CUDA, _CPU]
        raise ValueError(f"providers must be 'auto', 'cpu', 'cuda' or a list of onnxruntime providers, got {providers!r}")
    providers = list(providers)
    if not providers:
        raise ValueError("providers is an empty list; expected e.g. ['CPUExecutionProvider']")
    for p in providers:
        name = p[0] if isinstance(p, tuple) else p
        if name not in available:
            raise ValueError(f"execution provider {name!r} is not available; onnxruntime offers {available}")
    return providers


def default_session_options(threads: int | None = None, *, spinning: bool | None = None):
    """The ``onnxruntime.SessionOptions`` every session here starts from (plain and explain graphs alike).

    Args:
        threads: intra-op threads (None: onnxruntime's default, one per physical core).
        spinning: whether idle intra-op threads spin for work (``session.intra_op.allow_spinning``);
            None: off when ``OMP_WAIT_POLICY=PASSIVE`` is set (a machine shared with other work),
            else onnxruntime's default (on).
    """
    ort = _ort()
    opts = ort.SessionOptions()
    if threads is not None:
        if int(threads) < 1:
            raise ValueError(f"threads must be >= 1 (or None for onnxruntime's default), got {threads}")
        opts.intra_op_num_threads = int(threads)
    if spinning is None and os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE":
        spinning = False
    if spinning is not None:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return opts


def create_session(path: str | os.PathLike, providers: str | Sequence = "auto", session_options=None):
    """An ``onnxruntime.InferenceSession`` on ``path`` with ``resolve_providers(providers)``;
    ``session_options`` default: ``default_session_options()``."""
    if session_options is None:
        session_options = default_session_options()
    ort = _ort()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no ONNX model at {path}")
    providers = resolve_providers(providers)
    try:
        return ort.InferenceSession(str(path), sess_options=session_options, providers=providers)
    except Exception as e:  # onnxruntime's own error types derive from Exception only
        if not type(e).__module__.startswith("onnxruntime"):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: onnxruntime cannot load this graph: {first}") from None


def _load_graph(path: Path):
    """The graph's ``ModelProto`` without its weights; one-line errors for a file that is not an ONNX
    graph, and for external-data files that are missing or shorter than the graph says."""
    import onnx

    if not path.is_file():
        raise FileNotFoundError(f"no ONNX model at {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf decode errors have no common type
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} is not an ONNX model, or it is truncated ({first})") from None
    if not model.HasField("graph") or not model.ir_version:
        raise ValueError(f"{path} is not an ONNX model (no graph in it); pass a .onnx file written by vdm-export")
    needed: dict[str, int] = {}
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            loc = info.get("location", "")
            end = int(info.get("offset") or 0) + int(info.get("length") or 0)
            needed[loc] = max(needed.get(loc, 0), end)
    for loc, end in needed.items():
        data = path.parent / loc
        if not data.is_file():
            raise FileNotFoundError(
                f"{path}: its weights file {loc} is missing (expected at {data}); keep the graph and its "
                ".data file together when moving or copying them, or export again"
            )
        if data.stat().st_size < end:
            raise ValueError(
                f"{path}: its weights file {data} is truncated ({data.stat().st_size} bytes, the graph needs {end}); "
                "copy it again or export again"
            )
    return model


class OnnxExplainer:
    """Explain images with an exported graph (``vdm_engine.export.export_onnx`` / ``vdm-export``).

    Args:
        path: the ``.onnx`` file.
        providers: ``"auto"`` (CUDA when onnxruntime-gpu is installed, else CPU), ``"cpu"``,
            ``"cuda"``, or an onnxruntime provider list.
        session_options: optional ``onnxruntime.SessionOptions``.

    Attributes:
        metadata: the graph's ``ExportMetadata``; grid, image_size, num_labels, id2label, input_name,
        output_names, uint8_input and fixed_batch are read from it.
    """

    def __init__(self, path: str | os.PathLike, providers: str | Sequence = "auto", *, session_options=None):
        from .metadata import read_metadata

        self.path = Path(path)
        self.metadata = read_metadata(_load_graph(self.path))
        self.session = create_session(self.path, providers, session_options)
        (inp,) = self.session.get_inputs()
        self.input_name = inp.name
        self.output_names = [o.name for o in self.session.get_outputs()]
        m = self.metadata
        if list(self.output_names) != list(m.outputs) or self.input_name != m.input_name:
            raise ValueError(
                f"{self.path}: graph inputs/outputs {self.input_name}/{self.output_names} do not match its "
                f"metadata {m.input_name}/{list(m.outputs)}; re-export the model"
            )
        self.image_spec = m.image_spec
        self.grid = tuple(m.patch_grid)
        self.image_size = tuple(m.image_size)
        self.num_labels = m.num_labels
        self.num_hidden_states = m.num_hidden_states
        self.id2label = {int(k): v for k, v in m.id2label.items()}
        self.uint8_input = m.uint8_input
        self.fixed_batch = m.fixed_batch

    def __repr__(self) -> str:
        return (
            f"OnnxExplainer({str(self.path)!r}, providers={self.providers}, input={self.input_name}, "
            f"outputs={self.output_names})"
        )

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    # ----- input ------------------------------------------------------------------------------
    def preprocess(self, images) -> torch.Tensor:
        """Images -> this graph's input, using the preprocessing stored in the metadata.

        Accepts what ``Explainer.preprocess`` accepts (PIL images, uint8 arrays or tensors, lists of
        them) through the same ``preprocess_images``, so both give identical pixel values. Returns
        float32 ``pixel_values (B, 3, H, W)``, or for a uint8-input graph the images resized to the
        model size as uint8 ``(B, H, W, 3)`` (``resize_images``: rescale and normalisation happen
        inside the graph).
        """
        if self.uint8_input:
            return resize_images(images, self.image_spec)
        return preprocess_images(images, self.image_spec)

    def check_inputs(self, x) -> torch.Tensor:
        """Validate a graph input as the core does; return it as a torch tensor of the graph's dtype."""
        H, W = self.image_size
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(np.ascontiguousarray(x))
        if self.uint8_input:
            exp = f"(B, {H}, {W}, 3) uint8"
            if not isinstance(x, torch.Tensor):
                raise ValueError(f"images must be a uint8 tensor or array {exp}, got {type(x).__name__}; use preprocess(images)")
            if x.dtype != torch.uint8:
                raise ValueError(f"this graph takes raw uint8 images {exp}, got dtype {x.dtype}; use preprocess(images)")
            if x.dim() != 4 or tuple(x.shape[1:]) != (H, W, 3):
                raise ValueError(f"images must have shape {exp}, got {tuple(x.shape)}; use preprocess(images) to resize")
            if x.shape[0] == 0:
                raise ValueError(f"images is an empty batch; expected at least one image {exp}")
        else:
            if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != torch.float32:
                x = x.float()
            check_pixel_values(x, 3, (H, W))
        if self.fixed_batch is not None and x.shape[0] != self.fixed_batch:
            raise ValueError(
                f"this graph was exported with a fixed batch of {self.fixed_batch}, got a batch of {x.shape[0]}; "
                "re-export with a dynamic batch (the default) or pad the batch"
            )
        return x.contiguous()

    # ----- run --------------------------------------------------------------------------------
    def run(self, x) -> dict[str, torch.Tensor]:
        """Run the graph on a validated input; returns {output name: float32 tensor} on x's device.

        CUDA tensors with the CUDA execution provider are bound in place (IO binding).
        """
        x = self.check_inputs(x)
        if x.is_cuda and _CUDA in self.providers:
            return self._run_cuda(x)
        outs = self.session.run(None, {self.input_name: x.detach().cpu().numpy()})
        return {n: torch.from_numpy(np.asarray(o)).to(x.device) for n, o in zip(self.output_names, outs)}

    def _output_shape(self, name: str, B: int) -> tuple[int, ...]:
        return {
            "logits": (B, self.num_labels),
            "patch_mask": (B, self.num_patches),
            "layer_masks": (B, self.num_hidden_states, self.num_patches),
            "masked_logits": (B, self.num_labels),
            "kl": (B,),
            "patch_rank": (B, self.num_patches),
        }[name]

    def _run_cuda(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        dev = x.device.index or 0
        opts = self.session.get_provider_options().get(_CUDA, {})
        session_dev = int(opts.get("device_id", 0))
        if dev != session_dev:
            raise ValueError(
                f"the input is on cuda:{dev} but the onnxruntime session runs on cuda:{session_dev}; move the "
                f"input, or pass providers=[('CUDAExecutionProvider', {{'device_id': {dev}}})]"
            )
        binding = self.session.io_binding()
        elem = np.uint8 if self.uint8_input else np.float32
        binding.bind_input(self.input_name, "cuda", dev, elem, tuple(x.shape), x.data_ptr())
        outs = {}
        for name in self.output_names:
            t = torch.empty(self._output_shape(name, x.shape[0]), dtype=torch.float32, device=x.device)
            binding.bind_output(name, "cuda", dev, np.float32, tuple(t.shape), t.data_ptr())
            outs[name] = t
        torch.cuda.current_stream(x.device).synchronize()  # x was produced on torch's stream
        self.session.run_with_iobinding(binding)
        return outs

    def explain(self, x) -> Explanation:
        """Explain a batch: ``pixel_values (B, 3, H, W)`` float (or uint8 ``(B, H, W, 3)`` for a
        uint8-input graph), as from ``preprocess``.

        Returns:
            ``Explanation`` with logits (B, C), patch_mask (B, N) and layer_masks (B, L+2, N); the
            graph must have been exported with the ``logits`` and ``patch_mask`` outputs.
            ``layer_masks`` (and ``patch_rank``, K-level gates) is None unless the graph has that output.
        """
        missing = [o for o in ("logits", "patch_mask") if o not in self.output_names]
        if missing:
            raise ValueError(f"{self.path} lacks outputs {missing}; export with outputs including logits and patch_mask")
        out = self.run(x)
        return Explanation(
            logits=out["logits"],
            patch_mask=out["patch_mask"],
            layer_masks=out.get("layer_masks"),
            grid=self.grid,
            image_size=self.image_size,
            gates_source=self.metadata.gates_source or None,
            gates_sha256=self.metadata.gates_sha256 or None,
            patch_rank=out.get("patch_rank"),
        )

    def __call__(self, x) -> Explanation:
        return self.explain(x)
