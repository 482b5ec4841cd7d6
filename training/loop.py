"""``train_gates``: the gate training loop with validation, checkpoints, exact resume and a NaN guard.

Files in ``out_dir``:

- ``checkpoint.safetensors`` -- everything needed to continue exactly (gates, alphas, optimiser
  states, RNG states, step, best-so-far), one file written atomically every
  ``checkpoint_interval`` steps; the run's JSON state lives in the safetensors metadata;
- ``metrics.jsonl`` -- one JSON object per line: ``{"kind": "train", ...}`` every ``log_interval``
  steps and ``{"kind": "val", ...}`` at each validation;
- ``gates/`` -- the selected gates (``Gates.save_pretrained``) with their validation numbers.
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
from vdm_engine.explainer import install_kernels
from vdm_engine.gates import GateConfig, Gates

from .config import TrainConfig
from .data import DataSource, pixel_batches
from .distributed import all_reduce_sum, any_across_ranks, barrier, dist_info
from .objective import GateObjective, clean_pass, depth_weights, hard_mask_validation

__all__ = ["TrainResult", "TrainingDiverged", "new_gates", "train_gates", "CHECKPOINT", "METRICS", "GATES_DIR"]

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
    register: bool | str = True,
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
            states, RNG states, step); starts afresh when there is none.
        register: register the selected gates in the local gates registry under the backbone's
            name (True), under the given model name (str), or not at all (False).
        progress: show a tqdm bar with live KL / kept fraction / agreement / alpha.
        log_interval: steps between ``train`` lines in the metrics log.

    Returns:
        ``TrainResult``.

    Raises:
        TrainingDiverged: the loss or a gradient became NaN/Inf (the last checkpoint is kept).
        ValueError: inconsistent inputs (shapes, a checkpoint from another run).
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
    if val_images is None:
        if not isinstance(source, DataSource) or isinstance(source, _TensorSource):
            raise ValueError("val_images is None but train_images is a tensor; pass held-out pixel values")
        val_images = backbone.preprocess(source.validation(cfg.val_size))
    backbone.check_pixels(val_images)
    val_shard = val_images[info.rank :: info.world_size].to(device)
    preprocess = (lambda b: b) if isinstance(source, _TensorSource) else backbone.preprocess

    install_kernels(backbone)

    # ----- state ----------------------------------------------------------------------------------
    gates.to(device).train()
    obj = GateObjective(backbone, gates, alpha_init=cfg.alpha_init, eps=cfg.eps, l0=cfg.l0, precision=cfg.precision)
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
    if resume and ckpt_path.exists():
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
        if metrics_path.exists():
            metrics_path.unlink()
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
                    backbone, gates, val_shard, threshold=cfg.threshold, precision=cfg.precision
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
    gates_dir, registered = None, None
    if info.is_main:
        gates_dir = final.save_pretrained(out_dir / GATES_DIR, backbone=backbone, metrics=metrics)
        if register:
            from vdm_engine.registry import register_gates

            registered = register_gates(register if isinstance(register, str) else backbone.name_or_path, gates_dir)
    barrier()
    if not qualified and info.is_main:
        print(
            f"vdm-train: no validation met KL <= {cfg.eps_valid} and agreement >= {cfg.agreement}; "
            "the saved gates are the last step's",
            file=sys.stderr,
        )
    return TrainResult(
        gates=final, gates_dir=gates_dir, step=step, best=best, last=last_val, qualified=qualified,
        registered=registered, history=history, seconds=time.time() - t0,
    )


class _TensorSource(DataSource):
    """Preprocessed pixel values held in memory (indexed by ``pixel_batches``)."""

    def __init__(self, pixels: torch.Tensor):
        self.spec, self.pixels = "tensor", pixels

    def __len__(self) -> int:
        return len(self.pixels)

    def images(self, indices):
        return self.pixels[torch.as_tensor(np.asarray(indices), dtype=torch.long)]
