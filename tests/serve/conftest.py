"""One real Ray instance and Ray Serve proxy on 127.0.0.1 for every serve test (session-scoped).

Applications share the proxy under their own route prefixes: ``main`` at ``/`` (vit-digits,
batches of up to 8 that wait 50 ms to fill, small body and pixel limits so that 413 and the pixel
check are cheap to reach), and the overload and fault tests' own applications, deleted after them.
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


@pytest.fixture(scope="session")
def serve_port(tmp_path_factory):
    """Ray (2 CPUs, no dashboard) and the Serve HTTP proxy on a free loopback port; shut down at the end."""
    import ray
    from ray import serve

    os.environ["HF_HUB_OFFLINE"] = "1"
    env = {"HF_HUB_OFFLINE": "1", "VDM_GATES_HOME": str(tmp_path_factory.mktemp("serve_gates_home"))}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def deploy(port: int, name: str, route_prefix: str, **config) -> str:
    """Deploy a vit-digits application on the session's proxy and wait until it is ready; its URL."""
    from ray import serve

    from vdm_engine.serve import ServeConfig, build_app
    from vdm_engine.serve.runner import wait_ready

    app = build_app(ServeConfig(**config), env={"HF_HUB_OFFLINE": "1"})
    serve.run(app, name=name, route_prefix=route_prefix, blocking=False)
    url = f"http://127.0.0.1:{port}{route_prefix.rstrip('/')}"
    wait_ready(url, timeout_s=120)
    return url


@pytest.fixture(scope="session")
def server(serve_port) -> str:
    """The ``main`` application's base URL."""
    return deploy(serve_port, "main", "/", **MAIN)


@pytest.fixture(scope="session")
def reference():
    """The PyTorch explainer the server is compared against (same embedded model and gates)."""
    from vdm_engine import Explainer

    return Explainer.from_pretrained("vit-digits").eval()


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
