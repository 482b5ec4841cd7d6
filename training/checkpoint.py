"""The resumable training checkpoint: one safetensors file, written atomically.

It holds everything needed to continue exactly: the gates, the multipliers, both optimisers'
states, the RNG states and (optionally) the best gates so far as tensors; the run's JSON state
(step, settings, validation history, the open log window, the scaler) in the safetensors metadata
under ``vdm_train``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vdm_engine._io import atomic_path

from .step import TrainState

__all__ = ["CHECKPOINT_VERSION", "save_checkpoint", "load_checkpoint", "read_checkpoint_meta", "restore_state"]

CHECKPOINT_VERSION = 1


def save_checkpoint(path: Path, state: TrainState, meta: dict, best_state: dict | None = None) -> None:
    """Write ``state`` with the JSON-able ``meta`` (and the best gates' ``state_dict``, if any) to ``path``."""
    from safetensors.torch import save_file

    obj = state.objective
    tensors = {f"gates.{k}": v for k, v in obj.gates.state_dict().items()}
    tensors["alpha"] = obj.alpha.detach()
    if best_state is not None:
        tensors.update({f"best.{k}": v for k, v in best_state.items()})
    opt_meta = {}
    for name, o in (("opt", state.opt), ("opt_alpha", state.opt_alpha)):
        sd = o.state_dict()
        scalars = {}
        for i, st in sd["state"].items():
            for k, v in st.items():
                if torch.is_tensor(v):
                    tensors[f"{name}.{i}.{k}"] = v
                else:
                    scalars[f"{i}.{k}"] = v
        opt_meta[name] = {"param_groups": sd["param_groups"], "scalars": scalars, "ids": sorted(sd["state"])}
    for name, g in state.generators.items():
        tensors[f"rng.{name}"] = g.get_state()
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    meta = dict(meta, optimizers=opt_meta, version=CHECKPOINT_VERSION)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"vdm_train": json.dumps(meta)})


def _unreadable(path, e: Exception) -> ValueError:
    return ValueError(f"{path} is not a readable vdm-train checkpoint: {str(e).splitlines()[0] if str(e) else e}")


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The checkpoint's tensors (on CPU) and JSON state; ``ValueError`` when it is not a readable checkpoint."""
    from safetensors.torch import load_file

    meta = read_checkpoint_meta(path)
    try:
        tensors = load_file(str(path))
    except Exception as e:
        raise _unreadable(path, e) from e
    return tensors, meta


def read_checkpoint_meta(path: Path) -> dict:
    """The run's JSON state of a checkpoint, without reading its tensors."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {})["vdm_train"])
    except Exception as e:
        raise _unreadable(path, e) from e


def _restore_optimizer(o, name: str, tensors: dict, meta: dict, device) -> None:
    m = meta["optimizers"][name]
    state: dict = {}
    for i in m["ids"]:
        st = {}
        prefix = f"{name}.{i}."
        for k, v in tensors.items():
            if k.startswith(prefix):
                st[k[len(prefix) :]] = v
        for k, v in m["scalars"].items():
            j, key = k.split(".", 1)
            if int(j) == int(i):
                st[key] = v
        state[int(i)] = st
    o.load_state_dict({"state": state, "param_groups": m["param_groups"]})
    for st in o.state.values():  # load_state_dict casts to the params' device, except 'step' tensors
        for k, v in st.items():
            if torch.is_tensor(v) and k != "step":
                st[k] = v.to(device)


def restore_state(state: TrainState, tensors: dict, meta: dict, *, where, world_size: int = 1) -> None:
    """Load a checkpoint (``load_checkpoint``'s output) into ``state``.

    Learning rates come from ``state.config`` (possibly changed since), not from the saved groups.

    Raises:
        ValueError: the checkpoint was written for other gates or by another number of processes.
    """
    gates, cfg = state.gates, state.config
    if meta.get("gate_config") != gates.config.to_dict():
        raise ValueError(f"{where} was written for other gates ({meta.get('gate_config')}); use another --out")
    if meta.get("world_size", 1) != world_size:
        raise ValueError(
            f"{where} was written by a run with {meta.get('world_size')} processes; resume with the same number"
        )
    device = state.objective.alpha.device
    with torch.no_grad():
        gates.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("gates.")})
        state.objective.alpha.copy_(tensors["alpha"])
    _restore_optimizer(state.opt, "opt", tensors, meta, device)
    _restore_optimizer(state.opt_alpha, "opt_alpha", tensors, meta, device)
    state.gen_depth.set_state(tensors["rng.depth"])
    state.gen_noise.set_state(tensors["rng.noise"])
    if len(state.opt.param_groups) > 1:
        state.opt.param_groups[1]["lr"] = cfg.lr_placeholder
    state.opt_alpha.param_groups[0]["lr"] = cfg.lr_alpha
    if meta.get("scaler"):
        state.scaler.load_state_dict(meta["scaler"])
