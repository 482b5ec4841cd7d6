"""One training step: the loss scaler covers both optimisers, the NaN/Inf flags name the step, resumed settings."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from vdm_engine import Explainer
from vdm_engine.training import TrainConfig, TrainingDiverged, TrainState, new_gates, resume_config, train_gates, train_step
from vdm_engine.training.checkpoint import load_checkpoint
from vdm_engine.training.data import toy_batch
from vdm_engine.training.rundir import CHECKPOINT, METRICS
from vdm_engine.training.step import first_divergence

SMALL = TrainConfig(steps=40, batch_size=8, eval_interval=10, checkpoint_interval=10, val_size=12, warmup_steps=5)


@pytest.fixture
def toy_pixels(tiny_backbone):
    return tiny_backbone.preprocess(toy_batch(64, 0)[0]), tiny_backbone.preprocess(toy_batch(12, 1)[0])


def _state(backbone, scaler=None) -> TrainState:
    state = TrainState.create(backbone, new_gates(backbone, SMALL), SMALL)
    if scaler is not None:
        state.scaler = scaler  # loss scaling as fp16 on CUDA has it, on the CPU here
    return state


def _optimizer_tensors(state: TrainState) -> dict:
    return {f"{name}.{i}.{k}": v for name, o in (("opt", state.opt), ("opt_alpha", state.opt_alpha))
            for i, st in o.state_dict()["state"].items() for k, v in st.items()}


def test_loss_scaling_unscales_the_multipliers_too(tiny_backbone, toy_pixels, close):
    """With a (power-of-two) loss scale every update, optimiser state included, equals the unscaled one:
    the multipliers' RMSprop must see unscaled gradients, as the probes' Adam does."""
    plain = _state(tiny_backbone)
    scaled = _state(tiny_backbone, torch.amp.GradScaler("cpu", init_scale=2.0**12))
    assert scaled.scaler.is_enabled() and not plain.scaler.is_enabled()
    pv = toy_pixels[0][:8]
    for step in range(3):
        a, b = train_step(plain, pv, step), train_step(scaled, pv, step)
        assert a.depth == b.depth
        assert not b.health[1:].any(), b.health
    close(scaled.objective.alpha, plain.objective.alpha, 1e-6, 1e-6, "alpha")
    for k, v in plain.gates.state_dict().items():
        close(scaled.gates.state_dict()[k], v, 1e-6, 1e-5, k)
    sa, sb = _optimizer_tensors(plain), _optimizer_tensors(scaled)
    assert sa.keys() == sb.keys() and any(k.startswith("opt_alpha.") for k in sa)
    for k in sa:
        close(sb[k].float(), sa[k].float(), 1e-6, 1e-5, k)


def test_overflowed_step_is_skipped_for_both_optimisers(tiny_backbone, toy_pixels):
    """An infinite loss scale overflows every gradient: the scaler skips the probes' and the multipliers' steps."""
    state = _state(tiny_backbone, torch.amp.GradScaler("cpu", init_scale=float("inf")))
    alpha = state.objective.alpha.detach().clone()
    gates = {k: v.clone() for k, v in state.gates.state_dict().items()}
    out = train_step(state, toy_pixels[0][:8], 0)
    assert torch.equal(state.objective.alpha.detach(), alpha)
    assert all(torch.equal(state.gates.state_dict()[k], v) for k, v in gates.items())
    assert not out.health[1:].any()  # with loss scaling an overflow skips the step: not a divergence


def test_first_divergence_names_the_first_bad_step():
    clean = torch.tensor([[0.5, 0, 0, 0]] * 3)
    assert first_divergence(clean, 11) is None
    h = torch.tensor([[0.5, 0, 0, 0], [0.4, 0, 1, 1], [float("nan"), 1, 1, 1]])
    assert first_divergence(h, 11) == "a gradient became NaN/Inf at step 12"
    assert first_divergence(h[2:], 13) == "the loss became NaN/Inf (nan) at step 13"
    assert first_divergence(torch.tensor([[0.3, 0, 0, 1]]), 7) == "a gate parameter became NaN/Inf at step 7"


@pytest.mark.parametrize("sampling", ["adaptive", "uniform"])
def test_nan_inside_a_log_window_names_its_step(tiny_backbone, toy_pixels, tmp_path, monkeypatch, sampling):
    """The flags are read at boundaries only (here step 20), yet the error names step 13, and nothing of
    steps 11-20 is logged or saved. Adaptive sampling stops at step 14, whose depth draw sees NaN multipliers."""
    train, val = toy_pixels
    cfg = replace(SMALL, depth_sampling=sampling)
    real, calls = tiny_backbone.masked_logits_from_patches, {"n": 0}

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == 13:
                return out * float("nan")
        return out

    monkeypatch.setattr(tiny_backbone, "masked_logits_from_patches", poisoned)
    with pytest.raises(TrainingDiverged, match=r"loss became NaN/Inf \(nan\) at step 13; .*last good checkpoint is kept"):
        train_gates(Explainer(tiny_backbone, new_gates(tiny_backbone, cfg)), train, val, cfg, out_dir=tmp_path,
                    progress=False, register=False)
    assert calls["n"] == (13 if sampling == "adaptive" else 20)
    assert load_checkpoint(tmp_path / CHECKPOINT)[1]["step"] == 10
    assert max(json.loads(x)["step"] for x in (tmp_path / METRICS).read_text().splitlines()) == 10


def test_resume_config_merges_given_settings(tiny_backbone, toy_pixels, tmp_path):
    cfg = replace(SMALL, steps=2, eval_interval=2, checkpoint_interval=2, lr_probe=3e-3)
    with pytest.raises(ValueError, match="no checkpoint"):
        resume_config(tmp_path)
    train_gates(Explainer(tiny_backbone, new_gates(tiny_backbone, cfg)), *toy_pixels, cfg, out_dir=tmp_path,
                progress=False, register=False)
    assert resume_config(tmp_path) == cfg
    assert resume_config(tmp_path, steps=5, lr_probe=1e-4) == replace(cfg, steps=5, lr_probe=1e-4)
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        resume_config(tmp_path, stepz=5)
    with pytest.raises(ValueError, match="TrainConfig.steps"):
        resume_config(tmp_path, steps=0)
