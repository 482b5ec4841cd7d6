"""Shared fixtures: seeded RNG, tiny random ViTs saved locally, a verbose allclose."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

# Without a GPU the Triton kernels run under the CPU interpreter. Triton reads this when a kernel is
# decorated (module import), so it must be set before anything imports vdm_engine.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from vdm_engine import Explainer, GateConfig, Gates  # noqa: E402
from vdm_engine.backbone import random_backbone  # noqa: E402

# Tests never touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)
    yield


@pytest.fixture(autouse=True)
def _isolated_registry(tmp_path_factory, monkeypatch):
    """Each test gets its own empty gates registry."""
    monkeypatch.setenv("VDM_GATES_HOME", str(tmp_path_factory.mktemp("gates_registry")))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, what: str = "tensor"):
    """allclose that says how many elements differ, where the worst one is, and whether NaNs appeared."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    a, e = actual.detach().float().cpu(), expected.detach().float().cpu()
    nan_a, nan_e = torch.isnan(a).sum().item(), torch.isnan(e).sum().item()
    diff = (a - e).abs()
    bad = ~(diff <= atol + rtol * e.abs())
    if bad.any() or nan_a != nan_e:
        worst = int(torch.nan_to_num(diff, nan=float("inf")).argmax())
        idx = np.unravel_index(worst, tuple(a.shape)) if a.dim() else ()
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{a.numel()} elements out of tolerance (atol={atol}, rtol={rtol}); "
            f"worst at {tuple(int(i) for i in idx)}: {a.flatten()[worst].item()} vs {e.flatten()[worst].item()} "
            f"(|diff| {diff.flatten()[worst].item():.3e}); NaNs actual={nan_a} expected={nan_e}"
        )


@pytest.fixture(scope="module", autouse=True)
def _start_first(request):
    """The fixtures a module names in ``START_FIRST`` (slow background processes) start with its first
    test when a selected test there uses them, and run on the second core beside the others."""
    for name in getattr(request.module, "START_FIRST", ()):
        if any(name in item.fixturenames for item in request.session.items if item.module is request.module):
            request.getfixturevalue(name)


class BackgroundRun:
    """A slow subprocess started at once (name its fixture in ``START_FIRST``); ``wait()`` -> the
    finished process (stdout and stderr read), ``stop()`` kills it (fixture teardown)."""

    def __init__(self, cmd, *, env=None, timeout_s: float = 300.0):
        self.timeout_s = timeout_s
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def wait(self) -> subprocess.CompletedProcess:
        out, err = self.proc.communicate(timeout=self.timeout_s)
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, out, err)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.communicate()


@pytest.fixture
def close():
    return assert_close


@pytest.fixture
def tiny_backbone():
    """Random ViT: 32x32 input, 8x8 patches (4x4 grid, T=17), D=36, 2 layers, 10 classes."""
    return random_backbone("vit-tiny", seed=0)


def make_tiny_gates(backbone) -> Gates:
    """Gates for the tiny ViT with a random placeholder and spread offsets (own RNG, seed 1)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        g = Gates(GateConfig(backbone.hidden_size, backbone.num_hidden_states))
        with torch.no_grad():
            g.placeholder.normal_()
            g.add.copy_(torch.linspace(-1.0, 2.0, g.add.numel()))
    return g.eval()


def make_tiny_levels(backbone, k: int) -> list[Gates]:
    """K ``make_tiny_gates``, each level's offsets 1.5 lower (sparser) than the one before."""
    levels = []
    for i in range(k):
        g = make_tiny_gates(backbone)
        with torch.no_grad():
            g.add.add_(-1.5 * i)
        levels.append(g)
    return levels


@pytest.fixture
def tiny_gates(tiny_backbone):
    return make_tiny_gates(tiny_backbone)


@pytest.fixture(scope="session")
def shared_tiny_explainer():
    """One tiny explainer (same weights as ``tiny_explainer``) for module- and session-scoped work
    such as ONNX exports; tests must not modify it."""
    backbone = random_backbone("vit-tiny", seed=0)
    return Explainer(backbone, make_tiny_gates(backbone)).eval()


#: Every output of the ONNX graph (``vdm_engine.export.OUTPUTS``): two encoder passes.
ALL_OUTPUTS = ("logits", "patch_mask", "layer_masks", "masked_logits", "kl")


def _needs_onnx_export():
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")


@pytest.fixture(scope="session")
def full_export(shared_tiny_explainer, tmp_path_factory):
    """``shared_tiny_explainer`` exported once per session: fp32, dynamic batch, every output,
    validated (an ``ExportResult``). Shared by the export, runtime and serve tests; read it, never
    write beside it."""
    _needs_onnx_export()
    from vdm_engine.export import export_onnx

    path = tmp_path_factory.mktemp("full") / "full.onnx"
    return export_onnx(shared_tiny_explainer, path, outputs=ALL_OUTPUTS)


@contextlib.contextmanager
def _cwd(path: Path):
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


#: Where ``digits_onnx`` runs the README's default export, relative to its working directory.
DIGITS_ONNX = "scratch/vit-digits.onnx"


@pytest.fixture(scope="session")
def digits_onnx(tmp_path_factory) -> Path:
    """``vdm-export --out scratch/vit-digits.onnx`` (the README's command: the embedded vit-digits and
    its shipped gates, every default, validated) run once per session through the CLI's ``main`` in a
    temporary working directory with an empty gates registry; the graph's absolute path.

    Tests that need that graph (runtime, images, README, Triton server) share it instead of each
    exporting vit-digits again; they copy it before writing anything beside it.
    """
    _needs_onnx_export()
    from vdm_engine.cli.export import main
    from vdm_engine.registry import embedded_model_dir

    if embedded_model_dir("vit-digits") is None:
        pytest.skip("the embedded vit-digits model is not built")
    work = tmp_path_factory.mktemp("digits_onnx")
    with pytest.MonkeyPatch.context() as mp, _cwd(work):
        mp.setenv("VDM_GATES_HOME", str(work / "gates_home"))
        mp.setenv("HF_HUB_OFFLINE", "1")
        code = main(["--out", DIGITS_ONNX])
    assert code == 0, "vdm-export --out scratch/vit-digits.onnx failed (see the captured output)"
    return work / DIGITS_ONNX


@pytest.fixture
def one_thread():
    """Tiny models run far faster on one thread than two on a shared CPU (no spin-waiting)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def model_and_gates(tmp_path, tiny_model_dir, tiny_gates, tiny_backbone):
    """(model dir, gates dir) of the tiny ViT, both written with save_pretrained."""
    gates_dir = tmp_path / "gates"
    tiny_gates.save_pretrained(gates_dir, backbone=tiny_backbone)
    return str(tiny_model_dir), str(gates_dir)


@pytest.fixture
def tiny_explainer(tiny_backbone, tiny_gates):
    return Explainer(tiny_backbone, tiny_gates).eval()


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_backbone):
    """A local ``save_pretrained`` directory of the tiny ViT (model + preprocessor config)."""
    d = tmp_path / "tiny-vit"
    tiny_backbone.save_pretrained(d)
    return d


@pytest.fixture
def pixels():
    """(5, 3, 32, 32) random normalised pixels for the tiny ViT (prime batch)."""
    return torch.randn(5, 3, 32, 32)
