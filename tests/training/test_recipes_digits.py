"""The vit-digits recipe study (``vdm_engine.training.recipes_digits``): target check, variants, a tiny run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vdm_engine.gates import Gates
from vdm_engine.masks import patch_rank
from vdm_engine.training import recipes, recipes_digits as rd


def _figures(path: dict, chefer: dict) -> dict:
    curves = [rd._curve_name(*c) for c in rd.CURVES]
    return {"mask": {"kept": 0.44, "agreement": 0.97, "kl": 0.05},
            "methods": {"diffmask-path": {k: dict(path) for k in curves}, "diffmask": {k: dict(path) for k in curves},
                        rd.CHEFER: {k: dict(chefer) for k in curves}}}


def test_target_check_hand_worked():
    # path AUC 0.30 vs Chefer 0.28 ± 0.01: lower-better curves miss by 0.30 - 0.28 - 0.01 = 0.01;
    # paired difference +0.02 ± 0.01: the higher-better curves are met (0.02 - ... >= 0)
    t = rd.target_check(_figures({"auc": 0.30, "sem": 0.01, "diff": 0.02, "diff_sem": 0.01},
                                 {"auc": 0.28, "sem": 0.01, "diff": 0.0, "diff_sem": 0.0}))
    assert t["perturbation/noise/positive"] == {"met": False, "miss": 0.01}
    assert t["road/negative"] == {"met": True, "miss": 0.0}
    assert t["mask"]["met"] and not t["all"]
    # difference -0.03 ± 0.01: the 95% interval reaches -0.03 + 0.0196 < 0 -> missed by 0.0104
    t = rd.target_check(_figures({"auc": 0.285, "sem": 0.01, "diff": -0.03, "diff_sem": 0.01},
                                 {"auc": 0.28, "sem": 0.01, "diff": 0.0, "diff_sem": 0.0}))
    assert t["insertion-deletion/mean/insertion"] == {"met": False, "miss": 0.0104}
    assert t["insertion-deletion/mean/deletion"]["met"]  # 0.285 - 0.28 <= one standard error


def test_variants_are_valid_and_repeated_batches_repeat_images():
    assert len({v.name for v in rd.VARIANTS}) == len(rd.VARIANTS)
    with pytest.raises(ValueError, match="must include the main level"):
        rd.DigitsVariant("x", "x", levels=(0.3, 1.0))
    with pytest.raises(ValueError, match="increasing"):
        rd.DigitsVariant("x", "x", levels=(0.3, 0.1))
    with pytest.raises(ValueError, match="sparse_placeholder"):
        rd.DigitsVariant("x", "x", sparse_placeholder="noise")
    with pytest.raises(ValueError, match="samples"):
        rd.DigitsVariant("x", "x", samples=3)
    src = rd._repeated_source(torch.arange(10.0).view(10, 1, 1, 1), 4)
    got = src.images(np.array([7, 2, 5, 9, 0, 1, 3, 4])).flatten().tolist()
    assert got == [7.0] * 4 + [2.0] * 4


def test_sparse_replacement_reaches_only_the_sparser_levels():
    """``sparse_replacement`` sets ``TrainConfig.replacement`` of the levels sparser than the main one; the cache
    key of a level with the default replacement is the key it had before the field existed."""
    import hashlib

    with pytest.raises(ValueError, match="DigitsVariant.sparse_replacement 'placeholder\\+blur'"):
        rd.DigitsVariant("x", "x", sparse_replacement="placeholder+blur")
    v = rd.DigitsVariant("x", "x", levels=(0.03, 0.1, 0.3), sparse_replacement="placeholder+zeros")
    assert rd._train_config(v).replacement == "placeholder"
    assert rd._train_config(v, 0.03).replacement == "placeholder"
    assert rd._train_config(v, 0.3, sparse_level=True).replacement == "placeholder+zeros"
    cfg = rd._train_config(v, 0.03)
    old = {k: x for k, x in cfg.to_dict().items() if k not in ("replacement", "objective")}
    blob = json.dumps({"cfg": old, "samples": 1, "placeholder": "learned"}, sort_keys=True)
    assert rd._level_key(cfg, v, "learned") == hashlib.sha256(blob.encode()).hexdigest()[:16]
    sparse = rd._train_config(v, 0.3, sparse_level=True)
    assert rd._level_key(sparse, v, "learned") != rd._level_key(rd._train_config(rd.DigitsVariant(
        "y", "y", levels=(0.03, 0.1, 0.3)), 0.3, sparse_level=True), v, "learned")


def test_train_and_score_a_path_variant_on_a_tiny_vit(tiny_backbone, tmp_path, monkeypatch):
    """A 3-step path variant (2 mask samples per image) on a random tiny ViT: levels stacked with the main
    one (the denser level trained with a zero placeholder), cached and reloaded, scored against Chefer
    (whose own differences are 0), written as markdown."""
    from vdm_engine.attribution import get_method

    monkeypatch.setitem(recipes.GATE_CONFIGS, "digits", dict(steps=3, eval_interval=3, checkpoint_interval=3))
    v = rd.DigitsVariant("tiny", "3 steps", levels=(0.05, 0.1, 0.5), level_steps=2, samples=2, dense_placeholder="zeros",
                         sparse_placeholder="learned")
    rng = np.random.default_rng(0)
    data = {"gate_train": rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8),
            "gate_val": rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)}
    trained = rd.train_variant(v, tiny_backbone, data, cache=tmp_path / "cache")
    path = trained["path"]
    assert (path.config.levels, path.config.main_level, path.config.placeholder) == (3, 1, True)
    assert len(list((tmp_path / "cache").iterdir())) == 3
    dense = [g for g in (Gates.from_pretrained(d, tiny_backbone) for d in (tmp_path / "cache").iterdir())
             if not g.config.placeholder]  # the zero-placeholder level, as trained
    assert len(dense) == 1
    torch.testing.assert_close(path.w1[: dense[0].w1.shape[0]], dense[0].w1, rtol=0, atol=0)
    torch.testing.assert_close(path.placeholder, trained["gates"].placeholder, rtol=0, atol=0)
    again = rd.train_variant(v, tiny_backbone, data, cache=tmp_path / "cache")  # from the cache: same gates
    torch.testing.assert_close(again["path"].w1, path.w1, rtol=0, atol=0)

    pv = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    chefer = get_method(rd.CHEFER, backbone=tiny_backbone)(pv, tiny_backbone(pv).argmax(-1))
    fig = rd.score_variant(tiny_backbone, trained["gates"], path, pv, chefer)
    assert set(fig["methods"]) == {"diffmask", "diffmask-path", rd.CHEFER} and len(fig["mask"]["path_kept_per_level"]) == 3
    for k, c in fig["methods"]["diffmask-path"].items():
        assert fig["methods"][rd.CHEFER][k]["diff"] == 0.0
        assert c["diff"] == pytest.approx(c["auc"] - fig["methods"][rd.CHEFER][k]["auc"], abs=1e-9), k
    # the rankings, scored from precomputed level masks: path-rank reproduces diffmask-path's AUCs exactly
    ranked = rd.score_rankings(tiny_backbone, path, pv, chefer)
    assert set(ranked) == {*rd.RANKINGS, rd.CHEFER, "fractions"}
    assert len(ranked["mean-keep"]["prob"]["noise/negative"]) == len(ranked["fractions"])
    for k, c in ranked["path-rank"].items():
        if k not in ("target", "prob"):
            assert c["auc"] == pytest.approx(fig["methods"]["diffmask-path"][k]["auc"], abs=1e-9), k
            assert (c["diff_path-rank"], c["diff_path-rank_sem"]) == (0.0, 0.0)
    assert "mask" not in ranked["mean-keep"]["target"]
    record = {"test_images": 4, "variants": {"tiny": rd._variant_record(v, trained, fig, 1.0)},
              "rankings": {"tiny": {"levels_sha256": "x", "rankings": ranked}}}
    rd._write_markdown(record, tmp_path / "results.md")
    text = (tmp_path / "results.md").read_text()
    assert "## tiny" in text and "| tiny | " in text and "### tiny" in text and "| rank-mean-tie | " in text
    json.dumps(record)  # the record is JSON


def test_rankings_hand_worked():
    # levels least sparse first; patch 0 kept by every level, 1 by the first two, 2 and 3 by the first only
    # (3 with higher keep probabilities at the sparser levels), 4 by none
    p = torch.tensor([[[0.9, 0.8, 0.7, 0.6, 0.2],
                       [0.9, 0.7, 0.1, 0.4, 0.1],
                       [0.8, 0.2, 0.0, 0.3, 0.0]]])
    torch.testing.assert_close(rd.RANKINGS["path-rank"](p), patch_rank(p))
    torch.testing.assert_close(rd.RANKINGS["mean-keep"](p), p.mean(1))
    tie = rd.RANKINGS["rank-mean-tie"](p)[0]
    # rank 3 + 0.8667, 2 + 0.5667, 1 + 0.2667 (ties 2 vs 3 by the mean: 3 first), 1 + 0.4333, 0 + 0.1
    torch.testing.assert_close(tie, torch.tensor([3 + 2.6 / 3, 2 + 1.7 / 3, 1 + 0.8 / 3, 1 + 1.3 / 3, 0.1]))
    assert tie.argsort(descending=True).tolist() == [0, 1, 3, 2, 4]
    geo = rd.RANKINGS["rank-geomean-tie"](p)[0]
    torch.testing.assert_close(geo[2], torch.tensor(1.0), atol=1e-6, rtol=0)  # p = 0 clamps at 1e-30: tie ~ 0
    assert geo.argsort(descending=True).tolist() == [0, 1, 3, 2, 4]


def test_variant_main_and_split_are_checked():
    with pytest.raises(ValueError, match="DigitsVariant.main must be"):
        rd.DigitsVariant("x", "x", main="mine")
    with pytest.raises(ValueError, match="main='shipped' takes the shipped recipe's main level"):
        rd.DigitsVariant("x", "x", main="shipped", train={"probe_size": 4}, levels=(0.1, 0.3))
    with pytest.raises(ValueError, match="'test' or 'val' digits, got 'train'"):
        rd._setup("train")


def test_ship_levels_around_the_shipped_gates(tmp_path, monkeypatch):
    """A ``main="shipped"`` path variant (3-step levels on vit-digits) ships only ``gates-levels``: the
    single-level gates and metrics.json stay byte-identical, the path's main level is the shipped gates (same
    patch_mask), and the written levels record their budgets and the study."""
    import hashlib
    import shutil

    from vdm_engine import Explainer
    from vdm_engine.backbone import load_backbone
    from vdm_engine.data import digits_split
    from vdm_engine.models import embedded_model_dir

    model_dir = tmp_path / "vit-digits"
    shutil.copytree(embedded_model_dir("vit-digits"), model_dir)
    files = {p.relative_to(model_dir): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in model_dir.rglob("*") if p.is_file() and "gates-levels" not in p.parts}
    monkeypatch.setitem(recipes.GATE_CONFIGS, "digits", {**recipes.GATE_CONFIGS["digits"], "steps": 3,
                                                         "eval_interval": 3, "checkpoint_interval": 3})
    rng = np.random.default_rng(0)
    monkeypatch.setattr(recipes, "_data", lambda which, recipe: {
        "gate_train": rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8),
        "gate_val": rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)})
    v = rd.DigitsVariant("tiny-shipped", "3-step levels around the shipped gates", main="shipped",
                         levels=(0.1, 0.5, 1.0), level_steps=2, sparse_replacement="placeholder+zeros")
    monkeypatch.setattr(rd, "VARIANTS", [*rd.VARIANTS, v])
    with pytest.raises(ValueError, match="no levels"):  # refused before anything is trained or written
        rd.ship("shipped-recipe", tmp_path / "c", model_dir, levels_only=True)
    metrics = rd.ship("tiny-shipped", tmp_path / "cache", model_dir)
    assert files == {p.relative_to(model_dir): hashlib.sha256(p.read_bytes()).hexdigest()
                     for p in model_dir.rglob("*") if p.is_file() and "gates-levels" not in p.parts}
    bb = load_backbone(str(model_dir / "backbone"))
    single = Explainer(bb, Gates.from_pretrained(model_dir / "gates", bb)).eval()
    path = Gates.from_pretrained(model_dir / "gates-levels", bb)
    assert (path.config.levels, path.config.main_level) == (3, 0)
    assert path.level_budgets() == [0.1, 0.5, 1.0] and metrics["recipe_study"]["variant"] == "tiny-shipped"
    pv = single.preprocess(digits_split("test")[0][:16])
    torch.testing.assert_close(Explainer(single.backbone, path).eval().explain(pv).patch_mask,
                               single.explain(pv).patch_mask)
