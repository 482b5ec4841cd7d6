"""Connecting to Ray: the one place ``vdm-serve`` and bulk explanation start or join a Ray instance."""

from __future__ import annotations

import signal
import threading

__all__ = ["init_ray"]


def init_ray(address: str | None, **kwargs) -> None:
    """``ray.init`` a new local instance of our own (``address`` None) or join ``address``, keeping the
    process's SIGTERM handler.

    Ray installs a crash handler for SIGTERM in the driver that dumps a stack trace and aborts
    (exit -6, nothing cleaned up); the CLIs handle SIGTERM like Ctrl-C (exit 143 after a clean
    shutdown), so the handler in place before Ray started is put back.
    """
    import ray

    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGTERM) if main else None
    # "local": always a new instance of our own, never one another process started on this machine
    ray.init(address=address or "local", **kwargs)
    if main and before is not None:
        signal.signal(signal.SIGTERM, before)
