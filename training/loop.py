"""``train_gates``: the gate training loop with validation, checkpoints, exact resume and a NaN guard.

Files in ``out_dir``:

- ``checkpoint.safetensors`` -- everything needed to continue exactly (gates, alphas, optimiser
  states, RNG states, step, best-so-far), one file written atomically every
  ``checkpoint_interval`` steps; the run's JSON state lives in the safetensors metadata;
- ``metrics.jsonl`` -- one JSON object per line: ``{"kind": "train", ...}`` every ``log_interval``
  steps and ``{"kind": "val", ...}`` at each validation;
- ``gates/`` -- the selected gates (``Gates.save_pretrained``) with their validation numbers.

A folder holding a run is never overwritten by accident: ``check_run_dir`` refuses unless the run
is resumed (same model, same data, at least as many steps) or ``overwrite`` is given. Whether the
gates enter the local registry is decided by ``vdm_engine.registry.registration_decision``.
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

from vdm_engine._io import atomic_path, atomic_write_bytes
from vdm_engine.ops import select_ops
from vdm_engine.gates import GateConfig, Gates
from vdm_engine.registry import RegistrationRefused, mask_failure, register_gates, registration_decision

from .config import TrainConfig
from .data import DataSource, pixel_batches
from .distributed import all_reduce_sum, any_across_ranks, barrier, dist_info
from .objective import GateObjective, clean_pass, depth_weights, hard_mask_validation

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

CHECKPOINT = "checkpoint.safetensors"
METRICS = "metrics.jsonl"
GATES_DIR = "gates"
_CKPT_VERSION = 1


class TrainingDiverged(RuntimeError):
    """The loss or a gradient became NaN/Inf; the last good checkpoint is kept."""


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


# ----- checkpoint I/O ---------------------------------------------------------------------------
def _save_checkpoint(path: Path, obj: GateObjective, opt, opt_alpha, gens, meta: dict, best_state) -> None:
    from safetensors.torch import save_file

    tensors = {f"gates.{k}": v for k, v in obj.gates.state_dict().items()}
    tensors["alpha"] = obj.alpha.detach()
    if best_state is not None:
        tensors.update({f"best.{k}": v for k, v in best_state.items()})
    opt_meta = {}
    for name, o in (("opt", opt), ("opt_alpha", opt_alpha)):
        sd = o.state_dict()
        scalars = {}
        for i, st in sd["state"].items():
            for k, v in st.items():
                if torch.is_tensor(v):
                    tensors[f"{name}.{i}.{k}"] = v
                else:
                    scalars[f"{i}.{k}"] = v
        opt_meta[name] = {"param_groups": sd["param_groups"], "scalars": scalars, "ids": sorted(sd["state"])}
    for name, g in gens.items():
        tensors[f"rng.{name}"] = g.get_state()
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    meta = dict(meta, optimizers=opt_meta, version=_CKPT_VERSION)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"vdm_train": json.dumps(meta)})


def _load_checkpoint(path: Path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["vdm_train"])
        tensors = load_file(str(path))
    except Exception as e:
        raise ValueError(f"{path} is not a readable vdm-train checkpoint: {str(e).splitlines()[0] if str(e) else e}") from e
    return tensors, meta


def _checkpoint_meta(path: Path) -> dict:
    """The run's JSON state of a checkpoint, without reading its tensors."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {})["vdm_train"])
    except Exception as e:
        raise ValueError(f"{path} is not a readable vdm-train checkpoint: {str(e).splitlines()[0] if str(e) else e}") from e


def _model_id(name: str) -> str:
    """How a run records its model: local directories as absolute paths, presets as their hub ids."""
    from vdm_engine.backbone import PRESETS

    name = PRESETS.get(str(name), str(name))
    return os.path.abspath(name.rstrip("/\\")) if os.path.isdir(name) else name


def _data_id(spec: str) -> str:
    """How a run records its data source: ``imagefolder:`` with an absolute path, other specs as given."""
    spec = str(spec).strip()
    if spec.startswith("imagefolder:"):
        return "imagefolder:" + os.path.abspath(spec[len("imagefolder:") :].rstrip("/\\"))
    return spec


def run_files(out_dir: str | os.PathLike) -> list[str]:
    """The files of a training run present in ``out_dir`` (checkpoint, metrics log, gates folder)."""
    out_dir = Path(out_dir)
    return [name for name in (CHECKPOINT, METRICS, GATES_DIR) if (out_dir / name).exists()]


