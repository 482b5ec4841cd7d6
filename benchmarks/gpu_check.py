"""One-shot GPU check of the Triton kernels: correctness on the card, kernel timings, end-to-end explain.

Run on a machine with a CUDA GPU (writes ``gpu_check.md`` and ``gpu_check.json`` into ``--out``,
default ``$OUT`` or ``benchmarks/results``)::

    python benchmarks/gpu_check.py                 # full check, ViT-B/16 shapes, bf16
    python benchmarks/gpu_check.py --no-compile    # skip the torch.compile baselines (faster)
    python benchmarks/gpu_check.py --device cpu --tiny --out /tmp/x   # CPU dry run under the interpreter

Sections:
1. Correctness on the card: ``mask_patches`` (outputs and gradients) and ``probe_gates`` (log keep)
   against the references in fp32, fp16 and bf16; ``explain()`` with the
   kernels vs the references; the kernel explain path under ``torch.compile(mode="reduce-overhead")``
   (CUDA graphs, static shapes) vs eager.
2. Kernel timings (``triton.testing.do_bench``, median) for ViT-B/16 shapes (B = 64 and 256, T = 197,
   D = 768, L+2 = 14, K = 1 and 8) in bf16: Triton vs the PyTorch references eager and compiled;
   achieved GB/s against a measured device-to-device copy. A tile sweep times a dozen block-size
   choices for both kernels at B = 256 (each checked against the fp32 reference) to tune the defaults.
3. End-to-end explain throughput of a random-weight ViT-B/16 in bf16 at batch 256 against plain
   inference of the same model (SDPA attention), eager and compiled.

Timings are only meaningful on a GPU; the CPU dry run checks that the script itself works.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import sys
import time
import traceback
from pathlib import Path


def _parse(argv):
    p = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or str(Path(__file__).parent / "results"),
                   help="directory for gpu_check.md / gpu_check.json (default $OUT, else benchmarks/results)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cuda (default) or cpu (dry run)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (for a CPU dry run of the script)")
    p.add_argument("--no-compile", action="store_true", help="skip every torch.compile baseline")
    p.add_argument("--no-end-to-end", action="store_true", help="skip the end-to-end ViT section")
    p.add_argument("--sweep", action="store_true", help="also sweep tile sizes in a --tiny dry run")
    p.add_argument("--no-sweep", action="store_true", help="skip the tile sweep")
    p.add_argument("--batches", default=None, help="comma-separated kernel batch sizes (default 64,256)")
    p.add_argument("--explain-batch", type=int, default=None, help="end-to-end batch (default 256)")
    return p.parse_args(argv)


ARGS = _parse(sys.argv[1:] if __name__ == "__main__" else [])
if ARGS.device == "cpu":  # Triton reads this when the kernels are decorated, i.e. on import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from vdm_engine import Explainer, GateConfig, Gates  # noqa: E402
from vdm_engine._io import atomic_write_bytes, atomic_write_json  # noqa: E402
from vdm_engine.backbone import patch_mask_reference, random_backbone  # noqa: E402
from vdm_engine.gates import gate_probe_reference, probe_depths  # noqa: E402
from vdm_engine.kernels import mask_patches, probe_gates  # noqa: E402

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-2, 1e-2), torch.bfloat16: (2e-2, 2e-2)}
DT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


class Check:
    """Collects rows of the report and keeps going when one section fails."""

    def __init__(self):
        self.correctness: list[dict] = []
        self.kernels: list[dict] = []
        self.end_to_end: list[dict] = []
        self.sweep: list[dict] = []
        self.errors: list[str] = []
        self.copy_gbps: float | None = None

    def section(self, name, fn):
        print(f"== {name}", flush=True)
        try:
            fn()
        except Exception as e:  # a check script reports a broken section and moves on
            self.errors.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            traceback.print_exc()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_ms(fn, device) -> float:
    """Median milliseconds of ``fn()``: ``triton.testing.do_bench`` on CUDA, a perf_counter loop on CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    times = []
    for _ in range(3):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[1]


def compiled(fn, device, mode: str | None = None):
    """torch.compile with inductor on CUDA; on the CPU dry run aot_eager (no C++ toolchain needed)."""
    if device.type == "cuda":
        return torch.compile(fn, mode=mode, fullgraph=False, dynamic=False)
    return torch.compile(fn, backend="aot_eager", dynamic=False)


