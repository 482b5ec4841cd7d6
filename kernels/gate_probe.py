"""Fused gate probe of one depth: log keep probabilities of every token from one hidden state.

For hidden states h_0 and h_s (B, T, D) the DiffMask probe of depth s (De Cao et al. 2020; Vision
DiffMask, Nalmpantis et al. 2023) computes per token

    z_s = mul * tanh(w2_s . tanh(W1_s[:, :D] h_0 + W1_s[:, D:] h_s + b1_s) + b2_s) + add_s
    log_keep_s = -softplus(offset - z_s)

The explain path launches it once per depth as the backbone produces h_s, so the L+2 hidden states
are never stacked. K-level gates (``Gates.fused_probes``) launch once per depth too: the grid's
second axis runs over the levels, whose probes lie P rows apart in the joined weights. Each program
owns a tile of tokens of one level: the two matmuls (h_0 half and h_s half of W1) run on ``tl.dot``
with fp32 accumulation, and tanh, the w2 projection and the hard-concrete log keep probability stay
in registers. A pass over D accumulates ``P_TILES`` P tiles (1 to 3) from each
loaded (h_0, h_s) tile, so h_s is read ceil(P / (P_TILES * BLOCK_P)) times (once when the tiles
cover P). Inference only: there is no backward.

Two entry points share the body ``_gate_probe_tile``: ``_gate_probe_kernel`` (GPU) takes the loop
bounds D and P as runtime arguments (one compiled variant for every model);
``_gate_probe_kernel_static`` (used under the interpreter) takes them as ``tl.constexpr``, because
Triton 3.6's interpreter turns a runtime loop bound into a Python int with ``int()`` of a
1-element array, which NumPy >= 2.4 rejects ("only 0-dimensional arrays can be converted to Python
scalars"). Triton 3.9 handles both.
"""


import torch

from vdm_engine.gates import FusedProbes, ProbeParams, gate_probe_levels_reference, gate_probe_reference

from ._triton import SUPPORTED_DTYPES, device_guard, interpreting, launch_device, next_power_of_2, tl, triton

__all__ = ["gate_probe_forward", "gate_probe_levels_reference", "gate_probe_reference", "probe_gates",
           "probe_gates_levels"]


# ----- kernel ---------------------------------------------------------------------------------
@triton.jit
def _tanh(x):
    # 1 - 2 / (exp(2x) + 1): exact limits at +-inf, abs error ~1e-7 in fp32; 2x clamped so exp never overflows.
    return 1.0 - 2.0 / (tl.exp(tl.minimum(2.0 * x, 80.0)) + 1.0)


@triton.jit
def _softplus(y):
    # max(y, 0) + log1p(exp(-|y|)), with a two-term series where log(1 + u) would round away u.
    u = tl.exp(-tl.abs(y))
    log1p_u = tl.where(u < 1e-4, u * (1.0 - 0.5 * u), tl.log(1.0 + u))
    return tl.maximum(y, 0.0) + log1p_u


