"""ROAD: removal with noisy linear imputation (Rong et al. 2022, "A Consistent and Efficient Evaluation
Strategy for Attribution Methods").

Replacing removed pixels by a constant or by noise leaves the patch's outline in the image, and the
model may read the outline itself (the class information leaks through the shape of the mask). ROAD
fills every removed pixel with the weighted mean of its 8 neighbours (weight 1/6 for the 4 direct
neighbours, 1/12 for the diagonal ones; neighbours outside the image are dropped), solved jointly for
all removed pixels as one sparse linear system per image and channel, then adds small Gaussian noise.

The system for removed pixel i with in-image neighbours j (weights w_ij):

    (sum_j w_ij) x_i - sum_{j removed} w_ij x_j = sum_{j kept} w_ij x_j

is symmetric and irreducibly diagonally dominant whenever at least one pixel is kept, so it is
positive definite with one solution. Removing every pixel leaves nothing to impute from, which ROAD
never evaluates. ``noisy_linear_imputation`` solves many images (and every channel) at once as one
block-diagonal sparse system (scipy's direct solver; scipy is in the ``eval`` extra).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["noisy_linear_imputation", "road_logits", "ROAD_NOISE"]

#: Standard deviation of the noise added to imputed pixels (normalised units), ROAD's default.
ROAD_NOISE = 0.01

_OFFSETS = [(-1, 0, 1 / 6), (1, 0, 1 / 6), (0, -1, 1 / 6), (0, 1, 1 / 6),
            (-1, -1, 1 / 12), (-1, 1, 1 / 12), (1, -1, 1 / 12), (1, 1, 1 / 12)]


#: Pixels per sparse solve: images are solved together as one block-diagonal system in chunks this big.
_SOLVE_PIXELS = 1 << 16


def _linear_imputation(x: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """(M, C, H, W) float64 images, (M, H, W) bool -> (M, C, H, W) with the removed pixels solved for.

    All images form one block-diagonal sparse system (unknowns: the removed pixels of every image),
    solved directly for the C channels as C right-hand sides.
    """
    from scipy.sparse import csc_matrix
    from scipy.sparse.linalg import spsolve

    M, C, H, W = x.shape
    unknown = np.flatnonzero(removed.reshape(-1))  # global pixel index m*H*W + row*W + col
    n = unknown.size
    out = x.copy()
    if n == 0:
        return out
    index = np.full(M * H * W, -1, dtype=np.int64)
    index[unknown] = np.arange(n)
    m, rc = np.divmod(unknown, H * W)
    r, c = np.divmod(rc, W)
    pixels = x.transpose(0, 2, 3, 1).reshape(M * H * W, C)
    diag, rhs = np.zeros(n), np.zeros((n, C))
    rows, cols, vals = [np.arange(n)], [np.arange(n)], []
    for dr, dc, w in _OFFSETS:
        rr, cc = r + dr, c + dc
        inside = (rr >= 0) & (rr < H) & (cc >= 0) & (cc < W)
        src = np.flatnonzero(inside)
        nbr = m[inside] * H * W + rr[inside] * W + cc[inside]
        diag[src] += w
        j = index[nbr]
        removed_nbr = j >= 0
        rows.append(src[removed_nbr])
        cols.append(j[removed_nbr])
        vals.append(np.full(int(removed_nbr.sum()), -w))
        rhs[src[~removed_nbr]] += w * pixels[nbr[~removed_nbr]]  # each src appears once per offset
    vals.insert(0, diag)
    A = csc_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
    sol = np.asarray(spsolve(A, rhs)).reshape(n, C)
    flat = out.transpose(0, 2, 3, 1).reshape(M * H * W, C).copy()
    flat[unknown] = sol
    return flat.reshape(M, H, W, C).transpose(0, 3, 1, 2).copy()


def noisy_linear_imputation(pixel_values: torch.Tensor, removed: torch.Tensor, *, noise: float = ROAD_NOISE,
                            generators: list[torch.Generator] | None = None) -> torch.Tensor:
    """Fill removed pixels from their neighbours (see the module docstring), plus Gaussian noise.

    Args:
        pixel_values: (B, C, H, W) images (normalised; the imputation commutes with per-channel affine maps).
        removed: (B, H, W) bool, True where a pixel is removed; each image must keep at least one pixel.
        noise: standard deviation of the noise added to the imputed pixels (0: plain linear imputation).
        generators: one CPU generator per image for the noise (default the global RNG).

    Returns:
        (B, C, H, W) images equal to ``pixel_values`` where kept (solved in float64 on the CPU).

    Raises:
        ValueError: shapes, or an image with every pixel removed.
        ImportError: without scipy (one line naming the ``eval`` extra).
    """
    try:
        import scipy.sparse.linalg  # noqa: F401
    except ImportError:
        raise ImportError("ROAD's imputation needs scipy: pip install 'vdm-engine[eval]' (or scipy)") from None
    B, C, H, W = pixel_values.shape
    if removed.shape != (B, H, W):
        raise ValueError(f"removed must be (B={B}, H={H}, W={W}) bool, got {tuple(removed.shape)}")
    if generators is not None and len(generators) != B:
        raise ValueError(f"need one generator per image ({B}), got {len(generators)}")
    rm = removed.detach().cpu().bool()
    full = rm.flatten(1).all(1)
    if bool(full.any()):
        b = int(full.nonzero()[0, 0])
        raise ValueError(f"image {b}: every pixel is removed; ROAD needs at least one kept pixel to impute from")
    x = pixel_values.detach().cpu().double().numpy()
    step = max(1, _SOLVE_PIXELS // (H * W))
    out = torch.from_numpy(np.concatenate([_linear_imputation(x[i : i + step], rm[i : i + step].numpy())
                                           for i in range(0, B, step)]))
    if noise:
        eps = torch.stack([torch.randn(C, H, W, generator=g, dtype=torch.float64) for g in generators]) \
            if generators is not None else torch.randn(B, C, H, W, dtype=torch.float64)
        out = out + noise * eps * rm.unsqueeze(1)
    return out.to(pixel_values.device, pixel_values.dtype)


@torch.no_grad()
def road_logits(backbone, pixel_values: torch.Tensor, gates: torch.Tensor, *, noise: float = ROAD_NOISE,
                seeds=None, max_rows: int = 512) -> torch.Tensor:
    """Logits of each image with the patches its gates drop removed by noisy linear imputation.

    Args:
        backbone: ``vdm_engine.Backbone``.
        pixel_values: (B, 3, H, W).
        gates: (B, K, N) patch gates, 1 kept and 0 removed; every row must keep a patch.
        noise: see ``noisy_linear_imputation``.
        seeds: one integer per image seeding its noise (the same noise stream for every method).
        max_rows: imputed images per backbone pass.

    Returns:
        (B, K, C) logits.
    """
    B, K, N = gates.shape
    _, C, H, W = pixel_values.shape
    ph, pw = backbone.patch_size
    gh, gw = backbone.grid
    if N != gh * gw:
        raise ValueError(f"gates must have N={gh * gw} patches, got {N}")
    seeds = list(range(B)) if seeds is None else list(seeds)
    if len(seeds) != B:
        raise ValueError(f"need one seed per image ({B}), got {len(seeds)}")
    keep = gates.detach().cpu() > 0.5
    px = keep.view(B, K, gh, 1, gw, 1).expand(B, K, gh, ph, gw, pw).reshape(B, K, gh * ph, gw * pw)
    px = torch.nn.functional.pad(px, (0, W - gw * pw, 0, H - gh * ph), value=True)  # uncovered border: kept
    # one noise stream per (image, step), the same for every method
    gens = [torch.Generator().manual_seed(int(s) * 1009 + k) for s in seeds for k in range(K)]
    images = noisy_linear_imputation(pixel_values.cpu().repeat_interleave(K, 0), ~px.reshape(B * K, *px.shape[2:]),
                                     noise=noise, generators=gens).to(backbone.device, backbone.dtype)
    logits = torch.cat([backbone(images[i : i + max_rows]) for i in range(0, B * K, max_rows)])
    return logits.float().view(B, K, -1)
