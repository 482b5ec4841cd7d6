"""One gate-training step (clean pass, sampled gates, masked pass, backward, optimiser updates), in images/s."""

from __future__ import annotations

import copy

import pytest
import torch

from benchmarks.conftest import random_gates
from vdm_engine.training import TrainConfig, objective


def _step_fn(backbone, gates, pixel_values):
    """A closure running one training step with ``vdm_engine.training``'s objective at the last depth."""
    cfg = TrainConfig()
    gates.train()
    obj = objective.GateObjective(backbone, gates, alpha_init=cfg.alpha_init, eps=cfg.eps, l0=cfg.l0)
    obj.alpha.data = obj.alpha.data.to(backbone.device)
    params = [p for p in gates.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr_probe)
    opt_alpha = torch.optim.RMSprop([obj.alpha], lr=cfg.lr_alpha, centered=True)
    generator = torch.Generator(device=backbone.device).manual_seed(0)
    depth = backbone.num_hidden_states - 1  # the full mask: every probe in the graph

    def step(pv):
        logits, hidden = objective.clean_pass(backbone, pv)
        loss, stats = obj(logits, hidden, depth, generator)
        opt.zero_grad(set_to_none=True)
        opt_alpha.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        obj.alpha.grad.neg_()  # ascent on the Lagrange multipliers
        opt.step()
        opt_alpha.step()
        with torch.no_grad():
            obj.alpha.clamp_(0.0, cfg.alpha_max)
        return loss.detach(), stats

    return step


@pytest.mark.benchmark(group="training")
def test_training_step(measure, bench_config, bench_explainer, bench_pixels):
    backbone = bench_explainer.backbone
    gates = random_gates(backbone).to(bench_config.device)  # its own copy: the session gates stay untouched
    before = copy.deepcopy(gates.state_dict())
    loss, stats = measure("train/step", _step_fn(backbone, gates, bench_pixels), bench_pixels)
    assert torch.isfinite(loss) and torch.isfinite(stats.kl)
    changed = any(not torch.equal(before[k], v) for k, v in gates.state_dict().items())
    assert changed, "a training step left every gate parameter unchanged"
    assert all(not p.requires_grad for p in backbone.parameters()), "the training step unfroze the backbone"
