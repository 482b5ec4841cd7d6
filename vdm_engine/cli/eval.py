"""``vdm-eval --model MODEL --data SRC --methods diffmask,rollout,... [--n 500] [--out DIR]``.

Perturbation faithfulness (and, on toy data, localisation) of DiffMask and the baselines; writes
results.json, results.md and PNG curves into DIR.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ._common import CliParser, UsageError, check_device, check_model, check_out_dir, quiet_transformers, run_cli

__all__ = ["main"]

PROG = "vdm-eval"
DEFAULT_METHODS = "diffmask,rollout,gradcam,chefer,ig,random"


def _parser() -> argparse.ArgumentParser:
    p = CliParser(prog=PROG, description="Faithfulness evaluation of DiffMask and baseline attributions.")
    req = p.add_argument_group("required")
    req.add_argument("--data", required=True, help="toy, digits, imagefolder:PATH or hf:NAME[:SPLIT]")
    opt = p.add_argument_group("optional")
    opt.add_argument("--model", default="vit-digits", help="embedded name, preset, hub id or local dir (default vit-digits)")
    opt.add_argument("--gates", default=None, metavar="DIR", help="gates directory (default: registry, then embedded)")
    opt.add_argument("--allow-backbone-mismatch", action="store_true",
                     help="accept gates recorded for another backbone (a fine-tuned copy); warns and records it")
    opt.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated (default {DEFAULT_METHODS})")
    opt.add_argument("--n", type=int, default=500, help="images to evaluate (default 500; digits has 300 held out)")
    opt.add_argument("--out", default="eval-results", metavar="DIR", help="output folder (default ./eval-results)")
    opt.add_argument("--replacements", default="noise,mean", help="noise and/or mean (default noise,mean)")
    opt.add_argument("--steps", type=int, default=10, help="removal steps (default 10: 10%% each)")
    opt.add_argument("--seed", type=int, default=0, help="noise, tie-breaking and toy-data seed (default 0)")
    opt.add_argument("--batch-size", type=int, default=32, help="images per attribution batch (default 32)")
    opt.add_argument("--ig-steps", type=int, default=50, help="Integrated Gradients steps (default 50)")
    opt.add_argument("--ig-baseline", default="black", choices=("black", "zeros", "mean"),
                     help="Integrated Gradients baseline image: black (default), zeros (pixel values 0), mean")
    opt.add_argument("--threshold", type=float, default=0.5, help="DiffMask keep-probability threshold (default 0.5)")
    opt.add_argument("--device", default=None, help="cpu or cuda (default cpu)")
    opt.add_argument("--no-plots", action="store_true", help="skip the PNG figures (no matplotlib needed)")
    opt.add_argument("--diffmask-from", default=None, metavar="DIR",
                     help="take the DiffMask masks from a bulk run (vdm-explain --dataset ... --out DIR), by image id")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    quiet_transformers()

    def body() -> int:
        args = _parser().parse_args(argv)
        # before anything slow: the device, the model and the output folder
        check_device(args.device)
        check_model(args.model)
        check_out_dir(args.out)
        from vdm_engine.evaluation import PerturbationConfig, evaluate_model, write_report
        from vdm_engine.provenance import GatesProvenance

        if args.n < 1:
            raise UsageError(f"--n must be >= 1, got {args.n}")
        methods = [m for m in args.methods.split(",") if m.strip()]
        if "ig" in [m.strip().lower() for m in methods]:
            try:
                import captum  # noqa: F401
            except ImportError:
                raise UsageError("the 'ig' method needs captum (pip install captum); or leave ig out of --methods") from None
        if not args.no_plots:
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                raise UsageError("figures need matplotlib (pip install matplotlib); or pass --no-plots") from None
        stored = None
        if args.diffmask_from is not None:
            try:
                import pyarrow  # noqa: F401

                from vdm_engine.serve.bulk_output import read_masks
            except ImportError:
                raise UsageError("--diffmask-from reads Parquet, which needs pyarrow: pip install 'vdm-engine[serve]'") from None
            stored = read_masks(args.diffmask_from)  # ValueError: not a bulk run folder
        config = PerturbationConfig(
            steps=args.steps, replacements=tuple(r.strip() for r in args.replacements.split(",") if r.strip()),
            seed=args.seed, batch_size=args.batch_size,
        )
        results, examples = evaluate_model(
            args.model, args.data, methods, n=args.n, gates=args.gates, config=config, ig_steps=args.ig_steps,
            ig_baseline=args.ig_baseline, threshold=args.threshold, device=args.device,
            allow_backbone_mismatch=args.allow_backbone_mismatch, diffmask_from=stored,
        )
        written = write_report(results, args.out, examples, plots=not args.no_plots)
        rp = config.replacements[0]
        print(f"{PROG}: {GatesProvenance(**results['gates_provenance']).describe()}", file=sys.stderr)
        print(f"{results['data_description']}: AUC of P(original class), {rp} replacement")
        for m, e in results["methods"].items():
            line = f"  {m:9s} positive {e[rp]['positive']['auc_prob']:.4f}  negative {e[rp]['negative']['auc_prob']:.4f}"
            if "localisation" in e:
                loc = e["localisation"]
                line += f"  top-k F1 {loc['topk']['f1']:.3f}" + (f"  own F1 {loc['own']['f1']:.3f}" if "own" in loc else "")
            print(line)
        print("wrote " + ", ".join(str(p) for p in written))
        return 0

    return run_cli(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
