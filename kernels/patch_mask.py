"""Batched patch masking: blend patch embeddings with a placeholder under K gates per image.

Vision DiffMask (Nalmpantis et al. 2023) replaces masked patch embeddings by a learned placeholder
before the position embeddings are added. For ``x (B, N, D)`` and gates ``(B, K, N)`` this builds
the encoder input of all B*K masked copies in one pass:

    out[b*K + k, 0]     = cls + pos[0]
    out[b*K + k, 1 + n] = g[b, k, n] * x[b, n] + (1 - g[b, k, n]) * placeholder + pos[1 + n]

Each program reads its tile of ``x`` once and writes the K masked tiles, so the K copies of ``x``
are never materialised. The backward kernel produces the gradients of the gates, the placeholder
and (when needed) ``x`` in one read of the output gradient.

The mask count K bounds a loop, so it is a ``tl.constexpr`` (one compiled variant per K): Triton
3.6's interpreter turns a runtime loop bound into a Python int with ``int()`` of a 1-element array,
which NumPy >= 2.4 rejects ("only 0-dimensional arrays can be converted to Python scalars").
"""

from typing import Optional

import torch

from vdm_engine.backbone import patch_mask_reference

from ._triton import SUPPORTED_DTYPES, device_guard, interpreting, launch_device, next_power_of_2, tl, triton

__all__ = [
    "PatchMaskFunction",
    "mask_patches",
    "patch_mask_backward",
    "patch_mask_forward",
    "patch_mask_reference",
]


