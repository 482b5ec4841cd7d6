"""A training run's folder: its file names, the checks before a run may start in it, and the resumed settings.

A folder holding a run is never overwritten by accident: ``check_run_dir`` refuses unless the run
is resumed (same model, same data, at least as many steps) or ``overwrite`` is given.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from vdm_engine._io import atomic_write_bytes

from .checkpoint import read_checkpoint_meta
from .config import TrainConfig

__all__ = [
    "CHECKPOINT",
    "METRICS",
    "GATES_DIR",
    "run_files",
    "check_resume",
    "check_run_dir",
    "resume_config",
    "clear_run",
    "rewrite_metrics",
    "model_id",
    "data_id",
]

CHECKPOINT = "checkpoint.safetensors"
METRICS = "metrics.jsonl"
GATES_DIR = "gates"


def model_id(name: str) -> str:
    """How a run records its model: local directories as absolute paths, presets as their hub ids."""
    from vdm_engine.backbone import PRESETS

    name = PRESETS.get(str(name), str(name))
    return os.path.abspath(name.rstrip("/\\")) if os.path.isdir(name) else name


def data_id(spec: str) -> str:
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
    if model is not None and saved_model is not None and model_id(model) != model_id(saved_model):
        raise ValueError(
            f"{where} was written by a run on model '{saved_model}', not '{model}'; "
            f"resume with --model {saved_model}, or start a new run in another --out"
        )
    saved_data = meta.get("data")
    if data is not None and saved_data is not None and data_id(data) != data_id(saved_data):
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
        meta = read_checkpoint_meta(ckpt)
        check_resume(meta, ckpt, model=model, data=data, steps=steps)
        return meta
    found = run_files(out_dir)
    if found and not overwrite:
        raise ValueError(
            f"{out_dir} already holds a training run ({', '.join(found)}); pass --resume to continue it, "
            "--overwrite to discard it and start afresh, or choose another --out"
        )
    return None


def resume_config(out_dir: str | os.PathLike, **overrides) -> TrainConfig:
    """The settings of the run in ``out_dir`` (from its checkpoint), with ``overrides`` replacing fields.

    With no overrides a resumed run continues exactly; typical overrides are more ``steps``, or a
    lower ``lr_probe`` after a divergence.

    Raises:
        ValueError: no readable checkpoint in ``out_dir``; an unknown or invalid field; a ``probe_size``
            other than the run's (the checkpoint's probes have their own shape).
    """
    ckpt = Path(out_dir) / CHECKPOINT
    if not ckpt.is_file():
        raise ValueError(f"there is no checkpoint in {out_dir} ({CHECKPOINT} is missing) to take the settings from")
    saved = read_checkpoint_meta(ckpt)["config"]
    if overrides.get("probe_size") is not None and overrides["probe_size"] != saved.get("probe_size"):
        raise ValueError(f"the run in {out_dir} trains probes of size {saved.get('probe_size') or 'D/4 (default)'}; "
                         f"a resumed run cannot change it to {overrides['probe_size']} (start a new run, or --overwrite)")
    return TrainConfig.from_dict({**saved, **overrides})


def clear_run(out_dir: Path) -> None:
    """Remove the files a previous run wrote in ``out_dir`` (only those a run owns)."""
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


def rewrite_metrics(path: Path, upto_step: int) -> None:
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
