import json

import pytest
import torch

from vdm_engine import GateConfig, Gates
from vdm_engine.backbone import random_backbone


def test_save_load_round_trip(tiny_gates, tiny_backbone, tmp_path):
    d = tiny_gates.save_pretrained(tmp_path / "g", backbone=tiny_backbone, metrics={"kept": 0.4})
    meta = json.loads((d / "gates_config.json").read_text())
    assert meta["config"]["hidden_size"] == 36 and meta["backbone"]["name_or_path"] == "vit-tiny"
    assert meta["metrics"] == {"kept": 0.4} and len(meta["sha256"]) == 64
    loaded = Gates.from_pretrained(d, backbone=tiny_backbone)
    assert loaded.config == tiny_gates.config and loaded.sha256 == meta["sha256"]
    for k, v in tiny_gates.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert sorted(p.name for p in d.iterdir()) == ["gates.safetensors", "gates_config.json"], "no temp files left"


def test_load_validates_backbone_and_checksum(tiny_gates, tmp_path):
    d = tiny_gates.save_pretrained(tmp_path / "g")
    other = random_backbone("vit-tiny", hidden_size=48, num_attention_heads=4)
    with pytest.raises(ValueError, match="hidden size 36.*hidden size 48"):
        Gates.from_pretrained(d, backbone=other)
    data = bytearray((d / "gates.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (d / "gates.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        Gates.from_pretrained(d)
    with pytest.raises(ValueError, match="not a gates directory"):
        Gates.from_pretrained(tmp_path / "missing")


def test_failed_save_leaves_previous_checkpoint(tiny_gates, tmp_path, monkeypatch):
    d = tiny_gates.save_pretrained(tmp_path / "g")
    before = (d / "gates.safetensors").read_bytes()
    import safetensors.torch as st

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(st, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        tiny_gates.save_pretrained(d)
    assert (d / "gates.safetensors").read_bytes() == before
    assert sorted(p.name for p in d.iterdir()) == ["gates.safetensors", "gates_config.json"]


def _reference_checkpoint(path, S=4, D=12, P=3, mul=7.0, seed=0):
    """A checkpoint laid out like the original Vision-DiffMask (Lightning, weight-normed probes)."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for i in range(S):
        sd[f"gate.g_hat.{i}.f.0.weight_g"] = torch.rand(P, 1, generator=gen) + 0.5
        sd[f"gate.g_hat.{i}.f.0.weight_v"] = torch.randn(P, 2 * D, generator=gen)
        sd[f"gate.g_hat.{i}.f.0.bias"] = torch.randn(P, generator=gen)
        sd[f"gate.g_hat.{i}.f.2.weight_g"] = torch.rand(1, 1, generator=gen) + 0.5
        sd[f"gate.g_hat.{i}.f.2.weight_v"] = torch.randn(1, P, generator=gen)
        sd[f"gate.g_hat.{i}.f.2.bias"] = torch.randn(1, generator=gen)
        sd[f"gate.g_hat.{i}.add_activation"] = torch.tensor(float(i) - 1.5)
        sd[f"alpha.{i}"] = torch.tensor(5.0)
    sd["gate.placeholder"] = torch.randn(1, 1, D, generator=gen)
    torch.save({"state_dict": sd, "hyper_parameters": {"mul_activation": mul}, "epoch": 3}, path)
    return sd


def test_reference_checkpoint_import(tmp_path):
    S, D, P, mul = 4, 12, 3, 7.0
    sd = _reference_checkpoint(tmp_path / "ref.ckpt", S, D, P, mul)
    gates = Gates.from_reference_checkpoint(tmp_path / "ref.ckpt")
    assert gates.config.mul == mul and gates.config.num_hidden_states == S and gates.config.probe_size == P
    hs = torch.randn(S, 2, 5, D)
    # the original probe: f = Linear(wn) -> Tanh -> Linear(wn); z = mul * tanh(f(x)) + add
    for i in range(S):
        v0, g0 = sd[f"gate.g_hat.{i}.f.0.weight_v"], sd[f"gate.g_hat.{i}.f.0.weight_g"]
        w0 = g0 * v0 / v0.norm(dim=1, keepdim=True)
        v2, g2 = sd[f"gate.g_hat.{i}.f.2.weight_v"], sd[f"gate.g_hat.{i}.f.2.weight_g"]
        w2 = g2 * v2 / v2.norm(dim=1, keepdim=True)
        x = torch.cat([hs[0], hs[i]], -1)
        f = torch.tanh(x @ w0.T + sd[f"gate.g_hat.{i}.f.0.bias"]) @ w2.T + sd[f"gate.g_hat.{i}.f.2.bias"]
        z = mul * torch.tanh(f.squeeze(-1)) + sd[f"gate.g_hat.{i}.add_activation"]
        assert torch.allclose(gates.logits(hs)[:, i], z, atol=1e-5), i
    assert torch.allclose(gates.placeholder, sd["gate.placeholder"].reshape(-1))


class _Arbitrary:
    """Stands for any non-tensor object a pickle could carry."""


def test_reference_checkpoint_refuses_pickled_objects(tmp_path):
    torch.save({"state_dict": {}, "obj": _Arbitrary()}, tmp_path / "evil.ckpt")
    with pytest.raises(ValueError, match="weights_only=True"):
        Gates.from_reference_checkpoint(tmp_path / "evil.ckpt")
    torch.save({"state_dict": {"x": torch.zeros(1)}}, tmp_path / "empty.ckpt")
    with pytest.raises(ValueError, match="no Vision-DiffMask gate keys"):
        Gates.from_reference_checkpoint(tmp_path / "empty.ckpt")


def test_gates_train_eval_determinism(tiny_gates):
    hs = torch.randn(4, 2, 17, 36)
    tiny_gates.train()
    a = tiny_gates.patch_mask(hs)
    b = tiny_gates.patch_mask(hs)
    assert torch.equal(a, b), "the keep probability is deterministic; only sample() is stochastic"
    g1, _ = tiny_gates.sample(hs, upto=-1)
    g2, _ = tiny_gates.sample(hs, upto=-1)
    assert not torch.equal(g1, g2)
    assert GateConfig(hidden_size=36, num_hidden_states=4) == tiny_gates.config
