"""The faithfulness metrics of issue 17: one-patch insertion/deletion, ROAD, sparseness, complexity,
rank correlation, the randomisation test, and the Quantus cross-check."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vdm_engine.evaluation import (
    PerturbationConfig,
    entropy,
    evaluate,
    gini,
    insertion_deletion_gates,
    noisy_linear_imputation,
    patch_intensity,
    randomisation_test,
    randomised_backbone,
    results_markdown,
    road_logits,
    spearman,
    write_report,
)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def test_gini_and_entropy_hand_values():
    s = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 5.0], [1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0],
                      [-1.0, 1.0, -1.0, 1.0]])
    # sorted a = 1,2,3,4: sum (2k-5) a_k = -3 -2 +3 +12 = 10; / (4 * 10) = 0.25
    np.testing.assert_allclose(gini(s), [0.0, 0.75, 0.25, 0.0, 0.0], atol=1e-12)
    p = np.array([1, 2, 3, 4]) / 10
    np.testing.assert_allclose(entropy(s), [math.log(4), 0.0, -(p * np.log(p)).sum(), math.log(4), math.log(4)],
                               atol=1e-12)
    with pytest.raises(ValueError, match="NaN"):
        gini(torch.tensor([[1.0, float("nan")]]))


def test_spearman_matches_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(3)
    a = torch.randint(0, 5, (7, 16), generator=g).float()  # many ties
    b = torch.randn(7, 16, generator=g)
    ours = spearman(a, b)
    ref = [stats.spearmanr(a[i].numpy(), b[i].numpy()).statistic for i in range(7)]
    np.testing.assert_allclose(ours, ref, atol=1e-12)
    assert np.isnan(spearman(torch.ones(1, 4), torch.arange(4.0).view(1, 4))[0])


def test_insertion_deletion_gates_one_patch_per_step():
    s = torch.tensor([[0.1, 0.9, 0.5, 0.3]])
    g = insertion_deletion_gates(s)
    assert g.shape == (1, 2, 5, 4)
    assert g[0, 0, 1].tolist() == [1, 0, 1, 1] and g[0, 0, 2].tolist() == [1, 0, 0, 1]  # deletion: best first
    assert g[0, 1, 0].tolist() == [0, 0, 0, 0] and g[0, 1, 1].tolist() == [0, 1, 0, 0]  # insertion: best first
    assert (g[0, 0].sum(-1) == torch.tensor([4.0, 3, 2, 1, 0])).all() and (g[0, 0] + g[0, 1] == 1).all()


def _dense_equation_error(out: np.ndarray, removed: np.ndarray) -> float:
    """Max |x_i - weighted mean of its in-image neighbours| over removed pixels (ROAD's equation)."""
    k = np.array([[1 / 12, 1 / 6, 1 / 12], [1 / 6, 0, 1 / 6], [1 / 12, 1 / 6, 1 / 12]])
    B, C, H, W = out.shape
    worst = 0.0
    for b, i, j in zip(*np.nonzero(removed)):
        num, den = np.zeros(C), 0.0
        for di in (-1, 0, 1):
            for dj in (-1, 0, 1):
                if (di or dj) and 0 <= i + di < H and 0 <= j + dj < W:
                    num += k[di + 1, dj + 1] * out[b, :, i + di, j + dj]
                    den += k[di + 1, dj + 1]
        worst = max(worst, float(np.abs(out[b, :, i, j] - num / den).max()))
    return worst


def test_linear_imputation_solves_roads_equation():
    pytest.importorskip("scipy")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 13, 11, generator=g, dtype=torch.float64)  # awkward sizes
    removed = torch.rand(3, 13, 11, generator=g) < 0.6
    removed[0] = True
    removed[0, 6, 0] = False  # one kept pixel is enough
    out = noisy_linear_imputation(x, removed, noise=0.0)
    assert _dense_equation_error(out.numpy(), removed.numpy()) < 1e-9
    keep = ~removed.unsqueeze(1).expand_as(x)
    assert torch.equal(out[keep], x[keep])
    # linear and translation-equivariant in value: commutes with a per-channel affine map (normalisation)
    scale, shift = torch.tensor([2.0, 0.5, -1.0]).view(1, 3, 1, 1), torch.tensor([0.3, -1.0, 2.0]).view(1, 3, 1, 1)
    out2 = noisy_linear_imputation(x * scale + shift, removed, noise=0.0)
    torch.testing.assert_close(out2, out * scale + shift, atol=1e-9, rtol=1e-9)
    # the noise lands on removed pixels only, with the asked spread
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    noisy = noisy_linear_imputation(x, removed, noise=0.5, generators=gens)
    d = (noisy - out)[~keep]
    assert torch.equal(noisy[keep], x[keep]) and 0.4 < float(d.std()) < 0.6
    with pytest.raises(ValueError, match="every pixel is removed"):
        noisy_linear_imputation(x[:1], torch.ones(1, 13, 11, dtype=torch.bool))


def test_road_logits_keep_all_is_plain_inference(tiny_backbone, pixels, close):
    pytest.importorskip("scipy")
    N = tiny_backbone.num_patches
    gates = torch.ones(5, 2, N)
    gates[:, 1, :3] = 0
    out = road_logits(tiny_backbone, pixels, gates, noise=0.0)
    with torch.no_grad():
        close(out[:, 0], tiny_backbone(pixels), 1e-5, 1e-5, "keep-all row")
        # the removed row equals the backbone on the imputed image built by hand
        ph, pw = tiny_backbone.patch_size
        removed = torch.zeros(5, 32, 32, dtype=torch.bool)
        for n in range(3):
            r, c = divmod(n, tiny_backbone.grid[1])
            removed[:, r * ph : (r + 1) * ph, c * pw : (c + 1) * pw] = True
        imputed = noisy_linear_imputation(pixels, removed, noise=0.0)
        close(out[:, 1], tiny_backbone(imputed), 1e-5, 1e-5, "imputed row")


