"""Dispatch: the Explainer routes through the Triton kernels when told to, and the answers agree."""

from __future__ import annotations

import copy

import importlib
import subprocess
import sys
import types

import pytest
import torch

from vdm_engine import Explainer
from vdm_engine.backbone import patch_mask_reference
from vdm_engine.gates import gate_probe_reference
from vdm_engine.kernels import mask_patches, not_supported_reasons, probe_gates
from vdm_engine.kernels.dispatch import KernelsUnavailableError, choose, triton_ops
from vdm_engine.ops import resolve_mode, select_ops
from vdm_engine.kernels._triton import interpreting

gp = importlib.import_module("vdm_engine.kernels.gate_probe")
pm = importlib.import_module("vdm_engine.kernels.patch_mask")
tr = importlib.import_module("vdm_engine.kernels._triton")


class CountingKernel:
    """Wraps a ``@triton.jit`` kernel and counts its launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.fixture
def counters(monkeypatch):
    c = {
        "gate_probe": CountingKernel(gp._kernel(interpreting())),  # the entry this process launches
        "patch_mask_fwd": CountingKernel(pm._patch_mask_fwd_kernel),
        "patch_mask_bwd": CountingKernel(pm._patch_mask_bwd_kernel),
    }
    monkeypatch.setattr(gp, "_kernel", lambda interpret: c["gate_probe"])
    monkeypatch.setattr(pm, "_patch_mask_fwd_kernel", c["patch_mask_fwd"])
    monkeypatch.setattr(pm, "_patch_mask_bwd_kernel", c["patch_mask_bwd"])
    return c


def test_explain_routes_through_both_kernels(monkeypatch, tiny_backbone, tiny_gates, pixels, counters, close):
    monkeypatch.setenv("VDM_KERNELS", "reference")
    ref = Explainer(tiny_backbone, tiny_gates).eval()
    assert ref.ops.backend == "reference"
    assert ref.ops.gate_probe is gate_probe_reference and ref.ops.patch_mask is patch_mask_reference
    expected = ref.explain(pixels)
    expected_check = ref.verify(pixels, expected)
    gates = torch.rand(5, 3, tiny_backbone.num_patches, device=pixels.device, requires_grad=True)
    masked_ref = tiny_backbone.masked_logits(pixels, gates, tiny_gates.placeholder)
    grad_ref = torch.autograd.grad(masked_ref.sum(), gates)[0]

    monkeypatch.setenv("VDM_KERNELS", "triton")  # on the CPU allowed because TRITON_INTERPRET=1
    fast = Explainer(tiny_backbone, tiny_gates).eval()
    assert fast.ops.backend == "triton"
    assert fast.ops.gate_probe is probe_gates and fast.ops.patch_mask is mask_patches
    got = fast.explain(pixels)
    # one probe launch per depth, as each hidden state is produced
    assert counters["gate_probe"].launches == tiny_backbone.num_hidden_states and counters["patch_mask_fwd"].launches == 0
    close(got.logits, expected.logits, 1e-5, 1e-5, "logits")
    close(got.patch_mask, expected.patch_mask, 1e-5, 1e-5, "patch_mask")
    close(got.layer_masks, expected.layer_masks, 1e-5, 1e-5, "layer_masks")
    assert torch.equal(got.keep(), expected.keep())

    check = fast.verify(pixels, got)
    assert counters["patch_mask_fwd"].launches == 1
    close(check.masked_logits, expected_check.masked_logits, 1e-4, 1e-4, "verify masked logits")
    assert torch.equal(check.agree, expected_check.agree)

    # The training loop's masked pass: K=3 masks per image, gradients through the kernel.
    masked = tiny_backbone.masked_logits(pixels, gates, tiny_gates.placeholder, mask_fn=fast.ops.patch_mask)
    close(masked, masked_ref, 1e-4, 1e-4, "masked logits, K=3")
    masked.sum().backward()
    assert counters["patch_mask_bwd"].launches == 1
    close(gates.grad, grad_ref, 1e-4, 1e-4, "gate gradients through the masked pass")
    assert tiny_gates.placeholder.grad is not None


def test_levels_one_launch_per_depth(monkeypatch, tiny_backbone, tiny_gates, pixels, counters, close):
    """K-level gates: one probe launch per depth for all K levels; patch_rank as with the references."""
    from vdm_engine import Gates

    levels = []
    for k in range(3):
        g = copy.deepcopy(tiny_gates)
        with torch.no_grad():
            g.add.add_(-1.5 * k)
        levels.append(g)
    gates = Gates.stack(levels).to(pixels.device).eval()
    expected = Explainer(tiny_backbone, gates, kernels="reference").eval().explain(pixels)
    monkeypatch.setenv("VDM_KERNELS", "triton")
    got = Explainer(tiny_backbone, gates).eval().explain(pixels)
    assert counters["gate_probe"].launches == tiny_backbone.num_hidden_states
    close(got.patch_rank, expected.patch_rank, 1e-5, 1e-5, "patch_rank")
    close(got.patch_mask, expected.patch_mask, 1e-5, 1e-5, "patch_mask")


def test_auto_uses_references_on_cpu(monkeypatch, tiny_explainer):
    monkeypatch.delenv("VDM_KERNELS", raising=False)
    tiny_explainer = tiny_explainer.cpu()
    assert resolve_mode() == "auto"
    assert tiny_explainer.ops.backend == "reference" and "CUDA only" in tiny_explainer.ops.reason
    assert tiny_explainer.ops.gate_probe is gate_probe_reference
    assert tiny_explainer.ops.patch_mask is patch_mask_reference
    assert select_ops("cpu", torch.float32).backend == "reference"
    use, reasons = choose("cpu", torch.float32, "auto")
    assert not use and reasons


def test_forced_triton_raises_with_reasons(monkeypatch, tiny_explainer):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    tiny_explainer = tiny_explainer.cpu()
    with pytest.raises(KernelsUnavailableError, match=r"VDM_KERNELS=triton .* tensors are on the CPU") as info:
        triton_ops("cpu", torch.float32, "triton")
    assert isinstance(info.value, ValueError)
    with pytest.raises(KernelsUnavailableError, match=r"VDM_KERNELS=triton .* tensors are on the CPU"):
        select_ops("cpu", torch.float32, "triton")
    monkeypatch.setenv("VDM_KERNELS", "triton")
    with pytest.raises(KernelsUnavailableError):
        Explainer(tiny_explainer.backbone, tiny_explainer.gates)


def test_reasons(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert any("float64" in r for r in not_supported_reasons(torch.zeros(1, dtype=torch.float64)))
    assert any("CPU" in r for r in not_supported_reasons("cpu", torch.float32))
    if not torch.cuda.is_available():
        assert any("CUDA is not available" in r for r in not_supported_reasons("cuda", torch.bfloat16))
    monkeypatch.setattr(tr, "triton_importable", lambda: False)
    assert "triton is not installed" in not_supported_reasons("cuda", torch.float16)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not_supported_reasons("cpu", torch.float16) == ["triton is not installed"]


def test_bad_mode(monkeypatch, tiny_backbone, tiny_gates):
    with pytest.raises(ValueError, match="VDM_KERNELS must be one of auto, reference, triton; got 'cuda'"):
        resolve_mode("cuda")
    monkeypatch.setenv("VDM_KERNELS", "fast")
    with pytest.raises(ValueError, match="got 'fast'"):
        Explainer(tiny_backbone, tiny_gates)


def test_ops_and_modules_have_distinct_names():
    """``vdm_engine.kernels.patch_mask`` is the module and ``.mask_patches`` its op, whatever was imported first."""
    import vdm_engine.kernels as kernels

    for module, op in (("patch_mask", "mask_patches"), ("gate_probe", "probe_gates")):
        mod = importlib.import_module(f"vdm_engine.kernels.{module}")
        assert getattr(kernels, module) is mod and isinstance(mod, types.ModuleType)
        assert getattr(kernels, op) is getattr(mod, op) and callable(getattr(kernels, op))
    assert all(hasattr(kernels, name) for name in kernels.__all__)


def test_import_is_cheap_and_triton_optional():
    """Importing the package and dispatch does not import triton; without triton, everything falls back."""
    code = """
