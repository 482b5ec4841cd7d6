"""Metadata written into metadata_props: round trip, provenance, malformed models."""

from __future__ import annotations


import onnx
import pytest
from onnx import TensorProto, helper

from vdm_engine import Gates, __version__
from vdm_engine.export import ExportMetadata, gates_sha256, read_metadata
from vdm_engine.metadata import METADATA_PREFIX


def test_read_metadata_round_trips_what_export_wrote(full_export, export_explainer):
    m = read_metadata(full_export.path)
    assert m == full_export.metadata
    bb = export_explainer.backbone
    assert m.engine_version == __version__
    assert m.backbone_id == "vit-tiny" and m.backbone_revision == ""
    assert m.image_size == (32, 32) and m.patch_grid == (4, 4)
    assert m.image_mean == bb.image_spec.mean and m.image_std == bb.image_spec.std
    assert m.image_spec == bb.image_spec
    assert m.id2label == {str(k): v for k, v in bb.id2label.items()}
    assert (m.num_layers, m.num_hidden_states, m.num_labels) == (2, 4, 10)
    assert (m.opset, m.dtype, m.batch, m.fixed_batch) == (18, "fp32", "dynamic", None)
    assert m.input_name == "pixel_values" and m.outputs == ("logits", "patch_mask", "layer_masks", "masked_logits", "kl")
    assert m.gates_sha256 == gates_sha256(export_explainer.gates)
    assert not m.untrained_gates and not m.random_weights and m.threshold == 0.5
    proto = onnx.load(str(full_export.path), load_external_data=False)
    keys = {p.key for p in proto.metadata_props}
    assert {"vdm.gates_sha256", "vdm.image_mean", "vdm.image_std", "vdm.id2label", "vdm.opset", "vdm.dtype"} <= keys


def test_gates_sha256_is_that_of_the_saved_checkpoint(tiny_gates, tiny_backbone, tmp_path):
    computed = gates_sha256(tiny_gates)
    loaded = Gates.from_pretrained(tiny_gates.save_pretrained(tmp_path / "g", backbone=tiny_backbone))
    assert loaded.sha256 == computed
    assert gates_sha256(loaded) == computed
    with __import__("torch").no_grad():
        tiny_gates.add.add_(1.0)
    assert gates_sha256(tiny_gates) != computed


def _meta(**kw) -> ExportMetadata:
    base = dict(
        engine_version="0.1.0", backbone_id="google/vit-base-patch16-224", backbone_revision="abc123",
        gates_sha256="0" * 64, image_size=(224, 224), image_mean=(0.5, 0.5, 0.5), image_std=(0.25, 0.5, 0.5),
        image_processor={"size": {"height": 224, "width": 224}, "image_mean": [0.5] * 3, "image_std": [0.25, 0.5, 0.5]},
        patch_grid=(14, 14), num_layers=12, num_hidden_states=14, num_labels=3,
        id2label={"0": "cat", "1": "dog, husky", "2": 'quote "x"'}, opset=18, dtype="fp16", batch="8",
        input_name="images", outputs=("logits", "patch_mask"), uint8_input=True, threshold=0.25,
        untrained_gates=True, random_weights=False, extra={"note": "for benchmarks"},
    )
    base.update(kw)
    return ExportMetadata(**base)


def test_props_round_trip_every_field():
    m = _meta()
    props = m.to_props()
    assert all(k.startswith(METADATA_PREFIX) and isinstance(v, str) for k, v in props.items())
    assert props["vdm.untrained_gates"] == "true" and props["vdm.extra.note"] == "for benchmarks"
    back = ExportMetadata.from_props({**props, "foreign.key": "ignored"})
    assert back == m and back.fixed_batch == 8 and back.image_spec.std == (0.25, 0.5, 0.5)


def _model_with_props(props: dict) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    node = helper.make_node("Identity", ["x"], ["y"])
    g = helper.make_graph([node], "g", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    m = helper.make_model(g)
    helper.set_model_props(m, props)
    return m


def test_models_without_or_with_broken_metadata_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="lacks vdm-engine metadata"):
        read_metadata(_model_with_props({"producer": "someone else"}))
    props = _meta().to_props()
    with pytest.raises(ValueError, match="vdm.opset='eighteen' is malformed"):
        read_metadata(_model_with_props({**props, "vdm.opset": "eighteen"}))
    with pytest.raises(ValueError, match="vdm.uint8_input"):
        read_metadata(_model_with_props({**props, "vdm.uint8_input": "yes"}))
    missing = dict(props)
    del missing["vdm.gates_sha256"]
    with pytest.raises(ValueError, match="vdm.gates_sha256"):
        read_metadata(_model_with_props(missing))
    with pytest.raises(FileNotFoundError):
        read_metadata(tmp_path / "absent.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\x00not a protobuf\xff" * 3)
    with pytest.raises(ValueError, match="not a readable ONNX model"):
        read_metadata(tmp_path / "junk.onnx")
    # and a saved model reads back from disk
    onnx.save(_model_with_props(props), str(tmp_path / "ok.onnx"))
    assert read_metadata(tmp_path / "ok.onnx") == _meta()
