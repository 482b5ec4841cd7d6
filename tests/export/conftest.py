"""Exports shared by the export tests: each tiny graph is exported once per session.

``full_export`` (every output) lives in tests/conftest.py: the runtime and serve tests use it too.
"""

from __future__ import annotations

import pytest

from vdm_engine import Explainer
from vdm_engine.ops import Ops, reference_ops

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

MASK_ONLY_OUTPUTS = ("logits", "patch_mask")


@pytest.fixture(scope="session")
def export_explainer(shared_tiny_explainer) -> Explainer:
    return shared_tiny_explainer


def _raising(*args, **kwargs):
    raise AssertionError("a fast path was called while exporting")


@pytest.fixture(scope="session")
def mask_only_export(export_explainer, tmp_path_factory):
    """logits and patch_mask only, weights as external data, and fast-path hooks that must not be traced."""
    from vdm_engine.export import export_onnx

    ex = export_explainer
    ex.ops = Ops(_raising, _raising, "poisoned", "the export must use reference_ops()")
    try:
        path = tmp_path_factory.mktemp("mask_only") / "mask.onnx"
        result = export_onnx(ex, path, outputs=MASK_ONLY_OUTPUTS, external_data=True)
    finally:
        ex.ops = reference_ops()
    return result


#: Models of the session's Triton repository (vit-digits): the python-backend explainer, the
#: ensemble's two models, and the same graph for the onnxruntime backend (loaded by its test only).
TRITON_MODEL = "vit-digits"
TRITON_ORT_MODEL = "vit-digits_onnxruntime"


@pytest.fixture(scope="session")
def tritonserver_dist():
    """The unpacked nvidia-pytriton wheel with this Python's backend stub and stub environment
    (fetched with pip on the first run, cached after); skipped, with the reason, when they cannot be had."""
    from vdm_engine.export.tritonserver import TritonServerUnavailable, fetch_tritonserver

    try:
        dist = fetch_tritonserver()
        dist.backend_directory()
        dist.stub_environment()
    except TritonServerUnavailable as e:
        pytest.skip(f"no tritonserver here: {e}")
    return dist


@pytest.fixture(scope="session")
def triton_server(tmp_path_factory, tritonserver_dist, digits_onnx):
    """A real tritonserver (from the nvidia-pytriton wheel, cached across runs) on free loopback ports,
    serving the session's vit-digits graph (``digits_onnx``: ``vdm-export`` with its defaults) with
    the python backend and the ensemble; one per session, stopped by its pid at the end (and with the
    session's process if that is killed). ``vdm-export --triton-repo`` itself is tested in
    test_export_cli.py.

    Skipped, with the reason, only when the wheel cannot be fetched.
    """
    pytest.importorskip("tritonclient.http", reason="tritonclient[http] is not installed")
    pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed")
    from vdm_engine.export import write_triton_repo
    from vdm_engine.export.triton_repo import ensemble_model_names
    from vdm_engine.export.tritonserver import TritonServer

    work = tmp_path_factory.mktemp("triton")
    repo = work / "repo"
    # 20 ms of queue delay: concurrent test requests reliably meet in one batch.
    write_triton_repo(digits_onnx, repo, name=TRITON_MODEL, backend="python", ensemble=True,
                      max_queue_delay_us=20_000, max_batch_size=16)
    write_triton_repo(digits_onnx, repo, name=TRITON_ORT_MODEL, instance_kind="KIND_CPU")
    models = [TRITON_MODEL, *ensemble_model_names(TRITON_MODEL)]
    server = TritonServer(repo, models=models, dist=tritonserver_dist, log_path=work / "server.log")
    server.start(timeout_s=300)
    try:
        yield server
    finally:
        server.stop()
