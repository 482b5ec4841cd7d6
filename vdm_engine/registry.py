"""Local gates registry: where `vdm-train` leaves gates so others find them by model name.

Layout: ``$VDM_GATES_HOME/<model-key>/`` holds a ``save_pretrained`` gates directory. The default
home is ``~/.cache/vdm_engine/gates`` (or ``$XDG_CACHE_HOME/vdm_engine/gates``).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

__all__ = ["registry_home", "registered_gates", "register_gates", "embedded_model_dir", "EMBEDDED_MODELS"]

EMBEDDED_MODELS = ("vit-digits", "vit-toy")
_ASSETS = Path(__file__).parent / "assets"


def registry_home() -> Path:
    """The registry folder: ``$VDM_GATES_HOME`` or the user's cache."""
    env = os.environ.get("VDM_GATES_HOME")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "vdm_engine" / "gates"


def _key(model: str) -> str:
    """A folder name for a model id or path (``google/vit-base-patch16-224`` -> ``google--vit-...``)."""
    model = str(model).rstrip("/\\")
    if os.path.isdir(model):
        model = os.path.abspath(model)
    return re.sub(r"[^A-Za-z0-9._-]+", "--", model).strip("-")


def embedded_model_dir(name: str) -> Path | None:
    """Folder of an embedded demo model (``backbone/`` and ``gates/`` inside), or None."""
    if name in EMBEDDED_MODELS:
        d = _ASSETS / name
        return d if d.is_dir() else None
    return None


def registered_gates(model: str) -> Path | None:
    """Gates directory for ``model``: the registry entry, else the embedded gates, else None."""
    for name in {str(model), _resolve_preset(model)}:
        d = registry_home() / _key(name)
        if (d / "gates_config.json").is_file():
            return d
    emb = embedded_model_dir(str(model))
    if emb is not None and (emb / "gates" / "gates_config.json").is_file():
        return emb / "gates"
    return None


def register_gates(model: str, gates_dir: str | os.PathLike) -> Path:
    """Copy a gates directory into the registry under ``model`` (atomically replacing any entry)."""
    dst = registry_home() / _key(_resolve_preset(model))
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        for f in Path(gates_dir).iterdir():
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
        old = None
        if dst.exists():
            old = dst.with_name(dst.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dst, old)
        os.replace(tmp, dst)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


def _resolve_preset(model: str) -> str:
    from .backbone import PRESETS

    return PRESETS.get(str(model), str(model))
