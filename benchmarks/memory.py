"""Peak memory of one call: the bytes a function allocates beyond what was live before it ran.

CUDA: ``torch.cuda.max_memory_allocated`` after a reset, minus the memory allocated before the
call. CPU: ``tracemalloc`` does not see tensors (PyTorch's CPU allocator bypasses Python's), and
the process RSS keeps freed pages in malloc's arenas, so the CPU figure comes from the PyTorch
profiler's memory events: every tensor allocation and free in order, whose running sum peaks at the
figure reported. Both count tensors only (not onnxruntime's own arenas).
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["peak_call_bytes", "tensor_bytes"]


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes held by a module's parameters and buffers (the memory a call starts from)."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def _running_peak(events: list[tuple[int, int]]) -> int:
    """Max over time of the running sum of (time, +/- bytes) allocation events; 0 if none."""
    live = peak = 0
    for _, nbytes in sorted(events):
        live += nbytes
        peak = max(peak, live)
    return peak


def peak_call_bytes(fn: Callable, *args, cuda: bool = False) -> int:
    """Peak bytes allocated by one ``fn(*args)`` call above the memory live before it (outputs included)."""
    if cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn(*args)
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - before)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(*args)
    events = [(e.start_ns(), int(e.nbytes())) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    return _running_peak(events)


def main(argv=None) -> int:
    """``python -m benchmarks.memory [--shape vit-b16] [--batch 64]``: peak call bytes, plain vs explain.

    Also times the stacked path the engine used before the probes moved into the layer loop
    (``Backbone.hidden_states`` + ``gate_probe_stacked``), for comparison.
    """
    import argparse
    import json

    from benchmarks.conftest import BENCH_SHAPES, random_gates
    from vdm_engine import Explainer, masks
    from vdm_engine.backbone import random_backbone
    from vdm_engine.gates import gate_probe_stacked

    p = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=main.__doc__.splitlines()[0])
    p.add_argument("--shape", default="vit-b16")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"), help="backbone dtype (gates stay fp32)")
    args = p.parse_args(argv)
    from benchmarks.conftest import DTYPES

    dtype = DTYPES[args.dtype]
    backbone = random_backbone(BENCH_SHAPES.get(args.shape, args.shape), seed=0).to(args.device, dtype)
    explainer = Explainer(backbone, random_gates(backbone).to(args.device)).eval()  # auto: Triton on CUDA
    pv = torch.randn(args.batch, 3, *backbone.image_size, device=args.device, dtype=dtype)
    cuda = args.device == "cuda"

    def plain():
        with torch.no_grad():
            return backbone.hf_forward(pv)

    def stacked():  # the explain path before this change: every hidden state kept, then all probes
        with torch.no_grad():
            logits, hidden = backbone.hidden_states(pv)
            return logits, masks.layer_masks(gate_probe_stacked(hidden, explainer.gates.probe_params()))

    weights = tensor_bytes(explainer)
    row = {"shape": args.shape, "batch": args.batch, "device": args.device, "dtype": args.dtype, "weights_bytes": weights}
    for name, fn in (("plain", plain), ("explain", lambda: explainer.explain(pv)), ("explain_stacked", stacked)):
        fn()  # warm-up
        row[f"{name}_peak_call_bytes"] = peak_call_bytes(fn, cuda=cuda)
    for name in ("explain", "explain_stacked"):
        calls = row[f"{name}_peak_call_bytes"] / row["plain_peak_call_bytes"]
        total = (row[f"{name}_peak_call_bytes"] + weights) / (row["plain_peak_call_bytes"] + weights)
        row[f"{name}_over_plain_call"], row[f"{name}_over_plain_with_weights"] = round(calls, 3), round(total, 3)
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
