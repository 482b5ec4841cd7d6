"""``vdm-train``: learn DiffMask gates for a ViT classifier (also under ``torchrun --nproc_per_node N``)."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    from vdm_engine.cli._common import CliParser

    p = CliParser(
        prog="vdm-train",
        description="Train DiffMask gates (Lagrangian objective) for a frozen ViT classifier. "
        "Run it under `torchrun --nproc_per_node N` for data-parallel training.",
    )
    req = p.add_argument_group("required")
    req.add_argument("--model", required=True, help="embedded name (vit-digits, vit-toy), preset, hub id or local dir")
    req.add_argument("--data", required=True, help="toy, digits, imagefolder:PATH or hf:NAME[:SPLIT]")
    req.add_argument("--out", required=True, help="output folder: checkpoint, metrics.jsonl, gates/")
    opt = p.add_argument_group("optional")
    opt.add_argument("--steps", type=int, default=None, help="optimisation steps (default 3000)")
    opt.add_argument("--batch-size", type=int, default=None, help="images per step and process (default 64)")
    opt.add_argument("--eps", type=float, default=None, help="KL budget of the constraint (default 0.1)")
    opt.add_argument("--lr", type=float, default=None, help="probe learning rate (default 1e-3)")
    opt.add_argument("--lr-placeholder", type=float, default=None)
    opt.add_argument("--lr-alpha", type=float, default=None)
    opt.add_argument("--alpha-init", type=float, default=None)
    opt.add_argument("--alpha-max", type=float, default=None)
    opt.add_argument("--mul", type=float, default=None, help="probe output scale")
    opt.add_argument("--add-init", type=float, default=None, help="initial probe offset")
    opt.add_argument("--probe-size", type=int, default=None, metavar="P",
                     help="hidden units of each gate probe (default D/4; D/16 keeps K=4 levels within 1.15x plain)")
    opt.add_argument("--eval-interval", type=int, default=None, help="steps between validations")
    opt.add_argument("--checkpoint-interval", type=int, default=None, help="steps between checkpoints")
    opt.add_argument("--val-size", type=int, default=None, help="held-out validation images")
    opt.add_argument("--eps-valid", type=float, default=None, help="KL bound for selecting the best checkpoint")
    opt.add_argument("--agreement", type=float, default=None, help="agreement bound for the best checkpoint")
    opt.add_argument("--seed", type=int, default=None)
    opt.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    opt.add_argument("--replacement", default=None,
                     help="what dropped patches become while training: placeholder (default), or kinds "
                     "(placeholder, zeros, mean, noise) joined by '+', cycled over the rows of a batch")
    opt.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None, help="autocast of the frozen ViT")
    opt.add_argument(
        "--threads", type=int, default=None,
        help="CPU intra-op threads (default: 1 for small models, where more threads only contend; else torch's)",
    )
    opt.add_argument("--revision", default=None, help="hub revision of --model")
    opt.add_argument("--labels", default=None, metavar="A,B,...",
                     help="CLIP checkpoints only (required there): the zero-shot class names, comma-separated; "
                     "recorded with the gates")
    opt.add_argument("--prompt", default=None, help="CLIP only: the prompt template of each label (default 'a photo of a {}.')")
    run = opt.add_mutually_exclusive_group()
    run.add_argument("--resume", action="store_true", help="continue the run in OUT (same --model and --data)")
    run.add_argument("--overwrite", action="store_true", help="discard the run already in OUT and start afresh")
    reg = opt.add_mutually_exclusive_group()
    reg.add_argument(
        "--register", action="store_true",
        help="register the gates even if MODEL already has gates (replacing registered or shipped ones); "
        "refused for gates that did not learn a mask. Default: register only a model's first gates",
    )
    reg.add_argument("--no-register", action="store_true", help="never register the gates in the local registry")
    opt.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


_FIELDS = {
    "steps": "steps", "batch_size": "batch_size", "eps": "eps", "lr": "lr_probe", "lr_placeholder": "lr_placeholder",
    "lr_alpha": "lr_alpha", "alpha_init": "alpha_init", "alpha_max": "alpha_max", "mul": "mul", "add_init": "add_init",
    "eval_interval": "eval_interval", "checkpoint_interval": "checkpoint_interval", "val_size": "val_size",
    "eps_valid": "eps_valid", "agreement": "agreement", "seed": "seed", "precision": "precision",
    "replacement": "replacement", "probe_size": "probe_size",
}


def _summary(result) -> dict:
    """The one JSON line ``vdm-train`` prints on stdout."""
    chosen = result.best or result.last or {}
    return {
        "gates": str(result.gates_dir),
        "step": result.step,
        "selected": "best" if result.qualified else "last",
        "kept": chosen.get("kept"),
        "agreement": chosen.get("agreement"),
        "kl": chosen.get("kl"),
        "learned_mask": result.learned_mask,
        "did_not_learn": result.did_not_learn,
        "registered": str(result.registered) if result.registered else None,
        "registration": result.registration,
        "seconds": round(result.seconds, 1),
    }


def _run(args) -> int:
    import json

    from vdm_engine.cli._common import check_device, check_model, check_out_dir, parse_labels, quiet_transformers
    from vdm_engine.registry import RegistrationRefused
    from vdm_engine.training import TrainConfig, check_run_dir, resume_config, train

    check_device(args.device)
    check_model(args.model, revision=args.revision)
    given = {f: getattr(args, a) for a, f in _FIELDS.items() if getattr(args, a) is not None}
    fresh = None if args.resume else TrainConfig(**given)  # bad settings refused before anything is written
    # Before anything slow or written: refuse to clobber a run in --out, or to resume a missing or other run.
    # (``train`` checks the data too, once the source is open, still before loading the model.)
    check_run_dir(args.out, resume=args.resume, overwrite=args.overwrite, model=args.model, steps=given.get("steps"))
    check_out_dir(args.out, keep=True)  # kept: torchrun ranks check it at the same time
    # A resumed run keeps its own settings, except what is given again (e.g. more --steps or a lower
    # --lr after a divergence); with the same arguments it continues exactly.
    config = resume_config(args.out, **given) if args.resume else fresh
    quiet_transformers()  # its weight-loading bar would interleave with ours
    try:
        result = train(
            args.model, args.data, args.out, config, resume=args.resume, overwrite=args.overwrite, device=args.device,
            revision=args.revision, threads=args.threads, labels=parse_labels(args.labels), prompt=args.prompt,
            register=True if args.register else False if args.no_register else None, progress=not args.no_progress,
        )
    except RegistrationRefused as e:  # the run itself finished: report it, then the refusal
        if e.result is not None and e.result.gates_dir is not None:
            print(json.dumps(_summary(e.result)))
        raise
    if result.gates_dir is not None:  # only the rank that wrote the gates (rank 0 under torchrun) reports
        print(json.dumps(_summary(result)))
    return 0


def main(argv=None) -> int:
    from vdm_engine.cli._common import run_cli

    return run_cli("vdm-train", lambda: _run(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
