"""Every supported family against transformers' own model: logits, hidden states, the masked forward,
attention maps, a training step; the unsupported-family error; CLIP's zero-shot head and its labels."""

from __future__ import annotations

import pytest
import torch

from family_models import FAMILIES, LABELS, hf_logits_and_states, hf_model, load, prefix_tokens

from vdm_engine import Explainer, GateConfig, Gates
from vdm_engine.families import UnsupportedModelError


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))  # a prime batch


@pytest.fixture(scope="module")
def loaded(family_dirs):
    """kind -> (our Backbone, transformers' model (eager attention))."""
    return {k: (load(k, family_dirs[k]), hf_model(k, family_dirs[k])) for k in FAMILIES}


def _gates(backbone, seed=0):
    """Random gates whose masks keep some patches and drop others."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        g = Gates(GateConfig(backbone.hidden_size, backbone.num_hidden_states, add_init=2.0))
        with torch.no_grad():
            g.w1.normal_(0, 1.0)
            g.placeholder.normal_(0, 0.5)
    return g


def _hf_masked_logits(kind, ref, directory, pixels, keep, placeholder):
    """transformers' own forward with each dropped patch projection replaced by the placeholder (a
    forward hook on the patch projection): independent of vdm_engine's token assembly and head."""
    if kind == "clip":
        proj = ref.vision_model.embeddings.patch_embedding
    else:
        proj = getattr(ref, ref.base_model_prefix).embeddings.patch_embeddings.projection
    g = keep.float().view(pixels.shape[0], 1, 4, 4)

    def hook(module, inputs, out):
        return g * out + (1 - g) * placeholder.view(1, -1, 1, 1)

    handle = proj.register_forward_hook(hook)
    try:
        return hf_logits_and_states(kind, ref, directory, pixels)[0]
    finally:
        handle.remove()


@pytest.mark.parametrize("kind", FAMILIES)
def test_family_equals_transformers(kind, loaded, family_dirs, pixels, close):
    """One family against its own transformers model (eager attention, output_hidden_states and
    output_attentions):

    - plain forward, forward_states and hidden_states: logits, and the gates' view
      h_i = [last prefix token; patches] of every hidden state (h0: stored slot token + projections);
    - explain's masked pass (run(..., masked_logits)) and verify(): transformers' forward with the
      dropped patch projections replaced by the placeholder (prefix tokens untouched);
    - the explicit-attention pass behind rollout, Grad-CAM and Chefer: logits and attention
      probabilities over every token (BEiT's relative bias included); rollout and Chefer give (B, N).
    """
    from vdm_engine.attribution import CheferAttribution, RolloutAttribution
    from vdm_engine.attribution._attention import traced_forward

    bb, ref = loaded[kind]
    P = prefix_tokens(kind)
    assert bb.num_prefix_tokens == P and bb.grid == (4, 4) and bb.image_size == (32, 32)
    logits, states, attentions = hf_logits_and_states(kind, ref, family_dirs[kind], pixels, attentions=True)
    ex = Explainer(bb, _gates(bb)).eval()
    with torch.no_grad():
        close(bb(pixels), logits, 1e-5, 1e-5, f"{kind} plain logits")
        ours, hs = bb.hidden_states(pixels)
        explanation = ex.explain(pixels)
        thr = float(explanation.patch_mask.median())  # a threshold that keeps about half the patches
        out = ex.run(pixels, ("logits", "patch_mask", "masked_logits", "kl"), threshold=thr)
        checked = ex.verify(pixels, explanation, threshold=thr)
        trace = traced_forward(bb, pixels)
    close(ours, logits, 1e-5, 1e-5, f"{kind} forward_states logits")
    assert hs.shape == (bb.num_layers + 2, 3, 17, bb.hidden_size) and len(states) == bb.num_layers + 1
    for i, h in enumerate(states, start=1):
        close(hs[i], h[:, P - 1:], 1e-5, 1e-5, f"{kind} hidden state {i}")
    close(hs[0, :, 1:], bb.family.projection(pixels).flatten(2).transpose(1, 2), 1e-6, 1e-6, f"{kind} h0 patches")
    close(hs[0, :, 0], bb.family.slot_token().expand(3, -1), 0, 0, f"{kind} h0 slot")

    keep = out["patch_mask"] > thr
    assert 0 < keep.float().mean() < 1, "the mask should keep some patches and drop others"
    expected = _hf_masked_logits(kind, ref, family_dirs[kind], pixels, keep, ex.gates.placeholder.detach())
    close(out["masked_logits"], expected, 1e-5, 1e-5, f"{kind} masked logits (run)")
    close(checked.masked_logits, expected, 1e-5, 1e-5, f"{kind} masked logits (verify)")
    close(explanation.logits, out["logits"], 0, 0, f"{kind} explain logits")
    assert explanation.layer_masks.shape == (3, bb.num_layers + 2, 16)

    close(trace.logits, logits, 1e-5, 1e-5, f"{kind} traced logits")
    assert len(attentions) == len(trace.attentions) == bb.num_layers
    for i, (a, b) in enumerate(zip(trace.attentions, attentions)):
        close(a, b, 1e-5, 1e-5, f"{kind} attention {i}")
    for method in (RolloutAttribution(bb), CheferAttribution(bb)):
        scores = method(pixels)
        assert scores.shape == (3, 16) and torch.isfinite(scores).all(), method.name


