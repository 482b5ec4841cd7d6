"""Training replacements (``TrainConfig.replacement``): per-row replacements against plain references."""

from __future__ import annotations

import pytest
import torch

from vdm_engine.evaluation.metrics import replacement_pixels
from vdm_engine.masks import kl_divergence
from vdm_engine.training import TrainConfig, TrainState, new_gates, train_step
from vdm_engine.training.objective import GateObjective, clean_pass
from vdm_engine.training.replacement import _noise_pixels, masked_logits_replaced, row_replacements

B = 7  # prime: the row cycle of three or four kinds does not divide it


@pytest.fixture
def batch(tiny_backbone, tiny_gates):
    pv = torch.randn(B, 3, 32, 32)
    logits, hidden = clean_pass(tiny_backbone, pv)
    return pv, logits, hidden


def test_row_replacements_follow_the_row_cycle(tiny_backbone, tiny_gates, batch, close):
    """Row b takes kind b mod 4: the placeholder, zeros, the mean image's patches, uniform-noise patches."""
    pv, _, hidden = batch
    patches = hidden[0, :, 1:]
    gen = torch.Generator().manual_seed(3)
    r = row_replacements("placeholder+zeros+mean+noise", patches, tiny_gates.placeholder, backbone=tiny_backbone,
                         pixel_values=pv, generator=gen)
    noise = _noise_pixels(pv.shape, tiny_backbone.image_spec, torch.Generator().manual_seed(3), "cpu", pv.dtype)
    mean = pv.mean((2, 3), keepdim=True).expand_as(pv)
    N, D = patches.shape[1:]
    for b in range(B):
        kind = b % 4
        want = (tiny_gates.placeholder.expand(N, D) if kind == 0 else torch.zeros(N, D) if kind == 1
                else tiny_backbone.embed_patches(mean[b : b + 1])[0] if kind == 2
                else tiny_backbone.embed_patches(noise[b : b + 1])[0])
        close(r[b], want, 1e-5, 1e-5, f"row {b}")


def test_noise_pixels_are_normalised_like_the_evaluation(tiny_backbone):
    """The same uniform draw gives evaluation's noise replacement (``replacement_pixels(.., "noise")``)."""
    pv = torch.randn(1, 3, 32, 32)
    got = _noise_pixels((1, 3, 32, 32), tiny_backbone.image_spec, torch.Generator().manual_seed(11), "cpu", pv.dtype)
    want = replacement_pixels(pv, "noise", tiny_backbone.image_spec, [11])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_masked_logits_replaced_equals_blending_by_hand(tiny_backbone, batch, close):
    _, _, hidden = batch
    x = hidden[0, :, 1:]
    g, r = torch.rand(B, x.shape[1]), torch.randn_like(x)
    want = tiny_backbone.masked_logits_from_patches(g[..., None] * x + (1 - g[..., None]) * r, torch.ones_like(g), None)
    close(masked_logits_replaced(tiny_backbone, x, g, r), want, 1e-5, 1e-5, "logits")


def _gates(backbone):
    """Fresh training gates with a random (non-zero) placeholder, so zeros rows differ from placeholder rows."""
    gates = new_gates(backbone, TrainConfig()).train()
    with torch.no_grad():
        gates.placeholder.normal_()
    return gates


def _loss_and_grads(backbone, gates, logits, hidden, replacement, pv=None):
    obj = GateObjective(backbone, gates, alpha_init=3.0, eps=0.1, replacement=replacement)
    loss, _ = obj(logits, hidden, 2, torch.Generator().manual_seed(5), pixel_values=pv)
    grads = torch.autograd.grad(loss, [gates.w1, gates.add, gates.placeholder])
    return loss, grads


def test_every_row_the_placeholder_equals_the_default_path(tiny_backbone, batch, close):
    """The per-row path with every row the placeholder gives the default loss and gradients."""
    _, logits, hidden = batch
    gates = _gates(tiny_backbone)
    loss0, grads0 = _loss_and_grads(tiny_backbone, gates, logits, hidden, "placeholder")
    loss1, grads1 = _loss_and_grads(tiny_backbone, gates, logits, hidden, "placeholder+placeholder")
    close(loss1, loss0, 1e-5, 1e-5, "loss")
    for name, a, b in zip(("w1", "add", "placeholder"), grads1, grads0):
        close(a, b, 1e-5, 1e-5, f"grad {name}")


def test_mixed_loss_equals_a_per_row_reference(tiny_backbone, batch, close):
    """``placeholder+zeros``: even rows masked with the placeholder, odd rows with zeros (plain forward)."""
    _, logits, hidden = batch
    gates = _gates(tiny_backbone)
    loss, _ = _loss_and_grads(tiny_backbone, gates, logits, hidden, "placeholder+zeros")
    g, log_keep = gates.sample(hidden, 2, torch.Generator().manual_seed(5))
    x = hidden[0, :, 1:]
    with_ph = tiny_backbone.masked_logits_from_patches(x, g, gates.placeholder)
    with_zeros = tiny_backbone.masked_logits_from_patches(x, g, None)
    masked = torch.where((torch.arange(B) % 2 == 0)[:, None], with_ph, with_zeros)
    want = 3.0 * (kl_divergence(logits, masked).mean() - 0.1) + log_keep.exp().mean()
    close(loss, want, 1e-5, 1e-5, "loss")


def test_pixel_replacements_need_the_pixels_and_train(tiny_backbone, batch):
    pv, logits, hidden = batch
    gates = new_gates(tiny_backbone, TrainConfig()).train()
    with pytest.raises(ValueError, match="needs the batch's pixel_values"):
        _loss_and_grads(tiny_backbone, gates, logits, hidden, "mean+noise")
    cfg = TrainConfig(steps=2, batch_size=B, warmup_steps=1, replacement="placeholder+mean+noise")
    state = TrainState.create(tiny_backbone, new_gates(tiny_backbone, cfg), cfg)
    before = state.gates.w1.detach().clone()
    out = train_step(state, pv, 0)
    assert torch.isfinite(out.loss) and not torch.equal(state.gates.w1, before)


@pytest.mark.parametrize("bad", ["", "mean+", "zero", "placeholder+blur"])
def test_bad_replacement_names_the_field(bad):
    with pytest.raises(ValueError, match=r"TrainConfig\.replacement .*kinds must be placeholder/zeros/mean/noise"):
        TrainConfig(replacement=bad)
