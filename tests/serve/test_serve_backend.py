"""ServingModel without Ray: what one replica computes per batch, for both back ends.

A batch answered at once equals its images answered one by one; the ONNX back end equals
``OnnxExplainer``; verify rows are computed for the rows that asked only.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vdm_engine.serve import ServeConfig
from vdm_engine.serve.backend import ServingModel


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(5)]  # a prime batch


def test_batch_equals_one_by_one_and_verify_only_where_asked(digits_model, images, close):
    x = digits_model.preprocess(images)
    out = digits_model.explain_batch(x, [True, False, True, False, False])
    for i in range(len(images)):
        one = digits_model.explain_batch(x[i:i + 1])
        close(out["logits"][i], one["logits"][0], 1e-4, 1e-4, "logits")
        close(out["patch_mask"][i], one["patch_mask"][0], 1e-5, 1e-5, "patch_mask")
    ref = digits_model.impl.verify(x[[0, 2]], digits_model.impl.explain(x[[0, 2]]))
    close(out["kl"][[0, 2]], ref.kl, 1e-5, 1e-4, "kl")
    assert torch.isnan(out["kl"][[1, 3, 4]]).all()
    logits = digits_model.predict_batch(x)
    close(logits, digits_model.impl.backbone(x), 1e-5, 1e-5, "predict logits")


def test_onnx_backend_equals_onnx_explainer(full_export, shared_tiny_explainer, close):
    """On the session's tiny graph (every output, tests/conftest.py)."""
    from vdm_engine.runtime import OnnxExplainer

    path = full_export.path
    model = ServingModel(ServeConfig(onnx=str(path)))
    assert model.platform == "onnxruntime_onnx" and model.can_verify
    assert len(model.gates_sha256 or "") == 64  # the export hashes even unsaved gates
    assert model.input_spec.name == "pixel_values" and [t.name for t in model.output_specs] == ["logits", "patch_mask"]
    x = torch.randn(3, 3, 32, 32)
    out = model.explain_batch(x, [True, True, True])
    exp = OnnxExplainer(path, "cpu").explain(x)
    close(out["logits"], exp.logits, 1e-6, 1e-6, "logits")
    close(out["patch_mask"], exp.patch_mask, 1e-6, 1e-6, "patch_mask")
    close(model.predict_batch(x), exp.logits, 1e-6, 1e-6, "predict logits")
    assert out["kl"].shape == (3,) and torch.isfinite(out["kl"]).all()
    ref = shared_tiny_explainer.verify(x, shared_tiny_explainer.explain(x))
    close(out["kl"], ref.kl, 1e-4, 1e-3, "kl vs PyTorch verify")


def test_config_names_the_field():
    with pytest.raises(ValueError, match="ServeConfig.max_batch"):
        ServeConfig(max_batch=0)
    with pytest.raises(ValueError, match="gates applies to model"):
        ServeConfig(onnx="x.onnx", gates="g")
    assert ServeConfig(onnx="exports/My Model.onnx").oip_name == "My_Model"
    assert ServeConfig().ongoing == 64 and ServeConfig(device="cuda").gpus_per_replica == 1.0


def test_deployment_reserves_what_the_config_asks():
    """GPUs per replica (fractional), CPUs, replicas and queue bounds reach Ray Serve's options."""
    pytest.importorskip("ray", reason="the serve extra is not installed")
    from vdm_engine.serve.app import deployment

    d = deployment(ServeConfig(device="cuda", num_gpus=0.5, num_cpus=2, replicas=3, max_batch=8,
                               max_queued_requests=7), env={"VDM_KERNELS": "off"})
    assert d.num_replicas == 3 and d.max_ongoing_requests == 16 and d.max_queued_requests == 7
    assert d.ray_actor_options["num_gpus"] == 0.5 and d.ray_actor_options["num_cpus"] == 2
    assert d.ray_actor_options["runtime_env"] == {"env_vars": {"VDM_KERNELS": "off"}}
    assert deployment(ServeConfig(device="cuda"), env={}).ray_actor_options["num_gpus"] == 1.0
    assert deployment(ServeConfig(), env={}).ray_actor_options["num_gpus"] == 0.0


@pytest.mark.slow
def test_compiled_backend_equals_eager(digits_model, images, close):
    """--compile: the buckets compiled at load (aot_eager on the CPU; one bucket keeps the test short,
    padding is tested in tests/test_compiled.py); a batch of 3 runs in chunks and answers as the eager
    replica does; verify stays on the eager masked pass."""
    model = ServingModel(ServeConfig(model="vit-digits", max_batch=1, compile=True, compile_backend="aot_eager"))
    assert model.compiled.buckets == (1,) and ServeConfig(max_batch=32).compile_buckets == (1, 2, 4, 8, 16, 32)
    x = model.preprocess(images[:3])
    out = model.explain_batch(x, [False, True, False])
    ref = digits_model.explain_batch(x, [False, True, False])
    for name in ("logits", "patch_mask"):
        close(out[name], ref[name], 1e-5, 1e-5, name)
    close(out["kl"][1], ref["kl"][1], 1e-5, 1e-4, "kl")
    close(model.predict_batch(x), digits_model.predict_batch(x), 1e-5, 1e-5, "predict logits")


def test_compile_needs_the_pytorch_model(tmp_path):
    with pytest.raises(ValueError, match="compile applies to model"):
        ServeConfig(onnx=str(tmp_path / "m.onnx"), compile=True)


def test_k_level_gates_add_patch_rank(digits_model, images, close):
    """With K-level gates (vit-digits' gates-levels) every explained batch carries patch_rank, equal to the
    explainer's, and the Open Inference Protocol lists it; single-level gates have none."""
    from vdm_engine.models import embedded_levels_dir
    from vdm_engine.serve import ServeConfig

    levels = ServingModel(ServeConfig(model="vit-digits", gates=str(embedded_levels_dir("vit-digits"))))
    assert levels.has_patch_rank and not digits_model.has_patch_rank
    x = levels.preprocess(images)
    out = levels.explain_batch(x, [True, False, False, False, False])
    ref = levels.impl.explain(x)
    close(out["patch_rank"], ref.patch_rank, 1e-5, 1e-5, "patch_rank")
    close(out["patch_mask"], ref.patch_mask, 1e-5, 1e-5, "patch_mask")
    assert [t.name for t in levels.output_specs] == ["logits", "patch_mask", "patch_rank"]
    assert "patch_rank" not in digits_model.explain_batch(x)
