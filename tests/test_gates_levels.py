"""K-level gates and the one-pass ranking (``levels=K``, ``patch_rank``), issue 17 part 2."""

from __future__ import annotations

import json

import pytest
import torch

from vdm_engine import Explainer, GateConfig, Gates, masks
from vdm_engine.attribution import get_method

from tests.conftest import make_tiny_gates


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _levels(backbone, k=3):
    out = []
    for i in range(k):
        g = make_tiny_gates(backbone)
        with torch.no_grad():
            g.add.add_(-1.5 * i)  # sparser with every level
            g.w1.mul_(1 + 0.3 * i)
            g.placeholder.add_(i)
        out.append(g)
    return out


def test_patch_rank_hand_worked():
    # 3 levels (least sparse first), 4 patches, threshold 0.5
    p = torch.tensor([[[0.9, 0.9, 0.2, 0.6],
                       [0.8, 0.3, 0.1, 0.7],
                       [0.6, 0.2, 0.05, 0.4]]])
    # patch 0 kept by all -> 3 + p[2] = 3.6; patch 1 kept by level 0 only -> 1 + p[1] = 1.3;
    # patch 2 kept by none -> 0 + p[0] = 0.2; patch 3 kept by levels 0,1 -> 2 + p[2] = 2.4
    torch.testing.assert_close(masks.patch_rank(p), torch.tensor([[3.6, 1.3, 0.2, 2.4]]))
    # not nested: kept by level 2 only still ranks as level 2
    q = torch.tensor([[[0.1], [0.2], [0.7]]])
    torch.testing.assert_close(masks.patch_rank(q), torch.tensor([[3.7]]))


def test_config_levels_and_single_level_files_unchanged(tiny_backbone):
    with pytest.raises(ValueError, match="levels"):
        GateConfig(36, 4, levels=0)
    with pytest.raises(ValueError, match="main_level"):
        GateConfig(36, 4, levels=2, main_level=2)
    assert "levels" not in GateConfig(36, 4).to_dict()
    assert GateConfig.from_dict(GateConfig(36, 4, levels=3, main_level=1).to_dict()).levels == 3


def test_stack_runs_every_level_in_one_pass(tiny_backbone, pixels, tmp_path, close):
    levels = _levels(tiny_backbone)
    stacked = Gates.stack(levels, main_level=1).eval()
    assert stacked.config.levels == 3 and stacked.w1.shape[0] == 3 * tiny_backbone.num_hidden_states
    ex = Explainer(tiny_backbone, stacked).eval()
    e = ex.explain(pixels)
    _, hidden = tiny_backbone.hidden_states(pixels)
    per_level = torch.stack([g.patch_mask(hidden) for g in levels], 1)  # each level on its own
    close(stacked.level_masks(hidden), per_level, 1e-6, 1e-6, "level masks")
    close(e.patch_mask, per_level[:, 1], 1e-6, 1e-6, "main level mask")
    close(e.patch_rank, masks.patch_rank(per_level), 1e-6, 1e-6, "patch rank")
    assert torch.equal(stacked.placeholder, levels[1].placeholder)
    # one by one equals the batch
    one = torch.cat([ex.explain(pixels[i : i + 1]).patch_rank for i in range(pixels.shape[0])])
    close(one, e.patch_rank, 1e-6, 1e-6, "batch vs one by one")
    # saved and loaded with its levels; the method reads the rank
    stacked.save_pretrained(tmp_path / "lv", backbone=tiny_backbone)
    assert json.loads((tmp_path / "lv" / "gates_config.json").read_text())["config"]["levels"] == 3
    back = Explainer(tiny_backbone, Gates.from_pretrained(tmp_path / "lv")).eval()
    close(get_method("diffmask-path", back)(pixels), e.patch_rank, 1e-6, 1e-6, "diffmask-path")
    with pytest.raises(ValueError, match="K-level gates"):
        get_method("diffmask-path", Explainer(tiny_backbone, levels[0]))
    with pytest.raises(ValueError, match="single-level"):
        stacked.sample(hidden, -1)


def test_onnx_patch_rank_output(tiny_backbone, pixels, tmp_path, close):
    pytest.importorskip("onnxruntime")
    from vdm_engine.export import export_onnx
    from vdm_engine.runtime import OnnxExplainer

    ex = Explainer(tiny_backbone, Gates.stack(_levels(tiny_backbone, 2)).eval()).eval()
    path = tmp_path / "lv.onnx"
    export_onnx(ex, path, outputs=("logits", "patch_mask", "patch_rank"), validate=False)  # compared below
    got = OnnxExplainer(path).explain(pixels)
    close(got.patch_rank, ex.explain(pixels).patch_rank, 1e-4, 1e-4, "onnx patch_rank")


