"""Checks every export must pass: the ONNX checker, then onnxruntime against the PyTorch explainer.

Outputs are compared one by one: shape first, then the maximum absolute difference against the
dtype's tolerance (fp32 1e-4, fp16 1e-2). Differences are logged at INFO; a failure raises
``ExportValidationError`` (a ``RuntimeError``: the CLI exits 1).
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Sequence

import numpy as np
import torch

from vdm_engine.explainer import Explainer, Explanation

from .defaults import TOLERANCES
from .graph import normalize_outputs

__all__ = [
    "ExportValidationError",
    "TOLERANCES",
    "check_onnx",
    "validate_onnx",
    "compare_outputs",
    "structured_images",
    "graph_inputs",
    "time_onnx",
]

logger = logging.getLogger("vdm_engine.export")



class ExportValidationError(RuntimeError):
    """The exported graph failed the checker or disagrees with PyTorch."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def check_onnx(path: str | os.PathLike) -> None:
    """``onnx.checker`` with ``full_check`` (shape inference included) on a saved model.

    Checking by path lets the checker follow external data (models over 2 GB).
    """
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:  # ValidationError, InferenceError, ...
        raise ExportValidationError(f"onnx.checker rejected the exported graph: {_first_line(e)}") from e


def structured_images(n: int, size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Deterministic uint8 (n, H, W, 3) images with image-like statistics (not photographs).

    Smooth colour gradients, a few discs and stripes and mild noise: unlike Gaussian pixels they
    span the real [0, 255] range with large flat regions and sharp edges, which is what
    normalisation and the first layers see on real data. Used when no real images are given.
    """
    rng = np.random.default_rng(seed)
    H, W = size
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    out = np.empty((n, H, W, 3), dtype=np.uint8)
    for i in range(n):
        c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        t = (np.cos(rng.uniform(0, 2 * math.pi)) * xx / W + np.sin(rng.uniform(0, 2 * math.pi)) * yy / H + 1) / 2
        img = c0 * (1 - t[..., None]) + c1 * t[..., None]
        for _ in range(rng.integers(1, 4)):
            cy, cx, r = rng.uniform(0, H), rng.uniform(0, W), rng.uniform(0.1, 0.35) * min(H, W)
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
        if rng.random() < 0.5:
            period = rng.uniform(3, max(4.0, W / 3))
            img[(xx // period) % 2 == 0] *= 0.6
        img += rng.normal(0, 6, img.shape)
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def graph_inputs(explainer: Explainer, images, *, uint8_input: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Images -> (graph input, float pixel values for PyTorch).

    The graph input is the preprocessed float32 (B, 3, H, W) batch, or for ``uint8_input`` the
    images resized to the model size as uint8 (B, H, W, 3).
    """
    from dataclasses import replace

    spec = explainer.backbone.image_spec
    pv = explainer.backbone.preprocess(images)
    if not uint8_input:
        return pv, pv
    raw = replace(spec, do_rescale=False, do_normalize=False)
    from vdm_engine.backbone import preprocess_images

    u8 = preprocess_images(images, raw).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    return u8, pv


def compare_outputs(got: dict[str, np.ndarray], expected: dict[str, torch.Tensor], atol: float, what: str) -> dict[str, float]:
    """Shape first, then max |diff| per output; raise ``ExportValidationError`` naming the output.

    Returns:
        {output name: max absolute difference}.
    """
    diffs = {}
    for name, ref in expected.items():
        ref = ref.detach().float().cpu().numpy()
        if name not in got:
            raise ExportValidationError(f"{what}: the graph did not return output {name!r}")
        out = np.asarray(got[name])
        if out.shape != ref.shape:
            raise ExportValidationError(f"{what}: output {name!r} has shape {out.shape}, PyTorch gives {ref.shape}")
        if not np.isfinite(out).all() and np.isfinite(ref).all():
            raise ExportValidationError(f"{what}: output {name!r} has {int((~np.isfinite(out)).sum())} NaN/Inf values")
        diff = float(np.abs(out.astype(np.float64) - ref.astype(np.float64)).max()) if out.size else 0.0
        diffs[name] = diff
        logger.info("%s: %s max |onnxruntime - pytorch| = %.3e (tolerance %.1e)", what, name, diff, atol)
        if not diff <= atol:
            raise ExportValidationError(
                f"{what}: output {name!r} differs from PyTorch by {diff:.3e} > tolerance {atol:.1e}"
            )
    return diffs


def _reference(explainer: Explainer, pv: torch.Tensor, outputs: Sequence[str], ort_patch_mask: np.ndarray | None, threshold: float) -> dict[str, torch.Tensor]:
    """What the PyTorch explainer's public API says for ``pv``.

    ``masked_logits``/``kl`` are checked with the hard mask the graph itself chose (from its own
    ``patch_mask``, which is compared separately), so a probability within rounding of the
    threshold cannot flip a patch between the two runs.
    """
    ex = explainer.explain(pv)
    ref = {"logits": ex.logits, "patch_mask": ex.patch_mask, "layer_masks": ex.layer_masks, "patch_rank": ex.patch_rank}
    if "masked_logits" in outputs or "kl" in outputs:
        pm = torch.as_tensor(ort_patch_mask).to(ex.patch_mask.device) if ort_patch_mask is not None else ex.patch_mask
        v = explainer.verify(pv, Explanation(ex.logits, pm, ex.layer_masks, ex.grid, ex.image_size), threshold)
        ref["masked_logits"], ref["kl"] = v.masked_logits, v.kl
    return {o: ref[o] for o in outputs}


def validate_onnx(
    path: str | os.PathLike,
    explainer: Explainer,
    *,
    outputs: Sequence[str],
    uint8_input: bool = False,
    batch: str | int = "dynamic",
    traced_batch: int = 2,
    atol: float = TOLERANCES["fp32"],
    threshold: float = 0.5,
    images=None,
    providers="auto",
    seed: int = 0,
) -> dict[str, float]:
    """Run the saved graph in onnxruntime and compare it with ``explainer`` (fp32 PyTorch).

    Inputs: random ones (Gaussian pixels or uniform uint8) at a batch size other than the traced
    one and at batch 1 for a dynamic batch axis (else at the fixed size), then ``images`` (real
    uint8 images; default ``structured_images``) through the checkpoint's preprocessing.

    Returns:
        {output name: max absolute difference over all inputs}.
    """
    from vdm_engine.runtime import create_session

    outputs = normalize_outputs(outputs)
    try:
        session = create_session(path, providers)
    except (ValueError, FileNotFoundError):
        raise
    except Exception as e:  # onnxruntime's own error types
        raise ExportValidationError(f"onnxruntime could not load the exported graph: {_first_line(e)}") from e
    (inp,) = session.get_inputs()
    out_names = [o.name for o in session.get_outputs()]
    if list(out_names) != list(outputs):
        raise ExportValidationError(f"the graph's outputs are {out_names}, expected {list(outputs)}")
    bb = explainer.backbone
    H, W = bb.image_size
    fixed = None if batch == "dynamic" else int(batch)
    random_sizes = [fixed] if fixed else [traced_batch + 1, 1]
    gen = torch.Generator().manual_seed(seed)
    sets = []
    for b in random_sizes:
        if uint8_input:
            x = torch.randint(0, 256, (b, H, W, 3), dtype=torch.uint8, generator=gen)
            sets.append((f"random uint8 batch {b}", x, graph_inputs(explainer, x.numpy(), uint8_input=True)[1]))
        else:
            x = torch.randn(b, 3, H, W, generator=gen)
            sets.append((f"random batch {b}", x, x))
    n_real = fixed or 4
    if images is None:
        images, source = structured_images(n_real, (H, W), seed=seed), "structured images"
    else:
        source = "real images"
        images = list(images) if not isinstance(images, np.ndarray) else images
        if len(images) == 0:
            raise ValueError("validation images are empty; pass at least one image or None")
        reps = -(-n_real // len(images))
        images = (list(images) * reps)[:n_real] if fixed else list(images)[:n_real]
    gx, pv = graph_inputs(explainer, images, uint8_input=uint8_input)
    sets.append((f"{source} batch {gx.shape[0]}", gx, pv))

    worst: dict[str, float] = {}
    for what, x, pv in sets:
        feed = {inp.name: x.detach().cpu().numpy()}
        try:
            got = dict(zip(out_names, session.run(None, feed)))
        except Exception as e:  # onnxruntime's own error types
            raise ExportValidationError(f"{what}: onnxruntime failed to run the graph: {_first_line(e)}") from e
        ref = _reference(explainer, pv.to(bb.device), outputs, got.get("patch_mask"), threshold)
        for k, v in compare_outputs(got, ref, atol, what).items():
            worst[k] = max(worst.get(k, 0.0), v)
    return worst


def time_onnx(
    path: str | os.PathLike, batch_sizes: Sequence[int], *, providers="auto", max_repeats: int = 5, budget_s: float = 2.0
) -> dict[int, float]:
    """Median milliseconds per ``session.run`` at each batch size, on random inputs.

    Each size gets one warm-up run, then timed runs until ``budget_s`` seconds are spent (at least
    one, at most ``max_repeats``), so a large model on a CPU is not timed for minutes.
    """
    from vdm_engine.runtime import create_session

    session = create_session(path, providers)
    (inp,) = session.get_inputs()
    shape = [d if isinstance(d, int) else None for d in inp.shape]
    uint8 = inp.type == "tensor(uint8)"
    rng = np.random.default_rng(0)
    res = {}
    for b in batch_sizes:
        dims = [b] + shape[1:]
        if uint8:
            x = rng.integers(0, 256, dims, dtype=np.uint8)
        else:
            x = rng.standard_normal(dims, dtype=np.float32)
        session.run(None, {inp.name: x})
        times: list[float] = []
        while not times or (len(times) < max_repeats and sum(times) < budget_s * 1e3):
            t0 = time.perf_counter()
            session.run(None, {inp.name: x})
            times.append((time.perf_counter() - t0) * 1e3)
        res[b] = float(np.median(times))
    return res
