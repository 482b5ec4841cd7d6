import dataclasses

import pytest
import torch

from vdm_engine import Explainer, GateConfig, Gates, GatesNotFoundError
from vdm_engine.registry import register_gates


def test_explain_shapes_and_ranges(tiny_explainer, pixels):
    ex = tiny_explainer.explain(pixels)
    assert ex.logits.shape == (5, 10)
    assert ex.patch_mask.shape == (5, 16) and ex.layer_masks.shape == (5, 4, 16)
    assert ((ex.patch_mask >= 0) & (ex.patch_mask <= 1)).all()
    assert torch.equal(ex.patch_mask, ex.layer_masks[:, -1])
    assert ex.grid == (4, 4)
    assert ex.pixel_mask().shape == (5, 32, 32) and ex.pixel_mask("bilinear").shape == (5, 32, 32)
    # nearest upsampling repeats each patch's value over its 8x8 pixels
    assert torch.equal(ex.pixel_mask()[:, :8, :8], ex.patch_mask[:, :1, None].expand(5, 8, 8))
    assert torch.equal(ex.keep(0.5), ex.patch_mask > 0.5)
    with pytest.raises(ValueError, match="nearest"):
        ex.pixel_mask("cubic")


def test_explain_logits_are_the_plain_prediction(tiny_explainer, pixels, close):
    close(tiny_explainer.explain(pixels).logits, tiny_explainer.backbone(pixels), 1e-5, 1e-5, "logits")


def test_explain_matches_gates_on_hidden_states(tiny_explainer, pixels, close):
    _, hs = tiny_explainer.backbone.hidden_states(pixels)
    ex = tiny_explainer.explain(pixels)
    close(ex.patch_mask, tiny_explainer.gates.patch_mask(hs), 1e-6, 1e-5, "patch_mask")
    close(ex.layer_masks, tiny_explainer.gates.layer_masks(hs), 1e-6, 1e-5, "layer_masks")


def test_exactly_one_backbone_forward_per_explain(tiny_explainer, pixels):
    calls = {"proj": 0, "layers": 0, "head": 0}
    b = tiny_explainer.backbone
    hooks = [b.model.vit.embeddings.patch_embeddings.projection.register_forward_hook(lambda *a: calls.__setitem__("proj", calls["proj"] + 1))]
    hooks += [layer.register_forward_hook(lambda *a: calls.__setitem__("layers", calls["layers"] + 1)) for layer in b.layers]
    hooks += [b.model.classifier.register_forward_hook(lambda *a: calls.__setitem__("head", calls["head"] + 1))]
    try:
        tiny_explainer.explain(pixels)
    finally:
        for h in hooks:
            h.remove()
    assert calls == {"proj": 1, "layers": b.num_layers, "head": 1}


@pytest.mark.parametrize("layout", ["per-depth", "wide", "auto", "auto-large"])
def test_probes_run_inside_the_layer_loop(tiny_explainer, pixels, monkeypatch, layout):
    """Each depth's hidden state feeds its probe right after it is produced (per-depth: the whole probe;
    wide: its projection, then one finish after the last layer); nothing stacks the L+2 states.
    ``auto`` is wide for this small call, per depth once the call exceeds ``WIDE_MAX_ELEMENTS``."""
    import vdm_engine.explainer as explainer_module
    import vdm_engine.ops as ops_module

    if layout == "auto-large":
        monkeypatch.setattr(ops_module, "WIDE_MAX_ELEMENTS", 0)

    b = tiny_explainer.backbone
    events = []
    probe, project, finish = tiny_explainer.ops.gate_probe, explainer_module.project_depth, explainer_module.finish_probes

    def recording_probe(h0, hs, probes, depth):
        events.append(("probe", depth, tuple(hs.shape)))
        return probe(h0, hs, probes, depth)

    def recording_project(hs, probes, depth):
        events.append(("probe", depth, tuple(hs.shape)))
        return project(hs, probes, depth)

    def recording_finish(h0, projections, probes):
        events.append(("finish", len(projections)))
        return finish(h0, projections, probes)

    ops = dataclasses.replace(tiny_explainer.ops, gate_probe=recording_probe, probe_layout=layout.replace("-large", ""))
    monkeypatch.setattr(tiny_explainer, "ops", ops)
    monkeypatch.setattr(explainer_module, "project_depth", recording_project)
    monkeypatch.setattr(explainer_module, "finish_probes", recording_finish)
    monkeypatch.setattr(type(b), "hidden_states", lambda *a: pytest.fail("the explain path stacked the hidden states"))
    hooks = [layer.register_forward_hook(lambda m, i, o, k=k: events.append(("layer", k))) for k, layer in enumerate(b.layers)]
    try:
        ex = tiny_explainer.explain(pixels)
    finally:
        for h in hooks:
            h.remove()
    T, D = b.num_tokens, b.hidden_size
    expected = [("probe", 0, (5, T, D)), ("probe", 1, (5, T, D))]
    for k in range(b.num_layers):
        expected += [("layer", k), ("probe", k + 2, (5, T, D))]
    if layout in ("wide", "auto"):
        expected.append(("finish", b.num_hidden_states))
    assert events == expected
    assert ex.layer_masks.shape == (5, b.num_hidden_states, b.num_patches)


