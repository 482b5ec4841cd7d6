"""benchmarks/gpu_check.py must run when a GPU is lent: its CPU dry run (interpreter, tiny shapes) works.

The run itself (``gpu_check_run``, tests/kernels/conftest.py) starts with the first test of this folder.
"""

from __future__ import annotations

import json


def test_gpu_check_dry_run(gpu_check_run):
    res = gpu_check_run.wait()
    out = gpu_check_run.out
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    data = json.loads((out / "gpu_check.json").read_text())
    assert not data["errors"], data["errors"]
    assert {r["op"] for r in data["correctness"]} >= {"patch_mask", "gate_probe", "explain (kernels vs references)"}
    assert all(r["ok"] for r in data["correctness"]), data["correctness"]
    providers = {(r["op"], r["provider"]) for r in data["kernels"]}
    assert ("patch_mask fwd", "triton") in providers and ("gate_probe (L+2 probes)", "torch eager") in providers
    assert "| patch_mask fwd | triton |" in (out / "gpu_check.md").read_text()
    assert data["sweep"] and all(r.get("ok") for r in data["sweep"]), data["sweep"]