def test_shipped_vit_digits_levels():
    """The shipped K-level gates fit vit-digits (fingerprint checked), record increasing KL budgets, their main
    level meets the digits mask bar (<= 45% kept, >= 97% agreement on the 300 held-out digits), and the sparsest
    level keeps the fewest patches."""
    from vdm_engine.data import digits_split
    from vdm_engine.models import ASSETS, embedded_levels_dir

    single = Explainer.from_pretrained("vit-digits").eval()
    d = embedded_levels_dir("vit-digits")
    assert d == ASSETS / "vit-digits" / "gates-levels"
    levels = Explainer(single.backbone, Gates.from_pretrained(d, single.backbone, source="shipped")).eval()
    K = levels.gates.config.levels
    assert K >= 2
    eps = levels.gates.level_budgets()
    assert len(eps) == K and eps == sorted(eps) and len(set(eps)) == K, eps
    pv = single.preprocess(digits_split("test")[0])
    e = levels.explain(pv)
    v = levels.verify(pv, e, 0.5)
    assert float(v.kept_fraction.mean()) <= 0.45 and float(v.agree.float().mean()) >= 0.97
    _, hidden = single.backbone.hidden_states(pv)
    kept = (levels.gates.level_masks(hidden) > 0.5).float().mean((0, 2))
    assert kept.argmin() == K - 1 and kept[-1] < kept[levels.gates.config.main_level], kept


def test_export_patch_rank_needs_levels_is_a_usage_error(tmp_path, capsys):
    """``vdm-export --outputs patch_rank`` with single-level gates: one error line and exit 2 before tracing."""
    from vdm_engine.cli.export import main

    rc = main(["--model", "vit-digits", "--out", str(tmp_path / "x.onnx"), "--outputs", "logits,patch_rank"])
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert rc == 2
    assert len(err) == 1 and "patch_rank output needs K-level gates" in err[0] and "1 level" in err[0], err
    assert not (tmp_path / "x.onnx").exists()


def test_eval_default_path_follows_the_gates_in_use(tmp_path, monkeypatch):
    """vdm-eval adds diffmask-path by default only for K-level gates in use: --path-gates, K-level --gates,
    or the shipped gates with their shipped levels (not when --gates or a registry entry replaces them)."""
    from vdm_engine.cli.eval import _path_gates_in_use
    from vdm_engine.models import ASSETS
    from vdm_engine.registry import register_gates

    monkeypatch.setenv("VDM_GATES_HOME", str(tmp_path / "registry"))
    single, levels = ASSETS / "vit-digits" / "gates", ASSETS / "vit-digits" / "gates-levels"
    assert _path_gates_in_use("vit-digits", None, None) == (True, None)  # shipped gates + shipped levels
    assert _path_gates_in_use("vit-digits", str(single), None) == (False, None)
    assert _path_gates_in_use("vit-digits", str(levels), None) == (True, str(levels))
    assert _path_gates_in_use("vit-digits", str(single), str(levels)) == (True, str(levels))
    assert _path_gates_in_use("vit-toy", None, None) == (False, None)  # ships no levels
    assert _path_gates_in_use("vit-digits", str(tmp_path / "missing"), None) == (False, None)
    register_gates("vit-digits", single)  # a registry entry hides the shipped gates
    assert _path_gates_in_use("vit-digits", None, None) == (False, None)


def test_stack_refuses_gates_of_another_backbone(tiny_backbone):
    from vdm_engine.backbone import random_backbone

    a, b = _levels(tiny_backbone, 2)
    a.backbone_fingerprint, b.backbone_fingerprint = tiny_backbone.fingerprint, random_backbone("vit-tiny", seed=1).fingerprint
    with pytest.raises(ValueError, match=r"levels\[1\] was trained on another backbone"):
        Gates.stack([a, b])
    b.backbone_fingerprint = a.backbone_fingerprint
    with pytest.raises(ValueError, match="main_level must be in"):
        Gates.stack([a, b], main_level=2)
    assert Gates.stack([a, b]).backbone_fingerprint == tiny_backbone.fingerprint


