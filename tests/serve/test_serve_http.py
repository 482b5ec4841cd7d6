"""/v1 endpoints on a real Ray Serve: answers equal ``Explainer.explain``, batching routes rows right."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray", reason="the serve extra is not installed: pip install 'vdm-engine[serve]'")
requests = pytest.importorskip("requests")

from vdm_engine.images import load_image  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DIGIT6 = ROOT / "docs" / "overlay" / "digit6.png"


PNG = {"Content-Type": "image/png"}


def _mask(record) -> np.ndarray:
    return np.asarray(record["patch_mask"], dtype=np.float64).reshape(-1)


def test_explain_digit6_equals_explainer(server, reference, explain_one_by_one):
    """The issue's check: the curl call's label and patch mask equal Explainer.explain on the same file."""
    r = requests.post(f"{server}/v1/explain", data=DIGIT6.read_bytes(), headers=PNG, timeout=60)
    assert r.status_code == 200, r.text
    rec = r.json()
    (exp,) = explain_one_by_one([load_image(DIGIT6)])
    assert rec["label_index"] == int(exp.labels[0])
    assert rec["label"] == reference.backbone.id2label[int(exp.labels[0])]
    assert rec["grid"] == list(reference.grid)
    diff = np.abs(_mask(rec) - exp.patch_mask[0].double().numpy()).max()
    assert diff <= 1e-5, f"patch mask differs by {diff:.3e}"
    assert rec["score"] == pytest.approx(float(exp.probs[0].max()), abs=1e-5)
    assert len(rec["top_k"]) == 5 and rec["top_k"][0]["label"] == rec["label"]
    assert 0.0 <= rec["kept_fraction"] <= 1.0
    assert rec["gates_sha256"] == reference.gates.sha256 and rec["gates_source"] == reference.provenance.source
    assert rec["backbone_mismatch"] is False
    assert rec["model"] == "vit-digits" and rec["image_size"] == [32, 32]
    # vdm-explain wrote docs/overlay/digit6.json from the same model: same label and mask
    import json

    doc = json.loads((ROOT / "docs" / "overlay" / "digit6.json").read_text())
    assert rec["label"] == doc["label"]
    assert np.abs(_mask(rec) - np.asarray(doc["patch_mask"]).reshape(-1)).max() <= 1e-5


def test_k_level_gates_answer_with_patch_rank(levels_server, server):
    """Served with K-level gates, a record carries patch_rank on the grid, equal to the explainer's; the
    Open Inference Protocol metadata lists the output. The single-level app's records have none."""
    from vdm_engine import Explainer
    from vdm_engine.models import embedded_levels_dir

    r = requests.post(f"{levels_server}/v1/explain", data=DIGIT6.read_bytes(), headers=PNG, timeout=60)
    assert r.status_code == 200, r.text
    rec = r.json()
    ex = Explainer.from_pretrained("vit-digits", gates=str(embedded_levels_dir("vit-digits"))).eval()
    exp = ex.explain(ex.preprocess([load_image(DIGIT6)]))
    assert rec["gates_sha256"] == ex.gates.sha256
    assert np.abs(np.asarray(rec["patch_rank"]).reshape(-1) - exp.patch_rank[0].double().numpy()).max() <= 1e-5
    meta = requests.get(f"{levels_server}/v2/models/vit-digits", timeout=30)
    assert meta.status_code == 200 and "patch_rank" in [o["name"] for o in meta.json()["outputs"]], meta.text
    plain = requests.post(f"{server}/v1/explain", data=DIGIT6.read_bytes(), headers=PNG, timeout=60).json()
    assert "patch_rank" not in plain


