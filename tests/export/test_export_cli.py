"""vdm-export: a full run on a local tiny model (uint8 input, fixed batch, Triton), exit codes, --overwrite,
--outputs, and staging that neither SIGTERM nor SIGKILL leaves behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

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
    _bad_usage(capsys, ["--out", str(tmp_path), "--model", str(model), "--gates", str(gates)], "is a folder")
    _bad_usage(capsys, o + ["--model", "nonexistent"], "no such model 'nonexistent'")
    _bad_usage(capsys, o + ["--outputs", "logits,heatmap"], "invalid choice: 'heatmap'")
    repo = ["--triton-repo", str(tmp_path / "repo")]
    _bad_usage(capsys, o + ["--triton-backend", "python"], "--triton-backend needs --triton-repo DIR")
    _bad_usage(capsys, o + ["--triton-ensemble"], "--triton-ensemble needs --triton-repo DIR")
    _bad_usage(capsys, o + ["--triton-backend", "tensorflow"], "invalid choice: 'tensorflow'")
    _bad_usage(capsys, o + repo + ["--triton-backend", "python", "--tensorrt"], "--tensorrt needs --triton-backend onnxruntime")
    _bad_usage(capsys, o + repo + ["--triton-ensemble", "--batch-size", "2"], "--triton-ensemble needs a dynamic batch")
    _bad_usage(capsys, o + repo + ["--triton-queue-delay-us", "-1"], "--triton-queue-delay-us must be >= 0")
    if embedded_model_dir("vit-digits") is None:
        _bad_usage(capsys, o, "embedded model 'vit-digits' is missing")
    assert not out.exists() and not (tmp_path / "repo").exists()


def test_validation_failure_exits_1(capsys, tmp_path, tiny_dirs, monkeypatch):
    import vdm_engine.export.main as export
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


def _staging(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".staging") or p.name.endswith(".tmp"))


@pytest.mark.parametrize("outputs", [["logits,patch_mask"], ["logits", "patch_mask"], ["logits,", "patch_mask,logits"]])
def test_outputs_take_commas_or_spaces(tmp_path, tiny_dirs, monkeypatch, outputs):
    import vdm_engine.export.main as export
    from vdm_engine.export import ExportValidationError

    seen = []

    def record(explainer, path, **kwargs):
        seen.append(kwargs["outputs"])
        raise ExportValidationError("stop here")

    monkeypatch.setattr(export, "export_onnx", record)
    model, gates = tiny_dirs
    assert main(["--model", str(model), "--gates", str(gates), "--out", str(tmp_path / "m.onnx"), "--outputs", *outputs]) == 1
    assert seen == [["logits", "patch_mask"]]


def test_overwrite_replaces_and_stale_staging_is_removed(tmp_path, tiny_dirs, capsys):
    """An existing --out needs --overwrite; staging left by a killed export (dead pid) is removed first."""
    model, gates = tiny_dirs
    out = tmp_path / "m.onnx"
    out.write_bytes(b"an older export")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".other.onnx.vdm-staging-{dead.pid}-abc123.staging"
    stale.mkdir()
    (stale / "other.onnx").write_bytes(b"half written")
    argv = ["--model", str(model), "--gates", str(gates), "--out", str(out), "--outputs", "logits"]  # a small graph
    assert main(argv) == 2 and "already exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"an older export" and stale.exists()
    assert main(argv + ["--overwrite"]) == 0, capsys.readouterr().err
    assert OnnxExplainer(out, providers="cpu").num_patches == 16
    assert _staging(tmp_path) == []


def test_remove_stale_staging_keeps_live_exports(tmp_path):
    from vdm_engine.export.onnx import remove_stale_staging

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = os.getppid()  # alive, and started before anything made here

    def staging(pid, tag, age_s=0.0):
        d = tmp_path / f".m.onnx.vdm-staging-{pid}-{tag}.staging"
        d.mkdir()
        (d / "m.onnx").write_bytes(b"x")
        if age_s:
            t = time.time() - age_s
            os.utime(d, (t, t))
        return d

    gone = staging(dead.pid, "dead")
    reused = staging(live, "reused", age_s=10 * 365 * 86400)  # older than the live process with that pid
    running = staging(live, "running")
    mine = staging(os.getpid(), "mine")
    other = tmp_path / ".m.onnx.abc.staging"  # not ours to judge: no pid in the name
    other.mkdir()
    removed = remove_stale_staging(tmp_path)
    assert sorted(removed) == sorted([gone, reused])
    assert not gone.exists() and not reused.exists() and running.exists() and mine.exists() and other.exists()
    assert remove_stale_staging(tmp_path / "missing") == []


_SLOW_VALIDATION = """
import sys, time
import vdm_engine.export.onnx as eo

real = eo.validate_onnx

def slow(*args, **kwargs):  # hold the export while its staging folder exists (the test ends it)
    time.sleep(600)
    return real(*args, **kwargs)

eo.validate_onnx = slow
from vdm_engine.cli.export import main

sys.exit(main(sys.argv[1:]))
"""


def _start_export(tmp_path, out):
    env = dict(os.environ, HF_HUB_OFFLINE="1", VDM_GATES_HOME=str(tmp_path / "gates_home"), OMP_NUM_THREADS="1")
    # logits only: the smallest graph (a third less to trace); staging and signals are what is tested
    return subprocess.Popen(
        [sys.executable, "-c", _SLOW_VALIDATION, "--model", "vit-digits", "--outputs", "logits", "--out", str(out)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _wait_for_staging(proc, folder, timeout=240.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if folder.is_dir() and _staging(folder):
            return
        if proc.poll() is not None:
            pytest.fail(f"export ended (rc {proc.returncode}) before staging appeared: {proc.communicate()[1]}")
        time.sleep(0.1)
    proc.kill()
    pytest.fail("no staging files appeared")


# the two signalled exports (slow start-up: imports, loading, exporting) start with the first test
START_FIRST = ("signalled_exports",)


@pytest.fixture(scope="module")
def signalled_exports(tmp_path_factory):
    """Two slow exports started side by side (one per core), for the SIGTERM and the SIGKILL test:
    {"term"|"kill": (process, its tmp folder, its exports folder)}."""
    started = {}
    for name in ("term", "kill"):
        tmp = tmp_path_factory.mktemp(f"export_{name}")
        started[name] = (_start_export(tmp, tmp / "exports" / "m.onnx"), tmp, tmp / "exports")
    yield started
    for proc, _, _ in started.values():
        proc.kill()
        proc.communicate()


@pytest.mark.slow
def test_sigterm_cleans_staging_and_exits_in_one_line(signalled_exports):
    proc, _, folder = signalled_exports["term"]
    try:
        _wait_for_staging(proc, folder)
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert time.monotonic() - t0 < 15
    assert proc.returncode == 143, err
    assert "Traceback" not in out + err
    assert err.strip().splitlines()[-1] == "vdm-export: terminated (SIGTERM)", err
    assert list(folder.iterdir()) == []


@pytest.mark.slow
def test_staging_left_by_sigkill_is_removed_by_the_next_export(signalled_exports, export_explainer):
    from vdm_engine.export import export_onnx

    proc, _, folder = signalled_exports["kill"]
    try:
        _wait_for_staging(proc, folder)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    finally:
        proc.kill()
    left = _staging(folder)
    assert left and all(f".vdm-staging-{proc.pid}-" in n for n in left), left  # SIGKILL: nothing could clean up
    export_onnx(export_explainer, folder / "next.onnx", outputs=("logits",), validate=False)  # staging as ever
    assert _staging(folder) == [] and sorted(p.name for p in folder.iterdir()) == ["next.onnx"]
