"""Where explain() spends its time beyond plain inference: torch.profiler tables for both.

    python benchmarks/profile_explain.py [--device cuda] [--shape vit-b16] [--batch 256] [--dtype bf16]

Prints, for plain inference and for ``explain()`` (kernels as ``VDM_KERNELS`` chooses), the
operators with the most device time (CUDA) or CPU time, so the explain/plain gap can be split into
the probes (one per depth, inside the layer loop) and the rest. Works on the CPU with small shapes.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from vdm_engine import Explainer, GateConfig, Gates
from vdm_engine.backbone import random_backbone

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="profile_explain", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", default="vit-b16")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--dtype", default="bf16", choices=tuple(DTYPES))
    p.add_argument("--rows", type=int, default=15, help="operators per table")
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    backbone = random_backbone(args.shape, seed=0).to(device=device, dtype=dtype)
    gates = Gates(GateConfig(backbone.hidden_size, backbone.num_hidden_states)).to(device)
    explainer = Explainer(backbone, gates).eval()
    print(f"kernels: {explainer.ops.backend}; {args.shape} B={args.batch} {args.dtype} on {device}")
    pv = torch.randn(args.batch, 3, *backbone.image_size, device=device, dtype=dtype)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sort = "cuda_time_total" if cuda else "cpu_time_total"

    def plain():
        with torch.no_grad():
            return backbone.hf_forward(pv)

    for name, fn in (("plain inference", plain), ("explain()", lambda: explainer.explain(pv))):
        for _ in range(3):  # warm-up: Triton JIT, cuDNN/cuBLAS heuristics
            fn()
        if cuda:
            torch.cuda.synchronize()
        with profile(activities=activities) as prof:
            for _ in range(5):
                fn()
            if cuda:
                torch.cuda.synchronize()
        print(f"\n## {name}: 5 calls\n")
        print(prof.key_averages().table(sort_by=sort, row_limit=args.rows, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
