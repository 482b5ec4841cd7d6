"""``vdm-export [--model MODEL] [--gates DIR] --out PATH [...]``: one validated ONNX graph (ViT + gates).

The default model is the embedded ``vit-digits``, so ``vdm-export --out m.onnx`` works offline.
An existing ``--out`` file is replaced only with ``--overwrite``. Exit codes: 0 written; 2 bad
usage, unknown model, missing weights or gates, unwritable ``--out``; 1 export or validation
failure; 130 Ctrl-C, 143 SIGTERM (nothing is left at ``--out``, nor staging files, in all of these).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from ._common import CliParser, UsageError, check_model, check_out_dir, check_out_file, quiet_transformers, run_cli

__all__ = ["main", "load_explainer", "PROG"]

PROG = "vdm-export"
_CLI_OUTPUTS = ("logits", "patch_mask", "layer_masks")


def _parser() -> argparse.ArgumentParser:
    from vdm_engine.export.graph import OUTPUTS

    p = CliParser(prog=PROG, description="Export a ViT and its DiffMask gates as one validated ONNX graph.")
    req = p.add_argument_group("required")
    req.add_argument("--out", required=True, metavar="PATH", help="the .onnx file to write")
    opt = p.add_argument_group("optional")
    opt.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    opt.add_argument("--model", default="vit-digits",
                     help="embedded name, preset (vit-b16, ...), hub id or local directory (default vit-digits)")
    opt.add_argument("--revision", default=None, help="hub revision of --model")
    opt.add_argument("--gates", default=None, metavar="DIR", help="gates directory (default: the registry, then embedded)")
    opt.add_argument("--allow-backbone-mismatch", action="store_true",
                     help="accept gates recorded for another backbone (a fine-tuned copy); warns and records it")
    opt.add_argument("--untrained-gates", action="store_true",
                     help="if no trained gates are found, export random ones (benchmarks only; recorded in the metadata)")
    opt.add_argument("--random-weights", action="store_true",
                     help="random backbone of the architecture named by --model (vit-tiny, vit-b16, vit-l16) and "
                          "random gates, built offline: for timing only")
    opt.add_argument("--fp16", action="store_true", help="fp16 weights and compute (inputs and outputs stay float32)")
    opt.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    opt.add_argument("--batch-size", type=int, default=None, metavar="N", help="fixed batch size (default: dynamic)")
    opt.add_argument("--uint8-input", action="store_true",
                     help="take raw uint8 (B, H, W, 3) images; rescale and normalisation happen in the graph")
    opt.add_argument("--outputs", nargs="+", type=_output_names, default=[list(_CLI_OUTPUTS)], metavar="NAME",
                     help=f"graph outputs, space- or comma-separated, from {', '.join(OUTPUTS)} "
                          f"(default: {' '.join(_CLI_OUTPUTS)})")
    opt.add_argument("--threshold", type=float, default=0.5, help="hard-mask threshold for masked_logits/kl (default 0.5)")
    opt.add_argument("--atol", type=float, default=None, metavar="X",
                     help="max abs difference onnxruntime vs PyTorch (default 1e-4 fp32, 1e-2 fp16)")
    opt.add_argument("--providers", default="auto", choices=("auto", "cpu", "cuda"),
                     help="onnxruntime provider for validation and timing (default auto)")
    opt.add_argument("--triton-repo", default=None, metavar="DIR", help="also write a Triton model repository entry")
    opt.add_argument("--triton-name", default=None, help="Triton model name (default: the --out file's stem)")
    opt.add_argument("--triton-max-batch", type=int, default=32, metavar="N", help="Triton max_batch_size (default 32)")
    opt.add_argument("--tensorrt", action="store_true", help="add a TensorRT FP16 accelerator block to the Triton config")
    opt.add_argument("-v", "--verbose", action="store_true", help="log per-output differences of every validation input")
    return p


def _output_names(value: str) -> list[str]:
    """``--outputs`` takes ``logits patch_mask`` as well as ``logits,patch_mask``."""
    from vdm_engine.export.graph import OUTPUTS

    names = [n.strip() for n in value.split(",") if n.strip()]
    bad = [n for n in names if n not in OUTPUTS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"invalid choice: {(bad or [value])[0]!r} (choose from {', '.join(OUTPUTS)})")
    return names


def _status(msg: str) -> None:
    print(f"{PROG}: {msg}", file=sys.stderr, flush=True)


def load_explainer(model: str, *, gates: str | None = None, revision: str | None = None,
                   untrained_gates: bool = False, random_weights: bool = False,
                   allow_backbone_mismatch: bool = False):
    """The explainer to export and what to record about it.

    Returns:
        (explainer, untrained_gates_used: bool).
    """
    import torch

    from vdm_engine import Explainer, GateConfig, Gates
    from vdm_engine.backbone import SHAPES, load_backbone, random_backbone, resolve_model_source
    from vdm_engine.explainer import GatesNotFoundError
    from vdm_engine.provenance import classify_source
    from vdm_engine.registry import registered_gates, registry_home

    def random_gates(backbone):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return Gates(GateConfig(backbone.hidden_size, backbone.num_hidden_states))

    if random_weights:
        if model not in SHAPES:
            raise UsageError(f"--random-weights needs an architecture name for --model, one of {sorted(SHAPES)}; got {model!r}")
        if gates:
            raise UsageError("--gates cannot be combined with --random-weights (random weights get random gates)")
        backbone = random_backbone(model)
        return Explainer(backbone, random_gates(backbone)).eval(), True
    check_model(model, revision=revision)  # an unknown name is "no such model", not missing gates
    resolve_model_source(model)  # a missing embedded model is reported before missing gates
    gates_dir = gates if gates is not None else registered_gates(model)
    if gates_dir is None and not untrained_gates:
        raise GatesNotFoundError(
            f"no trained gates found for '{model}'. Train them with `vdm-train --model {model} --data SRC --out DIR` "
            "(this registers them), pass --gates DIR, or add --untrained-gates to export random gates for benchmarks"
        )
    backbone = load_backbone(model, revision=revision)
    if gates_dir is None:
        _status(f"warning: exporting RANDOM gates for '{model}' (--untrained-gates); the masks mean nothing")
        return Explainer(backbone, random_gates(backbone)).eval(), True
    source = "path" if gates is not None else classify_source(gates_dir, registry_home())
    loaded = Gates.from_pretrained(gates_dir, source=source)
    return Explainer(backbone, loaded, allow_backbone_mismatch=allow_backbone_mismatch).eval(), False


def _validation_images(model: str, random_weights: bool):
    """Real images for the validation run, where this install has some for the model."""
    if random_weights:
        return None
    try:
        if model == "vit-digits":
            from vdm_engine.training.data import digits_split

            return digits_split("test")[0][:8]
        if model == "vit-toy":
            from vdm_engine.training.data import toy_batch

            return toy_batch(8, seed=12345)[0]
    except (ImportError, ValueError):
        return None
    return None


def _fmt_shape(dims) -> str:
    return "[" + ", ".join(str(d) for d in dims) + "]"


def _run(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.atol is not None and not args.atol > 0:
        raise UsageError(f"--atol must be > 0, got {args.atol}")
    if not 0.0 <= args.threshold <= 1.0:
        raise UsageError(f"--threshold must be in [0, 1], got {args.threshold}")
    from vdm_engine.export.onnx import MIN_OPSET

    if args.opset < MIN_OPSET:
        raise UsageError(f"--opset must be >= {MIN_OPSET} (the dynamo exporter's oldest), got {args.opset}")
    if args.triton_max_batch < 1:
        raise UsageError(f"--triton-max-batch must be >= 1, got {args.triton_max_batch}")
    args.outputs = list(dict.fromkeys(n for names in args.outputs for n in names))
    # before anything slow: the model exists, and --out can be written
    if not args.random_weights:
        check_model(args.model, revision=args.revision)
    check_out_file(args.out, args.overwrite)
    if args.triton_repo:
        check_out_dir(args.triton_repo, flag="--triton-repo")
    if args.verbose:
        logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
        logging.getLogger("vdm_engine.export").setLevel(logging.INFO)
    try:
        from vdm_engine.export import export_onnx, write_triton_repo
        from vdm_engine.export.validate import time_onnx
    except ImportError as e:
        raise UsageError(f"export needs onnx, onnxscript and onnxruntime: {e}") from e

    from vdm_engine.runtime import resolve_providers

    provider = resolve_providers(args.providers)[0]  # before loading anything: 'cuda' without onnxruntime-gpu
    explainer, untrained = load_explainer(
        args.model, gates=args.gates, revision=args.revision,
        untrained_gates=args.untrained_gates, random_weights=args.random_weights,
        allow_backbone_mismatch=args.allow_backbone_mismatch,
    )
    _status(explainer.provenance.describe())
    batch = "dynamic" if args.batch_size is None else args.batch_size
    dtype = "fp16" if args.fp16 else "fp32"
    _status(f"exporting {args.model} ({dtype}, opset {args.opset}, batch {batch}) ...")
    try:
        result = export_onnx(
            explainer, args.out, opset=args.opset, dtype=dtype, batch=batch, outputs=args.outputs,
            uint8_input=args.uint8_input, threshold=args.threshold, atol=args.atol,
            images=_validation_images(args.model, args.random_weights), untrained_gates=untrained,
            random_weights=args.random_weights, providers=args.providers,
        )
    except ImportError as e:
        raise UsageError(f"export needs onnxscript and onnxruntime: {e}") from e
    timing = time_onnx(result.path, [1, 8] if batch == "dynamic" else [batch], providers=args.providers)
    m = result.metadata
    name, dims, elem = result.input
    lines = [
        f"wrote {result.path} ({result.size_bytes / 1e6:.1f} MB{', external data' if result.data_files else ''}; "
        f"{dtype}, opset {m.opset})",
        f"  model     {m.backbone_id} (gates sha256 {m.gates_sha256[:12]}...)"
        + ("  [UNTRAINED GATES]" if m.untrained_gates else "") + ("  [RANDOM WEIGHTS]" if m.random_weights else ""),
        f"  input     {name} {elem} {_fmt_shape(dims)}",
        "  outputs   " + "; ".join(f"{o} {_fmt_shape(d)}" for o, d in result.outputs.items()),
        "  max diff  " + ", ".join(f"{o} {d:.2e}" for o, d in result.max_diffs.items()) + f" (tolerance {result.tolerance:.0e})",
        f"  onnxruntime {provider}: " + ", ".join(f"batch {b}: {ms:.1f} ms" for b, ms in timing.items()),
        f"  time      export {result.export_s:.1f} s, check + validation {result.validate_s:.1f} s",
    ]
    if args.triton_repo:
        model_dir = write_triton_repo(
            result.path, args.triton_repo, name=args.triton_name,
            max_batch_size=args.triton_max_batch, tensorrt=args.tensorrt,
        )
        lines.append(f"  triton    {model_dir / 'config.pbtxt'}")
    print("\n".join(lines))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    quiet_transformers()
    return run_cli(PROG, lambda: _run(argv))


if __name__ == "__main__":
    sys.exit(main())