@pytest.mark.parametrize("kind", FAMILIES)
def test_one_training_step_runs(kind, loaded, pixels):
    """One optimisation step of the gates on each family: finite loss, no NaN/Inf flags, the probes move."""
    from vdm_engine.training import TrainConfig, TrainState, new_gates, train_step

    bb = loaded[kind][0]
    cfg = TrainConfig(steps=2, batch_size=3, warmup_steps=0)
    state = TrainState.create(bb, new_gates(bb, cfg), cfg)
    before = state.gates.w1.detach().clone()
    result = train_step(state, pixels, 0)
    assert torch.isfinite(result.loss) and not result.health[1:].any(), result.health
    assert not torch.equal(state.gates.w1.detach(), before)


def test_unsupported_family_is_one_line_naming_the_supported(family_dirs):
    with pytest.raises(UnsupportedModelError) as e:
        load("swin", family_dirs["swin"])
    msg = str(e.value)
    assert "\n" not in msg and "'swin'" in msg
    for t in ("vit", "deit", "dinov2", "dinov2_with_registers", "beit", "clip"):
        assert t in msg
    assert isinstance(e.value, ValueError)  # the CLIs turn it into exit code 2


def test_swin_through_a_cli_exits_2_with_one_line(family_dirs, tmp_path, capsys):
    from vdm_engine.cli.export import main

    assert main(["--model", str(family_dirs["swin"]), "--out", str(tmp_path / "m.onnx"), "--untrained-gates"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not support" in err[0] and "dinov2_with_registers" in err[0], err


def test_clip_needs_labels_and_records_them_with_the_gates(family_dirs, loaded, tmp_path, pixels, close):
    """No labels: one clear error. Gates saved for a CLIP backbone carry its labels and prompt;
    Explainer.from_pretrained rebuilds the same zero-shot head from them."""
    from vdm_engine.backbone import load_backbone

    with pytest.raises(ValueError, match="zero-shot"):
        load_backbone(str(family_dirs["clip"]), local_files_only=True)
    with pytest.raises(ValueError, match="labels are for CLIP"):
        load_backbone(str(family_dirs["deit"]), local_files_only=True, labels=["a", "b"])
    bb = loaded["clip"][0]
    assert bb.id2label == dict(enumerate(LABELS)) and bb.num_labels == len(LABELS)
    _gates(bb).save_pretrained(tmp_path / "g", backbone=bb)
    assert (tmp_path / "g" / "zero_shot.safetensors").is_file()
    ex = Explainer.from_pretrained(str(family_dirs["clip"]), gates=tmp_path / "g")
    assert ex.backbone.zero_shot == {"labels": list(LABELS), "prompt": "a photo of a {}."}
    assert ex.backbone.fingerprint == bb.fingerprint
    with torch.no_grad():
        close(ex.backbone(pixels), bb(pixels), 1e-6, 1e-6, "zero-shot head from the saved text embeddings")
    other = load("clip", family_dirs["clip"], labels=["cat", "dog"])
    assert other.fingerprint != bb.fingerprint  # another head: gates trained on this one are refused


def test_dinov2_interpolates_positions_to_the_processor_size(loaded):
    """Native grid 5x5 (image_size 40), processor crop 32: the run-time grid is 4x4."""
    bb = loaded["dinov2"][0]
    assert bb.model.config.image_size == 40 and bb.image_size == (32, 32) and bb.pos_embed.shape == (17, 48)