def max_err(a, b) -> float:
    return float((a.detach().float() - b.detach().float()).abs().max())


def within(a, b, dtype, scale: float = 1.0) -> bool:
    atol, rtol = TOL[dtype]
    a, b = a.detach().float(), b.detach().float()
    return bool(((a - b).abs() <= atol * scale + rtol * b.abs()).all()) and not bool(torch.isnan(a).any())


def random_probes(D: int, S: int, device):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        gates = Gates(GateConfig(D, S)).eval()
        with torch.no_grad():
            gates.w1.mul_(3.0)
            gates.placeholder.normal_()
            gates.add.copy_(torch.linspace(-1.0, 3.0, S))
    return gates.to(device)


# ----- 1. correctness --------------------------------------------------------------------------------
def check_patch_mask(chk: Check, device, dims):
    B, K, N, D = dims
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = torch.randn(B, N, D, device=device).to(dtype).requires_grad_(True)
        g = torch.rand(B, K, N, device=device, requires_grad=True)
        ph = torch.randn(D, device=device, requires_grad=True)
        cls, pos = torch.randn(D, device=device).to(dtype), torch.randn(N + 1, D, device=device).to(dtype)
        out = mask_patches(x, g, ph, cls, pos)
        xf = x.detach().float().requires_grad_(True)
        ref = patch_mask_reference(xf, g, ph, cls.float(), pos.float())
        go = torch.randn(out.shape, device=device).to(dtype)
        grads = torch.autograd.grad(out, (x, g, ph), go)
        rgrads = torch.autograd.grad(ref, (xf, g, ph), go.float())
        row = dict(op="patch_mask", dtype=DT[dtype], shape=f"B={B} K={K} N={N} D={D}", out_err=max_err(out, ref))
        ok = within(out, ref, dtype)
        for name, a, e in zip(("x", "gates", "placeholder"), grads, rgrads):
            row[f"grad_{name}_err"] = max_err(a, e)
            ok &= within(a, e, dtype, scale=max(1.0, float(e.abs().max())))
        row["ok"] = ok
        chk.correctness.append(row)


def check_gate_probe(chk: Check, device, dims):
    S, B, T, D = dims
    probes = random_probes(D, S, device).probe_params()
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        hs = torch.randn(S, B, T, D, device=device).to(dtype)
        with torch.no_grad():
            got, ref = probe_depths(probe_gates, hs, probes), probe_depths(gate_probe_reference, hs, probes)
        chk.correctness.append(dict(op="gate_probe", dtype=DT[dtype], shape=f"S={S} B={B} T={T} D={D}",
                                    out_err=max_err(got, ref), ok=within(got, ref, dtype)))


def check_explain(chk: Check, device, shape: str, batch: int, dtype, compile_: bool):
    backbone = random_backbone(shape, seed=0).to(device=device, dtype=dtype)
    explainer = Explainer(backbone, random_probes(backbone.hidden_size, backbone.num_hidden_states, device)).eval()
    pv = torch.randn(batch, 3, *backbone.image_size, device=device, dtype=dtype)
    explainer.set_kernels("reference")
    ref = explainer.explain(pv)
    ref_check = explainer.verify(pv, ref)
    explainer.set_kernels("triton")
    got = explainer.explain(pv)
    got_check = explainer.verify(pv, got)
    disagree = got.keep() != ref.keep()
    agree = float(1 - disagree.float().mean())
    # A kept/dropped flip is fine only for a patch whose reference probability sits at the threshold.
    flips_at_threshold = bool(((ref.patch_mask[disagree] - 0.5).abs() <= TOL[dtype][0]).all())
    chk.correctness.append(dict(
        op="explain (kernels vs references)", dtype=DT[dtype], shape=f"{shape} B={batch}",
        out_err=max_err(got.patch_mask, ref.patch_mask), mask_err=max_err(got.layer_masks, ref.layer_masks),
        keep_agreement=agree, verify_logits_err=max_err(got_check.masked_logits, ref_check.masked_logits),
        ok=within(got.patch_mask, ref.patch_mask, dtype) and flips_at_threshold,
    ))
    if compile_:
        mode = "reduce-overhead" if device.type == "cuda" else None  # CUDA graphs on the card
        fwd = compiled(explainer.forward, device, mode)
        with torch.no_grad():
            for _ in range(3):  # warm-up runs record the graph
                logits, log_keep = fwd(pv)
            logits, log_keep = (t.clone() for t in fwd(pv))
            eager_logits, eager_log_keep = explainer(pv)
        chk.correctness.append(dict(
            op=f"explain forward, torch.compile({mode or 'aot_eager'}) vs eager", dtype=DT[dtype],
            shape=f"{shape} B={batch}", out_err=max_err(log_keep, eager_log_keep), mask_err=max_err(logits, eager_logits),
            ok=within(log_keep, eager_log_keep, dtype) and within(logits.float(), eager_logits.float(), torch.bfloat16),
        ))


