"""``train_gates``: the gate training loop with validation, checkpoints, exact resume and a NaN guard.

Files in ``out_dir``:

- ``checkpoint.safetensors`` -- everything needed to continue exactly (see ``checkpoint``), written
  atomically every ``checkpoint_interval`` steps;
- ``metrics.jsonl`` -- one JSON object per line: ``{"kind": "train", ...}`` every ``log_interval``
  steps and ``{"kind": "val", ...}`` at each validation;
- ``gates/`` -- the selected gates (``Gates.save_pretrained``) with their validation numbers.

The per-step work is ``step.train_step``; this loop adds the data, validation, logging, checkpoints
and the NaN guard. The guard reads the steps' on-device health flags once per boundary (a log
line, a validation or a checkpoint), so nothing after a NaN/Inf is logged or saved, and names the
first step that went wrong. A folder holding a run is never overwritten by accident (see
``rundir.check_run_dir``). Whether the gates enter the local registry is decided by
``vdm_engine.registry.registration_decision``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from vdm_engine.gates import GateConfig, Gates
from vdm_engine.ops import select_ops
from vdm_engine.registry import RegistrationRefused, mask_failure, register_gates, registration_decision

from .checkpoint import load_checkpoint, restore_state, save_checkpoint
from .config import TrainConfig
from .data import DataSource, pixel_batches
from .distributed import all_reduce_sum, barrier, dist_info
from .objective import hard_mask_validation
from .rundir import (
    CHECKPOINT,
    GATES_DIR,
    METRICS,
    check_resume,
    check_run_dir,
    clear_run,
    data_id,
    model_id,
    rewrite_metrics,
    run_files,
)
from .step import StepOutput, TrainingDiverged, TrainState, first_divergence, train_step

__all__ = [
    "TrainResult",
    "TrainingDiverged",
    "RegistrationRefused",
    "new_gates",
    "train_gates",
    "check_run_dir",
    "check_resume",
    "run_files",
    "CHECKPOINT",
    "METRICS",
    "GATES_DIR",
]


@dataclass
class TrainResult:
    """What a run produced.

    Attributes:
        gates: the selected gates (best qualifying validation, else the last step's), on CPU.
        gates_dir: where they were written (``out_dir/gates``); None on ranks other than 0.
        step: steps completed.
        best: validation record of the selected checkpoint (``step``, ``kl``, ``agreement``,
            ``kept``), or None when no validation qualified.
        last: the last validation record.
        qualified: whether some validation met ``KL <= eps_valid`` and ``agreement >= agreement``.
        registered: the gates registry entry written, if any.
        history: every validation record, in order.
        seconds: wall time of this call.
        learned_mask: False when the selected gates keep the prediction nowhere (not qualified) or
            keep >= 95% of the patches (``vdm_engine.registry.mask_failure``); such gates are never
            registered.
        did_not_learn: why not, when ``learned_mask`` is False.
        registration: one line saying whether and where the gates were registered, or why not.
    """

    gates: Gates
    gates_dir: Path | None
    step: int
    best: dict | None
    last: dict | None
    qualified: bool
    registered: Path | None = None
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    learned_mask: bool = True
    did_not_learn: str | None = None
    registration: str = ""


def new_gates(backbone, config: TrainConfig) -> Gates:
    """Fresh gates for ``backbone`` with the maths of ``config`` (mul, add_init, beta, probe size)."""
    config_ = GateConfig(
        hidden_size=backbone.hidden_size,
        num_hidden_states=backbone.num_hidden_states,
        probe_size=config.probe_size,
        mul=config.mul,
        add_init=config.add_init,
        beta=config.beta,
    )
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(config.seed)
        return Gates(config_)


_WINDOW_KEYS = ("loss", "kl", "kept", "l0", "agree")


class _Window:
    """Running sums of the current log window, kept on the device (float64: the same sums as Python floats)."""

    def __init__(self, device: torch.device, saved: dict | None = None):
        saved = saved or {}
        self.sums = torch.tensor([float(saved.get(k, 0.0)) for k in _WINDOW_KEYS], dtype=torch.float64, device=device)
        self.n = int(saved.get("n", 0))

    def add(self, out: StepOutput) -> None:
        self.sums += torch.stack([t.double() for t in (out.loss, *out.stats)])
        self.n += 1

    def to_dict(self) -> dict:
        """The sums on the host (one read), as checkpoints keep them."""
        return {**dict(zip(_WINDOW_KEYS, self.sums.tolist())), "n": self.n}

    def reset(self) -> None:
        self.sums.zero_()
        self.n = 0


def _check_health(health: list[torch.Tensor], step: int) -> None:
    """Raise ``TrainingDiverged`` naming the first of the last ``len(health)`` steps (up to ``step``) that went
    NaN/Inf on any rank; one host read. Empties ``health``."""
    if not health:
        return
    h = torch.stack(health)  # (S, 4)
    health.clear()
    if dist_info().enabled:
        flags = all_reduce_sum(h[:, 1:].contiguous())
        h = torch.cat([h[:, :1], flags], 1)
    message = first_divergence(h.cpu(), step - len(h) + 1)
    if message is not None:
        raise TrainingDiverged(message)


def _validate(backbone, gates: Gates, val_shard: torch.Tensor, cfg: TrainConfig, mask_fn, step: int) -> dict:
    """The ``val`` record of the hard mask on the validation images of every rank."""
    gates.eval()
    delete = cfg.objective == "delete"
    sums = hard_mask_validation(backbone, gates, val_shard, threshold=cfg.threshold, precision=cfg.precision,
                                mask_fn=mask_fn, invert=delete)
    gates.train()
    for v in sums.values():
        all_reduce_sum(v)
    n = float(sums["count"])
    rec = {
        "kind": "val", "step": step, "kl": float(sums["kl"]) / n, "agreement": float(sums["agree"]) / n,
        "kept": float(sums["kept"]) / n, "kept_depth": [round(float(x) / n, 4) for x in sums["kept_depth"]],
        "images": int(n),
    }
    if delete:  # the prediction must change: KL at least eps_valid, agreement at most ``agreement``
        rec["qualified"] = rec["kl"] >= cfg.eps_valid and rec["agreement"] <= cfg.agreement
    else:
        rec["qualified"] = rec["kl"] <= cfg.eps_valid and rec["agreement"] >= cfg.agreement
    return rec


def _is_better(rec: dict, best: dict | None, delete: bool = False) -> bool:
    """Fewer patches kept (``delete``: removed); ties: lower KL (``delete``: higher)."""
    if best is None:
        return True
    if delete:
        return (rec["kept"], -rec["kl"]) < (best["kept"], -best["kl"])
    return (rec["kept"], rec["kl"]) < (best["kept"], best["kl"])


def _diverged_message(e: TrainingDiverged, ckpt_path: Path) -> str:
    msg = f"{e}; stopped. The last good checkpoint is kept"
    if ckpt_path.exists():
        return msg + f" in {ckpt_path} (continue with --resume after lowering the learning rates)"
    return msg + " (none was written yet)"


def _pixel_source(backbone, train_images) -> DataSource:
    if isinstance(train_images, DataSource):
        return train_images
    if torch.is_tensor(train_images):
        backbone.check_pixels(train_images)
        return _TensorSource(train_images)
    H, W = backbone.image_size
    raise ValueError(
        f"train_images must be a (M, 3, {H}, {W}) pixel tensor or a DataSource, got {type(train_images).__name__}"
    )


# ----- the loop ---------------------------------------------------------------------------------
def train_gates(
    explainer,
    train_images,
    val_images,
    config: TrainConfig,
    *,
    out_dir: str | os.PathLike,
    resume: bool = False,
    overwrite: bool = False,
    register: bool | None = None,
    register_as: str | None = None,
    progress: bool = True,
    log_interval: int = 25,
) -> TrainResult:
    """Train the gates of ``explainer`` (its backbone stays frozen) with the Lagrangian DiffMask objective.

    Under ``torchrun`` (process group initialised, see ``distributed.init_distributed``) the gates and
    alphas are wrapped in ``DistributedDataParallel``, each rank reads its own shard of the data and
    only rank 0 writes files.

    Args:
        explainer: an ``Explainer`` (backbone + gates to train; build fresh ones with ``new_gates``).
        train_images: (M, 3, H, W) preprocessed pixel values, or a ``DataSource`` (preprocessed with
            the backbone's ``preprocess``).
        val_images: (V, 3, H, W) pixel values, or None to take ``config.val_size`` held-out images
            from the ``DataSource``.
        config: ``TrainConfig``.
        out_dir: folder for the checkpoint, the metrics log and the selected gates.
        resume: continue from ``out_dir/checkpoint.safetensors`` (exactly: gates, alphas, optimiser
            states, RNG states, step); the checkpoint must exist and come from a run on the same
            model and data with at most ``config.steps`` steps.
        overwrite: discard a run already in ``out_dir`` (its checkpoint, log and gates) and start
            afresh; without it (or ``resume``) a folder holding a run is refused.
        register: whether the selected gates enter the local gates registry (see
            ``vdm_engine.registry.registration_decision``): None (default) only when the model has
            no gates yet, registered or shipped; True also replaces existing gates (raises
            ``RegistrationRefused`` after saving the run when the gates did not learn a mask);
            False never. Gates that did not learn a mask, and deletion levels (``objective="delete"``;
            True raises ``ValueError``), are never registered.
        register_as: the model name to register under (default: the backbone's ``name_or_path``).
        progress: show a tqdm bar with live KL / kept fraction / agreement / alpha.
        log_interval: steps between ``train`` lines in the metrics log.

    Returns:
        ``TrainResult``.

    Raises:
        TrainingDiverged: the loss or a gradient became NaN/Inf (the last checkpoint is kept).
        RegistrationRefused: ``register=True`` but the gates did not learn a mask (``.result``
            holds the ``TrainResult``; the run's files stay in ``out_dir``).
        ValueError: inconsistent inputs (shapes, a checkpoint from another run, a folder holding a
            run without ``resume`` or ``overwrite``).
    """
    from tqdm.auto import tqdm

    t0 = time.time()
    info = dist_info()
    backbone, gates, cfg = explainer.backbone, explainer.gates, config
    device = backbone.device
    out_dir = Path(out_dir)
    ckpt_path, metrics_path = out_dir / CHECKPOINT, out_dir / METRICS

    # ----- data and run folder --------------------------------------------------------------------
    source = _pixel_source(backbone, train_images)
    if register not in (None, True, False):
        raise ValueError(f"register must be None, True or False, got {register!r} (the model name goes in register_as)")
    if cfg.objective == "delete":  # a necessity level reads g as "removed": never a model's explaining gates
        if register:
            raise ValueError("register=True with TrainConfig.objective='delete': a deletion level's gates mark the "
                             "patches to remove, not to keep; stack them into K-level gates instead")
        register = False
    check_run_dir(out_dir, resume=resume, overwrite=overwrite, model=backbone.name_or_path,
                  data=data_id(source.spec), steps=cfg.steps)
    if val_images is None:
        if isinstance(source, _TensorSource):
            raise ValueError("val_images is None but train_images is a tensor; pass held-out pixel values")
        val_images = backbone.preprocess(source.validation(cfg.val_size))
    backbone.check_pixels(val_images)
    val_shard = val_images[info.rank :: info.world_size].to(device)
    preprocess = (lambda b: b) if isinstance(source, _TensorSource) else backbone.preprocess
    ops = select_ops(device, backbone.dtype)  # the masked passes' patch-masking op

    # ----- state ----------------------------------------------------------------------------------
    state = TrainState.create(backbone, gates, cfg, rank=info.rank, mask_fn=ops.patch_mask)
    step, best, best_state, history, saved_window = 0, None, None, [], None
    if resume:
        tensors, meta = load_checkpoint(ckpt_path)
        restore_state(state, tensors, meta, where=ckpt_path, world_size=info.world_size)
        step, best, history = meta["step"], meta.get("best"), meta.get("history", [])
        saved_window = meta.get("log_window")
        if any(k.startswith("best.") for k in tensors):
            best_state = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
        if info.is_main:
            rewrite_metrics(metrics_path, step)
    elif info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        clear_run(out_dir)  # check_run_dir let a fresh run in only if the folder is empty or overwrite is on
    barrier()
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        state.model = DDP(state.objective, device_ids=[device.index] if device.type == "cuda" else None)

    window = _Window(device, saved_window)  # saved in checkpoints so that resumed logs match
    health: list[torch.Tensor] = []  # per-step NaN/Inf flags since the last boundary, read once there

    def write_checkpoint():
        meta = {
            "step": step, "config": cfg.to_dict(), "gate_config": gates.config.to_dict(),
            "world_size": info.world_size, "best": best, "history": history, "backbone": backbone.name_or_path,
            "model": model_id(backbone.name_or_path), "data": data_id(source.spec),
            "scaler": state.scaler.state_dict() if state.scaler.is_enabled() else None, "log_window": window.to_dict(),
        }
        save_checkpoint(ckpt_path, state, meta, best_state)

    log_file = open(metrics_path, "a") if info.is_main else None

    def log(rec: dict):
        if log_file is not None:
            log_file.write(json.dumps(rec) + "\n")
            log_file.flush()

    batches = pixel_batches(
        source, preprocess, cfg.batch_size, seed=cfg.seed, start=step, rank=info.rank, world_size=info.world_size
    )
    bar = tqdm(
        total=cfg.steps, initial=step, desc="vdm-train", disable=not (progress and info.is_main),
        mininterval=0.5, dynamic_ncols=True, file=sys.stderr,
    )
    last_val = history[-1] if history else None
    try:
        while step < cfg.steps:
            pv = next(batches).to(device, non_blocking=True)
            try:
                out = train_step(state, pv, step)
            except TrainingDiverged:
                _check_health(health, step)  # the step that made the multipliers NaN/Inf
                raise
            step += 1
            health.append(out.health)
            window.add(out)
            log_now = step % log_interval == 0 or step == cfg.steps
            val_now = step % cfg.eval_interval == 0 or step == cfg.steps
            ckpt_now = step % cfg.checkpoint_interval == 0 or step == cfg.steps
            if log_now or val_now or ckpt_now:
                _check_health(health, step)  # before anything of a diverged step is logged or saved

            if log_now:
                sums = window.to_dict()
                n = sums.pop("n")
                rec = {"kind": "train", "step": step, "depth": out.depth, "lr_probe": state.opt.param_groups[0]["lr"]}
                rec.update({k: v / n for k, v in sums.items()})
                alpha = state.objective.alpha.detach().cpu()
                rec["alpha"] = [round(float(a), 4) for a in alpha]
                log(rec)
                bar.set_postfix(  # live numbers of the sampled gates over the last log window
                    kl=f"{rec['kl']:.3f}", kept=f"{rec['kept']:.2f}", agree=f"{rec['agree']:.2f}",
                    alpha=f"{float(alpha.mean()):.2f}", refresh=False,
                )
                window.reset()
            bar.update(1)

            if val_now:
                rec = _validate(backbone, gates, val_shard, cfg, ops.patch_mask, step)
                history.append(rec)
                last_val = rec
                log(rec)
                if rec["qualified"] and _is_better(rec, best, cfg.objective == "delete"):
                    best = rec
                    best_state = {k: v.detach().cpu().clone() for k, v in gates.state_dict().items()}
                bar.set_postfix(
                    kl=f"{rec['kl']:.3f}", kept=f"{rec['kept']:.2f}", agree=f"{rec['agreement']:.2f}",
                    alpha=f"{float(state.objective.alpha.detach().mean()):.2f}",
                )
            if ckpt_now and info.is_main:
                write_checkpoint()
    except TrainingDiverged as e:
        raise TrainingDiverged(_diverged_message(e, ckpt_path)) from None
    finally:
        bar.close()
        if log_file is not None:
            log_file.close()
    return _finish(gates, backbone, cfg, info, out_dir, step, best, best_state, last_val, history,
                   register=register, register_name=register_as or backbone.name_or_path, t0=t0)


def _finish(gates, backbone, cfg, info, out_dir, step, best, best_state, last_val, history, *, register,
            register_name, t0) -> TrainResult:
    """Select and save the gates, decide their registration, and build the ``TrainResult``."""
    final = Gates(gates.config)
    final.load_state_dict(best_state if best is not None else {k: v.detach().cpu() for k, v in gates.state_dict().items()})
    final.eval()
    gates.eval()
    qualified = best is not None
    chosen = best if qualified else last_val
    metrics = {
        "selected": "best" if qualified else "last",
        "qualified": qualified,
        "validation": chosen,
        "criteria": {"eps_valid": cfg.eps_valid, "agreement": cfg.agreement, "threshold": cfg.threshold},
        "train_config": cfg.to_dict(),
        "steps": step,
        "world_size": info.world_size,
    }
    bounds = {} if cfg.objective == "delete" else {"eps_valid": cfg.eps_valid, "agreement": cfg.agreement}  # keep's wording
    failure = mask_failure(chosen, qualified=qualified, **bounds)
    metrics["learned_mask"] = failure is None
    if failure is not None:
        metrics["did_not_learn"] = failure
    decision = registration_decision(register_name, failure=failure, register=register)
    gates_dir, registered, registration = None, None, decision.reason
    if info.is_main:
        gates_dir = final.save_pretrained(out_dir / GATES_DIR, backbone=backbone, metrics=metrics)
        if decision.register:
            try:
                registered = register_gates(register_name, gates_dir, replace=decision.replace)
                registration = f"{decision.reason}; in {registered}"
            except FileExistsError as e:
                registration = f"not registered: {e}; pass --register to replace them"
    barrier()
    result = TrainResult(
        gates=final, gates_dir=gates_dir, step=step, best=best, last=last_val, qualified=qualified,
        registered=registered, history=history, seconds=time.time() - t0,
        learned_mask=failure is None, did_not_learn=failure, registration=registration,
    )
    if decision.refused:
        raise RegistrationRefused(
            f"refusing to register the gates: the run did not learn a mask: {failure}; "
            f"the run's files stay in {out_dir}",
            result,
        )
    if info.is_main and failure is not None:
        print(f"vdm-train: did not learn a mask: {failure}; the gates in {gates_dir} are not registered", file=sys.stderr)
    elif info.is_main and register is None and registered is None:
        print(f"vdm-train: {registration}", file=sys.stderr)
    return result


class _TensorSource(DataSource):
    """Preprocessed pixel values held in memory (indexed by ``pixel_batches``)."""

    def __init__(self, pixels: torch.Tensor):
        self.spec, self.pixels = "tensor", pixels

    def __len__(self) -> int:
        return len(self.pixels)

    def images(self, indices):
        return self.pixels[torch.as_tensor(np.asarray(indices), dtype=torch.long)]
