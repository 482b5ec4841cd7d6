"""Start, run and stop ``vdm-serve``: a local Ray instance (or an existing cluster), the HTTP proxy,
the application."""

from __future__ import annotations

import time
import urllib.request

from .config import ServeConfig
from .raycluster import init_ray

__all__ = ["start", "stop", "serve_forever", "wait_ready", "APP_NAME"]

APP_NAME = "vdm"


def start(config: ServeConfig, *, host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
          name: str = APP_NAME, route_prefix: str = "/", num_cpus: int | None = None,
          metrics_port: int | None = None, ingress: str | None = None) -> str:
    """Deploy ``config`` and return its base URL once Ray Serve reports it running.

    Args:
        address: an existing Ray cluster (``ray://...``, ``auto`` or ``HOST:PORT``): the application
            joins it, and its proxy if Serve already runs there (then ``host``/``port`` are the
            cluster's). None starts a local Ray instance in this process (``num_cpus``: its CPU count,
            default all; ``metrics_port``: where its Prometheus metrics are served).
        name, route_prefix: the Ray Serve application (several may share one proxy).
        ingress: ``haproxy`` or ``proxy`` for a local instance started here (``ingress.py``; None:
            ``default_ingress()``); an existing cluster or Ray instance keeps its own.
    """
    import ray

    if not ray.is_initialized() and address is None:
        from .ingress import apply_ingress, default_ingress

        apply_ingress(ingress or default_ingress())  # before Ray Serve is imported and Ray starts
    from ray import serve

    from .app import build_app

    if not ray.is_initialized():
        kwargs = {"include_dashboard": False, "log_to_driver": False}
        if address is None:
            if num_cpus is not None:
                kwargs["num_cpus"] = num_cpus
            if metrics_port is not None:
                kwargs["_metrics_export_port"] = metrics_port
        init_ray(address, **kwargs)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(config), name=name, route_prefix=route_prefix, blocking=False)
    host, port = _proxy_address(host, port)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{shown}:{port}{route_prefix.rstrip('/')}"


def _proxy_address(host: str, port: int) -> tuple[str, int]:
    """The HTTP proxy's (host, port): the running Serve instance's own, which differ from the ones
    asked for when Serve already ran on the cluster (Ray Serve keeps its first HTTP options)."""
    try:  # the controller's options: no public accessor in Ray Serve 2.60
        from ray.serve.context import _get_global_client

        opts = _get_global_client().http_config
        return opts.host or host, int(opts.port)
    except Exception:
        return host, port


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


def stop(*, shutdown_ray: bool = True, name: str | None = None) -> None:
    """Leave Ray Serve, then Ray (stopping a local instance).

    ``name`` None removes every application, the proxy and the controller (a local instance of our
    own); a name removes that application only, leaving a shared cluster's Serve to its other users.
    """
    import ray
    from ray import serve

    try:
        if name is None:
            serve.shutdown()
        elif ray.is_initialized():
            serve.delete(name)
    finally:
        if shutdown_ray and ray.is_initialized():
            ray.shutdown()


def serve_forever(config: ServeConfig, *, host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
                  name: str = APP_NAME, route_prefix: str = "/", metrics_port: int | None = None,
                  ingress: str | None = None, on_ready=None) -> None:
    """``start``, wait until ready, call ``on_ready(url)``, then block until Ctrl-C or SIGTERM; always
    ``stop``: a local instance entirely, on an existing cluster (``address``) this application only."""
    try:
        url = start(config, host=host, port=port, address=address, name=name, route_prefix=route_prefix,
                    metrics_port=metrics_port, ingress=ingress)
        wait_ready(url)
        if on_ready is not None:
            on_ready(url)
        while True:
            time.sleep(1.0)
    finally:
        stop(shutdown_ray=True, name=None if address is None else name)