# ----- 2. kernel timings ------------------------------------------------------------------------------
def measure_copy(chk: Check, device, nbytes: int):
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), device)
    chk.copy_gbps = 2 * nbytes / (ms * 1e-3) / 1e9  # read + write


def time_kernels(chk: Check, device, dtype, batches, dims, compile_: bool):
    S, T, D, Ks = dims
    N = T - 1
    es = torch.empty((), dtype=dtype).element_size()
    probes = random_probes(D, S, device).probe_params()
    for B in batches:
        x = torch.randn(B, N, D, device=device, dtype=dtype)
        ph, cls, pos = (torch.randn(*s, device=device) for s in ((D,), (D,), (N + 1, D)))
        cls, pos = cls.to(dtype), pos.to(dtype)
        for K in Ks:
            g = torch.rand(B, K, N, device=device)
            nbytes = B * N * D * es + g.numel() * 4 + B * K * (N + 1) * D * es
            providers = [("triton", mask_patches), ("torch eager", patch_mask_reference)]
            if compile_:
                providers.append(("torch.compile", compiled(patch_mask_reference, device)))
            with torch.no_grad():
                for name, fn in providers:
                    ms = bench_ms(lambda fn=fn: fn(x, g, ph, cls, pos), device)
                    chk.kernels.append(_kernel_row("patch_mask fwd", name, B, K, dtype, ms, nbytes, chk.copy_gbps))
            # training step share: forward + backward for the gates and the placeholder
            gg, phg = g.clone().requires_grad_(True), ph.clone().requires_grad_(True)
            go = torch.randn(B * K, N + 1, D, device=device, dtype=dtype)
            fb = [("triton", mask_patches), ("torch eager", patch_mask_reference)]
            if compile_:
                fb.append(("torch.compile", compiled(patch_mask_reference, device)))
            for name, fn in fb:
                step = lambda fn=fn: torch.autograd.grad(fn(x, gg, phg, cls, pos), (gg, phg), go)  # noqa: E731
                ms = bench_ms(step, device)
                # forward bytes + backward (grad_out and x read, small grads written)
                fb_bytes = nbytes + B * K * (N + 1) * D * es + B * N * D * es
                chk.kernels.append(_kernel_row("patch_mask fwd+bwd", name, B, K, dtype, ms, fb_bytes, chk.copy_gbps))
        hs = torch.randn(S, B, T, D, device=device, dtype=dtype)
        P = probes.w1.shape[1]
        flops = 2 * S * B * T * 2 * D * P
        gp_bytes = hs.numel() * es + B * S * T * 4
        providers = [("triton", probe_gates), ("torch eager", gate_probe_reference)]
        if compile_:
            providers.append(("torch.compile", compiled(gate_probe_reference, device)))
        with torch.no_grad():
            for name, fn in providers:  # one launch per depth, as the explain path runs them
                ms = bench_ms(lambda fn=fn: probe_depths(fn, hs, probes), device)
                row = _kernel_row("gate_probe (L+2 probes)", name, B, None, dtype, ms, gp_bytes, chk.copy_gbps)
                row["tflops"] = flops / (ms * 1e-3) / 1e12
                chk.kernels.append(row)
        del hs, x
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _kernel_row(op, provider, B, K, dtype, ms, nbytes, copy_gbps):
    gbps = nbytes / (ms * 1e-3) / 1e9
    return dict(op=op, provider=provider, B=B, K=K, dtype=DT[dtype], ms=ms, GBps=gbps,
                pct_copy=100 * gbps / copy_gbps if copy_gbps else None)


