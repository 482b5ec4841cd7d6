"""Packages whose public names are imported on first use (PEP 562)."""

from __future__ import annotations

import importlib
import sys
from typing import Callable


def lazy_names(package: str, exports: dict[str, str], public: list[str]) -> tuple[Callable, Callable]:
    """``(__getattr__, __dir__)`` for ``package``: each name in ``exports`` is imported from its module on first
    use (a module name without a dot is relative to ``package``), then kept in the package's namespace."""

    def __getattr__(name: str):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module if "." in module else f"{package}.{module}"), name)
        setattr(sys.modules[package], name, value)  # later lookups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(public))

    return __getattr__, __dir__
