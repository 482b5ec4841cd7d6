"""Gates are bound to their backbone: fingerprints, the mismatch policy, provenance in every artefact."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from vdm_engine import Explainer, Gates, load_backbone
from vdm_engine.backbone import random_backbone
from vdm_engine.provenance import BackboneMismatchError, ProvenanceWarning, backbone_fingerprint
from vdm_engine.registry import embedded_model_dir

TOY_GATES = embedded_model_dir("vit-toy") / "gates"
DIGITS_GATES = embedded_model_dir("vit-digits") / "gates"


# ----- the fingerprint ------------------------------------------------------------------------------
def test_fingerprint_survives_save_and_load(tmp_path):
    bb = random_backbone("vit-tiny", seed=3)
    bb.save_pretrained(tmp_path / "m")
    assert load_backbone(str(tmp_path / "m")).fingerprint == bb.fingerprint


def test_fingerprint_changes_with_one_weight_and_with_the_config():
    bb = random_backbone("vit-tiny", seed=3)
    ref = backbone_fingerprint(bb.model)
    with torch.no_grad():
        bb.model.classifier.bias[0] += 1e-3
    assert backbone_fingerprint(bb.model) != ref
    with torch.no_grad():
        bb.model.classifier.bias[0] -= 1e-3
    assert backbone_fingerprint(bb.model) == ref
    bb.model.config.layer_norm_eps = 1e-5  # changes the hidden states, not the weights
    assert backbone_fingerprint(bb.model) != ref


def test_fingerprint_ignores_parameter_names_and_upcasts_exactly():
    bb = random_backbone("vit-tiny", seed=3)
    ref = backbone_fingerprint(bb.model)

    class Renamed(torch.nn.Module):  # same tensors under other names (transformers 4.x vs 5.x layouts)
        def __init__(self, model):
            super().__init__()
            self.config = model.config
            for i, (_, t) in enumerate(model.state_dict().items()):
                self.register_buffer(f"t{i:03d}", t.clone())

    assert backbone_fingerprint(Renamed(bb.model)) == ref
    half = random_backbone("vit-tiny", seed=3)
    half.model.half()
    stored_half = backbone_fingerprint(half.model)
    half.model.float()  # fp16 -> fp32 is exact: "stored in fp16, loaded in fp32" hashes alike
    assert backbone_fingerprint(half.model) == stored_half


def test_shipped_gates_carry_the_fingerprints_of_the_shipped_backbones():
    for name in ("vit-digits", "vit-toy"):
        cfg = json.loads((embedded_model_dir(name) / "gates" / "gates_config.json").read_text())
        assert cfg["backbone"]["fingerprint"] == load_backbone(name).fingerprint, name
    assert load_backbone("vit-digits").fingerprint != load_backbone("vit-toy").fingerprint


# ----- the policy -----------------------------------------------------------------------------------
def test_toy_gates_on_the_digits_model_are_refused_in_one_line_naming_both():
    with pytest.raises(BackboneMismatchError) as e:
        Explainer.from_pretrained("vit-digits", gates=str(TOY_GATES))
    msg = str(e.value)
    assert isinstance(e.value, ValueError) and "\n" not in msg
    assert "'vit-toy'" in msg and "'vit-digits'" in msg and "allow_backbone_mismatch" in msg
    bb = load_backbone("vit-digits")
    with pytest.raises(BackboneMismatchError):
        Gates.from_pretrained(TOY_GATES, backbone=bb)
    with pytest.raises(BackboneMismatchError):
        Explainer(bb, Gates.from_pretrained(TOY_GATES))


def test_allowed_mismatch_warns_and_is_recorded():
    with pytest.warns(ProvenanceWarning, match="vit-toy"):
        ex = Explainer.from_pretrained("vit-digits", gates=str(TOY_GATES), allow_backbone_mismatch=True)
    assert ex.provenance.backbone_mismatch and "MISMATCH" in ex.provenance.describe()
    exp = ex.explain(torch.zeros(2, 3, 32, 32))
    assert exp.patch_mask.shape == (2, 16)


def test_matching_gates_load_silently_and_say_where_they_came_from():
    with warnings.catch_warnings():
        warnings.simplefilter("error", ProvenanceWarning)
        ex = Explainer.from_pretrained("vit-digits")
    p = ex.provenance
    assert p.source == "shipped" and not p.backbone_mismatch and p.trained_on == "vit-digits"
    assert p.sha256 == ex.gates.sha256 and 0.3 < p.kept < 0.5 and p.agreement > 0.9
    line = p.describe()
    assert "\n" not in line and "shipped" in line and "kept 41%" in line and "agreement 97%" in line
    exp = ex.explain(torch.zeros(1, 3, 32, 32))
    assert exp.gates_source == "shipped" and exp.gates_sha256 == ex.gates.sha256
    assert exp.cpu().gates_sha256 == ex.gates.sha256


def test_gates_without_a_fingerprint_load_with_a_warning(tmp_path, tiny_backbone, tiny_gates):
    tiny_gates.save_pretrained(tmp_path / "g")  # no backbone given: nothing to record
    with pytest.warns(ProvenanceWarning, match="no backbone fingerprint"):
        Explainer(tiny_backbone, Gates.from_pretrained(tmp_path / "g"))


def test_reference_checkpoint_loads_with_a_warning(tmp_path, tiny_backbone):
    D, S, P = tiny_backbone.hidden_size, tiny_backbone.num_hidden_states, 9
    state = {"gate.placeholder": torch.randn(D)}
    for i in range(S):
        state[f"gate.g_hat.{i}.f.0.weight_v"] = torch.randn(P, 2 * D)
        state[f"gate.g_hat.{i}.f.0.weight_g"] = torch.rand(P, 1)
        state[f"gate.g_hat.{i}.f.0.bias"] = torch.randn(P)
        state[f"gate.g_hat.{i}.f.2.weight"] = torch.randn(1, P)
        state[f"gate.g_hat.{i}.f.2.bias"] = torch.randn(1)
        state[f"gate.g_hat.{i}.add_activation"] = torch.tensor(5.0)
    torch.save({"state_dict": state}, tmp_path / "ref.ckpt")
    gates = Gates.from_reference_checkpoint(tmp_path / "ref.ckpt")
    assert gates.provenance.source == "reference"
    with pytest.warns(ProvenanceWarning, match="cannot verify"):
        Explainer(tiny_backbone, gates)


def test_gates_built_in_memory_are_only_shape_checked(tiny_backbone, tiny_gates):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ProvenanceWarning)
        ex = Explainer(tiny_backbone, tiny_gates)
    assert ex.provenance.source == "memory"


def test_registry_gates_are_reported_as_registry(tmp_path, monkeypatch, model_and_gates):
    from vdm_engine.registry import register_gates

    model_dir, gates_dir = model_and_gates
    register_gates(model_dir, gates_dir)
    ex = Explainer.from_pretrained(model_dir)
    assert ex.provenance.source == "registry"
    assert Explainer.from_pretrained(model_dir, gates=gates_dir).provenance.source == "path"


# ----- the CLIs -------------------------------------------------------------------------------------
def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {lines}"
    assert "Traceback" not in err
    return lines[0]


def test_each_cli_refuses_toy_gates_on_the_digits_model(tmp_path, capsys):
    from PIL import Image

    from vdm_engine.cli import eval as eval_cli
    from vdm_engine.cli import explain as explain_cli
    from vdm_engine.cli import export as export_cli

    img = tmp_path / "x.png"
    Image.new("RGB", (32, 32)).save(img)
    runs = {
        "vdm-export": lambda: export_cli.main(["--gates", str(TOY_GATES), "--out", str(tmp_path / "m.onnx")]),
        "vdm-explain": lambda: explain_cli.main([str(img), "--gates", str(TOY_GATES), "--out", str(tmp_path / "x")]),
        "vdm-eval": lambda: eval_cli.main(["--data", "digits", "--gates", str(TOY_GATES), "--n", "4",
                                           "--methods", "diffmask", "--no-plots", "--out", str(tmp_path / "e")]),
    }
    for prog, run in runs.items():
        assert run() == 2, prog
        line = _one_error_line(capsys.readouterr().err)
        assert line.startswith(prog) and "'vit-toy'" in line and "'vit-digits'" in line, line
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "x").exists() and not (tmp_path / "e").exists()


def test_explain_and_eval_clis_proceed_with_the_override_and_record_it(tmp_path, capsys):
    from PIL import Image

    from vdm_engine.cli import eval as eval_cli
    from vdm_engine.cli import explain as explain_cli

    img = tmp_path / "x.png"
    Image.new("RGB", (32, 32), (200, 10, 10)).save(img)
    flag = "--allow-backbone-mismatch"
    assert explain_cli.main([str(img), "--gates", str(TOY_GATES), "--out", str(tmp_path / "x"), flag]) == 0
    err = capsys.readouterr().err
    assert "BACKBONE MISMATCH ALLOWED" in err and "Traceback" not in err
    warning = [ln for ln in err.splitlines() if "warning" in ln]
    assert len(warning) == 1 and warning[0].startswith("vdm-explain: warning: ") and "'vit-toy'" in warning[0]
    record = json.loads((tmp_path / "x" / "x.json").read_text())
    assert record["gates_source"] == "path" and record["gates_sha256"] == Gates.from_pretrained(TOY_GATES).sha256
    assert record["backbone_mismatch"] is True
    assert eval_cli.main(["--data", "digits", "--gates", str(TOY_GATES), "--n", "4", "--methods", "diffmask",
                          "--replacements", "noise", "--metrics", "perturbation", "--no-plots", "--out", str(tmp_path / "e"),
                          flag]) == 0
    results = json.loads((tmp_path / "e" / "results.json").read_text())
    assert results["gates_provenance"]["backbone_mismatch"] is True


def test_export_records_source_fingerprints_and_an_allowed_mismatch(tmp_path, capsys, tiny_model_dir, tiny_gates,
                                                                   tiny_backbone):
    pytest.importorskip("onnxruntime")
    from vdm_engine.cli import export as export_cli
    from vdm_engine.export import read_metadata

    other = random_backbone("vit-tiny", seed=7)  # same shapes, other weights: a "fine-tuned" copy
    tiny_gates.save_pretrained(tmp_path / "g", backbone=other)
    out = tmp_path / "m.onnx"
    args = ["--model", str(tiny_model_dir), "--gates", str(tmp_path / "g"), "--out", str(out)]
    assert export_cli.main(args) == 2
    _one_error_line(capsys.readouterr().err)
    assert not out.exists()
    assert export_cli.main(args + ["--allow-backbone-mismatch"]) == 0
    m = read_metadata(out)
    assert m.backbone_mismatch and m.gates_source == "path"
    assert m.backbone_fingerprint == tiny_backbone.fingerprint and m.gates_backbone_fingerprint == other.fingerprint
    assert m.gates_sha256 == Gates.from_pretrained(tmp_path / "g").sha256

    from vdm_engine.runtime import OnnxExplainer

    exp = OnnxExplainer(str(out)).explain(torch.zeros(1, 3, 32, 32))
    assert exp.gates_source == "path" and exp.gates_sha256 == m.gates_sha256