# ----- 2b. tile sweep -----------------------------------------------------------------------------
# (BLOCK_T, BLOCK_D, BLOCK_P, P_TILES, num_warps, num_stages), P_TILES 1 to 3; the first is the
# launcher's default for ViT-B/16 in bf16. Past sweeps: benchmarks/results/gpu-h100-2026-11-26.
GATE_PROBE_TILES = [  # three P tiles with 4 stages (or 128-wide D steps) would need > 227 KiB of shared memory
    (64, 64, 64, 3, 4, 3), (64, 64, 64, 3, 4, 2), (64, 32, 64, 3, 4, 4), (64, 32, 64, 3, 4, 3),
    (32, 64, 64, 3, 4, 3), (128, 32, 64, 3, 8, 3), (64, 128, 64, 1, 4, 3), (64, 64, 64, 1, 4, 4),
    (64, 64, 64, 1, 4, 3), (64, 64, 64, 1, 8, 3),
]
PATCH_MASK_TILES = [(16, 256, 8), (16, 256, 4), (8, 256, 4), (32, 128, 8), (4, 1024, 8)]  # (BLOCK_R, BLOCK_D, warps)


def sweep_tiles(chk: Check, device, dtype, B: int, dims):
    """Time GPU tile choices (each checked against the fp32 reference) so the defaults can be tuned.

    The last gate_probe row runs the default tiles through the constexpr-bounds entry the
    interpreter uses (``_gate_probe_kernel_static``), to see what specialising D, P costs or
    gains. On the CPU dry run the rows are only checked, not timed.
    """
    import importlib

    gp = importlib.import_module("vdm_engine.kernels.gate_probe")
    pm = importlib.import_module("vdm_engine.kernels.patch_mask")
    S, T, D, Ks = dims
    N, K = T - 1, max(Ks)
    probes = random_probes(D, S, device).probe_params()
    hs = torch.randn(S, B, T, D, device=device, dtype=dtype)
    x = torch.randn(B, N, D, device=device, dtype=dtype)
    g = torch.rand(B, K, N, device=device)
    ph, cls, pos = torch.randn(D, device=device), torch.randn(D, device=device).to(dtype), torch.randn(N + 1, D, device=device).to(dtype)
    with torch.no_grad():
        # References in fp32 on the same half inputs (a half-precision reference has its own
        # rounding error, as large as the tolerance): the probes are fp32, so gate_probe_reference
        # already computes in fp32; patch_mask's inputs are upcast.
        ref_gp = probe_depths(gate_probe_reference, hs, probes)
        ref_pm = patch_mask_reference(x.float(), g, ph, cls.float(), pos.float())
    timed = device.type == "cuda"
    default_gp, default_pm, default_kernel = gp._block_sizes, pm._block_sizes, gp._kernel

    def run(row, fn, ref):
        try:
            with torch.no_grad():
                out = fn()
                row["ok"] = within(out, ref, dtype)
                row["error"] = f"max err {max_err(out, ref):.3g}" if not row["ok"] else None
                if timed:
                    row["ms"] = bench_ms(fn, device)
        except Exception as e:  # e.g. out of shared memory on this card
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:120]
        chk.sweep.append(row)

    try:
        gp_default = default_gp(B * T, D, probes.w1.shape[1], False, torch.empty((), dtype=dtype).element_size())
        for cfg, static in [(c, False) for c in GATE_PROBE_TILES] + [(GATE_PROBE_TILES[0], True)]:
            gp._block_sizes = lambda *_, cfg=cfg: cfg
            gp._kernel = (lambda interp: gp._gate_probe_kernel_static) if static else default_kernel
            row = dict(op="gate_probe", B=B, K=None, tiles=str(cfg) + (" static D,P" if static else ""),
                       default="default" if cfg == gp_default and not static else "")
            run(row, lambda: probe_depths(probe_gates, hs, probes), ref_gp)
        gp._kernel = default_kernel
        for cfg in PATCH_MASK_TILES:
            pm._block_sizes = lambda *_, cfg=cfg: cfg
            row = dict(op="patch_mask fwd", B=B, K=K, tiles=str(cfg),
                       default="default" if cfg == default_pm(T, D, False) else "")
            run(row, lambda: mask_patches(x, g, ph, cls, pos), ref_pm)
    finally:
        gp._block_sizes, pm._block_sizes, gp._kernel = default_gp, default_pm, default_kernel