@pytest.mark.slow
def test_concurrent_requests_each_get_their_own_rows(server, reference, explain_one_by_one, digit_pngs):
    """Twelve different digits sent at once are batched together, and each answer is its own image's."""
    refs = explain_one_by_one([a for _, a in digit_pngs])

    def post(png):
        return requests.post(f"{server}/v1/explain", data=png, headers=PNG, timeout=60)

    for _ in range(3):  # the first round may reach the batcher spread out; batches must form in some round
        with ThreadPoolExecutor(len(digit_pngs)) as pool:
            answers = list(pool.map(post, [p for p, _ in digit_pngs]))
        sizes = []
        for r, exp in zip(answers, refs):
            assert r.status_code == 200, r.text
            rec = r.json()
            assert rec["label_index"] == int(exp.labels[0])
            diff = np.abs(_mask(rec) - exp.patch_mask[0].double().numpy()).max()
            assert diff <= 1e-5, f"patch mask differs by {diff:.3e}"
            sizes.append(int(r.headers["X-Batch-Size"]))
        assert len({r.json()["label_index"] for r in answers}) > 3  # really different images
        if max(sizes) > 1:
            break
    assert max(sizes) > 1, f"no batch formed: batch sizes {sizes}"
    stats = requests.get(f"{server}/v1/stats", timeout=10).json()
    assert stats["explain"]["max_batch_size"] > 1 and stats["explain"]["max_batch_size"] <= 8


def test_json_list_returns_one_record_per_image_in_order(server, reference, explain_one_by_one, digit_pngs):
    chosen = digit_pngs[:5]  # a prime number of images in one request
    body = {"images": [base64.b64encode(p).decode() for p, _ in chosen]}
    r = requests.post(f"{server}/v1/explain", json=body, timeout=60)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    refs = explain_one_by_one([a for _, a in chosen])
    assert len(results) == 5
    for rec, exp in zip(results, refs):
        assert rec["label_index"] == int(exp.labels[0])
        assert np.abs(_mask(rec) - exp.patch_mask[0].double().numpy()).max() <= 1e-5
    assert len(r.headers["X-Batch-Size"].split(",")) == 5


def test_overlay_png_is_what_vdm_explain_draws(server):
    from PIL import Image

    r = requests.post(f"{server}/v1/explain?overlay=png", data=DIGIT6.read_bytes(), headers=PNG, timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    got = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"))
    want = np.asarray(Image.open(ROOT / "docs" / "overlay" / "digit6.overlay.png").convert("RGB"))
    assert got.shape == want.shape
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1  # same drawing, same caption


def test_verify_adds_agreement_and_kl(server, reference):
    r = requests.post(f"{server}/v1/explain?verify=1", data=DIGIT6.read_bytes(), headers=PNG, timeout=60)
    assert r.status_code == 200, r.text
    v = r.json()["verify"]
    x = reference.preprocess([load_image(DIGIT6)])
    exp = reference.explain(x)
    want = reference.verify(x, exp)
    assert v["agree"] == bool(want.agree[0])
    assert v["kl"] == pytest.approx(float(want.kl[0]), abs=1e-5)
    assert v["masked_kept_fraction"] == pytest.approx(float(want.kept_fraction[0]), abs=1e-6)


def test_predict_is_the_backbone_alone(server, reference):
    r = requests.post(f"{server}/v1/predict", data=DIGIT6.read_bytes(), headers=PNG, timeout=60)
    assert r.status_code == 200, r.text
    rec = r.json()
    logits = reference.backbone(reference.preprocess([load_image(DIGIT6)]))
    assert rec["label_index"] == int(logits.argmax(-1)[0])
    assert rec["score"] == pytest.approx(float(logits.softmax(-1).max()), abs=1e-5)
    assert "patch_mask" not in rec
    assert int(r.headers["X-Batch-Size"]) >= 1


def test_health_ready_and_stats(server):
    assert requests.get(f"{server}/healthz", timeout=10).json() == {"status": "ok"}
    ready = requests.get(f"{server}/readyz", timeout=10)
    assert ready.status_code == 200 and ready.json()["ready"] is True
    stats = requests.get(f"{server}/v1/stats", timeout=10).json()
    assert stats["max_batch"] == 8 and set(stats) >= {"explain", "predict", "replica"}
