"""``vdm-eval --model MODEL --data SRC --methods diffmask,rollout,... [--metrics ...] [--n 500] [--out DIR]``.

Faithfulness metrics (perturbation, insertion/deletion, ROAD, sparseness, complexity, intensity,
model randomisation; on toy data also localisation) of DiffMask and the baselines; writes
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
    from vdm_engine.evaluation.metric_names import METRICS

    p = CliParser(prog=PROG, description="Faithfulness evaluation of DiffMask and baseline attributions.")
    req = p.add_argument_group("required")
    req.add_argument("--data", required=True, help="toy, digits, imagefolder:PATH or hf:NAME[:SPLIT]")
    opt = p.add_argument_group("optional")
    opt.add_argument("--model", default="vit-digits", help="embedded name, preset, hub id or local dir (default vit-digits)")
    opt.add_argument("--gates", default=None, metavar="DIR", help="gates directory (default: registry, then embedded)")
    opt.add_argument("--path-gates", default=None, metavar="DIR",
                     help="K-level gates for diffmask-path (default: K-level --gates, else the embedded model's gates-levels)")
    opt.add_argument("--allow-backbone-mismatch", action="store_true",
                     help="accept gates recorded for another backbone (a fine-tuned copy); warns and records it")
    opt.add_argument("--methods", default=None,
                     help=f"comma-separated (default {DEFAULT_METHODS}, with diffmask-path first when the gates in use "
                          "have K levels: --path-gates, K-level --gates, or the shipped gates with their gates-levels)")
    opt.add_argument("--metrics", default=",".join(METRICS),
                     help=f"comma-separated subset of {','.join(METRICS)} (default all)")
    opt.add_argument("--randomise-blocks", default=None, metavar="K,K,...",
                     help="randomisation test: numbers of top blocks re-initialised (default 1..L)")
    opt.add_argument("--retrain-steps", type=int, default=200,
                     help="randomisation test on digits/toy: steps of the gates retrained on each randomised "
                          "model (default 200; 0 = only the trained gates)")
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


def _path_gates_in_use(model: str, gates: str | None, path_gates: str | None) -> tuple[bool, str | None]:
    """Whether the default methods include ``diffmask-path``, and the K-level gates it reads (None: the
    model's shipped ``gates-levels``).

    The path goes with the gates in use: ``--path-gates`` when given; else ``--gates`` when that folder holds
    K-level gates (levels >= 2); else, without ``--gates``, the model's shipped ``gates-levels`` only while
    the gates in use are the shipped ones (their main level is those gates; a registry entry hides them).
    """
    import json
    from pathlib import Path

    from vdm_engine.models import embedded_levels_dir
    from vdm_engine.registry import registered_gates, shipped_gates

    if path_gates is not None:
        return True, path_gates
    if gates is not None:
        try:
            levels = json.loads((Path(gates) / "gates_config.json").read_text())["config"].get("levels", 1)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False, None  # loading --gates reports what is wrong with it
        return (True, gates) if isinstance(levels, int) and levels >= 2 else (False, None)
    shipped = shipped_gates(model)
    in_use_shipped = shipped is not None and registered_gates(model) == shipped
    return in_use_shipped and embedded_levels_dir(model) is not None, None


def main(argv: Sequence[str] | None = None) -> int:
    def body() -> int:
        args = _parser().parse_args(argv)
        # before anything slow: the device, the model and the output folder
        check_device(args.device)
        check_model(args.model)
        check_out_dir(args.out)
        if args.n < 1:
            raise UsageError(f"--n must be >= 1, got {args.n}")
        from vdm_engine.evaluation.metric_names import check_metrics

        try:
            metrics = check_metrics(args.metrics.split(","))
        except ValueError as e:
            raise UsageError(f"--metrics: {e}") from None
        if args.retrain_steps < 0:
            raise UsageError(f"--retrain-steps must be >= 0, got {args.retrain_steps}")
        ks = None
        if args.randomise_blocks is not None:
            try:
                ks = [int(k) for k in args.randomise_blocks.split(",") if k.strip()]
            except ValueError:
                raise UsageError(f"--randomise-blocks must be comma-separated integers, got {args.randomise_blocks!r}") from None
            if not ks or min(ks) < 0:
                raise UsageError(f"--randomise-blocks must list block counts >= 0, got {args.randomise_blocks!r}")
        quiet_transformers()  # after the checks: importing transformers takes seconds
        from vdm_engine.evaluation import PerturbationConfig, evaluate_model, write_report
        from vdm_engine.provenance import GatesProvenance

        if "road" in metrics:
            try:
                import scipy.sparse.linalg  # noqa: F401
            except ImportError:
                raise UsageError("the 'road' metric needs scipy (pip install 'vdm-engine[eval]'); or leave road out of --metrics") from None
        retrain = None
        if "randomisation" in metrics and args.retrain_steps and args.data.strip() in ("digits", "toy"):
            from vdm_engine.training.recipes import retrainer

            retrain = retrainer(args.data.strip(), steps=args.retrain_steps, seed=args.seed)
        with_path, args.path_gates = _path_gates_in_use(args.model, args.gates, args.path_gates)
        if args.methods is None:
            args.methods = ("diffmask-path," if with_path else "") + DEFAULT_METHODS
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
            allow_backbone_mismatch=args.allow_backbone_mismatch, diffmask_from=stored, metrics=metrics,
            randomise_blocks=ks, retrain=retrain, path_gates=args.path_gates,
        )
        written = write_report(results, args.out, examples, plots=not args.no_plots)
        rp = config.replacements[0]
        print(f"{PROG}: {GatesProvenance(**results['gates_provenance']).describe()}", file=sys.stderr)
        print(f"{results['data_description']}: AUC of P(original class), {rp} replacement")
        for m, e in results["methods"].items():
            line = f"  {m:9s}"
            if rp in e:
                line += f" positive {e[rp]['positive']['auc_prob']:.4f}  negative {e[rp]['negative']['auc_prob']:.4f}"
            if rp in e.get("insertion_deletion", {}):
                d = e["insertion_deletion"][rp]
                line += f"  deletion {d['deletion']['auc']:.4f}  insertion {d['insertion']['auc']:.4f}"
            if "road" in e:
                line += f"  ROAD MoRF {e['road']['positive']['auc']:.4f}  LeRF {e['road']['negative']['auc']:.4f}"
            if "localisation" in e:
                loc = e["localisation"]
                line += f"  top-k F1 {loc['topk']['f1']:.3f}" + (f"  own F1 {loc['own']['f1']:.3f}" if "own" in loc else "")
            print(line)
        from vdm_engine.evaluation import versus_best_baselines

        for m, rows in versus_best_baselines(results).items():
            if rows:
                short = [f"{r['curve']} ({r['best']}, short by {r['miss']:.4f})" for r in rows if not r["met"]]
                print(f"  {m} level with the best baseline on {len(rows) - len(short)} of {len(rows)} curves"
                      + (f"; not on: {'; '.join(short)}" if short else ""))
        print("wrote " + ", ".join(str(p) for p in written))
        return 0

    return run_cli(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
