"""Bad requests get a one-line JSON error (400, 413, 415, 404) before they reach a batch, and never
fail the good requests batched at the same time."""

from __future__ import annotations

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray", reason="the serve extra is not installed: pip install 'vdm-engine[serve]'")
requests = pytest.importorskip("requests")

DIGIT6 = Path(__file__).resolve().parents[2] / "docs" / "overlay" / "digit6.png"
PNG = "image/png"


def _png(h: int, w: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (w, h)).save(buf, format="PNG")  # compresses to a few KB at any size
    return buf.getvalue()


def _gif() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="GIF")
    return buf.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# (case, path, body, content type, status, words the message must contain)
CASES = [
    ("text as png", "/v1/explain", b"hello, not an image", PNG, 400, "not a readable image"),
    ("truncated png", "/v1/explain", DIGIT6.read_bytes()[:600], PNG, 400, "body"),
    ("empty body", "/v1/explain", b"", PNG, 400, "empty"),
    ("empty predict", "/v1/predict", b"", "image/jpeg", 400, "empty"),
    ("gif bytes as png", "/v1/explain", _gif(), PNG, 400, "unsupported image format GIF"),
    ("too many pixels", "/v1/explain", _png(1100, 1000), PNG, 400, "above the limit"),
    ("over the body limit", "/v1/explain", b"\x89PNG" + b"0" * 250_000, PNG, 413, "limit"),
    ("text/plain", "/v1/explain", DIGIT6.read_bytes(), "text/plain", 415, "Content-Type"),
    ("image/gif", "/v1/explain", _gif(), "image/gif", 415, "Content-Type"),
    ("no content type", "/v1/predict", DIGIT6.read_bytes(), None, 415, "Content-Type"),
    ("bad json", "/v1/explain", b"{images: [", "application/json", 400, "not valid JSON"),
    ("json without images", "/v1/explain", b'{"image": "x"}', "application/json", 400, "images"),
    ("json empty list", "/v1/explain", b'{"images": []}', "application/json", 400, "at least one"),
    ("bad base64", "/v1/explain", b'{"images": ["%%%"]}', "application/json", 400, "images[0] is not valid base64"),
    ("number not base64", "/v1/explain", b'{"images": [7]}', "application/json", 400, "images[0] is int"),
    ("json second image bad", "/v1/explain", json.dumps({"images": [_b64(DIGIT6.read_bytes()), _b64(b"junk")]}).encode(),
     "application/json", 400, "images[1]"),
    ("too many images", "/v1/explain", json.dumps({"images": [_b64(DIGIT6.read_bytes())] * 17}).encode(),
     "application/json", 413, "17 images"),
    ("overlay of two", "/v1/explain?overlay=png",
     json.dumps({"images": [_b64(DIGIT6.read_bytes())] * 2}).encode(), "application/json", 400, "one image"),
    ("overlay jpeg", "/v1/explain?overlay=jpeg", DIGIT6.read_bytes(), PNG, 400, "png"),
    ("verify=maybe", "/v1/explain?verify=maybe", DIGIT6.read_bytes(), PNG, 400, "verify"),
    ("oip unknown model", "/v2/models/nope/infer", b"{}", "application/json", 404, "unknown model"),
    ("oip bad json", "/v2/models/vit-digits/infer", b"[", "application/json", 400, "not valid JSON"),
    ("oip wrong input name", "/v2/models/vit-digits/infer",
     json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": [0.0] * 3072}]}).encode(),
     "application/json", 400, "pixel_values"),
    ("oip wrong shape", "/v2/models/vit-digits/infer",
     json.dumps({"inputs": [{"name": "pixel_values", "datatype": "FP32", "shape": [1, 3, 16, 16],
                             "data": [0.0] * 768}]}).encode(), "application/json", 400, "shape"),
    ("oip short data", "/v2/models/vit-digits/infer",
     json.dumps({"inputs": [{"name": "pixel_values", "datatype": "FP32", "shape": [1, 3, 32, 32],
                             "data": [0.0] * 10}]}).encode(), "application/json", 400, "3072 expected"),
    ("oip nan pixels", "/v2/models/vit-digits/infer",
     json.dumps({"inputs": [{"name": "pixel_values", "datatype": "FP32", "shape": [1, 3, 32, 32],
                             "data": [float("nan")] * 3072}]}).encode(), "application/json", 400, "finite"),
    ("oip wrong dtype", "/v2/models/vit-digits/infer",
     json.dumps({"inputs": [{"name": "pixel_values", "datatype": "INT64", "shape": [1, 3, 32, 32],
                             "data": [0] * 3072}]}).encode(), "application/json", 400, "FP32"),
]


@pytest.mark.parametrize("case,path,body,ctype,status,words", CASES, ids=[c[0] for c in CASES])
def test_bad_request_is_one_line_json(server, case, path, body, ctype, status, words):
    headers = {} if ctype is None else {"Content-Type": ctype}
    if ctype is None:  # requests would send no Content-Type for bytes anyway; say so explicitly
        headers = {"Content-Type": ""}
    r = requests.post(f"{server}{path}", data=body, headers=headers, timeout=60)
    assert r.status_code == status, f"{case}: {r.status_code} {r.text[:300]}"
    doc = r.json()
    assert set(doc) == {"error"}, doc
    assert "\n" not in doc["error"] and words.lower() in doc["error"].lower(), doc["error"]


def test_bad_requests_never_fail_the_good_ones_beside_them(server, digit_pngs, explain_one_by_one):
    """Good and bad requests sent at once: every good one gets its own right answer, every bad one its error."""
    good = [p for p, _ in digit_pngs[:8]]
    bad = [b"junk", DIGIT6.read_bytes()[:500], b"", b"\x89PNG\r\n\x1a\n" + b"\0" * 40]
    jobs = [(p, True) for p in good] + [(b, False) for b in bad]
    jobs = [jobs[i] for i in np.random.default_rng(0).permutation(len(jobs))]

    def post(job):
        return requests.post(f"{server}/v1/explain", data=job[0], headers={"Content-Type": PNG}, timeout=60)

    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(post, jobs))
    refs = dict(zip(good, explain_one_by_one([a for _, a in digit_pngs[:8]])))
    for (body, ok), r in zip(jobs, answers):
        if not ok:
            assert r.status_code == 400 and "error" in r.json()
            continue
        assert r.status_code == 200, r.text
        exp = refs[body]
        assert r.json()["label_index"] == int(exp.labels[0])
        got = np.asarray(r.json()["patch_mask"]).reshape(-1)
        assert np.abs(got - exp.patch_mask[0].double().numpy()).max() <= 1e-5
    # ... and the server keeps serving
    assert requests.post(f"{server}/v1/predict", data=good[0], headers={"Content-Type": PNG}, timeout=60).ok


def test_declared_length_over_the_limit_is_refused_before_reading(server):
    """413 from the Content-Length header alone (the body is never read)."""
    r = requests.post(f"{server}/v1/explain", data=b"x" * 300_000, headers={"Content-Type": PNG}, timeout=60)
    assert r.status_code == 413 and "300000 bytes" in r.json()["error"]
