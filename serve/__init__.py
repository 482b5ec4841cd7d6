"""vdm-serve: explanations behind a Ray Serve deployment (HTTP + Open Inference Protocol).

Installed as ``vdm_engine.serve`` from the optional ``serve`` extra (``pip install
'vdm-engine[serve]'``); the core never imports it. ``ServeConfig`` and the request parsers import
without Ray; ``build_app``, ``VdmServer``, ``start``, ``stop`` and ``serve_forever`` need it.
"""

from __future__ import annotations

from .config import DEFAULT_MAX_BODY_BYTES, ServeConfig

__all__ = ["ServeConfig", "DEFAULT_MAX_BODY_BYTES", "build_app", "VdmServer", "start", "stop", "serve_forever",
           "wait_ready"]

_LAZY = {"build_app": "app", "VdmServer": "app", "start": "runner", "stop": "runner", "serve_forever": "runner",
         "wait_ready": "runner"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
