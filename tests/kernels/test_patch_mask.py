"""Triton patch masking vs ``patch_mask_reference``: outputs and gradients, on poisoned outputs.

Without a GPU these run under the Triton CPU interpreter (``TRITON_INTERPRET=1``, set by
tests/conftest.py). Half-precision results are compared with the reference evaluated in fp32 on
the same half inputs (the exact value of the same maths): the half reference rounds after every op
and is itself farther from that value than the kernel, which computes in fp32 and rounds once.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from vdm_engine.kernels import mask_patches, patch_mask_reference
from vdm_engine.kernels._triton import interpreting

pm = importlib.import_module("vdm_engine.kernels.patch_mask")

# On a CUDA machine the kernels run on the card; without one, under the interpreter on the CPU.
DEV = "cuda" if torch.cuda.is_available() else "cpu"

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-2, 1e-2), torch.bfloat16: (2e-2, 2e-2)}


def _inputs(B, K, N, D, dtype, *, placeholder=True, x_grad=True, gates_2d=False, device=DEV):
    x = torch.randn(B, N, D, device=device).to(dtype).requires_grad_(x_grad)
    g = torch.rand(B, N, device=device) if gates_2d else torch.rand(B, K, N, device=device)
    g[..., 0] = 0.0  # exact 0 and 1 gates on purpose
    g[..., -1] = 1.0
    g.requires_grad_(True)
    ph = torch.randn(D, device=device, requires_grad=True) if placeholder else None  # gates' placeholder stays fp32
    cls = torch.randn(D, device=device).to(dtype)
    pos = torch.randn(N + 1, D, device=device).to(dtype)
    return x, g, ph, cls, pos


def _check(x, g, ph, cls, pos, close, dtype):
    out = mask_patches(x, g, ph, cls, pos)
    B, N, D = x.shape
    K = 1 if g.dim() == 2 else g.shape[1]
    assert out.shape == (B * K, N + 1, D) and out.dtype == x.dtype
    f32 = lambda t: None if t is None else t.detach().float().requires_grad_(t.requires_grad)  # noqa: E731
    xf, gf, phf = f32(x), f32(g), f32(ph)
    expected = patch_mask_reference(xf, gf, phf, cls.float(), pos.float())
    atol, rtol = TOL[dtype]
    close(out, expected, atol, rtol, "patch_mask output")
    if dtype == torch.float16 or (dtype == torch.bfloat16 and not interpreting()):
        # One rounding beats the half reference's rounding after every op. (The interpreter casts
        # fp32 -> bf16 by truncation, GPUs round to nearest even, so bf16 is only checked on a GPU.)
        err_kernel = (out.float() - expected).abs().max()
        err_ref = (patch_mask_reference(x, g, ph, cls, pos).float() - expected).abs().max()
        assert err_kernel <= err_ref, f"kernel error {err_kernel} > half reference error {err_ref}"

    grad_out = torch.randn(out.shape, device=out.device).to(dtype)
    wrt = [t for t in (x, g, ph) if t is not None and t.requires_grad]
    wrt_f = [t for t in (xf, gf, phf) if t is not None and t.requires_grad]
    grads = torch.autograd.grad(out, wrt, grad_out)
    expected_grads = torch.autograd.grad(expected, wrt_f, grad_out.float())
    names = [n for n, t in zip(("x", "gates", "placeholder"), (x, g, ph)) if t is not None and t.requires_grad]
    for name, got, exp, src in zip(names, grads, expected_grads, wrt):
        assert got.dtype == src.dtype and got.shape == src.shape, name
        # Gate and placeholder gradients are sums over D (or B*K*N) terms: scale atol by their size.
        scale = max(1.0, float(exp.abs().max()))
        close(got, exp, atol * scale, rtol, f"patch_mask grad {name}")


# (B, K, N, D, gates_2d): T = N+1 in {17, 50, 197}, D in {100, 192, 768}, K in {1, 4}.
SMALL = [(5, 1, 16, 100, True), (3, 4, 49, 192, False)]
BIG = [(2, 4, 196, 768, False)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B,K,N,D,gates_2d", SMALL)
def test_matches_reference(B, K, N, D, gates_2d, dtype, close, poison):
    _check(*_inputs(B, K, N, D, dtype, gates_2d=gates_2d), close, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B,K,N,D,gates_2d", BIG)
def test_matches_reference_vit_b16_tokens(B, K, N, D, gates_2d, dtype, close, poison):
    _check(*_inputs(B, K, N, D, dtype, gates_2d=gates_2d), close, dtype)


def test_no_placeholder_frozen_x_vit_tokens(close, poison):
    """placeholder=None means zeros; x without grad (the frozen-backbone training case); T=197, D=192, K=1."""
    _check(*_inputs(1, 1, 196, 192, torch.float32, placeholder=False, x_grad=False), close, torch.float32)


def test_one_patch_prime_batch(close, poison):
    _check(*_inputs(7, 3, 1, 37, torch.float32), close, torch.float32)


def test_gpu_tiling(monkeypatch, close, poison):
    """The GPU block sizes (several row and D tiles, ragged edges) under the interpreter."""
    sizes = pm._block_sizes
    monkeypatch.setattr(pm, "_block_sizes", lambda rows, D, interpret: sizes(rows, D, False))
    assert sizes(50, 300, False)[:2] == (16, 256)  # 4 row tiles, 2 D tiles with a ragged tail
    _check(*_inputs(2, 3, 49, 300, torch.float32), close, torch.float32)
    _check(*_inputs(3, 2, 16, 100, torch.bfloat16), close, torch.bfloat16)


def test_noncontiguous_inputs_and_cls_pos_grads(close, poison):
    B, K, N, D = 2, 3, 16, 36
    x = torch.randn(B, D, N, device=DEV).transpose(1, 2).requires_grad_(True)  # non-contiguous (B, N, D)
    g = torch.rand(B, N, K, device=DEV).transpose(1, 2).requires_grad_(True)  # non-contiguous (B, K, N)
    ph = torch.randn(D, device=DEV, requires_grad=True)
    cls = torch.randn(D, device=DEV, requires_grad=True)
    pos = torch.randn(N + 1, D, device=DEV, requires_grad=True)
    out = mask_patches(x, g, ph, cls, pos)
    expected = patch_mask_reference(x, g, ph, cls, pos)
    close(out, expected, 1e-5, 1e-5, "output")
    go = torch.randn_like(out)
    for name, a, e in zip("x g ph cls pos".split(), torch.autograd.grad(out, (x, g, ph, cls, pos), go),
                          torch.autograd.grad(expected, (x, g, ph, cls, pos), go)):
        close(a, e, 1e-4, 1e-5, f"grad {name}")


def test_poison_catches_unwritten_elements(monkeypatch, poison):
    """The poisoning is effective: a kernel that writes nothing leaves NaN behind."""

    class NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    monkeypatch.setattr(pm, "_patch_mask_fwd_kernel", NoLaunch())
    x, g, ph, cls, pos = _inputs(2, 2, 4, 8, torch.float32)
    assert torch.isnan(mask_patches(x, g, ph, cls, pos)).all()


def test_compiles_without_graph_breaks(close):
    """torch.compile sees the kernels as opaque ops with shape-only fake kernels (forward and backward)."""
    x, g, ph, cls, pos = _inputs(2, 3, 16, 36, torch.float32)
    compiled = torch.compile(mask_patches, backend="aot_eager", fullgraph=True)
    out = compiled(x, g, ph, cls, pos)
    expected = patch_mask_reference(x, g, ph, cls, pos)
    close(out, expected, 1e-5, 1e-5, "compiled output")
    got = torch.autograd.grad(out.square().sum(), (x, g, ph))
    exp = torch.autograd.grad(expected.square().sum(), (x, g, ph))
    for name, a, e in zip(("x", "gates", "placeholder"), got, exp):
        close(a, e, 1e-4, 1e-5, f"compiled grad {name}")


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(x=torch.zeros(2, 4)), r"x must be \(B, N, D\)"),
        (dict(gates=torch.zeros(2, 5)), r"gates must be \(B, N\) or \(B, K, N\) with B=2, N=4"),
        (dict(placeholder=torch.zeros(7)), r"placeholder must be \(8,\)"),
        (dict(pos_embed=torch.zeros(4, 8)), r"pos_embed must be \(5, 8\)"),
        (dict(x=torch.zeros(2, 4, 8, dtype=torch.float64)), "float32, float16 or bfloat16"),
    ],
)
def test_bad_arguments(change, match):
    args = dict(x=torch.zeros(2, 4, 8), gates=torch.zeros(2, 4), placeholder=torch.zeros(8),
                cls_token=torch.zeros(8), pos_embed=torch.zeros(5, 8))
    args.update(change)
    args = {k: v.to(DEV) for k, v in args.items()}
    with pytest.raises(ValueError, match=match):
        mask_patches(**args)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, g, ph, cls, pos = _inputs(1, 1, 4, 8, torch.float32, device="cpu")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        mask_patches(x, g, ph, cls, pos)
