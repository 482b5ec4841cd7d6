"""The kernels compile for real GPUs (sm_80, sm_90) ahead of time, without a GPU.

The interpreter runs the kernels' Python semantics but not Triton's compiler (type checks across
loops, layouts, tl.dot operand rules, register allocation). Here each kernel is compiled to a cubin
with the launchers' GPU block sizes in a subprocess where ``TRITON_INTERPRET`` is unset, and
must fit the target's shared memory; the script also prints registers and spill bytes (STACK)
when ``cuobjdump`` is available. These are reported, not asserted: measured timings decide the
tiles (figures in benchmarks/results/gpu-h100-2026-11-26/README.md).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys

import pytest


def _compile_all() -> list[dict]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    gp = importlib.import_module("vdm_engine.kernels.gate_probe")
    pm = importlib.import_module("vdm_engine.kernels.patch_mask")
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")

    def build(name, fn, sig, consts, opts, cc, div16=()):
        # Like a real launch, which specialises 16-byte-aligned pointers and ints divisible by 16
        # (here: D=768, P=192, R=256*197): without these hints loads do not vectorise, the D loop
        # is not pipelined and the register counts say little about the launched kernel.
        names = fn.arg_names
        aligned = [n for n in sig if n.endswith("_ptr")] + list(div16)
        src = ASTSource(fn, {n: sig.get(n, "constexpr") for n in names},
                        constexprs={(names.index(k),): v for k, v in consts.items()},
                        attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned})
        k = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=opts)
        row = dict(kernel=name, sm=cc, shared=k.metadata.shared, usage=None)
        if os.path.exists(cuobjdump):
            path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"vdm_{os.getpid()}.cubin")
            with open(path, "wb") as f:
                f.write(k.asm["cubin"])
            out = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True, text=True)
            os.unlink(path)
            usage = next((ln.split()[:3] for ln in out.stdout.splitlines() if "REG:" in ln), [])
            row["usage"] = " ".join(usage)
            row["spill_bytes"] = next((int(u.split(":")[1]) for u in usage if u.startswith("STACK:")), None)
        return row

    rows = []
    bf = "bf16"
    br, bd, warps = pm._block_sizes(197, 768, False)
    fwd_sig = dict(x_ptr=f"*{bf}", g_ptr="*fp32", ph_ptr="*fp32", cls_ptr=f"*{bf}", pos_ptr=f"*{bf}",
                   out_ptr=f"*{bf}", N="i32", D="i32")
    bwd_sig = dict(go_ptr=f"*{bf}", x_ptr=f"*{bf}", g_ptr="*fp32", ph_ptr="*fp32", gx_ptr=f"*{bf}",
                   gg_ptr="*fp32", gph_ptr="*fp32", N="i32", D="i32")
    for cc in (80, 90):
        rows.append(build("patch_mask_fwd", pm._patch_mask_fwd_kernel, fwd_sig,
                          dict(K=8, HAS_PH=True, BLOCK_R=br, BLOCK_D=bd), dict(num_warps=warps), cc, ("D",)))
    rows.append(build("patch_mask_bwd", pm._patch_mask_bwd_kernel, bwd_sig,
                      dict(K=8, HAS_PH=True, NEED_GX=True, NEED_GG=True, NEED_GPH=True, BLOCK_N=br, BLOCK_D=bd),
                      dict(num_warps=warps), 90, ("D",)))
    # gate_probe: the GPU entry (runtime D, P; one depth) with the launcher's defaults for ViT-B/16 probes,
    # plus variants the GPU sweep tries.
    gp_sig = dict(b1_ptr="*fp32", w2_ptr="*fp32", b2_ptr="*fp32", add_ptr="*fp32", out_ptr="*fp32",
                  R="i32", D="i32", P="i32", mul="fp32", offset="fp32")
    cases = [(dt, gp._block_sizes(256 * 197, 768, 192, False, elem), ccs, "default")
             for dt, elem, ccs in (("bf16", 2, (80, 90)), ("fp32", 4, (90,)))]
    cases += [("bf16", (64, 64, 64, 1, 4, 3), (90,), "sweep"), ("bf16", (64, 64, 64, 3, 4, 2), (90,), "sweep")]
    for dt, (bt, bd, bp, pt, warps, stages), ccs, kind in cases:
        sig = dict(gp_sig, h0_ptr=f"*{dt}", hs_ptr=f"*{dt}", w1_ptr=f"*{dt}")
        consts = dict(IEEE=dt == "fp32", UPCAST=False, BLOCK_T=bt, BLOCK_D=bd, BLOCK_P=bp, P_TILES=pt)
        for cc in ccs:
            row = build(f"gate_probe_{dt}", gp._gate_probe_kernel, sig, consts,
                        dict(num_warps=warps, num_stages=stages), cc, ("R", "D", "P"))
            rows.append(dict(row, config=(bt, bd, bp, pt, warps, stages), kind=kind))
    return rows


# Largest shared memory one block may use (opt-in): A100 (sm_80) 163 KiB, H100 (sm_90) 227 KiB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


def _nvidia_backend() -> bool:
    spec = importlib.util.find_spec("triton")
    if spec is None or not spec.origin:
        return False
    ptxas = os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin", "ptxas")
    return os.path.exists(ptxas)


@pytest.mark.skipif(not _nvidia_backend(), reason="triton with its NVIDIA backend (ptxas) is not installed")
def test_kernels_compile_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run([sys.executable, __file__], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-4000:]
    rows = json.loads(res.stdout.strip().splitlines()[-1])
    assert {r["kernel"] for r in rows} == {"patch_mask_fwd", "patch_mask_bwd", "gate_probe_bf16", "gate_probe_fp32"}
    for r in rows:
        print(r)  # registers and stack (spill) bytes are reported, not asserted
        assert r["shared"] <= SHARED_LIMIT[r["sm"]], f"{r} needs more shared memory than sm_{r['sm']} has"
    bf16 = [r for r in rows if r["kernel"] == "gate_probe_bf16" and r.get("kind") == "default"]
    assert {r["sm"] for r in bf16} == {80, 90} and all(r["config"] == [64, 64, 64, 3, 4, 3] for r in bf16), bf16


if __name__ == "__main__":
    print(json.dumps(_compile_all()))
