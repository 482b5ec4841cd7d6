"""Start, run and stop ``vdm-serve``: a local Ray instance (or an existing cluster), the HTTP proxy,
the application."""

from __future__ import annotations

import time
import urllib.request

from .config import ServeConfig

__all__ = ["start", "stop", "serve_forever", "wait_ready", "APP_NAME"]

APP_NAME = "vdm"


def start(config: ServeConfig, *, host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
          name: str = APP_NAME, route_prefix: str = "/", num_cpus: int | None = None) -> str:
    """Deploy ``config`` and return its base URL once Ray Serve reports it running.

    Args:
        address: an existing Ray cluster (``ray://...``, ``auto`` or ``HOST:PORT``); None starts a
            local Ray instance in this process (``num_cpus``: its CPU count, default all).
        name, route_prefix: the Ray Serve application (several may share one proxy).
    """
    import ray
    from ray import serve

    from .app import build_app

    if not ray.is_initialized():
        kwargs = {"include_dashboard": False, "log_to_driver": False}
        if address is None and num_cpus is not None:
            kwargs["num_cpus"] = num_cpus
        # "local": always a new instance of our own, never one another process started on this machine
        ray.init(address=address or "local", **kwargs)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(config), name=name, route_prefix=route_prefix, blocking=False)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{shown}:{port}{route_prefix.rstrip('/')}"


def wait_ready(url: str, timeout_s: float = 120.0) -> None:
    """Poll ``{url}/readyz`` until it answers 200; ``TimeoutError`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=5) as r:
                if r.status == 200:
                    return
        except Exception as e:  # not up yet
            last = e
        time.sleep(0.2)
    raise TimeoutError(f"{url}/readyz not ready after {timeout_s:.0f} s ({last})")


def stop(*, shutdown_ray: bool = True) -> None:
    """Remove every application, the proxy and the controller; then leave Ray (stopping a local instance)."""
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        if shutdown_ray and ray.is_initialized():
            ray.shutdown()


def serve_forever(config: ServeConfig, *, host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
                  on_ready=None) -> None:
    """``start``, wait until ready, call ``on_ready(url)``, then block until Ctrl-C or SIGTERM; always ``stop``."""
    try:
        url = start(config, host=host, port=port, address=address)
        wait_ready(url)
        if on_ready is not None:
            on_ready(url)
        while True:
            time.sleep(1.0)
    finally:
        stop(shutdown_ray=True)
