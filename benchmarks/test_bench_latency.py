"""Latency per call: plain and explain side by side at batch 1, 8 and 64, per runtime.

Runtimes: PyTorch eager (the Triton kernels on CUDA, the references on the CPU), PyTorch compiled
(``Explainer.compile``: CUDA graphs per batch bucket; CUDA only), onnxruntime fp32 and onnxruntime
int8 (dynamic quantization of the same two graphs; CPU only). Each case records p50/p90/p99
milliseconds per call and, for PyTorch, the peak bytes one call allocates (``peak_call_bytes``)
in ``extra_info``; ``python -m benchmarks.report`` prints them as one table.
"""

from __future__ import annotations

import pytest
import torch

BATCHES = (1, 8, 64)
RUNTIMES = ("torch-eager", "torch-compiled", "onnxruntime-fp32", "onnxruntime-int8")


@pytest.fixture(scope="module")
def latency_pixels(bench_config, bench_backbone):
    """{batch: (B, 3, H, W) seeded pixels in the model's dtype on the device}."""
    h, w = bench_backbone.image_size
    g = torch.Generator().manual_seed(4321)
    return {b: torch.randn(b, 3, h, w, generator=g).to(bench_config.device, bench_config.dtype) for b in BATCHES}


@pytest.fixture(scope="module")
def int8_graphs(bench_config, plain_onnx_session, onnx_explainer, onnx_dir):
    """(plain session, input name, OnnxExplainer) on int8 copies of the two session graphs (CPU only)."""
    if bench_config.cuda:
        pytest.skip("int8 onnxruntime graphs are a CPU runtime")
    if bench_config.dtype_name != "fp32":
        pytest.skip("int8 graphs are quantized from the fp32 graphs")
    from vdm_engine.export.quantize import quantize_onnx
    from vdm_engine.runtime import OnnxExplainer, create_session

    from benchmarks.conftest import _session_options

    paths = {}
    for name in ("plain", "explainer"):
        paths[name] = onnx_dir / f"{name}-int8.onnx"
        if not paths[name].is_file():
            quantize_onnx(onnx_dir / f"{name}.onnx", paths[name])
    session = create_session(paths["plain"], "cpu", _session_options(bench_config))
    explainer = OnnxExplainer(paths["explainer"], "cpu", session_options=_session_options(bench_config))
    return session, session.get_inputs()[0].name, explainer


@pytest.fixture(scope="module")
def compiled_explainer(bench_config, bench_explainer):
    if not bench_config.cuda:
        pytest.skip("compiled latency (CUDA graphs) is measured on CUDA; torch.compile on the CPU is not the target")
    compile_fn = getattr(bench_explainer, "compile", None)
    if compile_fn is None:
        pytest.skip("Explainer.compile is not available in this build")
    return compile_fn(batch_sizes=BATCHES)


def _variants(runtime, request, cfg, explainer, pixels):
    """(plain fn, explain fn, plain args, explain args) for one runtime."""
    if runtime == "torch-eager":
        from benchmarks.conftest import use_kernels

        use_kernels(explainer, "triton" if cfg.cuda else "reference")
        backbone = explainer.backbone

        def plain(pv):
            with torch.no_grad():
                return backbone.hf_forward(pv)

        return plain, explainer.explain, (pixels,), (pixels,)
    if runtime == "torch-compiled":
        compiled = request.getfixturevalue("compiled_explainer")
        return compiled.predict, compiled.explain, (pixels,), (pixels,)
    if runtime == "onnxruntime-fp32":
        sess, name = request.getfixturevalue("plain_onnx_session")
        onnx_explainer = request.getfixturevalue("onnx_explainer")
    else:
        sess, name, onnx_explainer = request.getfixturevalue("int8_graphs")
    feed = {name: pixels.detach().float().cpu().numpy()}
    return (lambda f: sess.run(["logits"], f)), onnx_explainer.explain, (feed,), (pixels.float(),)


@pytest.mark.benchmark(group="latency")
@pytest.mark.parametrize("mode", ["plain", "explain"])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_latency(runtime, batch, mode, request, benchmark, measure, kernels, bench_config, bench_explainer,
                 latency_pixels):
    if not benchmark.enabled and batch == max(BATCHES):
        pytest.skip("the largest batch runs only when timed (--benchmark-only), to keep the test command short")
    pixels = latency_pixels[batch]
    plain, explain, plain_args, explain_args = _variants(runtime, request, bench_config, bench_explainer, pixels)
    fn, args = (plain, plain_args) if mode == "plain" else (explain, explain_args)
    out = measure(f"latency/{mode}/{runtime}/b{batch}", fn, *args, batch=batch, percentiles=True,
                  memory=runtime.startswith("torch"))
    logits = out.logits if mode == "explain" else (out[0] if isinstance(out, list) else out)
    assert tuple(logits.shape) == (batch, bench_explainer.backbone.num_labels)
    if mode == "explain":
        assert out.patch_mask.shape == (batch, bench_explainer.backbone.num_patches)
        assert torch.isfinite(torch.as_tensor(out.patch_mask)).all()
