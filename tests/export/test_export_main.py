"""main_export: vdm-export as one Python call, with the CLI's defaults, checking its options before loading."""

from __future__ import annotations

import inspect

import pytest
import torch

from vdm_engine.export import DEFAULT_OUTPUTS, main_export
from vdm_engine.runtime import OnnxExplainer


def test_the_cli_passes_main_export_its_own_defaults(tmp_path, monkeypatch):
    import vdm_engine.export as export
    from vdm_engine.cli.export import main

    seen = {}

    def record(model, **kwargs):
        seen.update(kwargs, model=model)
        raise RuntimeError("stop here")

    monkeypatch.setattr(export, "main_export", record)
    out = tmp_path / "m.onnx"
    assert main(["--out", str(out)]) == 1
    defaults = {k: p.default for k, p in inspect.signature(main_export).parameters.items()
                if p.default is not inspect.Parameter.empty}
    assert seen.pop("out") == str(out) and callable(seen.pop("status"))
    assert tuple(seen.pop("outputs")) == defaults.pop("outputs") == DEFAULT_OUTPUTS
    assert DEFAULT_OUTPUTS == ("logits", "patch_mask", "layer_masks")
    defaults.pop("status")
    assert seen == defaults


def test_options_are_checked_before_loading(tmp_path, monkeypatch):
    from vdm_engine import Explainer

    def boom(*args, **kwargs):
        raise AssertionError("loaded before the bad option was refused")

    monkeypatch.setattr(Explainer, "from_pretrained", boom)
    out = tmp_path / "m.onnx"
    cases = [
        (dict(opset=12), "opset"), (dict(dtype="bf16"), "dtype"), (dict(batch=0), "batch"),
        (dict(outputs=("heatmap",)), "unknown output"), (dict(atol=-1.0), "atol"), (dict(threshold=2.0), "threshold"),
        (dict(random_weights=True), "architecture name"),
        (dict(model="vit-tiny", random_weights=True, gates=str(tmp_path)), "gates cannot"),
        (dict(triton_repo=str(tmp_path / "repo"), triton_max_batch=0), "triton_max_batch"),
        (dict(triton_repo=str(tmp_path / "repo"), triton_backend="tf"), "triton_backend"),
        (dict(triton_repo=str(tmp_path / "repo"), triton_backend="python", tensorrt=True), "tensorrt"),
        (dict(triton_repo=str(tmp_path / "repo"), triton_ensemble=True, batch=2), "dynamic batch"),
        (dict(triton_repo=str(tmp_path / "repo"), triton_queue_delay_us=-1), "triton_queue_delay_us"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            main_export(out=out, **kwargs)
    out.write_bytes(b"an older export")
    with pytest.raises(FileExistsError, match="overwrite"):
        main_export(out=out)
    assert out.read_bytes() == b"an older export" and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_main_export_writes_the_default_outputs_and_reports(tmp_path, tiny_model_dir, tiny_gates, tiny_backbone):
    tiny_gates.save_pretrained(tmp_path / "g", backbone=tiny_backbone)
    lines = []
    r = main_export(str(tiny_model_dir), out=tmp_path / "m.onnx", gates=tmp_path / "g", providers="cpu",
                    status=lines.append)
    assert lines[0].startswith("gates ") and "sha256" in lines[0] and lines[1].startswith("exporting ")
    assert tuple(r.export.outputs) == DEFAULT_OUTPUTS and r.export.metadata.gates_source == "path"
    assert set(r.timing_ms) == {1, 8} and r.provider == "CPUExecutionProvider" and r.triton_model_dir is None
    text = r.summary()
    assert text.startswith(f"wrote {r.path} ") and "layer_masks [batch, 4, 16]" in text and "batch 8:" in text
    assert OnnxExplainer(r.path, providers="cpu").explain(torch.zeros(1, 3, 32, 32)).layer_masks.shape == (1, 4, 16)
