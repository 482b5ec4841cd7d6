"""vdm-export: a full run on a local tiny model (uint8 input, fixed batch, Triton), and exit codes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vdm_engine.cli.export import main
from vdm_engine.registry import embedded_model_dir
from vdm_engine.runtime import OnnxExplainer


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, export_explainer):
    root = tmp_path_factory.mktemp("cli_model")
    export_explainer.backbone.save_pretrained(root / "model")
    export_explainer.gates.save_pretrained(root / "gates", backbone=export_explainer.backbone)
    return root / "model", root / "gates"


@pytest.fixture(scope="session")
def cli_run(tiny_dirs, tmp_path_factory):
    model, gates = tiny_dirs
    out = tmp_path_factory.mktemp("cli_out")
    argv = ["--model", str(model), "--gates", str(gates), "--out", str(out / "tiny.onnx"), "--uint8-input",
            "--batch-size", "3", "--triton-repo", str(out / "repo"), "--triton-name", "tiny"]
    import contextlib
    import io

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(argv)
    return code, stdout.getvalue(), stderr.getvalue(), out


def test_cli_export_succeeds_and_prints_a_summary(cli_run):
    code, out, err, _ = cli_run
    assert code == 0, err
    assert "wrote " in out and "tiny.onnx" in out
    assert "input     images uint8 [3, 32, 32, 3]" in out
    assert "logits [3, 10]; patch_mask [3, 16]; layer_masks [3, 4, 16]" in out
    assert "max diff  logits" in out and "(tolerance 1e-04)" in out
    assert "batch 3:" in out and " ms" in out
    assert "triton" in out and "Traceback" not in err


def test_cli_uint8_fixed_batch_graph_matches_pytorch(cli_run, export_explainer, close):
    _, _, _, out = cli_run
    rt = OnnxExplainer(out / "tiny.onnx", providers="cpu")
    assert rt.uint8_input and rt.fixed_batch == 3 and rt.input_name == "images"
    rng = np.random.default_rng(0)
    pil = [Image.fromarray(rng.integers(0, 256, (20 + 7 * i, 45, 3), dtype=np.uint8)) for i in range(3)]
    x = rt.preprocess(pil)
    assert x.dtype == torch.uint8 and x.shape == (3, 32, 32, 3)
    got = rt.explain(x)
    ref = export_explainer.explain(export_explainer.preprocess(pil))
    close(got.logits, ref.logits, 1e-4, 0.0, "logits")
    close(got.patch_mask, ref.patch_mask, 1e-4, 0.0, "patch_mask")
    close(got.layer_masks, ref.layer_masks, 1e-4, 0.0, "layer_masks")
    with pytest.raises(ValueError, match="fixed batch of 3"):
        rt.explain(x[:2])
    with pytest.raises(ValueError, match="raw uint8 images"):
        rt.explain(torch.randn(3, 32, 32, 3))
    with pytest.raises(ValueError, match=r"\(B, 32, 32, 3\)"):
        rt.explain(x.permute(0, 3, 1, 2))


def test_cli_triton_config_for_a_fixed_batch(cli_run):
    mc = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient[grpc] is not installed")
    from google.protobuf import text_format

    _, _, _, out = cli_run
    cfg = text_format.Parse((out / "repo" / "tiny" / "config.pbtxt").read_text(), mc.ModelConfig())
    assert cfg.max_batch_size == 0 and not cfg.HasField("dynamic_batching")
    assert list(cfg.input[0].dims) == [3, 32, 32, 3] and cfg.input[0].data_type == mc.TYPE_UINT8
    assert [list(o.dims) for o in cfg.output] == [[3, 10], [3, 16], [3, 4, 16]]


def _bad_usage(capsys, argv, match):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, (argv, err)
    assert len(err) >= 1 and err[-1].startswith("vdm-export: error: ") and match in err[-1], err
    assert not any("Traceback" in line for line in err)


def test_bad_cli_input_exits_2_with_one_line(capsys, tmp_path, tiny_dirs):
    model, gates = tiny_dirs
    out = tmp_path / "x.onnx"
    o = ["--out", str(out)]
    _bad_usage(capsys, ["--model", str(model)], "--out")
    _bad_usage(capsys, o + ["--bogus"], "unrecognized arguments: --bogus")
    _bad_usage(capsys, o + ["--fp16", "--opset", "12"], "--opset must be >= 18")
    _bad_usage(capsys, o + ["--batch-size", "0"], "--batch-size must be >= 1")
    _bad_usage(capsys, o + ["--atol", "-1"], "--atol must be > 0")
    _bad_usage(capsys, o + ["--outputs", "heatmap"], "invalid choice")
    _bad_usage(capsys, o + ["--model", "vit-b16"], "no trained gates found for 'vit-b16'")
    _bad_usage(capsys, o + ["--model", "vit-b16", "--untrained-gates"], "could not load ViT weights")
    _bad_usage(capsys, o + ["--model", "resnet50", "--random-weights"], "--random-weights needs an architecture name")
    _bad_usage(capsys, o + ["--model", "vit-tiny", "--random-weights", "--gates", str(gates)], "--gates cannot")
    _bad_usage(capsys, o + ["--model", str(model), "--gates", str(tmp_path)], "is not a gates directory")
    _bad_usage(capsys, ["--out", str(tmp_path), "--model", str(model), "--gates", str(gates)], "is a directory")
    if embedded_model_dir("vit-digits") is None:
        _bad_usage(capsys, o, "embedded model 'vit-digits' is missing")
    assert not out.exists()


def test_validation_failure_exits_1(capsys, tmp_path, tiny_dirs, monkeypatch):
    import vdm_engine.export as export
    from vdm_engine.export import ExportValidationError

    def fail(*args, **kwargs):
        raise ExportValidationError("random batch 3: output 'logits' differs from PyTorch by 1.000e-03 > tolerance 1.0e-04")

    monkeypatch.setattr(export, "export_onnx", fail)
    model, gates = tiny_dirs
    code = main(["--model", str(model), "--gates", str(gates), "--out", str(tmp_path / "x.onnx")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("vdm-export: failed: random batch 3: output 'logits' differs"), err


def test_console_script_is_this_main():
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "vdm-export"]
    assert ep.value == "vdm_engine.cli.export:main" and ep.load() is main
