"""Benchmark options and session fixtures: one model, batch, device and dtype for every case.

Options:
    --vdm-model   ``vit-small`` (default: a random-weight ViT small enough for a CPU run under five
                  minutes), ``vit-tiny``, ``vit-b16``/``vit-l16`` (those architectures with random
                  weights), an embedded model (``vit-digits``, ``vit-toy``) or a local
                  ``save_pretrained`` directory.
    --vdm-batch   images per call (default 8).
    --vdm-device  ``cpu`` or ``cuda``.
    --vdm-dtype   ``fp32``, ``fp16`` or ``bf16`` (backbone weights and pixels; gates stay fp32).
    --vdm-threads CPU threads for torch and onnxruntime (default: their defaults, all cores).
    --vdm-budget  seconds of timed rounds per case (default 3).
    --vdm-labels  class names for a CLIP checkpoint's zero-shot head (default: 10 generic names).

Every case calls the ``measure`` fixture, which times a function with ``benchmark.pedantic`` (a
chosen number of rounds after one warm-up call, CUDA synchronised inside the timed function) and
records ``case``, images/s, device name, dtype, batch, threads and, on CUDA, peak memory in
``benchmark.extra_info``. Under plain ``pytest`` (benchmarks disabled by the top-level conftest)
it runs the function once.
"""

from __future__ import annotations

import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Random-weight architectures beyond vdm_engine.backbone.SHAPES. ``vit-small`` keeps the ViT-B/16
# block structure (pre-norm, 4x MLP, 64-wide heads) at 1/4 width, half depth and a 7x7 grid, so
# the ratios mean something while a CPU run stays short.
BENCH_SHAPES = {
    "vit-small": dict(hidden_size=192, num_hidden_layers=6, num_attention_heads=3, intermediate_size=768,
                      image_size=112, patch_size=16, num_labels=100),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# (atol, rtol) for comparing two ways of computing the same outputs in a dtype.
ONNX_DTYPES = ("fp32", "fp16")
TOLERANCES = {"fp32": (1e-4, 1e-4), "fp16": (3e-2, 3e-2), "bf16": (6e-2, 6e-2)}
MAX_ROUNDS = 100
SLOW_CASE_S = 60.0  # a case whose calls are this slow gets a single timed round


def pytest_addoption(parser):
    group = parser.getgroup("vdm-engine benchmarks")
    group.addoption("--vdm-model", default="vit-small",
                    help="vit-small (default), vit-tiny, vit-b16, vit-l16 (random weights), an embedded "
                         "model (vit-digits, vit-toy) or a local save_pretrained directory")
    group.addoption("--vdm-batch", type=int, default=8, help="images per call (default 8)")
    group.addoption("--vdm-device", default="cpu", choices=("cpu", "cuda"), help="cpu (default) or cuda")
    group.addoption("--vdm-dtype", default="fp32", choices=tuple(DTYPES), help="fp32 (default), fp16 or bf16")
    group.addoption("--vdm-threads", type=int, default=None,
                    help="CPU threads for torch and onnxruntime (default: their own defaults)")
    group.addoption("--vdm-budget", type=float, default=3.0, help="seconds of timed rounds per case (default 3)")
    group.addoption("--vdm-labels", default=None,
                    help="CLIP checkpoints: comma-separated zero-shot class names (default: class 0 .. class 9)")


@dataclass(frozen=True)
class BenchConfig:
    """What every case runs on."""

    model: str
    batch: int
    device: str
    dtype_name: str
    budget_s: float
    threads: int | None = None
    labels: str | None = None

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.dtype_name]

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    @property
    def device_name(self) -> str:
        if self.cuda:
            return torch.cuda.get_device_name()
        return cpu_model_name()

    @property
    def tolerance(self) -> tuple[float, float]:
        """(atol, rtol) for checking one computation against another in this dtype."""
        return TOLERANCES[self.dtype_name]

    def info(self) -> dict:
        return {
            "model": self.model,
            "batch": self.batch,
            "device": self.device,
            "device_name": self.device_name,
            "dtype": self.dtype_name,
            "threads": torch.get_num_threads(),
        }