@triton.jit
def _probe_dot(acc, h0, hs, w_ptr, w_off, w_ok, D, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    # acc (BLOCK_T, BLOCK_P) += h0 @ W1[:, :D]^T tile + hs @ W1[:, D:]^T tile; h0, hs in the dot dtype.
    wa = tl.load(w_ptr + w_off, mask=w_ok, other=0.0)
    wb = tl.load(w_ptr + D + w_off, mask=w_ok, other=0.0)
    if UPCAST:  # interpreter only: its tl.dot multiplies bf16 bit patterns; fp32 holds them exactly
        h0, hs, wa, wb = h0.to(tl.float32), hs.to(tl.float32), wa.to(tl.float32), wb.to(tl.float32)
    if IEEE:
        acc = tl.dot(h0, wa, acc, input_precision="ieee")
        acc = tl.dot(hs, wb, acc, input_precision="ieee")
    else:
        acc = tl.dot(h0, wa, acc)
        acc = tl.dot(hs, wb, acc)
    return acc


@triton.jit
def _probe_proj(acc, b1_ptr, w2_ptr, p, p_ok):
    # (BLOCK_T,) partial w2 . tanh(acc + b1) over one P tile; w2 is 0 on padded columns.
    b1 = tl.load(b1_ptr + p, mask=p_ok, other=0.0)
    w2 = tl.load(w2_ptr + p, mask=p_ok, other=0.0)
    return tl.sum(_tanh(acc + b1[None, :]) * w2[None, :], axis=1)


@triton.jit
def _gate_probe_tile(
    h0_ptr, hs_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, add_ptr, out_ptr, R, D, P, mul, offset,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_P: tl.constexpr,
    P_TILES: tl.constexpr,
):  # fmt: skip
    # One token tile through one depth's probe of level program_id(1); arguments as in _gate_probe_kernel.
    pid = tl.program_id(0)
    level = tl.program_id(1).to(tl.int64)  # K levels: their probes are stacked P rows apart
    w1_ptr += level * P * 2 * D
    b1_ptr += level * P
    w2_ptr += level * P
    b2_ptr += level
    add_ptr += level
    out_ptr += level * R
    row0 = pid.to(tl.int64) * BLOCK_T  # first token of this tile
    local = tl.arange(0, BLOCK_T)
    rows = row0 + local  # (BLOCK_T,) flattened token index b*T + t
    row_ok = rows < R
    offs_d = tl.arange(0, BLOCK_D)
    offs_p = tl.arange(0, BLOCK_P)
    # int32 offset tiles inside this token tile / the probe's W1; the int64 bases are scalars.
    h_tile = local[:, None] * D + offs_d[None, :]  # (BLOCK_T, BLOCK_D)
    w_tile = offs_p[None, :] * (2 * D) + offs_d[:, None]  # (BLOCK_D, BLOCK_P) view of W1^T
    h0_base = h0_ptr + row0 * D
    hs_base = hs_ptr + row0 * D
    dot_ty = w1_ptr.dtype.element_ty
    proj = tl.zeros((BLOCK_T,), dtype=tl.float32)  # w2 . tanh(pre)
    # P_TILES P tiles share each loaded (h_0, h_s) tile; P_TILES * BLOCK_P >= P reads h_s once.
    for p0 in range(0, P, BLOCK_P * P_TILES):
        p_a = p0 + offs_p
        p_b = p_a + BLOCK_P
        p_c = p_b + BLOCK_P
        acc_a = tl.zeros((BLOCK_T, BLOCK_P), dtype=tl.float32)  # pre-activation tiles
        acc_b = tl.zeros((BLOCK_T, BLOCK_P), dtype=tl.float32)
        acc_c = tl.zeros((BLOCK_T, BLOCK_P), dtype=tl.float32)
        pa_ok, pb_ok, pc_ok = p_a < P, p_b < P, p_c < P
        for d0 in range(0, D, BLOCK_D):
            d_ok = (d0 + offs_d) < D
            h_ok = row_ok[:, None] & d_ok[None, :]
            h0 = tl.load(h0_base + d0 + h_tile, mask=h_ok, other=0.0).to(dot_ty)
            hs = tl.load(hs_base + d0 + h_tile, mask=h_ok, other=0.0).to(dot_ty)
            w_off = w_tile + (p0 * 2 * D + d0)
            acc_a = _probe_dot(acc_a, h0, hs, w1_ptr, w_off, d_ok[:, None] & pa_ok[None, :], D, IEEE, UPCAST)
            if P_TILES > 1:
                w_off += BLOCK_P * 2 * D
                acc_b = _probe_dot(acc_b, h0, hs, w1_ptr, w_off, d_ok[:, None] & pb_ok[None, :], D, IEEE, UPCAST)
            if P_TILES > 2:
                w_off += BLOCK_P * 2 * D
                acc_c = _probe_dot(acc_c, h0, hs, w1_ptr, w_off, d_ok[:, None] & pc_ok[None, :], D, IEEE, UPCAST)
        proj += _probe_proj(acc_a, b1_ptr, w2_ptr, p_a, pa_ok)
        if P_TILES > 1:
            proj += _probe_proj(acc_b, b1_ptr, w2_ptr, p_b, pb_ok)
        if P_TILES > 2:
            proj += _probe_proj(acc_c, b1_ptr, w2_ptr, p_c, pc_ok)
    z = mul * _tanh(proj + tl.load(b2_ptr)) + tl.load(add_ptr)
    log_keep = -_softplus(offset - z)
    tl.store(out_ptr + rows, log_keep, mask=row_ok)


@triton.jit
def _gate_probe_kernel(
    h0_ptr,  # (R, D) first hidden state, R = B*T tokens, contiguous
    hs_ptr,  # (R, D) this depth's hidden state, same dtype (may be h0_ptr itself at depth 0)
    w1_ptr,  # (K*P, 2D) the K levels' first layers in the dot dtype; columns [0, D) act on h_0, [D, 2D) on h_s
    b1_ptr,  # (K*P,) fp32
    w2_ptr,  # (K*P,) fp32 second probe layers
    b2_ptr,  # (K,) fp32
    add_ptr,  # (K,) fp32 learned offsets
    out_ptr,  # (K, R) fp32 log keep of each token at each level
    R,
    D,
    P,  # width of one level's probe; the grid's second axis runs over the K levels
    mul,
    offset,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_P: tl.constexpr,
    P_TILES: tl.constexpr,  # 1..3 P tiles accumulated per pass over D
):
    # GPU entry: runtime loop bounds D, P (one compiled variant for every model).
    _gate_probe_tile(
        h0_ptr, hs_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, add_ptr, out_ptr, R, D, P, mul, offset,
        IEEE, UPCAST, BLOCK_T, BLOCK_D, BLOCK_P, P_TILES,
    )  # fmt: skip


@triton.jit
def _gate_probe_kernel_static(
    h0_ptr, hs_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, add_ptr, out_ptr,
    R,
    D: tl.constexpr,
    P: tl.constexpr,
    mul,
    offset,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_P: tl.constexpr,
    P_TILES: tl.constexpr,
):  # fmt: skip
    # Interpreter entry (same arguments, loop bounds constexpr): see the module docstring.
    _gate_probe_tile(
        h0_ptr, hs_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, add_ptr, out_ptr, R, D, P, mul, offset,
        IEEE, UPCAST, BLOCK_T, BLOCK_D, BLOCK_P, P_TILES,
    )  # fmt: skip


# ----- launcher -------------------------------------------------------------------------------
def _block_sizes(R: int, D: int, P: int, interpret: bool, elem_bytes: int = 2) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_T, BLOCK_D, BLOCK_P, P_TILES, num_warps, num_stages); every block is >= 16 for ``tl.dot``.

    GPU: 64-token tiles, 64-wide P tiles, 64-wide D steps for half inputs and 32-wide for fp32.
    Half inputs use 4 warps and 3 stages and, when P fits in at most three P tiles, accumulate all
    of them in one pass over D (``P_TILES``) so each hidden-state tile is loaded once per depth;
    more P tiles take one per pass. fp32 uses 8 warps and 2 stages. (Timings behind these choices:
    benchmarks/results/gpu-h100-2026-11-26/README.md.)
    Interpreter: one D and P tile and up to 256 tokens per program (Python overhead per program).
    """
    if interpret:
        return max(16, min(next_power_of_2(R), 256)), max(16, next_power_of_2(D)), max(16, next_power_of_2(P)), 1, 1, 1
    block_p = max(16, min(next_power_of_2(P), 64))
    if elem_bytes <= 2:
        p_tiles = -(-P // block_p)
        return 64, 64, block_p, p_tiles if p_tiles <= 3 else 1, 4, 3
    return 64, 32, block_p, 1, 8, 2


def _kernel(interpret: bool):
    """The entry point: constexpr loop bounds under the interpreter, runtime bounds on the GPU."""
    return _gate_probe_kernel_static if interpret else _gate_probe_kernel


def _empty(shape, *, device, dtype) -> torch.Tensor:
    """Output allocation (one place, so tests can poison it)."""
    return torch.empty(shape, device=device, dtype=dtype)


def _dot_dtype(hidden_dtype: torch.dtype, w1_dtype: torch.dtype) -> torch.dtype:
    # The reference computes in the probes' dtype; half probes win, else half activations set the
    # tensor-core dtype (fp32 accumulation either way).
    return w1_dtype if w1_dtype != torch.float32 else hidden_dtype


def _check_args(h0: torch.Tensor, hs: torch.Tensor, probes: ProbeParams, depth: int, name: str = "probe_gates") -> None:
    if hs.dim() != 3 or h0.shape != hs.shape:
        raise ValueError(
            f"{name}: h0 and hs must both be (B, T, D), got shapes {tuple(h0.shape)} and {tuple(hs.shape)}"
        )
    if h0.dtype != hs.dtype:
        raise ValueError(f"{name}: h0 and hs must share a dtype, got {h0.dtype} and {hs.dtype}")
    B, T, D = hs.shape
    w1, b1, w2, b2, add = probes.w1, probes.b1, probes.w2, probes.b2, probes.add
    if w1.dim() != 3 or w1.shape[2] != 2 * D:
        raise ValueError(f"{name}: probes.w1 must be (S, P, 2D={2 * D}) for hidden states {tuple(hs.shape)}, got {tuple(w1.shape)}")
    S, P = w1.shape[:2]
    if not 0 <= depth < S:
        raise ValueError(f"{name}: depth must be in [0, {S}) for {S} probes, got {depth}")
    for field, t, shape in (("b1", b1, (S, P)), ("w2", w2, (S, P)), ("b2", b2, (S,)), ("add", add, (S,))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}: probes.{field} must be {shape}, got {tuple(t.shape)}")
    if hs.dtype not in SUPPORTED_DTYPES or w1.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"{name}: hidden states and probes must be float32, float16 or bfloat16, got {hs.dtype} and {w1.dtype}"
        )


def gate_probe_forward(
    h0: torch.Tensor,
    hs: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    add: torch.Tensor,
    mul: float,
    offset: float,
) -> torch.Tensor:
    """Launch one depth's probe (no checks on shapes; see ``probe_gates``).

    Args:
        h0, hs: (B, T, D); w1 (K*P, 2D); b1, w2 (K*P,); b2, add (K,): this depth's probes of K levels
            (K = 1: one probe), level-major rows.

    Returns:
        log_keep (K, B, T) float32. fp32 hidden states use IEEE fp32 dots unless
        ``torch.set_float32_matmul_precision`` allows TF32.
    """
    B, T, D = hs.shape
    K = b2.shape[0]
    P = w1.shape[0] // K
    device = launch_device("probe_gates", "gate_probe_reference", h0, hs, w1, b1, w2, b2, add)
    R = B * T
    h0c, hsc = h0.contiguous(), hs.contiguous()
    dot_dtype = _dot_dtype(hsc.dtype, w1.dtype)
    w1c = w1.detach().to(dot_dtype).contiguous()
    b1c, w2c, b2c, addc = (t.detach().to(torch.float32).contiguous() for t in (b1, w2, b2, add))
    out = _empty((K, B, T), device=device, dtype=torch.float32)
    if out.numel() == 0:
        return out
    ieee = dot_dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"
    interp = interpreting()
    block_t, block_d, block_p, p_tiles, warps, stages = _block_sizes(R, D, P, interp, w1c.element_size())
    if not 1 <= p_tiles <= 3:
        raise ValueError(f"probe_gates: P_TILES must be 1 to 3, got {p_tiles}")
    with device_guard(device):
        _kernel(interp)[(triton.cdiv(R, block_t), K)](
            h0c, hsc, w1c, b1c, w2c, b2c, addc, out, R, D, P, float(mul), float(offset),
            IEEE=ieee, UPCAST=dot_dtype == torch.bfloat16 and interp,
            BLOCK_T=block_t, BLOCK_D=block_d, BLOCK_P=block_p, P_TILES=p_tiles, num_warps=warps, num_stages=stages,
        )  # fmt: skip
    return out


# torch.compile and CUDA graphs see the launcher as one opaque op with a shape-only fake kernel.
@torch.library.custom_op("vdm_engine::gate_probe", mutates_args=())
def _gate_probe_op(
    h0: torch.Tensor,
    hs: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    add: torch.Tensor,
    mul: float,
    offset: float,
) -> torch.Tensor:
    return gate_probe_forward(h0, hs, w1, b1, w2, b2, add, mul, offset)


@_gate_probe_op.register_fake
def _(h0, hs, w1, b1, w2, b2, add, mul, offset):
    B, T, _ = hs.shape
    return hs.new_empty((b2.shape[0], B, T), dtype=torch.float32)


# ----- public op ------------------------------------------------------------------------------
def probe_gates(h0: torch.Tensor, hs: torch.Tensor, probes: ProbeParams, depth: int) -> torch.Tensor:
    """Triton twin of ``gate_probe_reference``: log keep probability of every token at one depth.

    Args:
        h0: (B, T, D) the first hidden state; hs: (B, T, D) hidden state ``depth``, same dtype
            (float32, float16 or bfloat16).
        probes: stacked probe weights of all depths (``Gates.probe_params()``).
        depth: which probe, 0 <= depth < S.

    Returns:
        log_keep (B, T) float32. Inference only (no gradient).
    """
    _check_args(h0, hs, probes, depth)
    p, s = probes, int(depth)
    return torch.ops.vdm_engine.gate_probe(
        h0, hs, p.w1[s], p.b1[s], p.w2[s], p.b2[s : s + 1], p.add[s : s + 1], float(p.mul), float(p.offset)
    )[0]


def probe_gates_levels(h0: torch.Tensor, hs: torch.Tensor, probes: FusedProbes, depth: int) -> torch.Tensor:
    """Triton twin of ``gate_probe_levels_reference``: one launch for the probes of all K levels.

    The grid's second axis runs over the levels; each program is ``probe_gates``'s on its level's
    rows of the joined weights.

    Args:
        h0, hs: (B, T, D) as for ``probe_gates``.
        probes: ``Gates.fused_probes()``.
        depth: 0 <= depth < S.

    Returns:
        log_keep (B, K, T) float32 (a view of the kernel's (K, B, T) output). Inference only.
    """
    K = probes.levels
    w1 = probes.w1
    if w1.dim() != 3 or w1.shape[1] % K:
        raise ValueError(f"probe_gates_levels: probes.w1 must be (S, K*P, 2D) with K={K}, got {tuple(w1.shape)}")
    S, KP = w1.shape[:2]
    # The per-level view the single-level checks read: same shapes, P = K*P / K.
    per_probe = ProbeParams(w1, probes.b1, probes.w2, probes.b2[:, 0], probes.bias[:, 0], probes.mul, 0.0)
    _check_args(h0, hs, per_probe, depth, "probe_gates_levels")
    for name, t in (("b2", probes.b2), ("bias", probes.bias)):
        if tuple(t.shape) != (S, K):
            raise ValueError(f"probe_gates_levels: probes.{name} must be ({S}, {K}), got {tuple(t.shape)}")
    p, s = probes, int(depth)
    out = torch.ops.vdm_engine.gate_probe(h0, hs, p.w1[s], p.b1[s], p.w2[s], p.b2[s], p.bias[s], float(p.mul), 0.0)
    return out.transpose(0, 1)