def check_resume(meta: dict, where, *, model: str | None = None, data: str | None = None, steps: int | None = None) -> None:
    """Raise ``ValueError`` if a checkpoint's run (``meta``) cannot be continued with these settings.

    Args:
        meta: the checkpoint's JSON state; ``where``: the checkpoint's path, for messages.
        model, data: the model name/path and the data spec of the run to resume (None: not checked).
        steps: the total steps asked for; below the checkpoint's step is an error.
    """
    saved_model = meta.get("model") or meta.get("backbone")
    if model is not None and saved_model is not None and _model_id(model) != _model_id(saved_model):
        raise ValueError(
            f"{where} was written by a run on model '{saved_model}', not '{model}'; "
            f"resume with --model {saved_model}, or start a new run in another --out"
        )
    saved_data = meta.get("data")
    if data is not None and saved_data is not None and _data_id(data) != _data_id(saved_data):
        raise ValueError(
            f"{where} was written by a run on data '{saved_data}', not '{data}'; "
            f"resume with --data {saved_data}, or start a new run in another --out"
        )
    if steps is not None and steps < meta.get("step", 0):
        raise ValueError(
            f"--steps {steps} is below the step the run in {where} already reached ({meta['step']}); "
            f"pass --steps {meta['step']} or more to continue it, or --overwrite to start afresh"
        )


def check_run_dir(
    out_dir: str | os.PathLike,
    *,
    resume: bool = False,
    overwrite: bool = False,
    model: str | None = None,
    data: str | None = None,
    steps: int | None = None,
) -> dict | None:
    """Check that a run may start in ``out_dir``; touches nothing.

    A fresh run needs a folder without a run in it (see ``run_files``) unless ``overwrite``; a
    resumed run needs the checkpoint, and the same model and data (see ``check_resume``).

    Returns:
        The checkpoint's JSON state when resuming, else None.

    Raises:
        ValueError: the folder holds a run and neither ``resume`` nor ``overwrite`` is given;
            ``resume`` without a checkpoint; a checkpoint of another model or data, or with more
            steps than asked for; ``resume`` and ``overwrite`` together.
    """
    out_dir = Path(out_dir)
    if resume and overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite discards it; pass only one")
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is a file; pass a folder")
    ckpt = out_dir / CHECKPOINT
    if resume:
        if not ckpt.is_file():
            raise ValueError(f"--resume: there is no checkpoint to continue in {out_dir} ({CHECKPOINT} is missing); "
                             "start the run without --resume")
        meta = _checkpoint_meta(ckpt)
        check_resume(meta, ckpt, model=model, data=data, steps=steps)
        return meta
    found = run_files(out_dir)
    if found and not overwrite:
        raise ValueError(
            f"{out_dir} already holds a training run ({', '.join(found)}); pass --resume to continue it, "
            "--overwrite to discard it and start afresh, or choose another --out"
        )
    return None


def _clear_run(out_dir: Path) -> None:
    """Remove the files a previous run wrote in ``out_dir`` (only those this module owns)."""
    for name in (CHECKPOINT, METRICS):
        (out_dir / name).unlink(missing_ok=True)
    gates_dir = out_dir / GATES_DIR
    if gates_dir.is_dir():
        from vdm_engine.gates import GATES_CONFIG, GATES_WEIGHTS

        for name in (GATES_CONFIG, GATES_WEIGHTS):
            (gates_dir / name).unlink(missing_ok=True)
        try:
            gates_dir.rmdir()
        except OSError:
            pass  # other files in it are not ours


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


