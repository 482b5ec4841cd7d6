"""The ``delete`` objective (a necessity level): keep = 1 - g, alpha * (delta - KL) + mean(g), against plain references."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from vdm_engine import masks
from vdm_engine.masks import kl_divergence
from vdm_engine.training import TrainConfig, TrainState, new_gates, train_step
from vdm_engine.training.loop import _is_better, _validate
from vdm_engine.training.objective import GateObjective, clean_pass, hard_mask_validation

B, DEPTH, ALPHA, EPS = 5, 2, 3.0, 0.4


@pytest.fixture
def batch(tiny_backbone):
    pv = torch.randn(B, 3, 32, 32)
    logits, hidden = clean_pass(tiny_backbone, pv)
    return pv, logits, hidden


def _loss(backbone, gates, logits, hidden, objective, replacement="placeholder"):
    obj = GateObjective(backbone, gates, alpha_init=ALPHA, eps=EPS, replacement=replacement, objective=objective)
    return obj(logits, hidden, DEPTH, torch.Generator().manual_seed(5))


def _reference(backbone, gates, logits, hidden, *, zeros_odd_rows=False):
    """Plain forward: the masked pass keeps 1 - g; loss alpha * (eps - KL) + mean keep probability."""
    g, log_keep = gates.sample(hidden, DEPTH, torch.Generator().manual_seed(5))
    x = hidden[0, :, 1:]
    masked = backbone.masked_logits_from_patches(x, 1 - g, gates.placeholder)
    if zeros_odd_rows:
        masked = torch.where((torch.arange(B) % 2 == 0)[:, None], masked,
                             backbone.masked_logits_from_patches(x, 1 - g, None))
    kl = kl_divergence(logits, masked)
    return ALPHA * (EPS - kl.mean()) + log_keep.exp().mean(), kl, g


@pytest.mark.parametrize("replacement", ["placeholder", "placeholder+zeros"])
def test_delete_loss_equals_a_plain_reference(tiny_backbone, tiny_gates, batch, close, replacement):
    _, logits, hidden = batch
    gates = tiny_gates.train()
    loss, stats = _loss(tiny_backbone, gates, logits, hidden, "delete", replacement)
    want, kl, g = _reference(tiny_backbone, gates, logits, hidden, zeros_odd_rows=replacement != "placeholder")
    close(loss, want, 1e-5, 1e-5, "loss")
    close(stats.kl, kl.mean(), 1e-5, 1e-5, "kl")
    close(stats.kept, g.mean(), 1e-6, 1e-6, "kept (the fraction removed)")
    # the masked pass keeps 1 - g, not g: the keep objective's KL differs
    keep_loss, keep_stats = _loss(tiny_backbone, gates, logits, hidden, "keep")
    assert not torch.allclose(keep_stats.kl, stats.kl)


def test_delete_alpha_term_has_the_reversed_sign(tiny_backbone, tiny_gates, batch):
    """d loss / d alpha_k = eps - KL (keep: KL - eps), so ascent raises alpha while KL < eps."""
    _, logits, hidden = batch
    for objective, sign in (("keep", 1.0), ("delete", -1.0)):
        obj = GateObjective(tiny_backbone, tiny_gates.train(), alpha_init=ALPHA, eps=EPS, objective=objective)
        loss, stats = obj(logits, hidden, DEPTH, torch.Generator().manual_seed(5))
        (grad,) = torch.autograd.grad(loss, [obj.alpha])
        want = torch.zeros_like(grad)
        want[DEPTH] = sign * (stats.kl - EPS)
        torch.testing.assert_close(grad, want, atol=1e-5, rtol=1e-5)


def test_keep_objective_is_the_default(tiny_backbone, tiny_gates, batch):
    _, logits, hidden = batch
    gates = tiny_gates.train()
    obj = GateObjective(tiny_backbone, gates, alpha_init=ALPHA, eps=EPS)
    a, _ = obj(logits, hidden, DEPTH, torch.Generator().manual_seed(5))
    b, _ = _loss(tiny_backbone, gates, logits, hidden, "keep")
    g, log_keep = gates.sample(hidden, DEPTH, torch.Generator().manual_seed(5))
    masked = tiny_backbone.masked_logits_from_patches(hidden[0, :, 1:], g, gates.placeholder)
    want = ALPHA * (kl_divergence(logits, masked).mean() - EPS) + log_keep.exp().mean()
    assert torch.equal(a, b)
    torch.testing.assert_close(a, want, atol=1e-5, rtol=1e-5)
    assert TrainConfig().objective == "keep" and TrainState.create(
        tiny_backbone, new_gates(tiny_backbone, TrainConfig()), TrainConfig()).objective.objective == "keep"


def test_delete_validation_removes_the_patches_above_threshold(tiny_backbone, tiny_gates, batch, close):
    pv, logits, hidden = batch
    gates = tiny_gates.eval()
    sums = hard_mask_validation(tiny_backbone, gates, pv, invert=True)
    removed = masks.hard_mask(masks.layer_masks(gates.log_keep_prob(hidden))[:, -1])  # (B, N)
    masked = tiny_backbone.masked_logits_from_patches(hidden[0, :, 1:], (~removed).float(), gates.placeholder)
    close(sums["kl"], kl_divergence(logits, masked).sum().double(), 1e-5, 1e-5, "kl")
    assert float(sums["agree"]) == float((masked.argmax(-1) == logits.argmax(-1)).sum())
    close(sums["kept"], removed.double().mean(-1).sum(), 1e-6, 1e-6, "kept counts the removed patches")
    # selection: qualify at KL >= eps_valid and agreement <= agreement; fewest removed, then highest KL
    kl, agree = float(sums["kl"]) / B, float(sums["agree"]) / B
    def qualified(**kw):
        return _validate(tiny_backbone, gates, pv, TrainConfig(objective="delete", **kw), None, 0)["qualified"]

    assert qualified(eps_valid=kl, agreement=1.0) and not qualified(eps_valid=kl + 1e-3, agreement=1.0)
    if agree > 0:
        assert qualified(eps_valid=0.0, agreement=agree) and not qualified(eps_valid=0.0, agreement=agree - 1e-3)
    rec = {"kept": 0.2, "kl": 1.0}
    assert _is_better({"kept": 0.1, "kl": 0.5}, rec, True) and _is_better({"kept": 0.2, "kl": 1.5}, rec, True)
    assert not _is_better({"kept": 0.2, "kl": 1.5}, rec, False)


def test_delete_step_trains(tiny_backbone, batch):
    pv, _, _ = batch
    cfg = TrainConfig(steps=2, batch_size=B, warmup_steps=1, objective="delete", replacement="placeholder+zeros", eps=1.0)
    state = TrainState.create(tiny_backbone, new_gates(tiny_backbone, cfg), cfg)
    before = state.gates.w1.detach().clone()
    out = train_step(state, pv, 0)
    assert torch.isfinite(out.loss) and not torch.equal(state.gates.w1, before)


@pytest.mark.parametrize("bad", ["", "remove", "Keep"])
def test_bad_objective_names_the_field(bad, tiny_backbone, tiny_gates):
    with pytest.raises(ValueError, match=r"TrainConfig\.objective must be one of \('keep', 'delete'\)"):
        TrainConfig(objective=bad)
    with pytest.raises(ValueError, match="GateObjective.objective"):
        GateObjective(tiny_backbone, tiny_gates, alpha_init=1.0, eps=0.1, objective=bad)


def test_objective_round_trips_and_keeps_default_cache_keys():
    """The objective is recorded; a recipe level's cache key hashes it only when not the default."""
    import hashlib
    import json

    from vdm_engine.training import recipes_digits as rd

    cfg = TrainConfig(objective="delete")
    assert cfg.to_dict()["objective"] == "delete" and TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert TrainConfig.from_dict({k: v for k, v in cfg.to_dict().items() if k != "objective"}).objective == "keep"
    v = rd.DigitsVariant("x", "x")
    keep = TrainConfig()
    old = {k: x for k, x in keep.to_dict().items() if k not in ("objective", "replacement")}
    blob = json.dumps({"cfg": old, "samples": 1, "placeholder": "learned"}, sort_keys=True)
    assert rd._level_key(keep, v, "learned") == hashlib.sha256(blob.encode()).hexdigest()[:16]
    assert rd._level_key(cfg, v, "learned") != rd._level_key(keep, v, "learned")


def test_digits_deletion_levels_train_the_reversed_objective():
    from vdm_engine.training import recipes_digits as rd

    v = rd.DigitsVariant("x", "x", levels=(0.03, 0.1, 0.3), sparse_replacement="placeholder+zeros", deletion_levels=(1.5,))
    cfg = rd._train_config(v, 1.5, deletion=True)
    assert (cfg.objective, cfg.eps, cfg.eps_valid, cfg.agreement, cfg.replacement, cfg.steps) == \
        ("delete", 1.5, 0.75, v.level_agreement, "placeholder+zeros", v.level_steps)
    assert rd._train_config(v, 0.3, sparse_level=True).objective == "keep"
    assert rd._train_config(replace(v, deletion_replacement="zeros"), 1.5, deletion=True).replacement == "zeros"
    with pytest.raises(ValueError, match="deletion_levels"):
        rd.DigitsVariant("x", "x", deletion_levels=(1.0,))
    with pytest.raises(ValueError, match="DigitsVariant.deletion_replacement"):
        rd.DigitsVariant("x", "x", levels=(0.1, 0.3), deletion_levels=(1.0,), deletion_replacement="blur")
