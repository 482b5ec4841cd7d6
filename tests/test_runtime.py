"""OnnxExplainer: the same Explanation as the PyTorch explainer, preprocessing from the metadata."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from vdm_engine import Explainer  # noqa: E402
from vdm_engine.registry import embedded_model_dir  # noqa: E402
from vdm_engine.runtime import OnnxExplainer, resolve_providers  # noqa: E402


@pytest.fixture(scope="module")
def exported(full_export, shared_tiny_explainer):
    """The tiny explainer and ``OnnxExplainer`` on the session's graph of it (every output)."""
    return shared_tiny_explainer, OnnxExplainer(full_export.path, providers="auto")


def test_explain_equals_the_pytorch_explainer(exported, close):
    explainer, rt = exported
    assert rt.providers[-1] == "CPUExecutionProvider"
    for b in (1, 5):
        x = torch.randn(b, 3, 32, 32)
        got, ref = rt.explain(x), explainer.explain(x)
        assert (got.grid, got.image_size) == (ref.grid, ref.image_size) == ((4, 4), (32, 32))
        for name in ("logits", "patch_mask", "layer_masks"):
            assert getattr(got, name).dtype == torch.float32
            close(getattr(got, name), getattr(ref, name), 1e-4, 0.0, f"{name} batch {b}")
        assert torch.equal(got.labels, ref.labels)


def test_preprocessing_comes_from_the_metadata(exported, close):
    explainer, rt = exported
    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 256, (40, 24, 3), dtype=np.uint8)),
              rng.integers(0, 256, (32, 32), dtype=np.uint8),
              rng.integers(0, 256, (50, 50, 4), dtype=np.uint8)]
    x = rt.preprocess(images)
    assert torch.equal(x, explainer.preprocess(images))
    close(rt.explain(x).patch_mask, explainer.explain(x).patch_mask, 1e-4, 0.0, "patch_mask from images")
    assert rt.id2label == explainer.backbone.id2label and rt.num_labels == 10


def test_inputs_are_validated_like_the_core(exported):
    _, rt = exported
    cases = [
        (np.zeros((2, 3, 32, 32), np.uint8), "float"),
        (torch.zeros(2, 3, 16, 16), "32x32"),
        (torch.zeros(3, 32, 32), "rank 4"),
        (torch.zeros(2, 1, 32, 32), "3 channels"),
        (torch.zeros(0, 3, 32, 32), "empty batch"),
        (torch.full((1, 3, 32, 32), float("nan")), "NaN"),
        ([[0.0]], "torch.Tensor"),
    ]
    for x, match in cases:
        with pytest.raises(ValueError, match=match):
            rt.explain(x)
    # float64 arrays are accepted and cast, as the core accepts any float tensor
    assert rt.explain(np.zeros((2, 3, 32, 32))).logits.shape == (2, 10)


def test_providers_are_resolved_or_rejected(tmp_path):
    import onnxruntime as ort

    assert resolve_providers("cpu") == ["CPUExecutionProvider"]
    assert resolve_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert resolve_providers("auto") == ["CPUExecutionProvider"]
        with pytest.raises(ValueError, match="onnxruntime-gpu"):
            resolve_providers("cuda")
    with pytest.raises(ValueError, match="providers must be"):
        resolve_providers("tpu")
    with pytest.raises(ValueError, match="not available"):
        resolve_providers(["NoSuchExecutionProvider"])
    with pytest.raises(ValueError, match="empty"):
        resolve_providers([])
    with pytest.raises(FileNotFoundError):
        OnnxExplainer(tmp_path / "absent.onnx")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA and onnxruntime-gpu (IO binding path)")
def test_cuda_io_binding_keeps_tensors_on_the_device(exported, close):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is not installed")
    explainer, rt = exported
    cuda = OnnxExplainer(rt.path, providers="cuda")
    x = torch.randn(4, 3, 32, 32, device="cuda")
    got = cuda.explain(x)
    assert got.logits.is_cuda and got.patch_mask.is_cuda
    ref = explainer.explain(x.cpu())
    close(got.logits.cpu(), ref.logits, 1e-3, 1e-3, "cuda logits")
    close(got.patch_mask.cpu(), ref.patch_mask, 1e-3, 1e-3, "cuda patch_mask")


@pytest.mark.skipif(embedded_model_dir("vit-digits") is None, reason="the embedded vit-digits model is not built yet")
def test_embedded_vit_digits_export_matches_pytorch_on_held_out_digits(digits_onnx, close):
    """``vdm-export --out FILE`` with its defaults (the session's ``digits_onnx``) against PyTorch."""
    from vdm_engine.data import digits_split

    images = digits_split("test")[0][:64]
    explainer = Explainer.from_pretrained("vit-digits").eval()
    rt = OnnxExplainer(digits_onnx)
    x = rt.preprocess(images)
    assert torch.equal(x, explainer.preprocess(images))
    got, ref = rt.explain(x), explainer.explain(x)
    for name in ("logits", "patch_mask", "layer_masks"):
        close(getattr(got, name), getattr(ref, name), 1e-4, 0.0, f"vit-digits {name}")
    assert rt.metadata.backbone_id == "vit-digits" and not rt.metadata.untrained_gates
    assert rt.metadata.gates_sha256 == explainer.gates.sha256


def test_default_session_options_apply_to_every_session(exported, monkeypatch, full_export):
    """One set of session options for plain and explain sessions alike: threads as asked, idle
    spinning off under ``OMP_WAIT_POLICY=PASSIVE`` (else onnxruntime's default), bad threads refused."""
    from vdm_engine.runtime import create_session, default_session_options

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    opts = default_session_options(2)
    assert opts.intra_op_num_threads == 2
    with pytest.raises(Exception, match="does not have configuration"):  # unset: onnxruntime's default
        opts.get_session_config_entry("session.intra_op.allow_spinning")
    assert default_session_options(spinning=True).get_session_config_entry("session.intra_op.allow_spinning") == "1"
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    assert default_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    session = create_session(full_export.path, "cpu")  # no options given: the defaults
    assert session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert OnnxExplainer(full_export.path, "cpu").session.get_session_options().get_session_config_entry(
        "session.intra_op.allow_spinning") == "0"
    with pytest.raises(ValueError, match="threads must be >= 1"):
        default_session_options(0)
