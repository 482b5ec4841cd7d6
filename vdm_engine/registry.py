"""Local gates registry: where `vdm-train` leaves gates so others find them by model name.

Layout: ``$VDM_GATES_HOME/<model-key>/`` holds a ``save_pretrained`` gates directory. The default
home is ``~/.cache/vdm_engine/gates`` (or ``$XDG_CACHE_HOME/vdm_engine/gates``). A registry entry
takes precedence over the gates shipped with an embedded model (``vit-digits``, ``vit-toy``).

Which trained gates may enter the registry is decided in one place, ``registration_decision``:

- gates that did not learn a mask (``mask_failure``: no validation kept the prediction, or the
  selected gates keep >= ``KEEP_ALL`` of the patches) are never registered; asking for it
  explicitly (``register=True``, ``vdm-train --register``) is refused;
- without an explicit request (``register=None``) gates are registered only when the model has
  none yet (neither a registry entry nor shipped gates): the first gates fill the empty slot;
- replacing existing registered or shipped gates needs ``register=True``;
- ``register=False`` (``--no-register``) never registers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from .models import EMBEDDED_MODELS, embedded_model_dir, resolve_preset

__all__ = [
    "registry_home",
    "registered_gates",
    "register_gates",
    "remove_gates",
    "list_gates",
    "shipped_gates",
    "embedded_model_dir",
    "mask_failure",
    "registration_decision",
    "GatesEntry",
    "RegistrationDecision",
    "RegistrationRefused",
    "EMBEDDED_MODELS",
    "KEEP_ALL",
]

KEEP_ALL = 0.95  # gates keeping at least this fraction of the patches explain nothing
_GATES_CONFIG = "gates_config.json"
_GATES_WEIGHTS = "gates.safetensors"


class RegistrationRefused(ValueError):
    """Registration was asked for explicitly, but the gates did not learn a mask.

    Attributes:
        result: the run's ``TrainResult`` when raised by ``train_gates`` (its files stay in ``out_dir``).
    """

    def __init__(self, message: str, result=None):
        super().__init__(message)
        self.result = result


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


def shipped_gates(model: str) -> Path | None:
    """The gates directory shipped inside the package for an embedded model, or None."""
    emb = embedded_model_dir(str(model))
    if emb is not None and (emb / "gates" / _GATES_CONFIG).is_file():
        return emb / "gates"
    return None


def _entry_dirs(model: str) -> list[Path]:
    """The registry folders ``model`` may be registered under (its name, and a preset's hub id)."""
    names = dict.fromkeys([str(model), resolve_preset(model)])
    return [registry_home() / _key(name) for name in names]


def registered_gates(model: str) -> Path | None:
    """Gates directory for ``model``: the registry entry, else the embedded gates, else None."""
    for d in _entry_dirs(model):
        if (d / _GATES_CONFIG).is_file():
            return d
    return shipped_gates(model)


def register_gates(model: str, gates_dir: str | os.PathLike, *, replace: bool = True) -> Path:
    """Copy a gates directory into the registry under ``model`` (atomically replacing any entry).

    This writes unconditionally; training decides first with ``registration_decision``.

    Args:
        model: the model name the gates are for (embedded name, preset, hub id or local directory).
        gates_dir: a ``save_pretrained`` gates directory.
        replace: replace an existing entry (default); when False, ``FileExistsError`` if one appeared.
    """
    dst = registry_home() / _key(resolve_preset(model))
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        for f in Path(gates_dir).iterdir():
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
        if not replace:
            if dst.exists():
                raise FileExistsError(f"gates for '{model}' were registered meanwhile ({dst})")
            os.replace(tmp, dst)
            return dst
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


def remove_gates(model: str) -> Path:
    """Delete the registry entry of ``model``; returns the folder removed.

    Afterwards ``registered_gates(model)`` falls back to the shipped gates, if any.

    Raises:
        ValueError: ``model`` has no registry entry (shipped gates are part of the package and
            cannot be removed).
    """
    for d in _entry_dirs(model):
        if (d / _GATES_CONFIG).is_file():
            trash = Path(tempfile.mkdtemp(prefix=f".{d.name}.removed.", dir=d.parent))
            os.replace(d, trash / d.name)  # gone from the registry at once; then delete
            shutil.rmtree(trash, ignore_errors=True)
            return d
    if shipped_gates(model) is not None:
        raise ValueError(
            f"'{model}' has no registered gates, only the ones shipped with the package, which cannot be removed"
        )
    raise ValueError(f"no registered gates for '{model}'; `vdm-gates list` shows the registered models")


@dataclass(frozen=True)
class GatesEntry:
    """One set of gates the registry knows.

    Attributes:
        model: the model key (registry folder name, or the embedded model's name).
        path: the gates directory.
        source: ``"registry"`` or ``"shipped"``.
        in_use: whether ``Explainer.from_pretrained(model)`` loads these (a registry entry hides the
            shipped gates of the same model).
        sha256: sha256 of ``gates.safetensors`` (as ``Gates.sha256``); None if the file is missing.
        backbone: the backbone the gates were trained on (``name_or_path``).
        kept, agreement, kl: hard-mask numbers from the gates' metrics (validation or evaluation).
        learned_mask: what training recorded (None for gates from before the quality gate).
        error: why the entry could not be read, if it could not.
    """

    model: str
    path: str
    source: str
    in_use: bool
    sha256: str | None = None
    backbone: str | None = None
    kept: float | None = None
    agreement: float | None = None
    kl: float | None = None
    learned_mask: bool | None = None
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _entry(model: str, path: Path, source: str, in_use: bool) -> GatesEntry:
    from ._io import sha256_file

    try:
        meta = json.loads((path / _GATES_CONFIG).read_text())
    except (OSError, ValueError) as e:
        return GatesEntry(model, str(path), source, in_use, error=f"unreadable {_GATES_CONFIG}: {e}")
    metrics = meta.get("metrics") or {}
    numbers = metrics.get("evaluation") or metrics.get("validation") or {}
    weights = path / _GATES_WEIGHTS
    return GatesEntry(
        model=model,
        path=str(path),
        source=source,
        in_use=in_use,
        sha256=sha256_file(weights) if weights.is_file() else None,
        backbone=(meta.get("backbone") or {}).get("name_or_path"),
        kept=numbers.get("kept"),
        agreement=numbers.get("agreement"),
        kl=numbers.get("kl"),
        learned_mask=metrics.get("learned_mask"),
        error=None if weights.is_file() else f"{_GATES_WEIGHTS} is missing",
    )


def list_gates() -> list[GatesEntry]:
    """Every registry entry (sorted by model key), then the gates shipped with the embedded models."""
    home = registry_home()
    entries = []
    if home.is_dir():
        for d in sorted(home.iterdir()):
            if d.is_dir() and not d.name.startswith(".") and (d / _GATES_CONFIG).is_file():
                entries.append(_entry(d.name, d, "registry", True))
    keys = {e.model for e in entries}
    for name in EMBEDDED_MODELS:
        d = shipped_gates(name)
        if d is not None:
            entries.append(_entry(name, d, "shipped", _key(name) not in keys))
    return entries


# ----- the registration policy --------------------------------------------------------------------
def mask_failure(
    validation: dict | None,
    *,
    qualified: bool,
    eps_valid: float | None = None,
    agreement: float | None = None,
) -> str | None:
    """Why trained gates did not learn a mask, or None when they did (the quality gate).

    Args:
        validation: the selected checkpoint's validation record (``kept``, ``kl``, ``agreement``).
        qualified: whether some validation met ``KL <= eps_valid`` and ``agreement >= agreement``.
        eps_valid, agreement: the bounds, only for the message.
    """
    v = validation or {}
    if not qualified:
        bounds = (
            f"KL <= {eps_valid:g} and agreement >= {agreement:g}"
            if eps_valid is not None and agreement is not None
            else "the KL and agreement bounds"
        )
        last = ""
        if v.get("kl") is not None and v.get("agreement") is not None:
            last = f" (last: KL {v['kl']:.3g}, agreement {v['agreement']:.0%})"
        return f"no validation met {bounds}{last}: the masked prediction is not kept"
    kept = v.get("kept")
    if kept is None:
        return "no validation record of the kept fraction"
    if kept >= KEEP_ALL:
        return f"the selected gates keep {kept:.0%} of the patches, so they explain nothing (the bar: < {KEEP_ALL:.0%})"
    return None


@dataclass(frozen=True)
class RegistrationDecision:
    """What to do with a run's gates.

    Attributes:
        register: write them into the registry.
        replace: they replace existing registered or shipped gates (only with ``register=True``).
        refused: registration was asked for explicitly but the gates did not learn a mask.
        reason: one line saying why (not).
    """

    register: bool
    reason: str
    replace: bool = False
    refused: bool = False


def registration_decision(model: str, *, failure: str | None, register: bool | None = None) -> RegistrationDecision:
    """The registration policy (see the module docstring), for gates of ``model``.

    Args:
        model: the model name the gates would be registered under.
        failure: ``mask_failure`` of the run (None: the gates learned a mask).
        register: None (default): only fill an empty slot; True: replace existing gates
            (``vdm-train --register``); False: never (``--no-register``).
    """
    if register not in (None, True, False):
        raise ValueError(f"register must be None, True or False, got {register!r}")
    if failure is not None:
        if register is True:
            return RegistrationDecision(False, f"refused: the run did not learn a mask: {failure}", refused=True)
        return RegistrationDecision(False, f"not registered: the run did not learn a mask: {failure}")
    if register is False:
        return RegistrationDecision(False, "not registered: registration is off (--no-register)")
    existing = registered_gates(model)
    if existing is None:
        return RegistrationDecision(True, f"registered: the first gates for '{model}'")
    kind = "shipped" if shipped_gates(model) == existing else "registered"
    if register is True:
        return RegistrationDecision(True, f"registered: replaced the {kind} gates of '{model}' ({existing})", replace=True)
    return RegistrationDecision(
        False, f"not registered: '{model}' already has {kind} gates ({existing}); pass --register to replace them"
    )