def test_randomised_backbone_cascades_from_the_top(tiny_backbone, pixels):
    before = {k: v.clone() for k, v in tiny_backbone.model.state_dict().items()}
    fp = tiny_backbone.fingerprint
    L = tiny_backbone.num_layers
    rb = randomised_backbone(tiny_backbone, 1, seed=4)
    after = rb.model.state_dict()
    assert all(torch.equal(before[k], v) for k, v in tiny_backbone.model.state_dict().items())  # original untouched
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("classifier") for k in changed)
    assert any(f"layers.{L - 1}." in k for k in changed) and not any(f"layers.{L - 2}." in k for k in changed)
    assert not any("embeddings" in k for k in changed)
    assert rb.fingerprint != fp
    rb2 = randomised_backbone(tiny_backbone, L, seed=4)
    assert all(any(f"layers.{i}." in k for k in before if not torch.equal(before[k], rb2.model.state_dict()[k]))
               for i in range(L))
    with pytest.raises(ValueError, match="k must be in"):
        randomised_backbone(tiny_backbone, L + 1)


def test_randomisation_test_separates_input_from_model(tiny_backbone, pixels):
    def build(bb):
        def input_only(pv, target):  # ignores the model: must stay perfectly correlated
            return patch_intensity(pv, bb.patch_size)

        def gradient(pv, target):  # depends on the weights
            pv = pv.clone().requires_grad_(True)
            bb(pv).gather(1, target.view(-1, 1)).sum().backward()
            return patch_intensity(pv.grad.abs(), bb.patch_size)

        return {"input": input_only, "gradient": gradient}

    res = randomisation_test(tiny_backbone, pixels, build, ks=[1, 2], batch_size=2)
    assert res["ks"] == [1, 2] and len(res["prediction_change"]) == 2
    assert [d["mean"] for d in res["methods"]["input"]["spearman"]] == pytest.approx([1.0, 1.0])
    assert all(d["mean"] < 0.9 for d in res["methods"]["gradient"]["spearman"])
    assert res["methods"]["input"]["intensity_spearman"][0]["mean"] == pytest.approx(1.0)


def test_evaluate_all_metrics_invariants(tiny_explainer, pixels, tmp_path):
    """Deletion over all N steps is the positive perturbation curve with steps = N, and insertion is the
    negative curve read backwards (same kept sets); every table and figure is written."""
    pytest.importorskip("scipy")
    from vdm_engine.attribution import get_method

    bb = tiny_explainer.backbone
    N = bb.num_patches
    methods = {"random": get_method("random", tiny_explainer),  # distinct scores: ties cannot reorder
               "intensity": lambda pv, t: patch_intensity(pv, bb.patch_size)}
    cfg = PerturbationConfig(steps=N, replacements=("mean",), batch_size=3)
    res = evaluate(methods, bb, pixels, config=cfg, progress=False,
                   metrics=("perturbation", "insertion-deletion", "road", "sparseness", "complexity", "intensity"))
    for m in methods:
        e = res["methods"][m]
        d = e["insertion_deletion"]["mean"]
        np.testing.assert_allclose(d["deletion"]["prob"], e["mean"]["positive"]["prob"], atol=1e-6)
        np.testing.assert_allclose(d["insertion"]["prob"][::-1], e["mean"]["negative"]["prob"], atol=1e-6)
        assert len(e["road"]["positive"]["prob"]) == N and e["road"]["positive"]["prob"][0] == pytest.approx(
            e["road"]["negative"]["prob"][0])
        assert 0 <= e["sparseness"]["mean"] <= 1 - 1 / N and 0 <= e["complexity"]["mean"] <= math.log(N)
        assert len(e["intensity"]["per_image"]) == 5
    md = results_markdown(res)
    for heading in ("Insertion and deletion", "ROAD", "Properties of the scores"):
        assert heading in md
    pytest.importorskip("matplotlib")
    names = {p.name for p in write_report(res, tmp_path)}
    assert {"curves_mean.png", "curves_road.png", "results.md", "results.json"} <= names


def test_quantus_sparseness_and_complexity_agree():
    """Cross-check with Quantus (optional extra ``eval``) where it implements the same figure."""
    quantus = pytest.importorskip("quantus")
    g = torch.Generator().manual_seed(5)
    scores = torch.rand(6, 16, generator=g) ** 3  # (B, N) patch scores on a 4x4 grid
    a = scores.view(6, 1, 4, 4).numpy()
    x = np.random.default_rng(0).random((6, 1, 4, 4)).astype(np.float32)
    y = np.zeros(6, dtype=np.int64)
    kw = dict(disable_warnings=True, display_progressbar=False)
    q_gini = quantus.Sparseness(**kw)(model=None, x_batch=x, y_batch=y, a_batch=a, device="cpu")
    q_ent = quantus.Complexity(**kw)(model=None, x_batch=x, y_batch=y, a_batch=a, device="cpu")
    np.testing.assert_allclose(gini(scores), q_gini, atol=1e-6)
    np.testing.assert_allclose(entropy(scores), q_ent, atol=1e-6)