def test_level_budgets_read_every_way_the_metrics_record_eps(tiny_backbone):
    from vdm_engine.provenance import trained_eps

    assert trained_eps({"eps": 0.3, "train_config": {"eps": 9.0}}) == 0.3  # recipes.train_levels
    assert trained_eps({"train_config": {"eps": 1.0}}) == 1.0  # train_gates (vdm-train)
    assert trained_eps({"gates_training": {"train_config": {"eps": 0.1}}}) == 0.1  # a shipped model's gates
    assert trained_eps({}) is None
    a, b, c = _levels(tiny_backbone, 3)
    a.metrics, b.metrics = {"eps": 0.1}, {"train_config": {"eps": 0.5}}
    assert a.level_budgets() == [0.1] and Gates.stack([a, b, c]).level_budgets() == [0.1, 0.5, None]


def test_vdm_gates_stack(tiny_backbone, tmp_path, capsys):
    """``vdm-gates stack`` writes the K-level gates ``Gates.stack`` builds (same weights, the sources recorded,
    bound to the same backbone, usable for patch_rank); bad input is one error line and exit 2, nothing written."""
    from vdm_engine.backbone import random_backbone
    from vdm_engine.cli.gates import main

    dirs = []
    for i, g in enumerate(_levels(tiny_backbone, 3)):
        dirs.append(str(g.save_pretrained(tmp_path / f"level{i}", backbone=tiny_backbone)))
    out = tmp_path / "levels"
    assert main(["stack", *dirs, "--out", str(out), "--main-level", "1"]) == 0
    assert f"wrote {out}: 3 levels" in capsys.readouterr().out
    got = Gates.from_pretrained(out, tiny_backbone)  # the backbone check passes
    ref = Gates.stack([Gates.from_pretrained(d) for d in dirs], main_level=1)
    assert (got.config.levels, got.config.main_level) == (3, 1)
    for name in ("w1", "b1", "w2", "b2", "add", "placeholder"):
        torch.testing.assert_close(getattr(got, name), getattr(ref, name), rtol=0, atol=0)
    assert [s["sha256"] for s in got.metrics["stacked_from"]] == [Gates.from_pretrained(d).sha256 for d in dirs]
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert Explainer(tiny_backbone, got).eval().explain(pixels).patch_rank.shape == (2, 16)

    other = random_backbone("vit-tiny", seed=1)
    stranger = str(make_tiny_gates(other).save_pretrained(tmp_path / "stranger", backbone=other))
    before = sorted(p.name for p in out.iterdir())
    for argv, msg in (
        (["stack", dirs[0], "--out", str(tmp_path / "x")], "at least 2 gates folders"),
        (["stack", *dirs[:2], "--out", str(tmp_path / "x"), "--main-level", "2"], "--main-level must be in [0, 2)"),
        (["stack", *dirs[:2], "--out", str(out)], "already holds gates; pass --overwrite"),
        (["stack", dirs[0], stranger, "--out", str(tmp_path / "x")], "trained on another backbone"),
        (["stack", dirs[0], str(tmp_path / "missing"), "--out", str(tmp_path / "x")], "is not a gates directory"),
    ):
        assert main(argv) == 2, argv
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and err[0].startswith("vdm-gates: error:") and msg in err[0], (argv, err)
    assert not (tmp_path / "x").exists() and sorted(p.name for p in out.iterdir()) == before
    assert main(["stack", *dirs[:2], "--out", str(out), "--overwrite", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["main_level"] == 0 and Gates.from_pretrained(out).config.levels == 2


def test_explanation_records_carry_patch_rank_for_k_level_gates(tiny_backbone):
    """vdm-explain's per-image JSON (``records.explanation_records``) adds ``patch_rank`` (grid rows) for K-level
    gates and leaves it out for single-level ones."""
    from vdm_engine.records import explanation_records

    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    e = Explainer(tiny_backbone, Gates.stack(_levels(tiny_backbone, 3))).eval().explain(pixels)
    recs = explanation_records(e, {}, top_k=2)
    assert torch.tensor(recs[1]["patch_rank"]).flatten().tolist() == e.patch_rank[1].tolist()
    assert len(recs[0]["patch_rank"]) == e.grid[0] and len(recs[0]["patch_rank"][0]) == e.grid[1]
    single = Explainer(tiny_backbone, make_tiny_gates(tiny_backbone)).eval().explain(pixels)
    assert "patch_rank" not in explanation_records(single, {})[0]
