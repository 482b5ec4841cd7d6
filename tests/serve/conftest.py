"""One real Ray instance (``ray_session``, shared with the bulk tests) and Ray Serve proxy on
127.0.0.1 for every serve test (session-scoped).

Two vit-digits applications share the proxy, deployed together: ``main`` at ``/`` (batches of up
to 8 that wait 50 ms to fill, small body and pixel limits so that 413 and the pixel check are
cheap to reach) and ``limited`` at ``/limited`` for the overload and replica-kill tests.
Replicas ask for a quarter CPU each so that several fit on the 2-CPU instance. Without the
``serve`` extra every module here is skipped (``pytest.importorskip("ray")`` at their top).
"""

from __future__ import annotations

import io
import os
import socket
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
DIGIT6 = ROOT / "docs" / "overlay" / "digit6.png"
MAIN = dict(max_batch=8, batch_wait_ms=50.0, num_cpus=0.25, max_body_bytes=200_000, max_pixels=1_000_000,
            max_images=16)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


METRICS_PORT = _free_port()

#: The session instance runs vdm-serve's default ingress (HAProxy where ray[serve] installed it). Ray
#: Serve reads the switch when it is imported, so it is set before any test module imports it.
try:
    from vdm_engine.serve.ingress import apply_ingress, default_ingress

    INGRESS = default_ingress()
    apply_ingress(INGRESS)
except ImportError:  # no serve extra: every module here is skipped
    INGRESS = None


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory) -> str:
    """The one Ray instance of the session (2 CPUs, no dashboard, Prometheus metrics at
    ``METRICS_PORT``); its GCS address, for drivers in subprocesses to join (``--address``).
    Stopping it at the end ends Serve's actors with it (serve.shutdown() first would wait up to 30 s
    for a controller whose replica a fault test killed)."""
    import ray

    os.environ["HF_HUB_OFFLINE"] = "1"
    # Ray starts its workers at nice 15; on a machine shared with other test runs they then starve.
    os.environ.setdefault("RAY_worker_niceness", "0")
    env = {"HF_HUB_OFFLINE": "1", "VDM_GATES_HOME": str(tmp_path_factory.mktemp("serve_gates_home"))}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env},
             _metrics_export_port=METRICS_PORT)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="session")
def serve_port(ray_session):
    """The Serve HTTP proxy on a free loopback port of the session's Ray (stopped with Ray)."""
    from ray import serve

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port


#: The fault tests' application: 2 requests per replica, 4 queued, batches that wait 1 s to fill.
LIMITED = dict(max_batch=16, batch_wait_ms=1000.0, num_cpus=0.25, max_ongoing_requests=2, max_queued_requests=4)


def deploy(port: int, apps: dict[str, dict]) -> dict[str, str]:
    """Deploy vit-digits applications {route prefix: config} at once (their replicas start side by
    side) and wait until each is ready; their URLs."""
    from ray import serve

    from vdm_engine.serve import ServeConfig, build_app
    from vdm_engine.serve.runner import wait_ready

    targets, urls = [], {}
    for prefix, config in apps.items():
        app = build_app(ServeConfig(**config), env={})  # the job's runtime_env (ray.init) already has them
        targets.append(serve.RunTarget(target=app, name=prefix.strip("/") or "main", route_prefix=prefix))
        urls[prefix] = f"http://127.0.0.1:{port}{prefix.rstrip('/')}"
    serve.run_many(targets)  # a developer API of Ray Serve: one call, replicas started together
    for url in urls.values():
        wait_ready(url, timeout_s=180)
    return urls


@pytest.fixture(scope="session")
def metrics_port(serve_port) -> int:
    """Where the tests' Ray instance serves its Prometheus metrics (``/metrics``)."""
    return METRICS_PORT


@pytest.fixture(scope="session")
def _apps(serve_port) -> dict[str, str]:
    from vdm_engine.models import embedded_levels_dir

    levels = {**MAIN, "gates": str(embedded_levels_dir("vit-digits"))}  # K-level gates: patch_rank in every record
    return deploy(serve_port, {"/": MAIN, "/limited": LIMITED, "/levels": levels})


@pytest.fixture(scope="session")
def server(_apps) -> str:
    """The ``main`` application's base URL."""
    return _apps["/"]


@pytest.fixture(scope="session")
def limited(_apps) -> str:
    """The fault tests' application (``LIMITED``)."""
    return _apps["/limited"]


@pytest.fixture(scope="session")
def levels_server(_apps) -> str:
    """``main`` with vit-digits' K-level gates (gates-levels)."""
    return _apps["/levels"]


@pytest.fixture(scope="session")
def digits_model():
    """What one replica of ``main`` holds, loaded in this process (no Ray)."""
    from vdm_engine.serve import ServeConfig
    from vdm_engine.serve.backend import ServingModel

    return ServingModel(ServeConfig(model="vit-digits"))


@pytest.fixture(scope="session")
def reference(digits_model):
    """The PyTorch explainer the server is compared against: ``Explainer.from_pretrained("vit-digits")``."""
    return digits_model.impl


@pytest.fixture(scope="session")
def digit_pngs() -> list[tuple[bytes, np.ndarray]]:
    """Twelve different test digits as (PNG bytes, (32, 32, 3) uint8 pixels)."""
    from PIL import Image

    from vdm_engine.data import digits_split

    images, _ = digits_split("test")
    out = []
    for a in images[:12]:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        out.append((buf.getvalue(), a))
    return out


@pytest.fixture(scope="session")
def explain_one_by_one(reference):
    """``Explainer.explain`` on images one at a time (the batching invariance the server must keep)."""
    return lambda images: [reference.explain(reference.preprocess([im])) for im in images]


def pytest_collection_modifyitems(items):
    """Ray's own pydantic deprecation warnings are not ours to fix."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*"))
