"""Explain and predict through ``torch.compile`` with one static shape per batch bucket.

``Explainer.compile(batch_sizes=...)`` returns a ``CompiledExplainer``: a batch of n images is
padded to the smallest bucket >= n, run through the graph compiled for that bucket (on CUDA with
``mode="reduce-overhead"``: CUDA graphs, so a call is one graph replay instead of hundreds of kernel
launches), and the first n rows are returned. Batches above the largest bucket run in chunks of
it. Plain prediction goes through the same machinery, so explain and predict compare fairly.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

__all__ = ["CompiledExplainer", "bucket_for", "pad_batch", "DEFAULT_BUCKETS"]

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def _check_buckets(batch_sizes: Sequence[int]) -> tuple[int, ...]:
    buckets = tuple(sorted({int(b) for b in batch_sizes}))
    if not buckets or buckets[0] < 1:
        raise ValueError(f"batch_sizes must be positive integers, got {tuple(batch_sizes)}")
    return buckets


def bucket_for(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= ``n``; the largest bucket when ``n`` exceeds them all (run in chunks)."""
    if n < 1:
        raise ValueError(f"a batch needs at least one image, got {n}")
    return next((b for b in buckets if b >= n), buckets[-1])


def pad_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """(n, ...) -> (size, ...) with zero rows appended (``x`` itself when n == size)."""
    n = x.shape[0]
    if n > size:
        raise ValueError(f"cannot pad a batch of {n} down to {size}")
    if n == size:
        return x
    return torch.cat([x, x.new_zeros((size - n, *x.shape[1:]))])


class CompiledExplainer:
    """Bucketed compiled ``explain`` and ``predict`` of an ``Explainer`` (see ``Explainer.compile``).

    Attributes:
        explainer: the eager explainer (its ops, gates and backbone are what is compiled; the gates'
            weights as they are when this is built).
        buckets: the batch sizes compiled, ascending.
        outputs: what ``explain`` computes: logits, patch_mask, layer_masks, and patch_rank for K-level gates.
    """

    def __init__(self, explainer, batch_sizes: Sequence[int] = DEFAULT_BUCKETS, *, mode: str | None = None,
                 backend: str = "inductor", warmup: bool = False):
        self.explainer = explainer
        self.buckets = _check_buckets(batch_sizes)
        cuda = explainer.backbone.device.type == "cuda"
        self.mode = mode if mode is not None else ("reduce-overhead" if cuda else "default")
        kw = {"backend": backend, "dynamic": False}
        if backend == "inductor":
            kw["mode"] = self.mode
        # Every bucket is one more static shape of the same code: allow that many recompilations.
        limit = torch._dynamo.config.cache_size_limit
        torch._dynamo.config.cache_size_limit = max(limit, 2 * len(self.buckets) + 2)
        rank = explainer.gates.config.levels > 1
        self.outputs = ("logits", "patch_mask", "layer_masks") + (("patch_rank",) if rank else ())
        # The wide layout's joined weights, built once here: inside a compiled graph they would be
        # rebuilt from the gate parameters on every call. The gates' weights are read at this point.
        with torch.no_grad():
            wide = explainer.gates.wide_probes(rank) if explainer.ops.probe_layout != "per-depth" else None

        def explain_core(pv):
            out = explainer.run(pv, self.outputs, wide=wide)
            return tuple(out[o] for o in self.outputs)

        self._explain = torch.compile(explain_core, **kw)
        self._predict = torch.compile(explainer.backbone.forward, **kw)
        if warmup:
            self.warmup()

    def warmup(self, rounds: int | None = None) -> None:
        """Compile (and on CUDA record the graphs of) every bucket now, instead of on first use;
        ``rounds`` calls per bucket (default 3 on CUDA, where graphs are recorded on a later call, else 1)."""
        if rounds is None:
            rounds = 3 if self.explainer.backbone.device.type == "cuda" else 1
        H, W = self.explainer.backbone.image_size
        b = self.explainer.backbone
        for size in self.buckets:
            pv = torch.zeros(size, b.config.num_channels, H, W, device=b.device, dtype=b.dtype)
            for _ in range(rounds):
                self.explain(pv)
                self.predict(pv)

    def _bucketed(self, fn: Callable, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Run ``fn`` on padded chunks; the first rows of each output, concatenated over chunks."""
        n = pixel_values.shape[0]
        parts: list[tuple[torch.Tensor, ...]] = []
        top = self.buckets[-1]
        with torch.no_grad():
            for start in range(0, n, top):
                chunk = pixel_values[start : start + top]
                size = bucket_for(chunk.shape[0], self.buckets)
                out = fn(pad_batch(chunk, size))
                out = out if isinstance(out, tuple) else (out,)
                # clone: CUDA-graph outputs live in memory the next replay overwrites
                parts.append(tuple(o[: chunk.shape[0]].clone() for o in out))
        return [torch.cat(p) if len(p) > 1 else p[0] for p in zip(*parts)]

    def explain(self, pixel_values: torch.Tensor):
        """As ``Explainer.explain``: (B, 3, H, W) -> ``Explanation``, through the bucket's compiled graph."""
        from .explainer import Explanation

        e = self.explainer
        e.backbone.check_pixels(pixel_values)
        out = dict(zip(self.outputs, self._bucketed(self._explain, pixel_values.to(e.backbone.device, e.backbone.dtype))))
        return Explanation(
            logits=out["logits"], patch_mask=out["patch_mask"], layer_masks=out["layer_masks"], grid=e.backbone.grid,
            image_size=e.backbone.image_size, gates_source=e.gates.provenance.source, gates_sha256=e.gates.sha256,
            patch_rank=out.get("patch_rank"),
        )

    def predict(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Plain inference through the same buckets: (B, 3, H, W) -> logits (B, C)."""
        b = self.explainer.backbone
        return self._bucketed(self._predict, pixel_values.to(b.device, b.dtype))[0]
