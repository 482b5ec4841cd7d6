"""`vdm-train` end to end: offline run on the embedded model, kill-and-resume, torchrun with 2 processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from vdm_engine import Explainer, Gates
from vdm_engine.cli.train import main
from vdm_engine.training.loop import CHECKPOINT, GATES_DIR, METRICS, _load_checkpoint


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _cmd(model_dir, out, *extra):
    return [
        sys.executable, "-m", "vdm_engine.cli.train", "--model", str(model_dir), "--data", "toy", "--out", str(out),
        "--batch-size", "8", "--val-size", "16", "--eval-interval", "50", "--checkpoint-interval", "25",
        "--device", "cpu", "--no-progress", "--no-register", *extra,
    ]


def test_vdm_train_embedded_digits_offline(tmp_path, capsys, monkeypatch):
    """The issue's command (sized down to 120 steps): progress, a loadable checkpoint, a metrics log, registration."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "g"
    code = main(["--model", "vit-digits", "--data", "digits", "--steps", "120", "--eval-interval", "60",
                 "--val-size", "100", "--out", str(out), "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "vdm-train" in captured.err and "kl=" in captured.err and "alpha=" in captured.err and "agree=" in captured.err
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["step"] == 120 and summary["gates"] == str(out / GATES_DIR)
    lines = [json.loads(x) for x in (out / METRICS).read_text().splitlines()]
    assert [r["step"] for r in lines if r["kind"] == "val"] == [60, 120]
    assert all(r["images"] == 100 for r in lines if r["kind"] == "val")
    assert sum(r["kind"] == "train" for r in lines) == 120 // 25 + 1
    explainer = Explainer.from_pretrained("vit-digits")  # found through the (isolated) registry
    assert explainer.gates.sha256 == Gates.from_pretrained(out / GATES_DIR).sha256
    assert explainer.gates.metrics["steps"] == 120


def test_vdm_train_errors_are_one_line(tmp_path, capsys):
    assert main(["--model", "vit-digits", "--data", "nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vdm-train: error: unknown data source") and "\n" not in err
    assert main(["--model", str(tmp_path / "missing"), "--data", "toy", "--out", str(tmp_path)]) == 2
    assert "could not load ViT weights" in capsys.readouterr().err
    assert main(["--model", "vit-toy", "--data", "toy", "--out", str(tmp_path), "--steps", "0"]) == 2
    assert "TrainConfig.steps" in capsys.readouterr().err


def test_vdm_train_divergence_exits_with_one_line(tmp_path, capsys, monkeypatch):
    import vdm_engine.training as training

    def diverge(*a, **k):
        raise training.TrainingDiverged("the loss became NaN/Inf (nan) at step 3; stopped. The last good checkpoint is kept")

    monkeypatch.setattr(training, "train_gates", diverge)
    assert main(["--model", "vit-toy", "--data", "toy", "--out", str(tmp_path), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("vdm-train: failed: the loss became NaN") and "\n" not in err


def test_kill_and_resume_matches_uninterrupted_run(tmp_path, tiny_model_dir):
    steps = ["--steps", "300"]
    ref = subprocess.run(_cmd(tiny_model_dir, tmp_path / "ref", *steps), env=_env(), capture_output=True, text=True,
                         timeout=120)
    assert ref.returncode == 0, ref.stderr

    out = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(tiny_model_dir, out, *steps), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 90
    while not (out / CHECKPOINT).exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = _load_checkpoint(out / CHECKPOINT)[1]["step"]
    assert 25 <= killed_at < 300 and not (out / GATES_DIR).exists()

    res = subprocess.run(_cmd(tiny_model_dir, out, *steps, "--resume"), env=_env(), capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    a = load_file(str(tmp_path / "ref" / GATES_DIR / "gates.safetensors"))
    b = load_file(str(out / GATES_DIR / "gates.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume from step {killed_at}"
    assert (out / METRICS).read_text() == (tmp_path / "ref" / METRICS).read_text()


def test_torchrun_two_processes(tmp_path, tiny_model_dir):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "vdm_engine.cli.train", *_cmd(tiny_model_dir, out, "--steps", "60")[3:]]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=150)
    assert res.returncode == 0, res.stderr[-3000:]
    summaries = [line for line in res.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1, res.stdout  # only rank 0 reports and writes
    lines = [json.loads(x) for x in (out / METRICS).read_text().splitlines()]
    assert [r["step"] for r in lines if r["kind"] == "val"] == [50, 60]
    assert all(r["images"] == 16 for r in lines if r["kind"] == "val")  # both ranks' shards summed
    gates = Gates.from_pretrained(out / GATES_DIR)
    assert gates.metrics["world_size"] == 2 and gates.metrics["steps"] == 60
    assert _load_checkpoint(out / CHECKPOINT)[1]["world_size"] == 2
