"""Issue 16's two CPU targets in one table: int8 speed on the ViT-B/16 shape, the fused graph at two threads.

    python -m benchmarks.cpu_targets [--out DIR] [--graphs DIR] [--rounds 8] [--only int8 threads]

1. int8: ViT-B/16 shape (random weights, untrained gates), batch 8, 2 onnxruntime threads: the
   int8 explain graph (``INT8_RECIPE``) against the fp32 plain graph (target >= 1.8x throughput),
   beside the fp32 explain graph and the int8 graph of the recipe before (``MATMUL_ONLY_RECIPE``).
2. threads: vit-small shape, batch 8, at 1 and 2 threads: the fused explain graph (the wide probe layout, ``Ops.probe_layout``)
   against the plain graph (target >= 0.95 at 2 threads), beside the per-depth graph it replaced.

Every graph of a comparison runs in this one process with the same session options
(``runtime.default_session_options``), rounds alternated and the order rotated each round, so all
see the same machine load. Figures: min and median wall ms per call, min process-CPU ms per call
(all threads); ratios are throughput ratios from the min wall time (and from the min CPU time).
Graphs are exported into ``--graphs`` (default a temporary folder) and reused when present there.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.conftest import BENCH_SHAPES, cpu_model_name, random_gates


def _explainer(shape: str):
    from vdm_engine import Explainer
    from vdm_engine.backbone import random_backbone

    backbone = random_backbone(BENCH_SHAPES.get(shape, shape), seed=0)
    return Explainer(backbone, random_gates(backbone)).eval()


def _export(explainer, path: Path, outputs, fused_probes: bool = True) -> Path:
    from vdm_engine.export import export_onnx

    if not path.is_file():
        export_onnx(explainer, path, outputs=outputs, validate=False, random_weights=True, untrained_gates=True,
                    fused_probes=fused_probes)
    return path


EXPLAIN = ("logits", "patch_mask", "layer_masks")


def time_graphs(paths: dict[str, Path], x: np.ndarray, threads: int, rounds: int, calls: int) -> dict[str, dict]:
    """{label: wall/CPU ms figures}: every graph ``calls`` times per round, rounds alternated."""
    from vdm_engine.runtime import create_session, default_session_options

    sessions = {}
    for label, path in paths.items():
        s = create_session(path, "cpu", default_session_options(threads))
        feed = {s.get_inputs()[0].name: x}
        s.run(None, feed)  # warm-up
        sessions[label] = (s, feed)
    walls = {k: [] for k in sessions}
    cpus = {k: [] for k in sessions}
    labels = list(sessions)
    for r in range(rounds):
        for label in labels[r % len(labels):] + labels[: r % len(labels)]:
            s, feed = sessions[label]
            for _ in range(calls):
                t, c = time.perf_counter(), time.process_time()
                s.run(None, feed)
                walls[label].append(1e3 * (time.perf_counter() - t))
                cpus[label].append(1e3 * (time.process_time() - c))
    return {k: {"wall_ms_min": min(walls[k]), "wall_ms_median": statistics.median(walls[k]),
                "cpu_ms_min": min(cpus[k]), "calls": len(walls[k])} for k in labels}


def _rows(res: dict, base: str) -> list[str]:
    b = res[base]
    return [f"| {k} | {v['wall_ms_min']:.1f} / {v['wall_ms_median']:.1f} | {v['cpu_ms_min']:.1f} | "
            f"{b['wall_ms_min'] / v['wall_ms_min']:.3f} | {b['wall_ms_median'] / v['wall_ms_median']:.3f} | "
            f"{b['cpu_ms_min'] / v['cpu_ms_min']:.3f} |" for k, v in res.items()]


HEADER = ["| graph | wall ms (min / median) | CPU ms (min) | throughput / {base} (min wall) | (median wall) | (min CPU) |",
          "|---|---:|---:|---:|---:|---:|"]


def int8_target(folder: Path, rounds: int, batch: int = 8, threads: int = 2) -> tuple[str, dict]:
    from vdm_engine.export.quantize import INT8_RECIPE, MATMUL_ONLY_RECIPE, quantize_onnx

    explainer = _explainer("vit-b16")
    paths = {"fp32 plain": _export(explainer, folder / "b16-plain.onnx", ("logits",)),
             "fp32 explain": _export(explainer, folder / "b16-explain.onnx", EXPLAIN)}
    del explainer
    for label, name, recipe in (("int8 explain (INT8_RECIPE)", "b16-explain-int8.onnx", INT8_RECIPE),
                                ("int8 explain (MATMUL_ONLY_RECIPE, before)", "b16-explain-int8-old.onnx",
                                 MATMUL_ONLY_RECIPE)):
        if not (folder / name).is_file():
            quantize_onnx(paths["fp32 explain"], folder / name, recipe=recipe)
        paths[label] = folder / name
    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224), dtype=np.float32)
    res = time_graphs(paths, x, threads, rounds, calls=1)
    lines = [f"## int8: ViT-B/16 shape, batch {batch}, {threads} threads (target: int8 explain >= 1.8x fp32 plain)",
             "", f"`INT8_RECIPE`: {INT8_RECIPE.describe()}; before: {MATMUL_ONLY_RECIPE.describe()}.", "",
             HEADER[0].format(base="fp32 plain"), HEADER[1], *_rows(res, "fp32 plain")]
    return "\n".join(lines), res


def threads_target(folder: Path, rounds: int, batch: int = 8, threads=(1, 2)) -> tuple[str, dict]:
    explainer = _explainer("vit-small")
    paths = {"plain": _export(explainer, folder / "small-plain.onnx", ("logits",)),
             "explain, fused probes": _export(explainer, folder / "small-explain.onnx", EXPLAIN),
             "explain, per-depth probes (before)": _export(explainer, folder / "small-explain-per-depth.onnx", EXPLAIN,
                                                           fused_probes=False)}
    h, w = explainer.backbone.image_size
    x = torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(0)).numpy()
    lines, out = [f"## threads: vit-small, batch {batch} (target: fused explain >= 0.95x plain at 2 threads)"], {}
    for t in threads:
        res = time_graphs(paths, x, t, rounds * 3, calls=4)
        out[t] = res
        lines += ["", f"{t} thread(s):", "", HEADER[0].format(base="plain"), HEADER[1], *_rows(res, "plain")]
    return "\n".join(lines), out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="cpu_targets", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="write cpu-targets.md and cpu-targets.json into this folder")
    p.add_argument("--graphs", default=None, help="export the graphs here (reused when present); default a temp dir")
    p.add_argument("--rounds", type=int, default=8, help="timed rounds (ViT-B/16: one call per graph per round; "
                                                         "vit-small: 3x the rounds, 4 calls each)")
    p.add_argument("--only", nargs="+", choices=("int8", "threads"), default=("int8", "threads"))
    args = p.parse_args(argv)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.graphs or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        parts, raw = [], {}
        if "threads" in args.only:
            text, raw["threads"] = threads_target(folder, args.rounds)
            parts.append(text)
        if "int8" in args.only:
            text, raw["int8"] = int8_target(folder, args.rounds)
            parts.append(text)
    import onnxruntime

    head = (f"# Issue 16 CPU targets\n\nCPU: {cpu_model_name()}, {os.cpu_count()} cores; onnxruntime "
            f"{onnxruntime.__version__}; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}; "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; 1-min load at the end {os.getloadavg()[0]:.1f}; "
            f"{time.time() - t0:.0f} s in all.\n")
    text = "\n\n".join([head, *parts]) + "\n"
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "cpu-targets.md").write_text(text)
        (out / "cpu-targets.json").write_text(json.dumps(raw, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
