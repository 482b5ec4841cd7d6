"""Gate training loop: config validation, the objective, selection, checkpoints, resume and the NaN guard."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from vdm_engine import Explainer, Gates
from vdm_engine.training import TrainConfig, TrainingDiverged, new_gates, train_gates
from vdm_engine.training.data import toy_batch
from vdm_engine.training.checkpoint import load_checkpoint
from vdm_engine.training.rundir import CHECKPOINT, GATES_DIR, METRICS
from vdm_engine.training.objective import GateObjective, depth_weights, hard_mask_validation

SMALL = TrainConfig(steps=40, batch_size=8, eval_interval=10, checkpoint_interval=10, val_size=12, warmup_steps=5)


@pytest.fixture
def toy_pixels(tiny_backbone):
    train = tiny_backbone.preprocess(toy_batch(64, 0)[0])
    val = tiny_backbone.preprocess(toy_batch(12, 1)[0])
    return train, val


def _explainer(backbone, cfg=SMALL):
    return Explainer(backbone, new_gates(backbone, cfg))


@pytest.mark.parametrize(
    "field,value,match",
    [("steps", 0, "steps"), ("eps", 0.0, "eps"), ("precision", "fp8", "precision"), ("agreement", 1.5, "agreement"),
     ("alpha_init", 500.0, "alpha_init"), ("l0", "l1", "l0"), ("depth_sampling", "random", "depth_sampling")],
)
def test_config_rejects_bad_values(field, value, match):
    with pytest.raises(ValueError, match=match):
        replace(TrainConfig(), **{field: value})


def test_config_roundtrip():
    cfg = TrainConfig(steps=7, eps=0.2)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        TrainConfig.from_dict({"stepz": 1})


def test_depth_weights():
    alpha = torch.tensor([0.0, 0.0, 40.0, 0.0])
    u = depth_weights(alpha, "uniform", 20.0)
    torch.testing.assert_close(u, torch.full((4,), 0.25, dtype=torch.float64))
    a = depth_weights(alpha, "adaptive", 20.0)
    assert abs(float(a.sum()) - 1) < 1e-12 and a[2] > a[0] > 0
    last = depth_weights(torch.zeros(4), "uniform", 20.0, last_weight=1.0)
    torch.testing.assert_close(last, torch.tensor([0.2, 0.2, 0.2, 0.4], dtype=torch.float64))


def test_objective_matches_hand_computation(tiny_backbone, close):
    """Loss = alpha_k (KL - eps) + mean keep probability, with the same gate sample."""
    gates = new_gates(tiny_backbone, SMALL)
    obj = GateObjective(tiny_backbone, gates, alpha_init=3.0, eps=0.1)
    pv = torch.randn(3, 3, 32, 32)
    logits, hidden = tiny_backbone.hidden_states(pv)
    loss, stats = obj(logits, hidden, 2, torch.Generator().manual_seed(5))
    g, log_keep = gates.sample(hidden, 2, torch.Generator().manual_seed(5))
    masked = tiny_backbone.masked_logits(pv, g, gates.placeholder)
    p, q = logits.softmax(-1), masked.softmax(-1)
    kl = (p * (p.log() - q.log())).sum(-1).mean()
    close(loss, 3.0 * (kl - 0.1) + log_keep.exp().mean(), 1e-5, 1e-5, "loss")
    close(stats.kl, kl, 1e-5, 1e-5, "kl")
    loss.backward()
    assert obj.alpha.grad[2] != 0 and (obj.alpha.grad[[0, 1, 3]] == 0).all()
    assert gates.w1.grad is not None and gates.placeholder.grad is not None


def test_hard_mask_validation_matches_explainer(tiny_explainer, pixels, close):
    sums = hard_mask_validation(tiny_explainer.backbone, tiny_explainer.gates, pixels)
    e = tiny_explainer.explain(pixels)
    v = tiny_explainer.verify(pixels, e)
    close(sums["kl"] / 5, v.kl.mean(), 1e-5, 1e-5, "kl")
    close(sums["kept"] / 5, v.kept_fraction.mean(), 1e-6, 0, "kept")
    close(sums["agree"] / 5, v.agree.float().mean(), 1e-6, 0, "agree")


def test_train_gates_writes_log_checkpoint_and_selects_best(tiny_backbone, toy_pixels, tmp_path):
    train, val = toy_pixels
    res = train_gates(_explainer(tiny_backbone), train, val, SMALL, out_dir=tmp_path, progress=False, log_interval=5)
    assert res.step == 40 and len(res.history) == 4
    lines = [json.loads(x) for x in (tmp_path / METRICS).read_text().splitlines()]
    assert [r["step"] for r in lines if r["kind"] == "val"] == [10, 20, 30, 40]
    assert [r["step"] for r in lines if r["kind"] == "train"] == list(range(5, 45, 5))
    assert all(r["images"] == 12 for r in lines if r["kind"] == "val")
    qualified = [r for r in res.history if r["qualified"]]
    if qualified:
        assert res.best == min(qualified, key=lambda r: (r["kept"], r["kl"]))
    else:
        assert res.best is None and not res.qualified
    loaded = Gates.from_pretrained(tmp_path / GATES_DIR, backbone=tiny_backbone)
    for k, v in res.gates.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert loaded.metrics["selected"] == ("best" if res.qualified else "last")
    _, meta = load_checkpoint(tmp_path / CHECKPOINT)
    assert meta["step"] == 40
    # The first gates for the backbone's name fill its empty (isolated) registry slot, if they learned a mask.
    assert (res.registered is not None) == res.learned_mask, res.registration
    if res.registered is not None:
        assert (res.registered / "gates.safetensors").is_file()


def test_selection_reports_when_nothing_qualifies(tiny_backbone, toy_pixels, tmp_path, capsys):
    train, val = toy_pixels
    cfg = replace(SMALL, steps=10, eps_valid=0.0, agreement=1.0, add_init=-5.0)  # everything dropped: KL > 0
    res = train_gates(_explainer(tiny_backbone, cfg), train, val, cfg, out_dir=tmp_path, progress=False, register=False)
    assert not res.qualified and res.best is None and res.registered is None
    err = capsys.readouterr().err
    assert "did not learn a mask" in err and "no validation met" in err
    assert Gates.from_pretrained(tmp_path / GATES_DIR).metrics["selected"] == "last"


def test_resume_in_process_is_exact(tiny_backbone, toy_pixels, tmp_path, monkeypatch):
    train, val = toy_pixels
    full = train_gates(_explainer(tiny_backbone), train, val, SMALL, out_dir=tmp_path / "a", progress=False, register=False)
    # Interrupt at step 27 (last checkpoint: step 20), as Ctrl-C would.
    real, calls = tiny_backbone.masked_logits_from_patches, {"n": 0}

    def interrupted(*args, **kwargs):
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == 27:
                raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(tiny_backbone, "masked_logits_from_patches", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_gates(_explainer(tiny_backbone), train, val, SMALL, out_dir=tmp_path / "b", progress=False, register=False)
    monkeypatch.setattr(tiny_backbone, "masked_logits_from_patches", real)
    assert load_checkpoint(tmp_path / "b" / CHECKPOINT)[1]["step"] == 20
    # Fresh gates with other values: resume must overwrite everything from the checkpoint.
    other = Explainer(tiny_backbone, new_gates(tiny_backbone, replace(SMALL, seed=9)))
    res = train_gates(other, train, val, SMALL, out_dir=tmp_path / "b", resume=True, progress=False, register=False)
    assert res.step == 40
    for k, v in full.gates.state_dict().items():
        assert torch.equal(res.gates.state_dict()[k], v), k
    assert res.history == full.history
    assert (tmp_path / "b" / METRICS).read_text() == (tmp_path / "a" / METRICS).read_text()


def test_nan_guard_keeps_last_good_checkpoint(tiny_backbone, toy_pixels, tmp_path, monkeypatch):
    train, val = toy_pixels
    calls = {"n": 0}
    real = tiny_backbone.masked_logits_from_patches

    def poisoned(patches, gates, placeholder, **kwargs):
        out = real(patches, gates, placeholder, **kwargs)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == 25:
                return out * float("nan")
        return out

    monkeypatch.setattr(tiny_backbone, "masked_logits_from_patches", poisoned)
    with pytest.raises(TrainingDiverged, match=r"loss became NaN/Inf.*at step 25.*last good checkpoint is kept"):
        train_gates(_explainer(tiny_backbone), train, val, SMALL, out_dir=tmp_path, progress=False, register=False)
    tensors, meta = load_checkpoint(tmp_path / CHECKPOINT)
    assert meta["step"] == 20
    assert all(torch.isfinite(v.float()).all() for k, v in tensors.items() if not k.startswith("rng."))
    assert not (tmp_path / GATES_DIR).exists()
    # The kept checkpoint resumes cleanly once the fault is gone.
    monkeypatch.setattr(tiny_backbone, "masked_logits_from_patches", real)
    res = train_gates(_explainer(tiny_backbone), train, val, SMALL, out_dir=tmp_path, resume=True, progress=False,
                      register=False)
    assert res.step == 40


def test_train_gates_rejects_wrong_pixels(tiny_backbone, tmp_path):
    with pytest.raises(ValueError, match="pixel"):
        train_gates(_explainer(tiny_backbone), torch.randn(4, 3, 16, 16), torch.randn(2, 3, 32, 32), SMALL,
                    out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="val_images is None"):
        train_gates(_explainer(tiny_backbone), torch.randn(4, 3, 32, 32), None, SMALL, out_dir=tmp_path, progress=False)


@pytest.mark.parametrize("precision", ["bf16"])
def test_autocast_precision_trains(tiny_backbone, toy_pixels, tmp_path, precision):
    """The frozen ViT runs under autocast (CPU here, CUDA in use); the gates stay fp32 and finite."""
    train, val = toy_pixels
    cfg = replace(SMALL, steps=10, precision=precision)
    res = train_gates(_explainer(tiny_backbone, cfg), train, val, cfg, out_dir=tmp_path, progress=False, register=False)
    assert res.step == 10 and res.gates.w1.dtype == torch.float32
    assert all(torch.isfinite(p).all() for p in res.gates.parameters())
    assert all(0 <= r["kl"] < 10 and 0 <= r["kept"] <= 1 for r in res.history)


def test_deletion_gates_are_never_registered(tiny_backbone, toy_pixels, tmp_path):
    """A deletion level marks patches to remove: register=None leaves the registry alone, True is refused."""
    from vdm_engine.registry import registered_gates

    train, val = toy_pixels
    before = registered_gates(tiny_backbone.name_or_path)
    cfg = replace(SMALL, steps=10, eval_interval=10, checkpoint_interval=10, objective="delete")
    with pytest.raises(ValueError, match="objective='delete'"):
        train_gates(_explainer(tiny_backbone, cfg), train, val, cfg, out_dir=tmp_path / "a", progress=False, register=True)
    assert not (tmp_path / "a").exists()
    res = train_gates(_explainer(tiny_backbone, cfg), train, val, cfg, out_dir=tmp_path / "b", progress=False)
    assert res.registered is None and "not registered" in res.registration
    assert registered_gates(tiny_backbone.name_or_path) == before
