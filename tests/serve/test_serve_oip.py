"""The Open Inference Protocol subset through ``tritonclient.http``: the same tensors as ``Explainer``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("ray", reason="the serve extra is not installed: pip install 'vdm-engine[serve]'")
httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is not installed")
from tritonclient.utils import InferenceServerException  # noqa: E402


@pytest.fixture(scope="module")
def client(server):
    c = httpclient.InferenceServerClient(url=server.removeprefix("http://"), network_timeout=60.0)
    yield c
    c.close()


def test_health_and_metadata(client, reference):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("vit-digits")
    meta = client.get_model_metadata("vit-digits")
    H, W = reference.backbone.image_size
    assert meta["inputs"] == [{"name": "pixel_values", "datatype": "FP32", "shape": [-1, 3, H, W]}]
    assert [o["name"] for o in meta["outputs"]] == ["logits", "patch_mask"]
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.get_model_metadata("not-a-model")


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_returns_the_explainers_tensors(client, reference, digit_pngs, binary):
    pv = reference.preprocess([a for _, a in digit_pngs[:3]]).numpy()  # a prime batch in one request
    inp = httpclient.InferInput("pixel_values", list(pv.shape), "FP32")
    inp.set_data_from_numpy(pv, binary_data=binary)
    outs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("logits", "patch_mask")]
    result = client.infer("vit-digits", [inp], outputs=outs, request_id="r1")
    exp = reference.explain(torch.from_numpy(pv))
    logits, mask = result.as_numpy("logits"), result.as_numpy("patch_mask")
    assert logits.shape == (3, reference.backbone.num_labels) and mask.shape == (3, reference.backbone.num_patches)
    assert np.abs(logits - exp.logits.numpy()).max() <= 1e-4
    assert np.abs(mask - exp.patch_mask.numpy()).max() <= 1e-5
    assert result.get_response()["id"] == "r1"


def test_infer_bad_shape_is_an_error_not_a_crash(client):
    pv = np.zeros((1, 3, 8, 8), dtype=np.float32)
    inp = httpclient.InferInput("pixel_values", list(pv.shape), "FP32")
    inp.set_data_from_numpy(pv)
    with pytest.raises(InferenceServerException, match="shape"):
        client.infer("vit-digits", [inp])
    assert client.is_server_ready()
