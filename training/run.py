"""``train``: one training run from names (model, data spec, output folder), what ``vdm-train`` runs."""

from __future__ import annotations

import os

import torch

from .config import TrainConfig
from .loop import TrainResult, new_gates, train_gates
from .rundir import check_run_dir, resume_config

__all__ = ["train", "pick_threads"]

_SMALL_MODEL = 256 * 65  # hidden size x tokens below which one CPU thread is fastest


def pick_threads(backbone, device: torch.device, threads: int | None = None) -> int:
    """CPU intra-op threads for training ``backbone``: ``threads`` if given, 1 for small models on CPU
    (their matmuls are so small that more threads only add synchronisation), else torch's current count."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        return threads
    if device.type == "cpu" and backbone.hidden_size * backbone.num_tokens <= _SMALL_MODEL:
        return 1
    return torch.get_num_threads()


def train(
    model: str,
    data: str,
    out_dir: str | os.PathLike,
    config: TrainConfig | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    device: str | None = None,
    revision: str | None = None,
    threads: int | None = None,
    register: bool | None = None,
    progress: bool = True,
    labels=None,
    prompt: str | None = None,
) -> TrainResult:
    """Train fresh gates for ``model`` on ``data`` into ``out_dir``; also under ``torchrun``.

    Opens the data source, checks the run folder (before loading the model), loads the backbone,
    picks the CPU threads (``pick_threads``), builds the explainer with ``new_gates`` and calls
    ``train_gates``. Joins the ``torchrun`` process group if there is one, and leaves it again if it
    joined it here. The gates register under ``model`` (see ``train_gates``' ``register``).

    Args:
        model: embedded name, preset, hub id or local ``save_pretrained`` directory.
        data: data spec (``toy``, ``digits``, ``imagefolder:PATH``, ``hf:NAME[:SPLIT]``).
        out_dir: the run folder.
        config: ``TrainConfig``; default ``TrainConfig()`` for a fresh run and the checkpoint's own
            settings when resuming (``resume_config`` merges changed ones).
        resume, overwrite, register, progress: as in ``train_gates``.
        device: ``cpu`` or ``cuda`` (under ``torchrun`` each rank takes ``cuda:LOCAL_RANK``);
            default cuda when available.
        revision: hub revision of ``model``.
        labels, prompt: CLIP checkpoints only: the zero-shot classes (recorded with the gates).
        threads: CPU intra-op threads during the run (restored afterwards).

    Returns:
        ``TrainResult``.

    Raises:
        ValueError: a bad data spec, a run folder that may not be used (see ``check_run_dir``),
            bad settings; and whatever ``train_gates`` raises.
    """
    import torch.distributed as dist

    from vdm_engine import Explainer, load_backbone

    from .data import open_source
    from .distributed import init_distributed, shutdown

    if config is None:
        config = resume_config(out_dir) if resume else TrainConfig()
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    joined = not (dist.is_available() and dist.is_initialized())
    info = init_distributed(device)
    saved_threads = torch.get_num_threads()
    try:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", info.local_rank)
        source = open_source(data, seed=config.seed)  # fail fast on a bad spec
        # Before the slow model load: refuse to clobber a run, or to resume a missing or other run.
        check_run_dir(out_dir, resume=resume, overwrite=overwrite, model=model, data=source.spec, steps=config.steps)
        backbone = load_backbone(model, revision=revision, device=dev, labels=labels, prompt=prompt)
        torch.set_num_threads(pick_threads(backbone, dev, threads))
        explainer = Explainer(backbone, new_gates(backbone, config).to(dev))
        return train_gates(
            explainer, source, None, config, out_dir=out_dir, resume=resume, overwrite=overwrite, register=register,
            register_as=model, progress=progress,
        )
    finally:
        torch.set_num_threads(saved_threads)
        if joined:
            shutdown()
