"""Triton model repository: layout, and config.pbtxt parsed with tritonclient's model_config proto."""

from __future__ import annotations

import filecmp
import json
import os
import sys

import numpy as np
import onnxruntime as ort
import pytest

from vdm_engine._io import sha256_file
from vdm_engine.export import write_triton_repo
from vdm_engine.export.triton_repo import triton_config_text


def parse_config(text: str):
    """The ModelConfig message for a config.pbtxt (skips when tritonclient is not installed)."""
    mc = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient[grpc] is not installed")
    from google.protobuf import text_format

    return text_format.Parse(text, mc.ModelConfig()), mc


def test_dynamic_batch_repository_parses(full_export, tmp_path):
    model_dir = write_triton_repo(full_export.path, tmp_path / "repo", name="vdm_tiny", max_batch_size=16, tensorrt=True)
    assert model_dir == tmp_path / "repo" / "vdm_tiny"
    assert filecmp.cmp(model_dir / "1" / "model.onnx", full_export.path, shallow=False)
    labels = (model_dir / "labels.txt").read_text().splitlines()
    assert labels == [f"class_{i}" for i in range(10)]
    cfg, mc = parse_config((model_dir / "config.pbtxt").read_text())
    assert cfg.name == "vdm_tiny" and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 16
    (inp,) = cfg.input
    assert (inp.name, inp.data_type, list(inp.dims)) == ("pixel_values", mc.TYPE_FP32, [3, 32, 32])
    outs = {o.name: o for o in cfg.output}
    assert list(outs) == ["logits", "patch_mask", "layer_masks", "masked_logits", "kl"]
    assert list(outs["logits"].dims) == [10] and outs["logits"].label_filename == "labels.txt"
    assert list(outs["patch_mask"].dims) == [16] and list(outs["layer_masks"].dims) == [4, 16]
    assert list(outs["kl"].dims) == [1] and list(outs["kl"].reshape.shape) == []
    assert all(o.data_type == mc.TYPE_FP32 for o in cfg.output)
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 8, 16]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 100
    (group,) = cfg.instance_group
    assert group.kind == mc.ModelInstanceGroup.KIND_GPU and group.count == 1
    (acc,) = cfg.optimization.execution_accelerators.gpu_execution_accelerator
    assert acc.name == "tensorrt" and acc.parameters["precision_mode"] == "FP16"