# ----- kernels --------------------------------------------------------------------------------
@triton.jit
def _patch_mask_fwd_kernel(
    x_ptr,  # (B, N, D) patch embeddings, contiguous
    g_ptr,  # (B, K, N) gates, contiguous
    ph_ptr,  # (D,) placeholder (not read when HAS_PH is False)
    cls_ptr,  # (D,) class token
    pos_ptr,  # (N+1, D) position embeddings
    out_ptr,  # (B*K, N+1, D) output tokens, dtype of x
    N,
    D,
    K: tl.constexpr,  # loop bound: constexpr (see the module docstring)
    HAS_PH: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_r = tl.program_id(0)  # tile of token rows r in [0, N]; row 0 is the CLS token
    pid_d = tl.program_id(1)  # tile of the hidden dimension
    b = tl.program_id(2).to(tl.int64)  # image
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    row_ok = rows < N + 1
    col_ok = cols < D
    is_patch = row_ok & (rows >= 1)
    n = rows - 1  # patch index (-1 on the CLS row, never dereferenced)
    tile_ok = row_ok[:, None] & col_ok[None, :]
    patch_ok = is_patch[:, None] & col_ok[None, :]
    # One int32 offset tile serves pos, x (shifted one row) and every output slice; the int64
    # per-image / per-mask bases are scalars.
    tile = rows[:, None] * D + cols[None, :]  # (BLOCK_R, BLOCK_D) offsets in an (N+1, D) slice

    # Everything the K masks share is loaded once and kept in fp32 registers.
    x = tl.load(x_ptr + (b * N * D - D) + tile, mask=patch_ok, other=0.0).to(tl.float32)
    pos = tl.load(pos_ptr + tile, mask=tile_ok, other=0.0).to(tl.float32)
    cls = tl.load(cls_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    is_cls = (rows == 0)[:, None]
    bias = pos + tl.where(is_cls, cls[None, :], 0.0)  # cls + pos[0] on row 0, pos[1+n] on patch rows
    if HAS_PH:
        ph = tl.load(ph_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)

    for k in range(K):
        bk = b * K + k
        g = tl.load(g_ptr + bk * N + n, mask=is_patch, other=0.0).to(tl.float32)[:, None]
        y = g * x
        if HAS_PH:
            y = y + (1.0 - g) * ph[None, :]
        y = tl.where(is_cls, bias, y + bias)
        tl.store(out_ptr + bk * (N + 1) * D + tile, y.to(out_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def _patch_mask_bwd_kernel(
    go_ptr,  # (B*K, N+1, D) gradient of the output tokens, contiguous
    x_ptr,  # (B, N, D) patch embeddings
    g_ptr,  # (B, K, N) gates
    ph_ptr,  # (D,) placeholder (not read when HAS_PH is False)
    gx_ptr,  # (B, N, D) gradient of x, dtype of x (written when NEED_GX)
    gg_ptr,  # (num_d_tiles, B*K, N) fp32 partial gate gradients, one slice per D tile (NEED_GG)
    gph_ptr,  # (B * num_n_tiles, D) fp32 partial placeholder gradients (NEED_GPH)
    N,
    D,
    K: tl.constexpr,
    HAS_PH: tl.constexpr,
    NEED_GX: tl.constexpr,
    NEED_GG: tl.constexpr,
    NEED_GPH: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)  # tile of patches n in [0, N)
    pid_d = tl.program_id(1)  # tile of the hidden dimension
    b = tl.program_id(2).to(tl.int64)  # image
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    n_ok = n < N
    col_ok = cols < D
    tile_ok = n_ok[:, None] & col_ok[None, :]
    tile = n[:, None] * D + cols[None, :]  # int32 offsets in an (N, D) slice; int64 bases are scalars

    # d out / d g = x - placeholder; d out / d placeholder = 1 - g; d out / d x = g.
    diff = tl.load(x_ptr + b * N * D + tile, mask=tile_ok, other=0.0).to(tl.float32)
    if HAS_PH:
        diff = diff - tl.load(ph_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    gx = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    gph = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for k in range(K):
        bk = b * K + k
        g = tl.load(g_ptr + bk * N + n, mask=n_ok, other=0.0).to(tl.float32)
        go = tl.load(go_ptr + (bk * (N + 1) * D + D) + tile, mask=tile_ok, other=0.0)  # rows 1 + n
        go = go.to(tl.float32)
        if NEED_GX:
            gx += g[:, None] * go
        if NEED_GG:
            gg = tl.sum(go * diff, axis=1)  # (BLOCK_N,) partial over this D tile
            tl.store(gg_ptr + (pid_d * tl.num_programs(2) * K + bk) * N + n, gg, mask=n_ok)
        if NEED_GPH:
            gph += tl.sum(go * (1.0 - g)[:, None], axis=0)
    if NEED_GX:
        tl.store(gx_ptr + b * N * D + tile, gx.to(gx_ptr.dtype.element_ty), mask=tile_ok)
    if NEED_GPH:
        tl.store(gph_ptr + (b * tl.num_programs(0) + pid_n) * D + cols, gph, mask=col_ok)


# ----- launchers ------------------------------------------------------------------------------
def _block_sizes(rows: int, D: int, interpret: bool) -> tuple[int, int, int]:
    """(BLOCK_ROWS, BLOCK_D, num_warps) for a (rows, D) tile walk.

    On a GPU: 256-wide D tiles and ~4096-element programs (memory bound) on 8 warps. Under the
    interpreter every program costs Python overhead, so one program covers a whole image.
    """
    if interpret:
        return next_power_of_2(rows), next_power_of_2(D), 1
    block_d = min(next_power_of_2(D), 256)
    block_r = max(1, min(next_power_of_2(rows), 4096 // block_d))
    return block_r, block_d, 8


def _empty(shape, *, device, dtype) -> torch.Tensor:
    """Output allocation (one place, so tests can poison it)."""
    return torch.empty(shape, device=device, dtype=dtype)


def patch_mask_forward(
    x: torch.Tensor,
    gates: torch.Tensor,
    placeholder: Optional[torch.Tensor],
    cls_token: torch.Tensor,
    pos_embed: torch.Tensor,
) -> torch.Tensor:
    """Launch the forward kernel (no autograd). Shapes as in ``mask_patches``; gates must be (B, K, N)."""
    B, N, D = x.shape
    K = gates.shape[1]
    ph = placeholder if placeholder is not None else cls_token  # dummy pointer when HAS_PH is False
    device = launch_device("mask_patches", "patch_mask_reference", x, gates, ph, cls_token, pos_embed)
    x, gates, ph = x.contiguous(), gates.contiguous(), ph.contiguous()
    cls_token, pos_embed = cls_token.contiguous(), pos_embed.contiguous()
    out = _empty((B * K, N + 1, D), device=x.device, dtype=x.dtype)
    if out.numel() == 0:
        return out
    block_r, block_d, warps = _block_sizes(N + 1, D, interpreting())
    grid = (triton.cdiv(N + 1, block_r), triton.cdiv(D, block_d), B)
    with device_guard(device):
        _patch_mask_fwd_kernel[grid](
            x, gates, ph, cls_token, pos_embed, out, N, D, K,
            HAS_PH=placeholder is not None, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps,
        )  # fmt: skip
    return out


def patch_mask_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    gates: torch.Tensor,
    placeholder: Optional[torch.Tensor],
    need_x: bool,
    need_gates: bool,
    need_placeholder: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernel.

    Args:
        grad_out: (B*K, N+1, D) gradient of the output tokens.
        x: (B, N, D); gates: (B, K, N); placeholder: (D,) or None.
        need_x, need_gates, need_placeholder: which gradients to compute.

    Returns:
        grad_x (B, N, D) in x's dtype, grad_gates (B, K, N) in the gates' dtype, grad_placeholder (D,)
        in its dtype; a gradient that was not asked for is an empty tensor.
    """
    B, N, D = x.shape
    K = gates.shape[1]
    has_ph = placeholder is not None
    need_placeholder = need_placeholder and has_ph
    ph = placeholder if has_ph else x
    device = launch_device("mask_patches backward", "patch_mask_reference", grad_out, x, gates, ph)
    grad_out, x, gates, ph = grad_out.contiguous(), x.contiguous(), gates.contiguous(), ph.contiguous()
    block_n, block_d, warps = _block_sizes(N, D, interpreting())
    n_tiles, d_tiles = triton.cdiv(N, block_n), triton.cdiv(D, block_d)
    empty = x.new_empty(0)
    gx = _empty(x.shape, device=x.device, dtype=x.dtype) if need_x else empty
    gg = _empty((d_tiles, B * K, N), device=x.device, dtype=torch.float32) if need_gates else empty
    gph = _empty((B * n_tiles, D), device=x.device, dtype=torch.float32) if need_placeholder else empty
    if (need_x or need_gates or need_placeholder) and B * N * D * K > 0:
        with device_guard(device):
            _patch_mask_bwd_kernel[(n_tiles, d_tiles, B)](
                grad_out, x, gates, ph, gx, gg, gph, N, D, K,
                HAS_PH=has_ph, NEED_GX=need_x, NEED_GG=need_gates, NEED_GPH=need_placeholder,
                BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps,
            )  # fmt: skip
    grad_gates = gg.sum(0).view(B, K, N).to(gates.dtype) if need_gates else gates.new_empty(0)
    grad_ph = gph.sum(0).to(placeholder.dtype) if need_placeholder else x.new_empty(0)
    return gx, grad_gates, grad_ph


# torch.compile and CUDA graphs see the launchers as opaque ops with shape-only fake kernels.
@torch.library.custom_op("vdm_engine::patch_mask_fwd", mutates_args=())
def _patch_mask_fwd_op(
    x: torch.Tensor,
    gates: torch.Tensor,
    placeholder: Optional[torch.Tensor],
    cls_token: torch.Tensor,
    pos_embed: torch.Tensor,
) -> torch.Tensor:
    return patch_mask_forward(x, gates, placeholder, cls_token, pos_embed)


@_patch_mask_fwd_op.register_fake
def _(x, gates, placeholder, cls_token, pos_embed):
    B, N, D = x.shape
    return x.new_empty((B * gates.shape[1], N + 1, D))


@torch.library.custom_op("vdm_engine::patch_mask_bwd", mutates_args=())
def _patch_mask_bwd_op(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    gates: torch.Tensor,
    placeholder: Optional[torch.Tensor],
    need_x: bool,
    need_gates: bool,
    need_placeholder: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return patch_mask_backward(grad_out, x, gates, placeholder, need_x, need_gates, need_placeholder)


@_patch_mask_bwd_op.register_fake
def _(grad_out, x, gates, placeholder, need_x, need_gates, need_placeholder):
    gx = x.new_empty(x.shape) if need_x else x.new_empty(0)
    gg = gates.new_empty(gates.shape) if need_gates else gates.new_empty(0)
    has = need_placeholder and placeholder is not None
    gph = placeholder.new_empty(placeholder.shape) if has else x.new_empty(0)
    return gx, gg, gph


class PatchMaskFunction(torch.autograd.Function):
    """Autograd wrapper: gradients for x, gates (B, K, N), placeholder, cls_token and pos_embed."""

    @staticmethod
    def forward(ctx, x, gates, placeholder, cls_token, pos_embed):
        ctx.save_for_backward(x, gates, placeholder)
        ctx.has_placeholder = placeholder is not None
        return torch.ops.vdm_engine.patch_mask_fwd(x, gates, placeholder, cls_token, pos_embed)

    @staticmethod
    def backward(ctx, grad_out):
        x, gates, placeholder = ctx.saved_tensors
        if not ctx.has_placeholder:
            placeholder = None
        need_x, need_g, need_ph, need_cls, need_pos = ctx.needs_input_grad
        gx = gg = gph = gcls = gpos = None
        if need_x or need_g or need_ph:
            gx, gg, gph = torch.ops.vdm_engine.patch_mask_bwd(
                grad_out, x, gates, placeholder, need_x, need_g, need_ph and placeholder is not None
            )
            gx = gx if need_x else None
            gg = gg if need_g else None
            gph = gph if need_ph and placeholder is not None else None
        if need_cls or need_pos:  # frozen in practice; plain reductions when they do train
            per_token = grad_out.float().sum(0)  # (N+1, D)
            gcls = per_token[0] if need_cls else None
            gpos = per_token if need_pos else None
        return gx, gg, gph, gcls, gpos


# ----- public op ------------------------------------------------------------------------------
def _check_args(x, gates, placeholder, cls_token, pos_embed) -> None:
    if x.dim() != 3:
        raise ValueError(f"mask_patches: x must be (B, N, D) patch embeddings, got shape {tuple(x.shape)}")
    B, N, D = x.shape
    if gates.dim() not in (2, 3) or gates.shape[0] != B or gates.shape[-1] != N:
        raise ValueError(f"mask_patches: gates must be (B, N) or (B, K, N) with B={B}, N={N}; got {tuple(gates.shape)}")
    if placeholder is not None and tuple(placeholder.shape) != (D,):
        raise ValueError(f"mask_patches: placeholder must be ({D},) or None, got {tuple(placeholder.shape)}")
    if tuple(cls_token.shape) != (D,):
        raise ValueError(f"mask_patches: cls_token must be ({D},), got {tuple(cls_token.shape)}")
    if tuple(pos_embed.shape) != (N + 1, D):
        raise ValueError(f"mask_patches: pos_embed must be ({N + 1}, {D}), got {tuple(pos_embed.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"mask_patches: x must be float32, float16 or bfloat16, got {x.dtype}")
    if not gates.is_floating_point():
        raise ValueError(f"mask_patches: gates must be a float tensor, got {gates.dtype}")


def mask_patches(
    x: torch.Tensor,
    gates: torch.Tensor,
    placeholder: Optional[torch.Tensor],
    cls_token: torch.Tensor,
    pos_embed: torch.Tensor,
) -> torch.Tensor:
    """Triton twin of ``patch_mask_reference`` (same signature and result), differentiable.

    Args:
        x: (B, N, D) patch embeddings (before position embeddings), float32/float16/bfloat16.
        gates: (B, N) or (B, K, N) keep values in [0, 1]; K masks per image.
        placeholder: (D,) replacement vector, or None for zeros.
        cls_token: (D,) class token.
        pos_embed: (N+1, D) position embeddings.

    Returns:
        (B*K, N+1, D) tokens in x's dtype: row 0 = cls + pos[0]; row 1+n = g*x + (1-g)*placeholder + pos[1+n].
        Arithmetic is fp32 with one rounding on store.
    """
    _check_args(x, gates, placeholder, cls_token, pos_embed)
    g3 = gates if gates.dim() == 3 else gates.unsqueeze(1)
    return PatchMaskFunction.apply(x, g3, placeholder, cls_token, pos_embed)
