"""benchmarks/gpu_check.py must run when a GPU is lent: its CPU dry run (interpreter, tiny shapes) works."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


def test_gpu_check_dry_run(tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--no-compile", "--no-end-to-end",
           "--batches", "2", "--sweep", "--out", str(tmp_path)]
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert not data["errors"], data["errors"]
    assert {r["op"] for r in data["correctness"]} >= {"patch_mask", "gate_probe", "explain (kernels vs references)"}
    assert all(r["ok"] for r in data["correctness"]), data["correctness"]
    providers = {(r["op"], r["provider"]) for r in data["kernels"]}
    assert ("patch_mask fwd", "triton") in providers and ("gate_probe (L+2 probes)", "torch eager") in providers
    assert "| patch_mask fwd | triton |" in (tmp_path / "gpu_check.md").read_text()
    assert data["sweep"] and all(r.get("ok") for r in data["sweep"]), data["sweep"]