def test_external_data_travels_with_the_model(mask_only_export, tmp_path):
    model_dir = write_triton_repo(mask_only_export.path, tmp_path / "repo")
    assert model_dir.name == "mask"
    assert sorted(p.name for p in (model_dir / "1").iterdir()) == ["mask.onnx.data", "model.onnx"]
    s = ort.InferenceSession(str(model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    logits, mask = s.run(None, {"pixel_values": np.zeros((2, 3, 32, 32), np.float32)})
    assert logits.shape == (2, 10) and mask.shape == (2, 16)
    cfg, _ = parse_config((model_dir / "config.pbtxt").read_text())
    assert not cfg.optimization.HasField("execution_accelerators")


def test_config_text_without_tritonclient(full_export):
    text = triton_config_text(full_export.path, "m", max_batch_size=8, preferred_batch_sizes=[2, 8], instance_kind="KIND_CPU")
    assert 'platform: "onnxruntime_onnx"' in text and "max_batch_size: 8" in text
    assert "preferred_batch_size: [ 2, 8 ]" in text and "kind: KIND_CPU" in text and "tensorrt" not in text


def test_bad_triton_options(full_export, tmp_path):
    with pytest.raises(ValueError, match="max_batch_size"):
        triton_config_text(full_export.path, "m", max_batch_size=0)
    with pytest.raises(ValueError, match="preferred batch sizes"):
        triton_config_text(full_export.path, "m", max_batch_size=8, preferred_batch_sizes=[16])
    with pytest.raises(ValueError, match="instance_kind"):
        triton_config_text(full_export.path, "m", instance_kind="GPU")
    with pytest.raises(ValueError, match="model name"):
        write_triton_repo(full_export.path, tmp_path, name="../escape")
    assert list(tmp_path.iterdir()) == []


def test_python_backend_repository_and_ensemble_parse(full_export, tmp_path):
    model_dir = write_triton_repo(full_export.path, tmp_path / "repo", name="tiny", backend="python", ensemble=True,
                                  max_batch_size=8, max_queue_delay_us=5000, python_path=["/opt/env/site-packages"])
    repo = tmp_path / "repo"
    assert sorted(p.name for p in repo.iterdir()) == ["tiny", "tiny_decode", "tiny_ensemble"]
    assert sorted(p.name for p in (model_dir / "1").iterdir()) == ["model.onnx", "model.py"]
    compile((model_dir / "1" / "model.py").read_text(), "model.py", "exec")  # the shim is valid Python
    assert "ExplainerModel" in (model_dir / "1" / "model.py").read_text()
    assert "DecodeModel" in (repo / "tiny_decode" / "1" / "model.py").read_text()
    cfg, mc = parse_config((model_dir / "config.pbtxt").read_text())
    assert cfg.backend == "python" and not cfg.platform and cfg.max_batch_size == 8
    assert cfg.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 5000
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    assert json.loads(params["vdm_python_path"]) == ["/opt/env/site-packages"]
    assert params["vdm_python_version"] == "%d.%d" % sys.version_info[:2]
    assert params["vdm_gates_sha256"] == full_export.metadata.gates_sha256
    assert params["vdm_model_sha256"] == sha256_file(model_dir / "1" / "model.onnx")
    (warm,) = cfg.model_warmup
    assert warm.batch_size == 1 and warm.inputs["pixel_values"].zero_data and list(warm.inputs["pixel_values"].dims) == [3, 32, 32]

    dec, _ = parse_config((repo / "tiny_decode" / "config.pbtxt").read_text())
    assert dec.backend == "python" and [(i.name, i.data_type, list(i.dims)) for i in dec.input] == [("images", mc.TYPE_STRING, [1])]
    assert [(o.name, list(o.dims)) for o in dec.output] == [("pixel_values", [3, 32, 32])]
    dparams = {k: v.string_value for k, v in dec.parameters.items()}
    assert json.loads(dparams["image_size"]) == [32, 32] and json.loads(dparams["image_processor"])["size"] == {
        "height": 32, "width": 32}
    ens, _ = parse_config((repo / "tiny_ensemble" / "config.pbtxt").read_text())
    assert ens.platform == "ensemble" and ens.max_batch_size == 8 and (repo / "tiny_ensemble" / "1").is_dir()
    first, second = ens.ensemble_scheduling.step
    assert (first.model_name, dict(first.input_map), dict(first.output_map)) == (
        "tiny_decode", {"images": "images"}, {"pixel_values": "pixel_values"})
    assert second.model_name == "tiny" and dict(second.input_map) == {"pixel_values": "pixel_values"}
    assert dict(second.output_map) == {o: o for o in full_export.outputs}
    assert [o.name for o in ens.output] == list(full_export.outputs)


def test_default_python_path_has_this_environment_and_not_the_standard_library():
    import sysconfig

    import vdm_engine
    from vdm_engine.export.triton_repo import default_python_path

    paths = default_python_path()
    stdlib = os.path.realpath(sysconfig.get_path("stdlib"))
    assert stdlib not in paths and all(os.path.isabs(p) for p in paths)
    # The folder vdm_engine is imported from is reachable: directly, or through an editable install's .pth.
    root = os.path.dirname(os.path.dirname(os.path.realpath(vdm_engine.__file__)))
    assert root in paths or any(
        f.endswith(".pth") and "vdm_engine" in f for p in paths for f in os.listdir(p)), paths


def test_bad_python_backend_options(full_export, tmp_path):
    with pytest.raises(ValueError, match="backend must be one of"):
        triton_config_text(full_export.path, "m", backend="tensorflow")
    with pytest.raises(ValueError, match="KIND_CPU"):
        triton_config_text(full_export.path, "m", backend="python", instance_kind="KIND_GPU")
    with pytest.raises(ValueError, match="tensorrt needs the onnxruntime backend"):
        triton_config_text(full_export.path, "m", backend="python", tensorrt=True)
    assert "kind: KIND_GPU" in triton_config_text(full_export.path, "m")  # onnxruntime's default stays GPU
    assert 'platform: "onnxruntime_onnx"' in triton_config_text(full_export.path, "m", warmup=False)
    assert list(tmp_path.iterdir()) == []