def test_batch_equals_one_by_one(tiny_explainer, pixels, close):
    ex = tiny_explainer.explain(pixels)
    for i in range(len(pixels)):
        one = tiny_explainer.explain(pixels[i : i + 1])
        close(one.patch_mask[0], ex.patch_mask[i], 1e-5, 1e-5, f"image {i}")
        close(one.logits[0], ex.logits[i], 1e-5, 1e-5, f"logits {i}")


def test_verify_hard_mask(tiny_explainer, pixels, close):
    ex = tiny_explainer.explain(pixels)
    v = tiny_explainer.verify(pixels, ex, threshold=0.5)
    expected = tiny_explainer.backbone.masked_logits(pixels, ex.keep(0.5).float(), tiny_explainer.gates.placeholder)
    close(v.masked_logits, expected, 1e-6, 1e-6, "masked logits")
    assert v.kl.shape == (5,) and (v.kl >= -1e-6).all()
    assert torch.equal(v.agree, expected.argmax(-1) == ex.logits.argmax(-1))
    # threshold 0 keeps every patch: the masked pass is the original one
    v0 = tiny_explainer.verify(pixels, ex, threshold=-1.0)
    assert v0.agree.all() and v0.kl.abs().max() < 1e-5 and (v0.kept_fraction == 1).all()


def test_explain_rejects_bad_input(tiny_explainer):
    with pytest.raises(ValueError, match="rank 4"):
        tiny_explainer.explain(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="NaN"):
        tiny_explainer.explain(torch.full((1, 3, 32, 32), float("nan")))
    with pytest.raises(ValueError, match="empty"):
        tiny_explainer.explain(torch.zeros(0, 3, 32, 32))


def test_mismatched_gates_are_rejected(tiny_backbone):
    with pytest.raises(ValueError, match="hidden size 40.*hidden size 36"):
        Explainer(tiny_backbone, Gates(GateConfig(hidden_size=40, num_hidden_states=4)))
    with pytest.raises(ValueError, match="3 layers.*2 layers"):
        Explainer(tiny_backbone, Gates(GateConfig(hidden_size=36, num_hidden_states=5)))


def test_from_pretrained_uses_registry(tiny_model_dir, tiny_gates, tmp_path, pixels, close):
    with pytest.raises(GatesNotFoundError, match="vdm-train --model"):
        Explainer.from_pretrained(str(tiny_model_dir))
    tiny_gates.save_pretrained(tmp_path / "g")
    register_gates(str(tiny_model_dir), tmp_path / "g")
    e = Explainer.from_pretrained(str(tiny_model_dir))
    ref = Explainer(e.backbone, tiny_gates)
    close(e.explain(pixels).patch_mask, ref.explain(pixels).patch_mask, 0, 0, "registry gates")
    e2 = Explainer.from_pretrained(str(tiny_model_dir), gates=tmp_path / "g")
    close(e2.explain(pixels).patch_mask, ref.explain(pixels).patch_mask, 0, 0, "explicit gates")
