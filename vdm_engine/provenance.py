"""Where gates come from and which backbone they fit: fingerprints, provenance, the mismatch policy.

A backbone fingerprint is a sha256 over the model's weights and the config fields that change its
hidden states. Gates record the fingerprint of the backbone they were trained on; loading them onto
another backbone is an error unless the caller allows it, loudly (``allow_backbone_mismatch``).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .models import ASSETS

__all__ = [
    "BackboneMismatchError",
    "ProvenanceWarning",
    "GatesProvenance",
    "backbone_fingerprint",
    "check_fingerprint",
    "classify_source",
    "validation_figures",
    "trained_eps",
    "FINGERPRINT_CONFIG_FIELDS",
]

#: ViT config fields that change the hidden states for given pixel values.
FINGERPRINT_CONFIG_FIELDS = (
    "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    "hidden_act", "layer_norm_eps", "image_size", "patch_size", "num_channels", "qkv_bias",
)


class BackboneMismatchError(ValueError):
    """Gates were trained on another backbone than the one they are loaded onto."""


class ProvenanceWarning(UserWarning):
    """Gates that cannot be verified against their backbone, or were allowed onto another one."""


def backbone_fingerprint(model: torch.nn.Module) -> str:
    """Hex sha256 identifying a ViT's weights and architecture.

    Each tensor of the state dict is hashed as contiguous float32 bytes with its shape (an exact
    upcast, so a checkpoint stored in fp16 and loaded in fp32 hashes alike); the per-tensor digests
    are sorted before the final hash, so parameter names (transformers 4.x ``encoder.layer`` vs 5.x
    ``layers``) do not enter it. The config fields in ``FINGERPRINT_CONFIG_FIELDS`` are hashed too.
    """
    digests = []
    for t in model.state_dict().values():
        h = hashlib.sha256(repr(tuple(t.shape)).encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().data)
        digests.append(h.digest())
    config = getattr(model, "config", None)
    fields = {k: _jsonable(getattr(config, k, None)) for k in FINGERPRINT_CONFIG_FIELDS}
    top = hashlib.sha256(json.dumps(fields, sort_keys=True).encode())
    for d in sorted(digests):
        top.update(d)
    return top.hexdigest()


def _jsonable(v):
    return list(v) if isinstance(v, tuple) else v


@dataclass(frozen=True)
class GatesProvenance:
    """Where a set of gates was loaded from and what it was validated to do.

    Attributes:
        source: ``shipped`` (embedded demo gates), ``registry`` (``$VDM_GATES_HOME``), ``path``
            (a directory the caller named), ``reference`` (an original Vision-DiffMask checkpoint)
            or ``memory`` (built in this process, never saved).
        path: the gates directory or checkpoint file, if any.
        sha256: sha256 of ``gates.safetensors`` (None for gates never saved).
        trained_on: name of the backbone the gates were trained on, as recorded.
        fingerprint: that backbone's fingerprint, as recorded (None: not recorded).
        backbone_mismatch: loaded onto a backbone with another fingerprint, allowed by the caller.
        kept, agreement: validation figures recorded with the gates (fraction of patches kept by the
            hard mask; fraction of images whose prediction it keeps), if any.
    """

    source: str
    path: str | None = None
    sha256: str | None = None
    trained_on: str | None = None
    fingerprint: str | None = None
    backbone_mismatch: bool = False
    kept: float | None = None
    agreement: float | None = None

    def describe(self) -> str:
        """One line for the user: where the gates came from and how good they were."""
        where = {"shipped": "shipped gates", "registry": "registry gates", "path": "gates",
                 "reference": "reference checkpoint", "memory": "in-memory gates"}.get(self.source, self.source)
        parts = [f"{where} {self.path}" if self.path else where]
        if self.sha256:
            parts.append(f"sha256 {self.sha256[:12]}")
        if self.trained_on:
            parts.append(f"trained on {self.trained_on}")
        if self.kept is not None:
            parts.append(f"kept {self.kept:.0%}")
        if self.agreement is not None:
            parts.append(f"agreement {self.agreement:.0%}")
        if self.backbone_mismatch:
            parts.append("BACKBONE MISMATCH ALLOWED")
        return ", ".join(parts)

    def replace(self, **changes) -> "GatesProvenance":
        return GatesProvenance(**{**asdict(self), **changes})

    def to_dict(self) -> dict:
        return asdict(self)


def validation_figures(metrics: dict) -> tuple[float | None, float | None]:
    """(kept, agreement) from a gates' metrics: the held-out evaluation, else the selected validation."""
    for key in ("evaluation", "validation"):
        rec = metrics.get(key) if isinstance(metrics, dict) else None
        if isinstance(rec, dict) and "kept" in rec:
            agree = rec.get("agreement")
            return float(rec["kept"]), None if agree is None else float(agree)
    return None, None


def trained_eps(metrics: dict) -> float | None:
    """The KL budget single-level gates were trained with, from their metrics: ``eps``, else the training
    config's (``train_config``, or under ``gates_training`` as the shipped models record it); None if absent."""
    for rec in (metrics, metrics.get("gates_training") if isinstance(metrics, dict) else None):
        if not isinstance(rec, dict):
            continue
        eps = rec.get("eps", (rec.get("train_config") or {}).get("eps"))
        if eps is not None:
            return float(eps)
    return None


def classify_source(directory: str | Path, registry: Path) -> str:
    """``shipped`` (inside the package's assets), ``registry`` (inside ``registry``) or ``path``."""
    d = Path(directory).resolve()
    for root, name in ((ASSETS, "shipped"), (registry, "registry")):
        try:
            d.relative_to(Path(root).resolve())
            return name
        except ValueError:
            continue
    return "path"


def check_fingerprint(
    recorded: str | None,
    trained_on: str | None,
    actual: str,
    backbone_name: str,
    *,
    where: str,
    allow_mismatch: bool = False,
) -> bool:
    """Apply the mismatch policy; returns True when a mismatch was allowed.

    Raises:
        BackboneMismatchError: ``recorded`` differs from ``actual`` and ``allow_mismatch`` is False.

    Warns (``ProvenanceWarning``) when nothing was recorded (cannot verify) or a mismatch is allowed.
    """
    if recorded is None:
        warnings.warn(
            f"{where} carry no backbone fingerprint; cannot verify they were trained on '{backbone_name}'",
            ProvenanceWarning, stacklevel=3,
        )
        return False
    if recorded == actual:
        return False
    what = (
        f"{where} were trained on '{trained_on or '?'}' (fingerprint {recorded[:12]}), not on "
        f"'{backbone_name}' (fingerprint {actual[:12]})"
    )
    if not allow_mismatch:
        raise BackboneMismatchError(
            f"{what}; use gates trained for this model, or pass allow_backbone_mismatch=True "
            "(--allow-backbone-mismatch) if it is a fine-tuned copy of theirs"
        )
    warnings.warn(f"{what}; proceeding because the backbone mismatch was allowed", ProvenanceWarning, stacklevel=3)
    return True
