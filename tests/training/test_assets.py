"""The embedded demo models meet the issue's bars (evaluated afresh here, not read from their metrics)."""

from __future__ import annotations

import json

import pytest
import torch

from vdm_engine import Explainer, load_backbone
from vdm_engine.registry import embedded_model_dir
from vdm_engine.training.data import digits_split, toy_batch


@pytest.fixture(scope="module")
def digits():
    return Explainer.from_pretrained("vit-digits").eval()


@pytest.fixture(scope="module")
def toy():
    return Explainer.from_pretrained("vit-toy").eval()


def test_assets_are_small_and_complete():
    total = 0
    for name in ("vit-digits", "vit-toy"):
        d = embedded_model_dir(name)
        assert d is not None, name
        for f in ("backbone/config.json", "backbone/model.safetensors", "backbone/preprocessor_config.json",
                  "gates/gates.safetensors", "gates/gates_config.json", "metrics.json"):
            assert (d / f).is_file(), f"{name}/{f}"
        total += sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
    assert total < 5 * 2**20, f"embedded models take {total / 2**20:.2f} MB, expected < 5 MB"


def test_vit_digits_classifier_and_gates_meet_the_bar(digits):
    bb = load_backbone("vit-digits")
    assert min(bb.grid) >= 4
    x, y = digits_split("test")  # 300 digits never used for the classifier or the gates
    pv = digits.preprocess(x)
    e = digits.explain(pv)
    acc = float((e.labels == torch.as_tensor(y)).float().mean())
    assert acc >= 0.95, f"held-out accuracy {acc:.3f} < 0.95"
    v = digits.verify(pv, e, 0.5)
    kept, agree, kl = float(v.kept_fraction.mean()), float(v.agree.float().mean()), float(v.kl.mean())
    assert kept <= 0.5 and agree >= 0.95 and kl <= 0.15, f"kept {kept:.3f}, agreement {agree:.3f}, KL {kl:.3f}"
    # The committed numbers are the ones the shipped files give.
    recorded = json.loads((embedded_model_dir("vit-digits") / "metrics.json").read_text())["evaluation"]
    assert recorded == digits.gates.metrics["evaluation"]
    assert abs(recorded["kept"] - kept) < 0.01 and abs(recorded["agreement"] - agree) < 0.01
    assert abs(recorded["kl"] - kl) < 1e-3 and abs(recorded["accuracy"] - acc) < 0.01


@pytest.mark.parametrize("seed", [777, 4242])
def test_vit_toy_ground_truth_holds_for_the_model(toy, seed):
    """Masking exactly the non-relevant patches keeps the prediction (>= 98%), with the gates'
    placeholder and with zeros, and the model counts correctly."""
    x, y, rel = toy_batch(300, seed)
    pv = toy.preprocess(x)
    bb = toy.backbone
    with torch.no_grad():
        pred = bb(pv).argmax(-1)
        assert float((pred == torch.as_tensor(y)).float().mean()) >= 0.98
        keep = torch.as_tensor(rel).float()
        for name, ph in (("gates' placeholder", toy.gates.placeholder), ("zeros", None)):
            masked = bb.masked_logits(pv, keep, ph).argmax(-1)
            rate = float((masked == pred).float().mean())
            assert rate >= 0.98, f"masking the non-relevant patches with {name} kept only {rate:.3f} of predictions"


def test_vit_toy_gates_meet_the_bar(toy):
    x, _, rel = toy_batch(300, 31337)  # fresh images (training used seeds 0..300)
    rel = torch.as_tensor(rel)
    pv = toy.preprocess(x)
    e = toy.explain(pv)
    v = toy.verify(pv, e, 0.5)
    keep = e.keep(0.5)
    tp = float((keep & rel).sum())
    recall, precision = tp / float(rel.sum()), tp / max(1.0, float(keep.sum()))
    agree = float(v.agree.float().mean())
    assert recall >= 0.9 and precision >= 0.8 and agree >= 0.95, (
        f"recall {recall:.3f}, precision {precision:.3f}, agreement {agree:.3f}"
    )


def test_vit_toy_diffmask_localises_better_than_the_attention_baselines(toy):
    """The issue's bar on images the committed evaluation did not use: DiffMask's kept patches
    (F1 >= 0.9) beat rollout's, Chefer's and Grad-CAM's top-k (k = true count); decoys are why."""
    from vdm_engine.attribution import get_method
    from vdm_engine.evaluation import _topk_mask, localisation_counts, prf

    x, _, rel = toy_batch(300, 5151)
    rel = torch.as_tensor(rel)
    pv = toy.preprocess(x)
    f1 = {"diffmask": prf(localisation_counts(toy.explain(pv).keep(0.5), rel))["f1"]}
    for name in ("rollout", "chefer", "gradcam"):
        scores = get_method(name, toy)(pv)
        f1[name] = prf(localisation_counts(_topk_mask(scores, rel.sum(1), torch.Generator().manual_seed(0)), rel))["f1"]
    assert f1["diffmask"] >= 0.9 and all(f1["diffmask"] > v for k, v in f1.items() if k != "diffmask"), f1
