"""vdm-serve: explanations behind a Ray Serve deployment (HTTP + Open Inference Protocol), and bulk
explanation of whole data sets on Ray Data (``explain_dataset``, behind ``vdm-explain --dataset``).

Installed as ``vdm_engine.serve`` from the optional ``serve`` extra (``pip install
'vdm-engine[serve]'``); the core never imports it. ``ServeConfig`` and the request parsers import
without Ray; ``build_app``, ``VdmServer``, ``start``, ``stop`` and ``serve_forever`` need it, as does
``explain_dataset``; ``read_results`` and ``read_masks`` read a bulk run with pyarrow alone.
"""

from __future__ import annotations

from .config import DEFAULT_MAX_BODY_BYTES, ServeConfig

__all__ = ["ServeConfig", "DEFAULT_MAX_BODY_BYTES", "build_app", "deployment", "VdmServer", "start", "stop", "serve_forever",
           "wait_ready", "BulkConfig", "explain_dataset", "read_results", "read_masks"]

_LAZY = {"build_app": "app", "deployment": "app", "VdmServer": "app", "start": "runner", "stop": "runner", "serve_forever": "runner",
         "wait_ready": "runner", "BulkConfig": "bulk", "explain_dataset": "bulk", "read_results": "bulk_output",
         "read_masks": "bulk_output"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
