"""Every console script on bad input: exit 2, one line on stderr, no traceback, nothing written.

The table runs in-process (``main(argv)``) with model loading and onnxruntime sessions made to fail
loudly, which proves each check fires before any slow work; a few rows also run as real
subprocesses (``python -m vdm_engine.cli.X``) to prove that nothing else reaches stderr.
"""

from __future__ import annotations

import importlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from vdm_engine.cli._common import (
    CliParser, UsageError, check_device, check_model, check_out_dir, check_out_file, run_cli,
)

PROGS = {"export": "vdm-export", "explain": "vdm-explain", "eval": "vdm-eval", "train": "vdm-train"}
ROOT = os.geteuid() == 0  # root ignores permission bits: an unwritable parent is made a file instead


def _tiny_onnx(path: Path, external: bool) -> Path:
    """A one-MatMul graph (no vdm metadata: these checks fire before the metadata is read)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w],
    )
    model = helper.make_model(graph)
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=0)
    else:
        onnx.save_model(model, str(path))
    return path


def _workspace(tmp_path: Path) -> SimpleNamespace:
    """A workspace in ``tmp_path``: an image, an existing file, bad ONNX files, an unwritable folder."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    image = inputs / "digit.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(image)
    existing = inputs / "existing.txt"
    existing.write_text("not yours to overwrite\n")
    (inputs / "moved").mkdir()
    missing_data = _tiny_onnx(inputs / "moved" / "m.onnx", external=True)
    (inputs / "moved" / "m.onnx.data").unlink()  # the graph was moved without its weights file
    not_onnx = inputs / "notes.onnx"
    not_onnx.write_text("these are notes, not a graph\n")
    full = _tiny_onnx(inputs / "full.onnx", external=False).read_bytes()
    truncated = inputs / "truncated.onnx"
    truncated.write_bytes(full[: len(full) // 2])
    if ROOT:
        blocker = tmp_path / "blocker"
        blocker.write_text("a file where a folder should be\n")
        unwritable, unwritable_msg = blocker, "is a file, not a folder"
    else:
        unwritable = tmp_path / "read-only"
        unwritable.mkdir()
        unwritable.chmod(0o555)
        unwritable_msg = "cannot write into"
    return SimpleNamespace(
        root=tmp_path, image=image, existing=existing, missing_data=missing_data, not_onnx=not_onnx,
        truncated=truncated, unwritable=unwritable, unwritable_msg=unwritable_msg,
        out_file=tmp_path / "out" / "m.onnx", out_dir=tmp_path / "out",
    )


def _release(w: SimpleNamespace) -> None:
    if not ROOT:
        w.unwritable.chmod(0o755)


@pytest.fixture
def ws(tmp_path, monkeypatch):
    """A workspace (``_workspace``) that is also the working directory."""
    pytest.importorskip("onnx")
    monkeypatch.chdir(tmp_path)
    w = _workspace(tmp_path)
    yield w
    _release(w)


def _no_cuda():
    return pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


def _no_ort_cuda():
    try:
        import onnxruntime as ort

        has = "CUDAExecutionProvider" in ort.get_available_providers()
    except ImportError:
        has = True
    return pytest.mark.skipif(has, reason="onnxruntime offers CUDA (or is missing)")


# (id, cli, argv from the workspace, a regular expression the one line matches)
ROWS = [
    # vdm-export: --out is a file
    ("export-out-exists", "export", lambda w: ["--out", w.existing], "already exists; pass --overwrite"),
    ("export-out-unwritable", "export", lambda w: ["--out", w.unwritable / "m.onnx"], "unwritable"),
    ("export-out-is-folder", "export", lambda w: ["--out", w.root], "is a folder"),
    pytest.param("export-providers-cuda", "export", lambda w: ["--out", w.out_file, "--providers", "cuda"],
                 "providers='cuda'", marks=_no_ort_cuda()),
    ("export-unknown-model", "export", lambda w: ["--out", w.out_file, "--model", "nonexistent"],
     "no such model 'nonexistent'"),
    ("export-bad-outputs-commas", "export", lambda w: ["--out", w.out_file, "--outputs", "logits,heatmap"],
     "invalid choice: 'heatmap'"),
    ("export-bad-outputs-spaces", "export", lambda w: ["--out", w.out_file, "--outputs", "logits", "heatmap"],
     "invalid choice: 'heatmap'"),
    ("export-device-flag", "export", lambda w: ["--out", w.out_file, "--device", "cuda"],
     "unrecognized arguments: --device"),
    # vdm-explain: --out is a folder
    ("explain-out-is-file", "explain", lambda w: [w.image, "--out", w.existing], "is an existing file"),
    ("explain-out-unwritable", "explain", lambda w: [w.image, "--out", w.unwritable / "out"], "unwritable"),
    pytest.param("explain-device-cuda", "explain", lambda w: [w.image, "--device", "cuda", "--out", w.out_dir],
                 "no CUDA device is available", marks=_no_cuda()),
    ("explain-device-unknown", "explain", lambda w: [w.image, "--device", "tpu9", "--out", w.out_dir],
     "is not a device"),
    ("explain-unknown-model", "explain", lambda w: [w.image, "--model", "not-a-model", "--out", w.out_dir],
     "no such model 'not-a-model'"),
    ("explain-onnx-missing-data", "explain", lambda w: [w.image, "--onnx", w.missing_data, "--out", w.out_dir],
     "its weights file m.onnx.data is missing"),
    ("explain-onnx-not-onnx", "explain", lambda w: [w.image, "--onnx", w.not_onnx, "--out", w.out_dir],
     "is not an ONNX model"),
    ("explain-onnx-truncated", "explain", lambda w: [w.image, "--onnx", w.truncated, "--out", w.out_dir],
     "is not an ONNX model, or it is truncated"),
    ("explain-onnx-no-such-file", "explain", lambda w: [w.image, "--onnx", w.root / "none.onnx", "--out", w.out_dir],
     "no such file"),
    ("explain-no-such-image", "explain", lambda w: [w.root / "nope.png", "--out", w.out_dir], "nope.png: no such file"),
    # vdm-eval
    ("eval-out-is-file", "eval", lambda w: ["--data", "digits", "--out", w.existing], "is an existing file"),
    ("eval-out-unwritable", "eval", lambda w: ["--data", "digits", "--out", w.unwritable / "out"], "unwritable"),
    pytest.param("eval-device-cuda", "eval", lambda w: ["--data", "digits", "--device", "cuda", "--out", w.out_dir],
                 "no CUDA device is available", marks=_no_cuda()),
    ("eval-unknown-model", "eval", lambda w: ["--data", "digits", "--model", "nonexistent", "--out", w.out_dir],
     "no such model 'nonexistent'"),
    # vdm-train
    ("train-out-is-file", "train", lambda w: ["--model", "vit-digits", "--data", "digits", "--out", w.existing],
     "is (an existing|a) file"),  # the run-folder check (training.loop.check_run_dir) may come first
    ("train-out-unwritable", "train",
     lambda w: ["--model", "vit-digits", "--data", "digits", "--out", w.unwritable / "out"], "unwritable"),
    pytest.param("train-device-cuda", "train",
                 lambda w: ["--model", "vit-digits", "--data", "digits", "--device", "cuda", "--out", w.out_dir],
                 "no CUDA device is available", marks=_no_cuda()),
    ("train-device-unknown", "train",
     lambda w: ["--model", "vit-digits", "--data", "digits", "--device", "tpu", "--out", w.out_dir], "invalid choice"),
    ("train-unknown-model", "train", lambda w: ["--model", "nonexistent", "--data", "digits", "--out", w.out_dir],
     "no such model 'nonexistent'"),
    ("train-bad-replacement", "train",
     lambda w: ["--model", "vit-digits", "--data", "digits", "--replacement", "mean+blur", "--out", w.out_dir],
     r"TrainConfig\.replacement 'mean\+blur': kinds must be"),
]


def _ids(rows):
    return [r.values[0] if hasattr(r, "values") else r[0] for r in rows]


def _snapshot(root: Path) -> dict:
    """Every file with its size and mtime, every folder (folder mtimes change with the write probe)."""
    snap = {}
    for p in sorted(root.rglob("*")):
        if p.is_dir() and not p.is_symlink():
            snap[str(p.relative_to(root))] = "dir"
        else:
            st = p.lstat()
            snap[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return snap


def _expected(ws, message: str) -> str:
    return ws.unwritable_msg if message == "unwritable" else message


def _check_one_line(prog: str, code: int, out: str, err: str, expected: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, err)
    assert "Traceback" not in out + err, err
    assert len(lines) == 1, f"expected exactly one line on stderr, got {lines}"
    assert lines[0].startswith(f"{prog}: error: ") and re.search(expected, lines[0]), lines[0]


@pytest.fixture
def nothing_loads(monkeypatch):
    """Loading a model or opening an onnxruntime session fails the test: the checks must come first."""
    import transformers

    def boom(*args, **kwargs):
        raise AssertionError("a model or graph was loaded before the bad input was refused")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", boom)
    monkeypatch.setattr(transformers.ViTForImageClassification, "from_pretrained", boom)
    try:
        import onnxruntime

        monkeypatch.setattr(onnxruntime, "InferenceSession", boom)
    except ImportError:
        pass


@pytest.mark.parametrize("row_id, cli, argv, message", ROWS, ids=_ids(ROWS))
def test_bad_input_in_process(ws, nothing_loads, capsys, row_id, cli, argv, message):
    main = importlib.import_module(f"vdm_engine.cli.{cli}").main
    before = _snapshot(ws.root)
    code = main([str(a) for a in argv(ws)])
    out, err = capsys.readouterr()
    _check_one_line(PROGS[cli], code, out, err, _expected(ws, message))
    assert _snapshot(ws.root) == before, "a file or folder was left behind"


SUBPROCESS_ROWS = ["export-unknown-model", "explain-onnx-missing-data", "eval-out-is-file", "train-unknown-model"]


def _row(row_id: str):
    return next(r for r in ROWS if not hasattr(r, "values") and r[0] == row_id)


# the process rows start with the first test and run beside the in-process table
START_FIRST = ("processes",)


@pytest.fixture(scope="module")
def processes(tmp_path_factory):
    """The ``SUBPROCESS_ROWS`` as real processes, all started at once (their start-ups overlap), each
    in its own workspace: {row id: (process, workspace, snapshot of the workspace before)}."""
    pytest.importorskip("onnx")
    started = {}
    for row_id in SUBPROCESS_ROWS:
        (_, cli, argv, _) = _row(row_id)
        w = _workspace(tmp_path_factory.mktemp(f"ws-{row_id}"))
        env = dict(os.environ, HF_HUB_OFFLINE="1", VDM_GATES_HOME=str(tmp_path_factory.mktemp("gates_home")))
        before = _snapshot(w.root)
        proc = subprocess.Popen([sys.executable, "-m", f"vdm_engine.cli.{cli}", *[str(a) for a in argv(w)]],
                                cwd=w.root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started[row_id] = (proc, w, before)
    yield started
    for proc, w, _ in started.values():
        proc.kill()
        proc.communicate()
        _release(w)


@pytest.mark.parametrize("row_id", SUBPROCESS_ROWS)
def test_bad_input_as_a_process(processes, row_id):
    """The real process: nothing but the one line on stderr (no warnings, no usage, no traceback)."""
    (_, cli, _, message) = _row(row_id)
    proc, w, before = processes[row_id]
    out, err = proc.communicate(timeout=120)
    _check_one_line(PROGS[cli], proc.returncode, out, err, _expected(w, message))
    assert _snapshot(w.root) == before


# ----- the shared helpers ------------------------------------------------------------------------


def test_parser_errors_are_one_usage_error():
    p = CliParser(prog="vdm-x")
    p.add_argument("--n", type=int)
    with pytest.raises(UsageError, match=r"^argument --n: invalid int value: 'x' \(see vdm-x --help\)$"):
        p.parse_args(["--n", "x"])


def test_check_out_file(tmp_path):
    f = tmp_path / "m.onnx"
    assert check_out_file(f) == f and not f.exists()
    f.write_text("x")
    with pytest.raises(UsageError, match="already exists; pass --overwrite"):
        check_out_file(f)
    assert check_out_file(f, overwrite=True) == f and f.read_text() == "x"
    deep = tmp_path / "a" / "b" / "m.onnx"
    check_out_file(deep)
    assert not (tmp_path / "a").exists()  # the probe's folders are removed again
    with pytest.raises(UsageError, match="is a file, not a folder"):
        check_out_file(f / "m.onnx")
    with pytest.raises(UsageError, match="is a folder"):
        check_out_file(tmp_path)


def test_check_out_dir(tmp_path):
    assert check_out_dir(tmp_path) == tmp_path and list(tmp_path.iterdir()) == []
    check_out_dir(tmp_path / "a" / "b")
    assert not (tmp_path / "a").exists()
    check_out_dir(tmp_path / "a" / "b", keep=True)
    assert (tmp_path / "a" / "b").is_dir() and list((tmp_path / "a" / "b").iterdir()) == []
    (tmp_path / "f").write_text("x")
    with pytest.raises(UsageError, match="is an existing file; expected a folder"):
        check_out_dir(tmp_path / "f")


@pytest.mark.skipif(ROOT, reason="root ignores permission bits")
def test_check_out_dir_read_only(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(UsageError, match="cannot write into"):
            check_out_dir(ro)
        with pytest.raises(UsageError, match="cannot write into"):
            check_out_file(ro / "x" / "m.onnx")
    finally:
        ro.chmod(0o755)


def test_check_device():
    assert check_device(None) is None and check_device("cpu") == "cpu"
    with pytest.raises(UsageError, match="'gpu' is not a device"):
        check_device("gpu")
    with pytest.raises(UsageError, match="only cpu and cuda"):
        check_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="--device cuda was asked for but no CUDA device is available"):
            check_device("cuda")


def test_check_model(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("vit-digits", "vit-toy", "vit-b16"):  # embedded and presets pass without loading
        check_model(name)
    (tmp_path / "m").mkdir()
    with pytest.raises(UsageError, match="folder without config.json"):
        check_model(str(tmp_path / "m"))
    (tmp_path / "m" / "config.json").write_text("{}")
    check_model(str(tmp_path / "m"))
    for name in ("nonexistent", "someone/not-cached", "a/b/c", str(tmp_path / "missing")):
        with pytest.raises(UsageError, match=f"no such model '{name}'.*hub id cached locally"):
            check_model(name)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    check_model("someone/vit")  # online: the hub decides
    with pytest.raises(UsageError, match="no such model 'a/b/c'.*a valid hub id"):
        check_model("a/b/c")


@pytest.mark.parametrize("signum, inherited, code, message", [
    (signal.SIGTERM, None, 143, "terminated (SIGTERM)"),
    # a CLI started as a background job of a non-interactive shell inherits SIGINT ignored; Ctrl-C
    # (or kill -INT) must still interrupt it
    (signal.SIGINT, signal.SIG_IGN, 130, "interrupted"),
], ids=["sigterm", "sigint-inherited-ignored"])
def test_signal_runs_cleanup_and_exits(signum, inherited, code, message, capsys):
    """SIGTERM -> 143, SIGINT -> 130, each after the body's clean-up ran; the disposition restored."""
    cleaned = []

    def body():
        try:
            os.kill(os.getpid(), signum)
            time.sleep(10)
        finally:
            cleaned.append(True)

    previous = signal.signal(signum, inherited) if inherited is not None else None
    try:
        handler = signal.getsignal(signum)
        t0 = time.monotonic()
        assert run_cli("vdm-x", body) == code
        assert time.monotonic() - t0 < 5 and cleaned == [True]
        assert capsys.readouterr().err.strip() == f"vdm-x: {message}"
        assert signal.getsignal(signum) is handler  # restored
    finally:
        if previous is not None:
            signal.signal(signum, previous)


def test_onnx_explainer_names_the_missing_data_file(ws):
    pytest.importorskip("onnxruntime")
    from vdm_engine.runtime import OnnxExplainer

    with pytest.raises(FileNotFoundError, match=r"its weights file m\.onnx\.data is missing"):
        OnnxExplainer(ws.missing_data)
    data = ws.missing_data.with_name("m.onnx.data")
    data.write_bytes(b"\0" * 8)  # shorter than the 64 bytes of the 4x4 weights
    with pytest.raises(ValueError, match=r"is truncated \(8 bytes, the graph needs 64\)"):
        OnnxExplainer(ws.missing_data)
    with pytest.raises(ValueError, match="is not an ONNX model"):
        OnnxExplainer(ws.not_onnx)
    with pytest.raises(ValueError, match="or it is truncated"):
        OnnxExplainer(ws.truncated)