def _rewrite_metrics(path: Path, upto_step: int) -> None:
    """Keep only the log lines of steps <= ``upto_step`` (what the checkpoint covers)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= upto_step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a line torn by the kill
    atomic_write_bytes(path, ("\n".join(keep) + "\n").encode() if keep else b"")


def _is_better(rec: dict, best: dict | None) -> bool:
    if best is None:
        return True
    return (rec["kept"], rec["kl"]) < (best["kept"], best["kl"])


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
            False never. Gates that did not learn a mask are never registered.
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
    backbone, gates = explainer.backbone, explainer.gates
    device = backbone.device
    out_dir = Path(out_dir)
    ckpt_path, metrics_path = out_dir / CHECKPOINT, out_dir / METRICS
    cfg = config

    # ----- data ---------------------------------------------------------------------------------
    H, W = backbone.image_size
    if isinstance(train_images, DataSource):
        source = train_images
    elif torch.is_tensor(train_images):
        backbone.check_pixels(train_images)
        source = _TensorSource(train_images)
    else:
        raise ValueError(
            f"train_images must be a (M, 3, {H}, {W}) pixel tensor or a DataSource, got {type(train_images).__name__}"
        )
    if register not in (None, True, False):
        raise ValueError(f"register must be None, True or False, got {register!r} (the model name goes in register_as)")
    register_name = register_as or backbone.name_or_path
    check_run_dir(out_dir, resume=resume, overwrite=overwrite, model=backbone.name_or_path,
                  data=_data_id(source.spec), steps=cfg.steps)
    if val_images is None:
        if not isinstance(source, DataSource) or isinstance(source, _TensorSource):
            raise ValueError("val_images is None but train_images is a tensor; pass held-out pixel values")
        val_images = backbone.preprocess(source.validation(cfg.val_size))
    backbone.check_pixels(val_images)
    val_shard = val_images[info.rank :: info.world_size].to(device)
    preprocess = (lambda b: b) if isinstance(source, _TensorSource) else backbone.preprocess

    ops = select_ops(device, backbone.dtype)  # the masked passes' patch-masking op

    # ----- state ----------------------------------------------------------------------------------
    gates.to(device).train()
    obj = GateObjective(backbone, gates, alpha_init=cfg.alpha_init, eps=cfg.eps, l0=cfg.l0, precision=cfg.precision,
                        mask_fn=ops.patch_mask)
    obj.alpha.data = obj.alpha.data.to(device)
    probe_params = [gates.w1, gates.b1, gates.w2, gates.b2, gates.add]
    groups = [{"params": probe_params, "lr": cfg.lr_probe}]
    if isinstance(gates.placeholder, torch.nn.Parameter):
        groups.append({"params": [gates.placeholder], "lr": cfg.lr_placeholder})
    opt = torch.optim.Adam(groups)
    opt_alpha = torch.optim.RMSprop([obj.alpha], lr=cfg.lr_alpha, centered=True)
    gen_depth = torch.Generator().manual_seed(cfg.seed)  # same on every rank: all ranks pick the same depth
    gen_noise = torch.Generator(device=device).manual_seed(cfg.seed * 7919 + info.rank + 1)
    gens = {"depth": gen_depth, "noise": gen_noise}
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.precision == "fp16" and device.type == "cuda")

    step, best, best_state, history, resumed_window = 0, None, None, [], None
    if resume:
        tensors, meta = _load_checkpoint(ckpt_path)
        if meta.get("gate_config") != gates.config.to_dict():
            raise ValueError(f"{ckpt_path} was written for other gates ({meta.get('gate_config')}); use another --out")
        if meta.get("world_size", 1) != info.world_size:
            raise ValueError(
                f"{ckpt_path} was written by a run with {meta.get('world_size')} processes; resume with the same number"
            )
        with torch.no_grad():
            gates.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("gates.")})
            obj.alpha.copy_(tensors["alpha"])
        _restore_optimizer(opt, "opt", tensors, meta, device)
        _restore_optimizer(opt_alpha, "opt_alpha", tensors, meta, device)
        gen_depth.set_state(tensors["rng.depth"])
        gen_noise.set_state(tensors["rng.noise"])
        # Learning rates come from the (possibly changed) config, not the saved groups.
        if len(opt.param_groups) > 1:
            opt.param_groups[1]["lr"] = cfg.lr_placeholder
        opt_alpha.param_groups[0]["lr"] = cfg.lr_alpha
        if meta.get("scaler"):
            scaler.load_state_dict(meta["scaler"])
        step, best, history = meta["step"], meta.get("best"), meta.get("history", [])
        resumed_window = meta.get("log_window")
        if any(k.startswith("best.") for k in tensors):
            best_state = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
        if info.is_main:
            _rewrite_metrics(metrics_path, step)
    elif info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        _clear_run(out_dir)  # check_run_dir let a fresh run in only if the folder is empty or overwrite is on
    barrier()

    model = obj
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(obj, device_ids=[device.index] if device.type == "cuda" else None)

    def write_checkpoint():
        if not info.is_main:
            return
        meta = {
            "step": step,
            "config": cfg.to_dict(),
            "gate_config": gates.config.to_dict(),
            "world_size": info.world_size,
            "best": best,
            "history": history,
            "backbone": backbone.name_or_path,
            "model": _model_id(backbone.name_or_path),
            "data": _data_id(source.spec),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "log_window": acc,
        }
        _save_checkpoint(ckpt_path, obj, opt, opt_alpha, gens, meta, best_state)

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
    # Running sums of the current log window (saved in checkpoints so resumed logs match).
    acc = resumed_window or {"loss": 0.0, "kl": 0.0, "kept": 0.0, "l0": 0.0, "agree": 0.0, "n": 0}
    last_val = history[-1] if history else None
    try:
        while step < cfg.steps:
            pv = next(batches).to(device, non_blocking=True)
            lr_scale = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
            opt.param_groups[0]["lr"] = cfg.lr_probe * lr_scale
            w = depth_weights(obj.alpha, cfg.depth_sampling, cfg.alpha_init, cfg.last_depth_weight)
            depth = int(torch.multinomial(w, 1, generator=gen_depth))
            logits, hidden = clean_pass(backbone, pv, cfg.precision)
            loss, stats = model(logits, hidden, depth, gen_noise)
            if any_across_ranks(not bool(torch.isfinite(loss)), device):
                raise TrainingDiverged(f"the loss became NaN/Inf ({loss.item()}) at step {step + 1}")
            opt.zero_grad(set_to_none=True)
            opt_alpha.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            grads = [p.grad for p in probe_params + [gates.placeholder] if p.grad is not None]
            finite = all(bool(torch.isfinite(g).all()) for g in grads) and bool(torch.isfinite(obj.alpha.grad).all())
            if any_across_ranks(not finite, device) and not scaler.is_enabled():
                raise TrainingDiverged(f"a gradient became NaN/Inf at step {step + 1}")
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(probe_params + [gates.placeholder], cfg.grad_clip)
            obj.alpha.grad.neg_()  # gradient ascent on the multipliers
            scaler.step(opt)
            scaler.update()
            opt_alpha.step()
            with torch.no_grad():
                obj.alpha.clamp_(0.0, cfg.alpha_max)
            if not all(bool(torch.isfinite(p).all()) for p in gates.parameters()):
                raise TrainingDiverged(f"a gate parameter became NaN/Inf at step {step + 1}")
            step += 1

            for k, v in zip(("kl", "kept", "l0", "agree"), stats):
                acc[k] += float(v)
            acc["loss"] += float(loss.detach())
            acc["n"] += 1
            if step % log_interval == 0 or step == cfg.steps:
                n = acc.pop("n")
                rec = {"kind": "train", "step": step, "depth": depth, "lr_probe": opt.param_groups[0]["lr"]}
                rec.update({k: v / n for k, v in acc.items()})
                rec["alpha"] = [round(float(a), 4) for a in obj.alpha.detach().cpu()]
                log(rec)
                bar.set_postfix(  # live numbers of the sampled gates over the last log window
                    kl=f"{rec['kl']:.3f}", kept=f"{rec['kept']:.2f}", agree=f"{rec['agree']:.2f}",
                    alpha=f"{float(obj.alpha.detach().mean()):.2f}", refresh=False,
                )
                acc = {"loss": 0.0, "kl": 0.0, "kept": 0.0, "l0": 0.0, "agree": 0.0, "n": 0}
            bar.update(1)

            if step % cfg.eval_interval == 0 or step == cfg.steps:
                gates.eval()
                sums = hard_mask_validation(
                    backbone, gates, val_shard, threshold=cfg.threshold, precision=cfg.precision, mask_fn=ops.patch_mask
                )
                gates.train()
                for v in sums.values():
                    all_reduce_sum(v)
                n = float(sums["count"])
                rec = {
                    "kind": "val", "step": step, "kl": float(sums["kl"]) / n, "agreement": float(sums["agree"]) / n,
                    "kept": float(sums["kept"]) / n, "kept_depth": [round(float(x) / n, 4) for x in sums["kept_depth"]],
                    "images": int(n),
                }
                rec["qualified"] = rec["kl"] <= cfg.eps_valid and rec["agreement"] >= cfg.agreement
                history.append(rec)
                last_val = rec
                log(rec)
                if rec["qualified"] and _is_better(rec, best):
                    best = rec
                    best_state = {k: v.detach().cpu().clone() for k, v in gates.state_dict().items()}
                bar.set_postfix(
                    kl=f"{rec['kl']:.3f}", kept=f"{rec['kept']:.2f}", agree=f"{rec['agreement']:.2f}",
                    alpha=f"{float(obj.alpha.detach().mean()):.2f}",
                )
            if step % cfg.checkpoint_interval == 0 or step == cfg.steps:
                write_checkpoint()
    except TrainingDiverged as e:
        msg = f"{e}; stopped. The last good checkpoint is kept"
        if ckpt_path.exists():
            msg += f" in {ckpt_path}"
            msg += " (continue with --resume after lowering the learning rates)"
        else:
            msg += " (none was written yet)"
        raise TrainingDiverged(msg) from None
    finally:
        bar.close()
        if log_file is not None:
            log_file.close()

    # ----- result ---------------------------------------------------------------------------------
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
    failure = mask_failure(chosen, qualified=qualified, eps_valid=cfg.eps_valid, agreement=cfg.agreement)
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
