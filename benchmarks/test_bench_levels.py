"""Explain with K-level gates (``levels=4``: the one-pass ranking, ``patch_rank``) beside plain inference.

The issue's bar: explain with K = 4 levels within 1.15x plain inference. The ``explain/torch-levels4*``
cases run in the ``inference`` group, so the report reads them against ``plain/torch``. Each also
records the load-independent cost, ``flop_ratio``: FLOPs of one explain call over one plain forward,
counted by ``torch.utils.flop_counter`` (matmuls and attention). Probe width D/4 (the default) costs
about 4.6% of a ViT-B/16 forward per level; D/8 half that, D/16 (the width that met the agreement bar
on digits) a quarter.

``test_levels_paired`` calls plain inference, single-level explain and K = 4 explain at D/4, D/8 and
D/16 back to back in every round (order rotated, ``test_bench_paired.round_order``), so each ratio sees
the same load: it records the best (min) round of each and their ratios, by wall time and by the
process's CPU time (which other processes on a shared machine disturb less; with one thread it is
the time the work itself ran), and prints them beside each case's ``flop_ratio``. The ready command (about 2 minutes on vit-small):

    OMP_WAIT_POLICY=PASSIVE pytest benchmarks/test_bench_levels.py --benchmark-only --vdm-threads 1 -k paired -s
"""

from __future__ import annotations

import pytest
import torch

import time

PROBE_DIVISORS = {"": 4, "-p8": 8, "-p16": 16}  # case suffix -> probe width D // divisor


def flop_ratio(explainer, pixels: torch.Tensor) -> float:
    """FLOPs of ``explainer.explain(pixels)`` over those of the plain forward ``backbone(pixels)``."""
    from torch.utils.flop_counter import FlopCounterMode

    counts = []
    with torch.no_grad():
        for fn in (explainer.backbone, explainer.explain):
            mode = FlopCounterMode(display=False)
            with mode:
                fn(pixels)
            counts.append(mode.get_total_flops())
    return counts[1] / counts[0]


def levels_explainer_for(backbone, divisor: int, device):
    """K = 4 random-weight levels of probe width D // divisor joined with ``Gates.stack``, reference ops."""
    from vdm_engine import Explainer, GateConfig, Gates

    from .conftest import use_kernels

    D = backbone.hidden_size
    levels = []
    for s in range(1, 5):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            g = Gates(GateConfig(D, backbone.num_hidden_states, probe_size=max(1, D // divisor)))
            with torch.no_grad():
                g.placeholder.normal_()
                g.add.copy_(torch.linspace(-1.0, 3.0, g.add.numel()))
        levels.append(g)
    ex = Explainer(backbone, Gates.stack(levels).to(device).eval()).eval()
    use_kernels(ex, "reference")
    return ex


@pytest.fixture(scope="module", params=list(PROBE_DIVISORS), ids=lambda s: f"probe-d{PROBE_DIVISORS[s]}")
def levels_explainer(request, bench_config, bench_backbone):
    return request.param, levels_explainer_for(bench_backbone, PROBE_DIVISORS[request.param], bench_config.device)


@pytest.mark.benchmark(group="inference")
def test_explain_levels4(benchmark, measure, bench_config, levels_explainer, bench_pixels):
    suffix, ex = levels_explainer
    if benchmark.enabled:  # timed runs only: plain pytest runs the body once, as cheaply as it can
        benchmark.extra_info["flop_ratio"] = round(flop_ratio(ex, bench_pixels[:1]), 4)
    benchmark.extra_info["probe_size"] = ex.gates.config.probe_size
    exp = measure(f"explain/torch-levels4{suffix}", ex.explain, bench_pixels)
    B, N = bench_config.batch, ex.backbone.num_patches
    assert exp.patch_rank.shape == (B, N) and torch.isfinite(exp.patch_rank).all()
    assert float(exp.patch_rank.min()) >= 0 and float(exp.patch_rank.max()) <= 5


@pytest.mark.benchmark(group="levels-paired")
def test_levels_paired(benchmark, measure, bench_config, bench_backbone, bench_explainer, bench_pixels):
    from .test_bench_paired import round_order

    def plain(pv):
        with torch.no_grad():
            return bench_backbone.hf_forward(pv)

    explainers = {"explain/torch-reference": bench_explainer}
    for suffix in ("", "-p8", "-p16"):
        explainers[f"explain/torch-levels4{suffix}"] = levels_explainer_for(
            bench_backbone, PROBE_DIVISORS[suffix], bench_config.device)
    variants = {"plain/torch": plain, **{case: ex.explain for case, ex in explainers.items()}}
    wall: dict[str, list[float]] = {case: [] for case in variants}
    cpu: dict[str, list[float]] = {case: [] for case in variants}
    rounds_run = 0

    def one_round():
        nonlocal rounds_run
        for case in round_order(list(variants), rounds_run):
            c0, w0 = time.process_time(), time.perf_counter()
            variants[case](bench_pixels)
            if bench_config.cuda:
                torch.cuda.synchronize()
            wall[case].append(time.perf_counter() - w0)
            cpu[case].append(time.process_time() - c0)
        rounds_run += 1

    measure("paired/levels", one_round, budget_s=8 * bench_config.budget_s, min_rounds=3)
    assert all(len(t) == rounds_run and min(t) > 0 for t in wall.values())
    if not benchmark.enabled:
        return
    keep = slice(1, None)  # the warm-up round
    info = {}
    for name, times in (("wall", wall), ("cpu", cpu)):
        best = {case: min(t[keep]) for case, t in times.items()}
        info[f"best_{name}_ms"] = {case: round(1e3 * b, 2) for case, b in best.items()}
        info[f"ratio_{name}"] = {case: round(b / best["plain/torch"], 4) for case, b in best.items()}
    info["flop_ratio"] = {case: round(flop_ratio(ex, bench_pixels[:1]), 4) for case, ex in explainers.items()}
    info["flop_ratio"]["plain/torch"] = 1.0
    benchmark.extra_info.update(info, rounds_timed=rounds_run - 1)
    print(f"\n[levels-paired] {bench_config.model} batch {bench_config.batch} threads {torch.get_num_threads()}, "
          f"{rounds_run - 1} rounds, best of rounds; ratio to plain (wall / cpu):")
    for case in variants:
        print(f"  {case:28s} {info['best_wall_ms'][case]:8.2f} ms {info['ratio_wall'][case]:.3f}x"
              f" | cpu {info['best_cpu_ms'][case]:8.2f} ms {info['ratio_cpu'][case]:.3f}x"
              f" | flops {info['flop_ratio'][case]:.3f}x")
