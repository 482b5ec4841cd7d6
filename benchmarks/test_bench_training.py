"""One gate-training step (clean pass, sampled gates, masked pass, backward, optimiser updates), in images/s.

The step timed is ``vdm_engine.training.train_step``, the one ``train_gates`` runs, with its NaN/Inf
health flags, at the last depth. On CUDA the training precision follows ``--vdm-dtype`` (fp16 runs
under autocast with the GradScaler, as ``vdm-train --precision fp16`` does); on CPU it is fp32.
"""

from __future__ import annotations

import copy

import pytest
import torch

from benchmarks.conftest import random_gates
from vdm_engine.training import TrainConfig, TrainState, train_step


def _step_fn(backbone, gates, precision: str):
    """A closure running one ``train_step`` at the last depth (the full mask: every probe in the graph)."""
    state = TrainState.create(backbone, gates, TrainConfig(precision=precision))
    depth = backbone.num_hidden_states - 1
    steps = {"done": state.config.warmup_steps}  # past the warm-up: the full probe learning rate

    def step(pv):
        out = train_step(state, pv, steps["done"], depth=depth)
        steps["done"] += 1
        return out.loss, out.stats, out.health

    return step


@pytest.mark.benchmark(group="training")
def test_training_step(measure, bench_config, bench_explainer, bench_pixels):
    backbone = bench_explainer.backbone
    gates = random_gates(backbone).to(bench_config.device)  # its own copy: the session gates stay untouched
    before = copy.deepcopy(gates.state_dict())
    precision = bench_config.dtype_name if bench_config.cuda else "fp32"
    loss, stats, health = measure("train/step", _step_fn(backbone, gates, precision), bench_pixels)
    assert torch.isfinite(loss) and torch.isfinite(stats.kl)
    assert not health[1:].any(), f"the step flagged a NaN/Inf (loss, gradient, parameter): {health[1:].tolist()}"
    changed = any(not torch.equal(before[k], v) for k, v in gates.state_dict().items())
    assert changed, "a training step left every gate parameter unchanged"
    assert all(not p.requires_grad for p in backbone.parameters()), "the training step unfroze the backbone"
