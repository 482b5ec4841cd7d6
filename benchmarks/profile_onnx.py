"""Where the fused explain graph spends its time beyond the plain graph, per onnxruntime op type.

    python -m benchmarks.profile_onnx [--shape vit-small] [--batch 8] [--threads 1 2] [--runs 20] [--out FILE.md]
                                      [--per-depth-probes] [--graphs DIR [--save]]

Exports the plain graph (logits only) and the fused explain graph (logits, patch_mask,
layer_masks) of a random-weight ViT, runs each with onnxruntime's profiler for ``--runs`` calls per
thread count, and writes a markdown summary: wall time per call (min and median), and per op type
the summed kernel time per call in both graphs, so the explain/plain gap can be pinned on the ops
the gate probes and masks add. On a shared machine the min over calls is the figure to compare.
Sessions use ``runtime.default_session_options`` (what ``OnnxExplainer`` uses).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from benchmarks.conftest import BENCH_SHAPES, cpu_model_name, random_gates


def _build(shape: str):
    from vdm_engine import Explainer
    from vdm_engine.backbone import random_backbone

    backbone = random_backbone(BENCH_SHAPES.get(shape, shape), seed=0)
    return Explainer(backbone, random_gates(backbone)).eval()


def export_pair(explainer, folder: Path, fused_probes: bool = True) -> dict[str, Path]:
    """{"plain": logits-only graph, "explain": fused graph} exported into ``folder``
    (``fused_probes=False``: the probes per depth, the graph before the wide probe layout)."""
    from vdm_engine.export import export_onnx

    paths = {}
    for name, outputs in (("plain", ("logits",)), ("explain", ("logits", "patch_mask", "layer_masks"))):
        paths[name] = folder / f"{name}.onnx"
        export_onnx(explainer, paths[name], outputs=outputs, validate=False, random_weights=True, untrained_gates=True,
                    fused_probes=fused_probes)
    return paths


def profile_graph(path: Path, feed_x: np.ndarray, threads: int, runs: int, prefix: str) -> dict:
    """Run ``path`` ``runs`` times with the profiler on; per-call wall times and per-op-type kernel time."""
    import onnxruntime as ort

    from vdm_engine.runtime import default_session_options

    opts = default_session_options(threads)  # what OnnxExplainer and the plain sessions use
    opts.enable_profiling = True
    opts.profile_file_prefix = prefix
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    for _ in range(3):
        sess.run(None, {name: feed_x})
    walls, cpus = [], []
    for _ in range(runs):
        t, c = time.perf_counter(), time.process_time()
        sess.run(None, {name: feed_x})
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    trace = json.loads(Path(sess.end_profiling()).read_text())
    by_type: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for ev in trace:
        if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
            op = ev.get("args", {}).get("op_name", "?")
            by_type[op] += ev["dur"] / 1e3  # ms
            count[op] += 1
    calls = runs + 3
    return {
        "wall_ms_min": 1e3 * min(walls), "wall_ms_median": 1e3 * statistics.median(walls),
        "cpu_ms_min": 1e3 * min(cpus), "cpu_ms_median": 1e3 * statistics.median(cpus),
        "op_ms": {k: v / calls for k, v in by_type.items()}, "op_nodes": {k: count[k] // calls for k in count},
    }


def summary(results: dict, shape: str, batch: int) -> str:
    """Markdown: wall time per graph and thread count, and the per-op-type table."""
    lines = [f"# onnxruntime profile: {shape}, batch {batch}, fp32, CPU", "",
             f"CPU: {cpu_model_name()}, {os.cpu_count()} cores; onnxruntime {_ort_version()}; "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; 1-min load at the end {os.getloadavg()[0]:.1f}", "",
             "Wall ms per call, and process CPU ms per call (all threads; less sensitive than wall time to "
             "other work on the machine, and it shows threading overhead).", "",
             "| threads | plain wall ms (min / median) | explain wall ms (min / median) | explain/plain throughput "
             "(min wall) | plain CPU ms (min) | explain CPU ms (min) | explain/plain CPU (min) |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for threads, r in sorted(results.items()):
        p, e = r["plain"], r["explain"]
        cpu = (f"{p['cpu_ms_min']:.1f} | {e['cpu_ms_min']:.1f} | {e['cpu_ms_min'] / p['cpu_ms_min']:.3f}"
               if "cpu_ms_min" in p else " | | ")
        lines.append(f"| {threads} | {p['wall_ms_min']:.1f} / {p['wall_ms_median']:.1f} | "
                     f"{e['wall_ms_min']:.1f} / {e['wall_ms_median']:.1f} | {p['wall_ms_min'] / e['wall_ms_min']:.3f} | {cpu} |")
    for threads, r in sorted(results.items()):
        p, e = r["plain"], r["explain"]
        ops = sorted(set(p["op_ms"]) | set(e["op_ms"]), key=lambda k: -(e["op_ms"].get(k, 0) - p["op_ms"].get(k, 0)))
        lines += ["", f"## {threads} thread(s): kernel time per call by op type (sum over nodes)", "",
                  "| op type | plain nodes | plain ms | explain nodes | explain ms | explain - plain ms |",
                  "|---|---:|---:|---:|---:|---:|"]
        for k in ops:
            pm, em = p["op_ms"].get(k, 0.0), e["op_ms"].get(k, 0.0)
            lines.append(f"| {k} | {p['op_nodes'].get(k, 0)} | {pm:.2f} | {e['op_nodes'].get(k, 0)} | {em:.2f} | {em - pm:+.2f} |")
        lines.append(f"| **all kernels** | | {sum(p['op_ms'].values()):.2f} | | {sum(e['op_ms'].values()):.2f} | "
                     f"{sum(e['op_ms'].values()) - sum(p['op_ms'].values()):+.2f} |")
    return "\n".join(lines) + "\n"


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="profile_onnx", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="vit-small", help="vit-small (default) or a key of vdm_engine.backbone.SHAPES")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--out", default=None, help="write the markdown summary here (and print it)")
    p.add_argument("--json", default=None, help="also write the raw figures as JSON")
    p.add_argument("--graphs", default=None, metavar="DIR",
                   help="profile plain.onnx and explain.onnx from DIR (exported earlier, e.g. by older code) "
                        "instead of exporting; with --save, export into DIR and stop")
    p.add_argument("--save", action="store_true", help="only export the two graphs into --graphs DIR")
    p.add_argument("--per-depth-probes", action="store_true",
                   help="export the explain graph with the probes per depth (the graph before the wide probe layout)")
    args = p.parse_args(argv)
    explainer = _build(args.shape)
    h, w = explainer.backbone.image_size
    x = torch.randn(args.batch, 3, h, w, generator=torch.Generator().manual_seed(0)).numpy()
    if args.save:
        Path(args.graphs).mkdir(parents=True, exist_ok=True)
        print(export_pair(explainer, Path(args.graphs), fused_probes=not args.per_depth_probes))
        return 0
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.graphs:
            paths = {name: Path(args.graphs) / f"{name}.onnx" for name in ("plain", "explain")}
        else:
            paths = export_pair(explainer, Path(tmp), fused_probes=not args.per_depth_probes)
        for threads in args.threads:
            results[threads] = {name: profile_graph(path, x, threads, args.runs, str(Path(tmp) / f"{name}-{threads}"))
                                for name, path in paths.items()}
    text = summary(results, args.shape, args.batch)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