def cpu_model_name() -> str:
    """The CPU's model name as ``lscpu``/``/proc/cpuinfo`` report it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _config_from(config) -> BenchConfig:
    opt = config.getoption
    return BenchConfig(opt("--vdm-model"), opt("--vdm-batch"), opt("--vdm-device"), opt("--vdm-dtype"),
                       opt("--vdm-budget"), opt("--vdm-threads"), opt("--vdm-labels"))


def pytest_configure(config):
    """Reject bad options at start-up, in one line."""
    cfg = _config_from(config)
    if cfg.batch < 1:
        raise pytest.UsageError(f"--vdm-batch must be >= 1, got {cfg.batch}")
    if cfg.budget_s <= 0:
        raise pytest.UsageError(f"--vdm-budget must be > 0 seconds, got {cfg.budget_s}")
    if cfg.threads is not None and cfg.threads < 1:
        raise pytest.UsageError(f"--vdm-threads must be >= 1, got {cfg.threads}")
    if cfg.cuda and not torch.cuda.is_available():
        raise pytest.UsageError("--vdm-device cuda was given but torch sees no CUDA device; use --vdm-device cpu")


@pytest.fixture(scope="session")
def bench_config(pytestconfig) -> BenchConfig:
    cfg = _config_from(pytestconfig)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    return cfg


def _random_shapes() -> set[str]:
    from vdm_engine.backbone import SHAPES

    return set(SHAPES)


def build_backbone(model: str, labels: str | None = None):
    """A backbone for ``--vdm-model``: a random-weight shape, or a checkpoint of any supported family
    loaded offline (CLIP with ``labels``, comma-separated, or ten generic class names)."""
    from transformers import AutoConfig

    from vdm_engine.backbone import SHAPES, load_backbone, random_backbone, resolve_model_source

    if model in BENCH_SHAPES:
        return random_backbone(BENCH_SHAPES[model], seed=0)
    if model in SHAPES:
        return random_backbone(model, seed=0)
    kw = {}
    if AutoConfig.from_pretrained(resolve_model_source(model), local_files_only=True).model_type == "clip":
        kw["labels"] = labels.split(",") if labels else [f"class {i}" for i in range(10)]
    return load_backbone(model, local_files_only=True, **kw)


def random_gates(backbone, seed: int = 1):
    """Untrained gates with a learnt-looking placeholder and per-depth offsets (fine for timing)."""
    from vdm_engine import GateConfig, Gates

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gates = Gates(GateConfig(backbone.hidden_size, backbone.num_hidden_states))
        with torch.no_grad():
            gates.placeholder.normal_()
            gates.add.copy_(torch.linspace(-1.0, 3.0, gates.add.numel()))
    return gates.eval()


@pytest.fixture(scope="session")
def bench_backbone(bench_config):
    """The backbone every case times, on the chosen device and dtype (built once per session)."""
    return build_backbone(bench_config.model, bench_config.labels).to(device=bench_config.device, dtype=bench_config.dtype)


@pytest.fixture(scope="session")
def bench_explainer(bench_config, bench_backbone):
    """The engine on ``bench_backbone`` with random gates (fp32, on the device).

    Cases choose their kernels explicitly with ``use_kernels``; the session default is the
    references.
    """
    from vdm_engine import Explainer

    explainer = Explainer(bench_backbone, random_gates(bench_backbone).to(bench_config.device)).eval()
    use_kernels(explainer, "reference")
    return explainer


def use_kernels(explainer, mode: str) -> None:
    """Set the probe and masking functions: ``reference`` (plain PyTorch) or ``triton``.

    ``reference`` has ``VDM_KERNELS=reference`` semantics, set explicitly so that whatever the
    environment says, the case times what its name claims.
    """
    if mode not in ("reference", "triton"):
        raise ValueError(f"kernel mode must be 'reference' or 'triton', got {mode!r}")
    if explainer.set_kernels(mode).backend != mode:
        raise RuntimeError(f"select_ops(mode={mode!r}) chose {explainer.ops.backend}: {explainer.ops.reason}")


@pytest.fixture
def kernels(bench_explainer):
    """``kernels(mode)`` switches the session explainer's kernels; the references are restored after the case."""
    yield lambda mode: use_kernels(bench_explainer, mode)
    use_kernels(bench_explainer, "reference")