# ----- 3. end to end ------------------------------------------------------------------------------------
def time_end_to_end(chk: Check, device, shape: str, batch: int, dtype, compile_: bool):
    backbone = random_backbone(shape, seed=0).to(device=device, dtype=dtype)
    attn = getattr(backbone.config, "_attn_implementation", "?")
    explainer = Explainer(backbone, random_probes(backbone.hidden_size, backbone.num_hidden_states, device)).eval()
    pv = torch.randn(batch, 3, *backbone.image_size, device=device, dtype=dtype)

    def row(name, ms):
        chk.end_to_end.append(dict(case=name, model=shape, B=batch, dtype=DT[dtype], attn=attn, ms=ms,
                                   images_per_s=batch / (ms * 1e-3)))

    with torch.no_grad():
        row("plain inference (eager)", bench_ms(lambda: backbone(pv), device))
        explainer.set_kernels("reference")
        row("explain(), references (eager)", bench_ms(lambda: explainer.explain(pv), device))
        explainer.set_kernels("triton")
        row("explain(), Triton kernels (eager)", bench_ms(lambda: explainer.explain(pv), device))
        if compile_:
            label = "inductor" if device.type == "cuda" else "aot_eager"
            plain_c = compiled(backbone.forward, device)
            row(f"plain inference (compile {label})", bench_ms(lambda: plain_c(pv), device))
            fwd_c = compiled(explainer.forward, device)

            def explain_c():
                logits, log_keep = fwd_c(pv)
                return log_keep.float().cumsum(1)[:, :, 1:].exp()

            row(f"explain forward + masks, Triton (compile {label})", bench_ms(explain_c, device))
            if device.type == "cuda":
                plain_g = compiled(backbone.forward, device, "reduce-overhead")
                fwd_g = compiled(explainer.forward, device, "reduce-overhead")

                def explain_g():
                    logits, log_keep = fwd_g(pv)
                    return log_keep.float().cumsum(1)[:, :, 1:].exp()

                row("plain inference (compile reduce-overhead, CUDA graphs)", bench_ms(lambda: plain_g(pv), device))
                row("explain forward + masks, Triton (compile reduce-overhead, CUDA graphs)", bench_ms(explain_g, device))


# ----- report -----------------------------------------------------------------------------------------
def _fmt(v, nd=3):
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "**NO**"
    if isinstance(v, float):
        return f"{v:.{nd}g}" if abs(v) < 1e-2 else f"{v:,.{nd}f}".rstrip("0").rstrip(".")
    return str(v)


