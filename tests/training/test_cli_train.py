"""`vdm-train` end to end: offline run on the embedded model, kill-and-resume, torchrun with 2 processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from vdm_engine import Explainer, Gates
from vdm_engine.cli.train import main
from vdm_engine.registry import shipped_gates
from vdm_engine.training.checkpoint import load_checkpoint
from vdm_engine.training.rundir import CHECKPOINT, GATES_DIR, METRICS

from tests.conftest import BackgroundRun


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
    """The issue's command (sized down to 120 steps): progress, a loadable checkpoint, a metrics log, and the
    shipped gates left in place (vit-digits has gates; replacing them needs --register)."""
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
    assert summary["registered"] is None
    assert Gates.from_pretrained(out / GATES_DIR).metrics["steps"] == 120
    explainer = Explainer.from_pretrained("vit-digits")  # the (isolated) registry is still empty
    assert explainer.gates.sha256 == Gates.from_pretrained(shipped_gates("vit-digits")).sha256


def test_vdm_train_errors_are_one_line(tmp_path, capsys):
    assert main(["--model", "vit-digits", "--data", "nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vdm-train: error: unknown data source") and "\n" not in err
    assert main(["--model", str(tmp_path / "missing"), "--data", "toy", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert str(tmp_path / "missing") in err and "\n" not in err
    assert main(["--model", "vit-toy", "--data", "toy", "--out", str(tmp_path), "--steps", "0"]) == 2
    assert "TrainConfig.steps" in capsys.readouterr().err


def test_vdm_train_divergence_exits_with_one_line(tmp_path, capsys, monkeypatch):
    import vdm_engine.training as training
    import vdm_engine.training.run as run

    def diverge(*a, **k):
        raise training.TrainingDiverged("the loss became NaN/Inf (nan) at step 3; stopped. The last good checkpoint is kept")

    monkeypatch.setattr(run, "train_gates", diverge)
    assert main(["--model", "vit-toy", "--data", "toy", "--out", str(tmp_path), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("vdm-train: failed: the loss became NaN") and "\n" not in err


def test_kill_and_resume_matches_uninterrupted_run(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """SIGKILL a run (a subprocess) after its first checkpoint; resumed (through the CLI in this process:
    one process start-up fewer) it ends bit-identical to an uninterrupted run, metrics included."""
    steps = ["--steps", "100"]  # checkpoints every 25, validation at 50 and 100
    # the uninterrupted reference runs beside the run that gets killed (two cores, two processes)
    ref = subprocess.Popen(_cmd(tiny_model_dir, tmp_path / "ref", *steps), env=_env(), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(tiny_model_dir, out, *steps), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 90
    while not (out / CHECKPOINT).exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    ref_err = ref.communicate(timeout=120)[1]
    assert ref.returncode == 0, ref_err
    killed_at = load_checkpoint(out / CHECKPOINT)[1]["step"]
    assert 25 <= killed_at < 100 and not (out / GATES_DIR).exists()

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the training conftest already runs torch on one thread
    code = main(_cmd(tiny_model_dir, out, *steps, "--resume")[3:])
    assert code == 0, capsys.readouterr().err
    a = load_file(str(tmp_path / "ref" / GATES_DIR / "gates.safetensors"))
    b = load_file(str(out / GATES_DIR / "gates.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume from step {killed_at}"
    assert (out / METRICS).read_text() == (tmp_path / "ref" / METRICS).read_text()


class TorchrunRun(BackgroundRun):
    """``torchrun --nproc_per_node 2 -m vdm_engine.cli.train`` (60 steps on the tiny ViT), started at once;
    ``wait()`` -> the finished process (stdout and stderr read)."""

    def __init__(self, root):
        from vdm_engine.backbone import random_backbone

        model_dir = root / "tiny-vit"
        random_backbone("vit-tiny", seed=0).save_pretrained(model_dir)  # the tiny_model_dir fixture's model
        self.out = root / "ddp"
        super().__init__([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "vdm_engine.cli.train", *_cmd(model_dir, self.out, "--steps", "60")[3:]],
                         env=_env(), timeout_s=150)



# torchrun starts with the first test: the in-process tests here train on one thread beside it
START_FIRST = ("torchrun_run",)


@pytest.fixture(scope="module")
def torchrun_run(tmp_path_factory):
    run = TorchrunRun(tmp_path_factory.mktemp("torchrun"))
    yield run
    run.stop()


def test_torchrun_two_processes(torchrun_run):
    res = torchrun_run.wait()
    out = torchrun_run.out
    assert res.returncode == 0, res.stderr[-3000:]
    summaries = [line for line in res.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1, res.stdout  # only rank 0 reports and writes
    lines = [json.loads(x) for x in (out / METRICS).read_text().splitlines()]
    assert [r["step"] for r in lines if r["kind"] == "val"] == [50, 60]
    assert all(r["images"] == 16 for r in lines if r["kind"] == "val")  # both ranks' shards summed
    gates = Gates.from_pretrained(out / GATES_DIR)
    assert gates.metrics["world_size"] == 2 and gates.metrics["steps"] == 60
    assert load_checkpoint(out / CHECKPOINT)[1]["world_size"] == 2


# ----- run folders are safe --------------------------------------------------------------------------
def _tiny(model_dir, out, *extra):
    return ["--model", str(model_dir), "--data", "toy", "--out", str(out), "--steps", "10", "--batch-size", "8",
            "--val-size", "16", "--eval-interval", "10", "--checkpoint-interval", "5", "--device", "cpu",
            "--no-progress", *extra]


def _snapshot(d):
    return {p.relative_to(d): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture
def finished_run(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "run"
    assert main(_tiny(tiny_model_dir, out)) == 0
    capsys.readouterr()
    return out


@pytest.fixture
def no_model_loading(monkeypatch):
    """The refusals come before the slow work: loading the model fails the test."""
    import vdm_engine

    def fail(*a, **k):
        raise AssertionError("the model was loaded before the run folder was checked")

    monkeypatch.setattr(vdm_engine, "load_backbone", fail)


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert err.startswith("vdm-train: error:") and "\n" not in err, err
    for n in needles:
        assert n in err, err
    return err


def test_existing_run_is_refused_and_left_untouched(finished_run, tiny_model_dir, capsys, no_model_loading):
    before = _snapshot(finished_run)
    assert main(_tiny(tiny_model_dir, finished_run)) == 2
    _one_line_error(capsys, "already holds a training run", "--resume", "--overwrite")
    assert main(_tiny(tiny_model_dir, finished_run, "--register")) == 2  # --register does not overwrite either
    _one_line_error(capsys, "already holds a training run")
    assert _snapshot(finished_run) == before
    for leftover in (CHECKPOINT, METRICS, GATES_DIR):  # any one of the run's files is enough
        d = finished_run.parent / f"only-{leftover}"
        d.mkdir()
        (d / leftover).mkdir() if leftover == GATES_DIR else (d / leftover).write_text("")
        assert main(_tiny(tiny_model_dir, d)) == 2
        _one_line_error(capsys, "already holds a training run", leftover)


def test_overwrite_starts_afresh(finished_run, tiny_model_dir, capsys):
    (finished_run / "notes.txt").write_text("mine")
    (finished_run / METRICS).write_text('{"kind": "val", "step": 999}\n')
    assert main(_tiny(tiny_model_dir, finished_run, "--overwrite", "--steps", "5", "--eval-interval", "5")) == 0
    capsys.readouterr()
    assert (finished_run / "notes.txt").read_text() == "mine"  # not a file of the run
    steps = [json.loads(x)["step"] for x in (finished_run / METRICS).read_text().splitlines()]
    assert max(steps) == 5
    assert load_checkpoint(finished_run / CHECKPOINT)[1]["step"] == 5
    assert Gates.from_pretrained(finished_run / GATES_DIR).metrics["steps"] == 5


def test_resume_and_overwrite_exclude_each_other(finished_run, tiny_model_dir, capsys):
    before = _snapshot(finished_run)
    assert main(_tiny(tiny_model_dir, finished_run, "--resume", "--overwrite")) == 2
    _one_line_error(capsys, "--overwrite")
    assert _snapshot(finished_run) == before


@pytest.mark.parametrize("where", ["empty", "missing"])
def test_resume_without_checkpoint_is_an_error(tmp_path, tiny_model_dir, capsys, no_model_loading, where):
    out = tmp_path / where
    if where == "empty":
        out.mkdir()
    assert main(_tiny(tiny_model_dir, out, "--resume")) == 2
    _one_line_error(capsys, "--resume: there is no checkpoint", str(out))
    assert list(out.iterdir()) == [] if where == "empty" else not out.exists()


def test_resume_with_other_model_or_data_names_both(finished_run, tiny_model_dir, tmp_path, capsys,
                                                    no_model_loading):
    before = _snapshot(finished_run)
    assert main(_tiny("vit-toy", finished_run, "--resume")) == 2
    _one_line_error(capsys, f"model '{tiny_model_dir}'", "not 'vit-toy'")
    cmd = _tiny(tiny_model_dir, finished_run, "--resume")
    cmd[cmd.index("toy")] = "digits"
    assert main(cmd) == 2
    _one_line_error(capsys, "data 'toy'", "not 'digits'")
    assert _snapshot(finished_run) == before


def test_resume_with_fewer_steps_is_an_error(finished_run, tiny_model_dir, capsys, no_model_loading):
    before = _snapshot(finished_run)
    assert main(_tiny(tiny_model_dir, finished_run, "--resume", "--steps", "5")) == 2
    _one_line_error(capsys, "--steps 5 is below", "(10)")
    assert _snapshot(finished_run) == before


def test_resume_continues_to_more_steps(finished_run, tiny_model_dir, capsys):
    assert main(_tiny(tiny_model_dir, finished_run, "--resume", "--steps", "15")) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 15
    meta = load_checkpoint(finished_run / CHECKPOINT)[1]
    assert meta["step"] == 15 and meta["data"] == "toy" and meta["model"] == str(tiny_model_dir)


def test_probe_size_is_set_and_kept_on_resume(finished_run, tiny_model_dir, tmp_path, capsys):
    """``--probe-size`` sets the probes' hidden units; a resumed run refuses another size before it loads anything."""
    out = tmp_path / "p3"
    assert main(_tiny(tiny_model_dir, out, "--probe-size", "3", "--no-register")) == 0
    capsys.readouterr()
    assert Gates.from_pretrained(out / GATES_DIR).config.probe_size == 3
    before = _snapshot(finished_run)
    assert main(_tiny(tiny_model_dir, finished_run, "--resume", "--steps", "15", "--probe-size", "3")) == 2
    _one_line_error(capsys, "cannot change it to 3")
    assert _snapshot(finished_run) == before
    assert main(_tiny(tiny_model_dir, tmp_path / "p0", "--probe-size", "0")) == 2
    _one_line_error(capsys, "probe_size must be >= 1")