@pytest.fixture(scope="session")
def bench_pixels(bench_config, bench_backbone):
    """(B, 3, H, W) seeded random pixels in the model's dtype, on the device."""
    h, w = bench_backbone.image_size
    g = torch.Generator().manual_seed(1234)
    pv = torch.randn(bench_config.batch, bench_backbone.config.num_channels, h, w, generator=g)
    return pv.to(device=bench_config.device, dtype=bench_config.dtype)


@pytest.fixture(scope="session")
def onnx_dir(tmp_path_factory) -> Path:
    """One directory for the session's ONNX exports (each export is built once)."""
    return tmp_path_factory.mktemp("bench_onnx")


def _onnx_export(bench_config, bench_explainer, path: Path, outputs: tuple[str, ...]) -> Path:
    """Export the session explainer once with ``vdm_engine.export.export_onnx`` (skip without onnxruntime)."""
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    pytest.importorskip("onnxscript", reason="ONNX export needs onnxscript")
    if bench_config.cuda and "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDAExecutionProvider here; install onnxruntime-gpu to time ONNX on CUDA")
    from vdm_engine import export

    if bench_config.dtype_name not in ONNX_DTYPES:
        pytest.skip(f"ONNX export supports {sorted(ONNX_DTYPES)} compute, not {bench_config.dtype_name}")
    if not path.is_file():
        # The benchmark checks its own outputs against PyTorch; the export's validation is the
        # export tests' job, so it is skipped here to keep plain pytest fast.
        random_weights = bench_config.model in BENCH_SHAPES or bench_config.model in _random_shapes()
        export.export_onnx(bench_explainer, path, outputs=outputs, dtype=bench_config.dtype_name, validate=False,
                           random_weights=random_weights, untrained_gates=True)
    return path


def passive_wait() -> bool:
    """True when ``OMP_WAIT_POLICY=PASSIVE``: idle worker threads sleep instead of spinning.

    Set it in the environment (before Python starts) on a machine shared with other work: spinning
    threads of both runtimes then stop competing with the other processes for the cores. The same
    setting applies to onnxruntime's intra-op pool (``session.intra_op.allow_spinning``).
    """
    return os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"


def _session_options(bench_config):
    from vdm_engine.runtime import default_session_options

    return default_session_options(bench_config.threads)  # spinning off under OMP_WAIT_POLICY=PASSIVE


@pytest.fixture(scope="session")
def plain_onnx_session(bench_config, bench_explainer, onnx_dir):
    """(onnxruntime session, input name) of a plain ViT export: pixel_values -> logits only."""
    path = _onnx_export(bench_config, bench_explainer, onnx_dir / "plain.onnx", ("logits",))
    from vdm_engine.runtime import create_session

    session = create_session(path, bench_config.device, _session_options(bench_config))
    return session, session.get_inputs()[0].name


@pytest.fixture(scope="session")
def onnx_explainer(bench_config, bench_explainer, onnx_dir):
    """``vdm_engine.runtime.OnnxExplainer`` on the fused graph: logits, patch_mask, layer_masks, as ``explain``."""
    path = _onnx_export(bench_config, bench_explainer, onnx_dir / "explainer.onnx",
                        ("logits", "patch_mask", "layer_masks"))
    from vdm_engine.runtime import OnnxExplainer

    return OnnxExplainer(path, bench_config.device, session_options=_session_options(bench_config))