def _table(rows, cols):
    out = ["| " + " | ".join(c for c, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(_fmt(r.get(k)) for _, k in cols) + " |")
    return "\n".join(out)


def report(chk: Check, meta: dict) -> str:
    lines = [f"# GPU check: Triton kernels ({meta['device_name']}, {meta['date']})", ""]
    lines.append(", ".join(f"{k} {v}" for k, v in meta.items() if k not in ("device_name", "date")))
    lines += ["", "## Correctness on the card", "",
              "Errors are max |kernel - reference| (the reference in fp32 for half inputs); tolerances fp32 1e-5, "
              "fp16 1e-2, bf16 2e-2 (abs + rel; gradient sums scaled by their magnitude).", ""]
    lines.append(_table(chk.correctness, [("op", "op"), ("dtype", "dtype"), ("shape", "shape"), ("max err", "out_err"),
                                          ("mask / logits err", "mask_err"), ("grad gates err", "grad_gates_err"),
                                          ("grad placeholder err", "grad_placeholder_err"), ("grad x err", "grad_x_err"),
                                          ("keep agreement", "keep_agreement"), ("ok", "ok")]))
    lines += ["", f"## Kernel timings (triton.testing.do_bench median; device-to-device copy: "
                  f"{_fmt(chk.copy_gbps)} GB/s)", "",
              "GB/s counts the bytes the op must move (inputs read once, outputs written once), for every provider.", ""]
    lines.append(_table(chk.kernels, [("op", "op"), ("provider", "provider"), ("B", "B"), ("K", "K"), ("dtype", "dtype"),
                                      ("ms", "ms"), ("GB/s", "GBps"), ("% of copy", "pct_copy"), ("TFLOP/s", "tflops")]))
    if chk.sweep:
        lines += ["", "## Tile sweep (bf16 vs the fp32 reference; the launcher's default marked)", "",
                  "gate_probe tiles: (BLOCK_T, BLOCK_D, BLOCK_P, P_TILES, warps, stages); patch_mask: "
                  "(BLOCK_R, BLOCK_D, warps).", ""]
        lines.append(_table(chk.sweep, [("op", "op"), ("B", "B"), ("K", "K"), ("tiles", "tiles"), ("", "default"),
                                        ("ms", "ms"), ("ok", "ok"), ("error", "error")]))
    lines += ["", "## End to end", ""]
    lines.append(_table(chk.end_to_end, [("case", "case"), ("model", "model"), ("B", "B"), ("dtype", "dtype"),
                                         ("attention", "attn"), ("ms", "ms"), ("images/s", "images_per_s")]))
    if chk.errors:
        lines += ["", "## Sections that failed", ""] + [f"- {e}" for e in chk.errors]
    return "\n".join(lines) + "\n"


def main() -> int:
    args = ARGS
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; use --device cpu --tiny for a dry run", file=sys.stderr)
        return 2
    import triton

    compile_ = not args.no_compile
    dtype = torch.bfloat16
    if args.tiny:
        shape, batches, kdims = "vit-tiny", [3], (4, 17, 36, (1, 4))
        pm_dims, gp_dims, explain_batch = (2, 4, 16, 36), (4, 3, 17, 36), args.explain_batch or 4
        copy_bytes = 1 << 20
    else:
        shape, batches, kdims = "vit-b16", [64, 256], (14, 197, 768, (1, 8))
        pm_dims, gp_dims, explain_batch = (4, 8, 196, 768), (14, 8, 197, 768), args.explain_batch or 256
        copy_bytes = 1 << 30
    if args.batches:
        batches = [int(b) for b in args.batches.split(",")]
    meta = dict(
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {platform.processor()} (interpreter)",
        date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
        interpreter=os.environ.get("TRITON_INTERPRET", "0"),
    )
    torch.manual_seed(int(os.environ.get("GPU_CHECK_SEED", "0")))
    chk = Check()
    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def write():  # after every section, so a run cut short still leaves its table
        meta["wall_s"] = round(time.time() - t0, 1)
        text = report(chk, meta)
        atomic_write_bytes(out / "gpu_check.md", text.encode())
        atomic_write_json(out / "gpu_check.json", dict(meta=meta, correctness=chk.correctness, kernels=chk.kernels,
                                                      sweep=chk.sweep, end_to_end=chk.end_to_end,
                                                      copy_GBps=chk.copy_gbps, errors=chk.errors))
        return text

    sections = [
        ("correctness: patch_mask", lambda: check_patch_mask(chk, device, pm_dims)),
        ("correctness: gate_probe", lambda: check_gate_probe(chk, device, gp_dims)),
        ("correctness: explain", lambda: check_explain(chk, device, shape, 3 if args.tiny else 16, dtype, compile_)),
        ("copy bandwidth", lambda: measure_copy(chk, device, copy_bytes)),
        ("kernel timings", lambda: time_kernels(chk, device, dtype, batches, kdims, compile_)),
    ]
    if (not args.tiny or args.sweep) and not args.no_sweep:
        sections.append(("tile sweep", lambda: sweep_tiles(chk, device, dtype, max(batches), kdims)))
    if not args.no_end_to_end:
        sections.append(("end to end", lambda: time_end_to_end(chk, device, shape, explain_batch, dtype, compile_)))
    for name, fn in sections:
        chk.section(name, fn)
        write()
        print(f"   done at {time.time() - t0:.0f} s", flush=True)
    print(write())
    bad = [r for r in chk.correctness if not r.get("ok")]
    return 1 if bad or chk.errors else 0


if __name__ == "__main__":
    sys.exit(main())