import sys, torch
import vdm_engine.kernels, vdm_engine.kernels.dispatch
assert "triton" not in sys.modules, "importing vdm_engine.kernels imported triton"
sys.modules["triton"] = None  # as if triton were not installed
sys.modules["triton.language"] = None
from vdm_engine.kernels import patch_mask_reference, mask_patches
from vdm_engine.kernels._triton import TRITON_IMPORT_ERROR
assert TRITON_IMPORT_ERROR
x = torch.randn(1, 4, 8)
args = (x, torch.rand(1, 4), torch.zeros(8), torch.zeros(8), torch.zeros(5, 8))
assert patch_mask_reference(*args).shape == (1, 5, 8)
try:
    mask_patches(*args)
except RuntimeError as e:
    assert "triton is not installed" in str(e), e
else:
    raise AssertionError("launch without triton did not raise")
print("ok")
"""
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_INTERPRET"] = "1"  # let the launcher get as far as the (missing) kernel
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


def test_kernel_paths_compile_in_one_graph(monkeypatch, tiny_backbone, tiny_gates, pixels, counters, close):
    """Explainer.forward and the masked pass with the kernels installed trace without graph breaks
    (what torch.compile / CUDA graphs need on the GPU; aot_eager here, as CPU has no inductor-Triton)."""
    monkeypatch.setenv("VDM_KERNELS", "triton")
    explainer = Explainer(tiny_backbone, tiny_gates).eval()
    gates = torch.rand(5, 2, tiny_backbone.num_patches, device=pixels.device)
    with torch.no_grad():
        logits, log_keep = torch.compile(explainer.forward, backend="aot_eager", fullgraph=True)(pixels)
        masked = torch.compile(tiny_backbone.masked_logits, backend="aot_eager", fullgraph=True)(
            pixels, gates, tiny_gates.placeholder, mask_fn=explainer.ops.patch_mask
        )
        assert counters["gate_probe"].launches >= 1 and counters["patch_mask_fwd"].launches >= 1
        ref_logits, ref_log_keep = Explainer(tiny_backbone, tiny_gates, kernels="reference")(pixels)
        ref_masked = tiny_backbone.masked_logits(pixels, gates, tiny_gates.placeholder)
    close(log_keep, ref_log_keep, 1e-5, 1e-5, "compiled log_keep")
    close(logits, ref_logits, 1e-5, 1e-5, "compiled logits")
    close(masked, ref_masked, 1e-4, 1e-4, "compiled masked logits")


def test_moving_the_explainer_selects_the_ops_again(monkeypatch, tiny_backbone, tiny_gates):
    """.half() / .float() / .to() / .cuda() all pass through nn.Module._apply: the ops follow the dtype and device."""
    monkeypatch.delenv("VDM_KERNELS", raising=False)
    ex = Explainer(tiny_backbone, tiny_gates, kernels="triton")  # CPU allowed under the interpreter
    assert ex.ops.backend == "triton" and "float32" in ex.ops.reason
    ex.half()
    assert ex.backbone.dtype == torch.float16 and ex.ops.backend == "triton" and "float16" in ex.ops.reason
    ex.float()
    assert "float32" in ex.ops.reason
    seen = []
    monkeypatch.setattr("vdm_engine.explainer.select_ops", lambda device, dtype, mode: seen.append((device, dtype, mode)))
    ex.to(torch.bfloat16)
    assert seen == [(torch.device("cpu"), torch.bfloat16, "triton")]
    if torch.cuda.is_available():
        monkeypatch.undo()
        auto = Explainer(tiny_backbone.float(), tiny_gates, kernels="auto")
        assert auto.ops.backend == "reference"
        auto.cuda()
        assert auto.ops.backend == "triton" and "cuda" in auto.ops.reason


def test_reference_mode_is_reference_everywhere(monkeypatch, tiny_backbone, tiny_gates):
    monkeypatch.setenv("VDM_KERNELS", "reference")
    ex = Explainer(tiny_backbone, tiny_gates)
    assert ex.ops.backend == "reference" and select_ops("cuda", torch.bfloat16).backend == "reference"
    ex.half()
    assert ex.ops.backend == "reference"