def pytest_benchmark_update_machine_info(config, machine_info):
    """Add what the results file must name: CPU model and cores, library versions, threads, load, date."""
    import datetime

    import transformers

    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = None
    machine_info["vdm"] = {
        "cpu_model": cpu_model_name(),
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnxruntime": ort_version,
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "ort_spinning": not passive_wait(),
        "loadavg_end": list(os.getloadavg()),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _rounds(seconds_per_call: float, budget_s: float, min_rounds: int = 1) -> int:
    """Timed rounds for a call of this duration: about ``budget_s`` in all, 3..MAX_ROUNDS, fewer
    (down to ``min_rounds``) for calls so slow that 3 rounds would pass ``SLOW_CASE_S``."""
    t = max(seconds_per_call, 1e-6)
    rounds = min(MAX_ROUNDS, max(3, math.ceil(budget_s / t)))
    cap = max(3 * budget_s, SLOW_CASE_S)
    if t * rounds > cap:
        rounds = int(cap // t)
    return max(rounds, min_rounds, 1)


def _family(request) -> str | None:
    """The ``model_type`` of the session backbone, once a case has built it (the report groups by it)."""
    if "bench_backbone" not in request.fixturenames:  # kernel micro-benchmarks on shapes
        return None
    return request.getfixturevalue("bench_backbone").model_type


@pytest.fixture
def measure(benchmark, bench_config, request) -> Callable:
    """``measure(case, fn, *args) -> fn's result``: time ``fn(*args)`` on one batch and record extra_info.

    ``case`` is the key the report reads (``plain/torch``, ``explain/torch-reference``, ...).
    """
    cfg = bench_config

    def run(case: str, fn: Callable, *args, warmup: tuple | None = None, budget_s: float | None = None,
            min_rounds: int = 1, batch: int | None = None, percentiles: bool = False, memory: bool = False):
        """Time ``fn(*args)``.

        ``warmup``: args whose first item is a smaller batch, to warm up cheaply; ``budget_s``
        overrides ``--vdm-budget`` for this case; ``min_rounds`` holds even for very slow calls.
        ``batch``: images per call when not ``--vdm-batch``. ``percentiles``: record p50/p90/p99
        milliseconds per call. ``memory``: record the peak bytes one call allocates
        (``peak_call_bytes``: CUDA allocator, or the PyTorch profiler's memory events on the CPU).
        """

        def timed(*call_args):
            out = fn(*(call_args or args))
            if cfg.cuda:
                torch.cuda.synchronize()
            return out

        images = cfg.batch if batch is None else batch
        benchmark.extra_info.update(case=case, **dict(cfg.info(), batch=images))
        family = _family(request)
        if family:
            benchmark.extra_info["family"] = family
        if not benchmark.enabled:
            return benchmark.pedantic(timed)  # plain pytest: one untimed call
        if cfg.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        if warmup is None:
            timed()  # warm-up, also sizes the number of rounds
            estimate = time.perf_counter() - start
        else:
            timed(*warmup)
            estimate = (time.perf_counter() - start) * images / max(1, len(warmup[0]))
        rounds = _rounds(estimate, budget_s or cfg.budget_s, min_rounds)
        result = benchmark.pedantic(timed, rounds=rounds, iterations=1)
        median = benchmark.stats.stats.median
        benchmark.extra_info["images_per_s"] = images / median if median > 0 else float("inf")
        benchmark.extra_info["rounds"] = rounds
        benchmark.extra_info["loadavg_1m"] = os.getloadavg()[0]  # how busy the (shared) machine was
        if cfg.cuda:
            benchmark.extra_info["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated())
        if percentiles:
            import numpy as np

            ms = 1e3 * np.asarray(benchmark.stats.stats.data)
            benchmark.extra_info.update({f"p{q}_ms": float(np.percentile(ms, q)) for q in (50, 90, 99)})
        if memory:
            from benchmarks.memory import peak_call_bytes

            benchmark.extra_info["peak_call_bytes"] = peak_call_bytes(fn, *args, cuda=cfg.cuda)
        return result

    return run
