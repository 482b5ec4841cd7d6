import math

import pytest
import torch

from vdm_engine import GateConfig, Gates
from vdm_engine.gates import gate_probe_reference, gate_probe_stacked, hard_concrete_sample, probe_depths


def _naive_logits(gates: Gates, hs: torch.Tensor) -> torch.Tensor:
    """The probe formula written out per depth: z_i = mul*tanh(w2.tanh(W1[h0;hi]+b1)+b2)+add."""
    out = []
    for i in range(hs.shape[0]):
        x = torch.cat([hs[0], hs[i]], -1)
        h = torch.tanh(x @ gates.w1[i].T + gates.b1[i])
        out.append(gates.config.mul * torch.tanh(h @ gates.w2[i] + gates.b2[i]) + gates.add[i])
    return torch.stack(out, 1)


@pytest.mark.parametrize("S,B,T,D", [(4, 3, 17, 36), (3, 1, 2, 20), (5, 2, 50, 100)])
def test_vectorised_probes_match_per_depth_formula(S, B, T, D, close):
    g = Gates(GateConfig(hidden_size=D, num_hidden_states=S, add_init=0.3))
    hs = torch.randn(S, B, T, D)
    z = _naive_logits(g, hs)
    close(g.logits(hs), z, 1e-5, 1e-5, "logits")
    offset = 0.2 * math.log(0.2)
    close(g.log_keep_prob(hs), torch.log(torch.sigmoid(z - offset)), 1e-5, 1e-5, "log keep")
    # list input equals stacked input
    close(g.log_keep_prob(list(hs)), gate_probe_stacked(hs, g.probe_params()), 0, 0, "list input")


@pytest.mark.parametrize("S,B,T,D", [(4, 3, 17, 36), (3, 1, 2, 20), (5, 2, 197, 100)])
def test_per_depth_reference_matches_stacked(S, B, T, D, close):
    """The explain path's one-depth probe equals the training path's stacked probes, depth by depth."""
    g = Gates(GateConfig(hidden_size=D, num_hidden_states=S, add_init=0.3))
    with torch.no_grad():
        g.w1.mul_(3.0)  # spread the keep probabilities away from saturation
        g.add.copy_(torch.linspace(-6.0, 4.0, S))
    hs = torch.randn(S, B, T, D)
    p = g.probe_params()
    with torch.no_grad():
        stacked = gate_probe_stacked(hs, p)
    assert stacked.min() < -1.0 and stacked.max() > -0.1, "probes too saturated for a meaningful check"
    for s in range(S):
        with torch.no_grad():
            got = gate_probe_reference(hs[0], hs[s], p, s)
        assert got.shape == (B, T) and got.dtype == torch.float32
        close(got, stacked[:, s], 1e-5, 1e-5, f"depth {s}")
    with torch.no_grad():
        close(probe_depths(gate_probe_reference, list(hs), p), stacked, 1e-5, 1e-5, "all depths")


def test_keep_probability_closed_form_matches_monte_carlo():
    cfg = GateConfig(hidden_size=4, num_hidden_states=2)
    z = torch.tensor([-3.0, -1.0, -0.3, 0.0, 0.5, 2.0])
    closed = torch.sigmoid(z - cfg.log_keep_offset)
    samples = hard_concrete_sample(z.expand(200_000, -1), cfg.beta, cfg.l, cfg.r)
    mc = (samples > 0).float().mean(0)
    assert (closed - mc).abs().max() < 0.01, (closed, mc)
    # the stated constant: sigmoid(z + 0.2 ln 5)
    assert torch.allclose(closed, torch.sigmoid(z + 0.2 * math.log(5)))
    # the sample lives in [0, 1] and puts mass on both ends
    assert samples.min() == 0 and samples.max() == 1


def test_patch_mask_is_product_over_depth_without_cls():
    g = Gates(GateConfig(hidden_size=8, num_hidden_states=4))
    hs = torch.randn(4, 2, 5, 8)
    p = g.log_keep_prob(hs).exp()
    expected = p[:, :3].prod(1)[:, 1:]
    assert torch.allclose(g.patch_mask(hs, upto=2), expected, atol=1e-6)
    assert torch.allclose(g.patch_mask(hs), p.prod(1)[:, 1:], atol=1e-6)
    lm = g.layer_masks(hs)
    assert lm.shape == (2, 4, 4)
    assert torch.allclose(lm[:, -1], g.patch_mask(hs), atol=1e-6)
    assert (lm[:, 1:] <= lm[:, :-1] + 1e-7).all(), "cumulative masks can only shrink with depth"


def test_sample_is_reparameterised_and_aggregated():
    g = Gates(GateConfig(hidden_size=8, num_hidden_states=4, add_init=0.0))
    hs = torch.randn(4, 3, 5, 8)
    gates, log_keep = g.sample(hs, upto=1)
    assert gates.shape == (3, 4) and log_keep.shape == (3, 4)
    assert ((gates >= 0) & (gates <= 1)).all()
    expected_log_keep = g.log_keep_prob(hs)[:, :2].sum(1)[:, 1:]
    assert torch.allclose(log_keep, expected_log_keep, atol=1e-6)
    (gates.sum() + log_keep.sum()).backward()
    assert g.w1.grad is not None and g.w1.grad[:2].abs().sum() > 0
    assert g.w1.grad[2:].abs().sum() == 0, "probes deeper than `upto` must not receive gradient"
    with pytest.raises(ValueError, match="depth"):
        g.sample(hs, upto=4)


def test_gate_config_validation():
    with pytest.raises(ValueError, match="hidden_size"):
        GateConfig(hidden_size=0, num_hidden_states=3)
    with pytest.raises(ValueError, match="num_hidden_states"):
        GateConfig(hidden_size=8, num_hidden_states=1)
    with pytest.raises(ValueError, match="l < 0"):
        GateConfig(hidden_size=8, num_hidden_states=3, l=0.1)
    assert GateConfig(hidden_size=36, num_hidden_states=4).probe_size == 9
    with pytest.raises(ValueError, match="unknown GateConfig fields"):
        GateConfig.from_dict({"hidden_size": 8, "num_hidden_states": 3, "bogus": 1})


def test_hidden_state_shape_errors():
    g = Gates(GateConfig(hidden_size=8, num_hidden_states=4))
    with pytest.raises(ValueError, match=r"L\+2=4"):
        g.log_keep_prob(torch.randn(3, 1, 5, 8))
    with pytest.raises(ValueError, match="D=8"):
        g.log_keep_prob(torch.randn(4, 1, 5, 9))


def test_softplus_form_is_stable_for_extreme_logits():
    g = Gates(GateConfig(hidden_size=4, num_hidden_states=2, mul=10.0))
    with torch.no_grad():
        g.add.fill_(-60.0)
    hs = torch.randn(2, 1, 3, 4)
    lk = g.log_keep_prob(hs)
    assert torch.isfinite(lk).all() and (lk < -40).all()
    # log(sigmoid(.)) underflows to -inf here; the log-space form stays equal to z - offset
    z = g.logits(hs)
    assert torch.allclose(lk, z - g.config.log_keep_offset, atol=1e-4)
