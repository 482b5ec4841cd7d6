"""``vdm-export [--model MODEL] [--gates DIR] --out PATH [...]``: one validated ONNX graph (ViT + gates).

The default model is the embedded ``vit-digits``, so ``vdm-export --out m.onnx`` works offline.
An existing ``--out`` file is replaced only with ``--overwrite``. Exit codes: 0 written; 2 bad
usage, unknown model, missing weights or gates, unwritable ``--out``, and an int8 graph
(``--quantize int8``) below ``--min-agreement`` / ``--min-iou``; 1 export or validation failure; 130 Ctrl-C, 143 SIGTERM (nothing is left at ``--out``, nor staging files, in all of these).
Everything it does is ``vdm_engine.export.main_export``, with the same defaults.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from ._common import (CliParser, UsageError, check_model, check_out_dir, check_out_file, parse_labels, quiet_transformers,
                      run_cli)

__all__ = ["main", "PROG"]

PROG = "vdm-export"


def _parser() -> argparse.ArgumentParser:
    from vdm_engine.export.defaults import (BACKENDS, DEFAULT_BACKEND, DEFAULT_MAX_BATCH_SIZE, DEFAULT_OPSET,
                                            DEFAULT_OUTPUTS, DEFAULT_QUEUE_DELAY_US, OUTPUTS, TOLERANCES)

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
    opt.add_argument("--labels", default=None, metavar="A,B,...",
                     help="CLIP checkpoints: the zero-shot class names (default: those recorded with the gates)")
    opt.add_argument("--untrained-gates", action="store_true",
                     help="if no trained gates are found, export random ones (benchmarks only; recorded in the metadata)")
    opt.add_argument("--random-weights", action="store_true",
                     help="random backbone of the architecture named by --model (vit-tiny, vit-b16, vit-l16) and "
                          "random gates, built offline: for timing only")
    opt.add_argument("--fp16", action="store_true", help="fp16 weights and compute (inputs and outputs stay float32)")
    opt.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    opt.add_argument("--batch-size", type=int, default=None, metavar="N", help="fixed batch size (default: dynamic)")
    opt.add_argument("--uint8-input", action="store_true",
                     help="take raw uint8 (B, H, W, 3) images; rescale and normalisation happen in the graph")
    opt.add_argument("--outputs", nargs="+", type=_output_names, default=[list(DEFAULT_OUTPUTS)], metavar="NAME",
                     help=f"graph outputs, space- or comma-separated, from {', '.join(OUTPUTS)} "
                          f"(default: {' '.join(DEFAULT_OUTPUTS)})")
    opt.add_argument("--threshold", type=float, default=0.5, help="hard-mask threshold for masked_logits/kl (default 0.5)")
    opt.add_argument("--atol", type=float, default=None, metavar="X",
                     help="max abs difference onnxruntime vs PyTorch (default "
                          + ", ".join(f"{tol:.0e} {dtype}".replace("e-0", "e-") for dtype, tol in TOLERANCES.items()) + ")")
    opt.add_argument("--providers", default="auto", choices=("auto", "cpu", "cuda"),
                     help="onnxruntime provider for validation and timing (default auto)")
    opt.add_argument("--triton-repo", default=None, metavar="DIR", help="also write a Triton model repository entry")
    opt.add_argument("--triton-name", default=None, help="Triton model name (default: the --out file's stem)")
    opt.add_argument("--triton-max-batch", type=int, default=DEFAULT_MAX_BATCH_SIZE, metavar="N",
                     help=f"Triton max_batch_size (default {DEFAULT_MAX_BATCH_SIZE})")
    opt.add_argument("--triton-backend", default=DEFAULT_BACKEND, choices=BACKENDS,
                     help=f"Triton backend: onnxruntime (GPU servers) or python (OnnxExplainer on the CPU, in this "
                          f"Python environment) (default {DEFAULT_BACKEND})")
    opt.add_argument("--triton-ensemble", action="store_true",
                     help="also write NAME_decode and NAME_ensemble: PNG/JPEG bytes in (TYPE_STRING), the graph's "
                          "outputs out (the decode step uses Triton's python backend)")
    opt.add_argument("--triton-queue-delay-us", type=int, default=DEFAULT_QUEUE_DELAY_US, metavar="US",
                     help=f"Triton dynamic batcher's max_queue_delay_microseconds (default {DEFAULT_QUEUE_DELAY_US})")
    opt.add_argument("--tensorrt", action="store_true", help="add a TensorRT FP16 accelerator block to the Triton config")
    q = p.add_argument_group("int8 (CPU)")
    q.add_argument("--quantize", choices=("int8",), default=None,
                   help="write an int8 graph (onnxruntime.quantization) checked against the fp32 graph on held-out images")
    q.add_argument("--calibration-data", default=None, metavar="SRC",
                   help="static quantization calibrated on images of this source (toy, digits, imagefolder:PATH, "
                        "hf:NAME); default: dynamic quantization")
    q.add_argument("--calibration-images", type=int, default=64, metavar="N", help="calibration images (default 64)")
    q.add_argument("--held-out-images", type=int, default=300, metavar="N",
                   help="held-out images of the int8 check (default 300)")
    q.add_argument("--min-agreement", type=float, default=0.99, metavar="X",
                   help="fail below this prediction agreement with the fp32 graph (default 0.99)")
    q.add_argument("--min-iou", type=float, default=0.95, metavar="X",
                   help="fail below this mean kept-set IoU with the fp32 graph (default 0.95)")
    opt.add_argument("-v", "--verbose", action="store_true", help="log per-output differences of every validation input")
    return p


def _output_names(value: str) -> list[str]:
    """``--outputs`` takes ``logits patch_mask`` as well as ``logits,patch_mask``."""
    from vdm_engine.export.defaults import OUTPUTS

    names = [n.strip() for n in value.split(",") if n.strip()]
    bad = [n for n in names if n not in OUTPUTS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"invalid choice: {(bad or [value])[0]!r} (choose from {', '.join(OUTPUTS)})")
    return names


def _status(msg: str) -> None:
    print(f"{PROG}: {msg}", file=sys.stderr, flush=True)


def _check(args) -> None:
    """The checks that run before anything is loaded, worded in flags."""
    from vdm_engine.export.defaults import DEFAULT_BACKEND, MIN_OPSET

    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.atol is not None and not args.atol > 0:
        raise UsageError(f"--atol must be > 0, got {args.atol}")
    if not 0.0 <= args.threshold <= 1.0:
        raise UsageError(f"--threshold must be in [0, 1], got {args.threshold}")
    if args.opset < MIN_OPSET:
        raise UsageError(f"--opset must be >= {MIN_OPSET} (the dynamo exporter's oldest), got {args.opset}")
    if args.triton_max_batch < 1:
        raise UsageError(f"--triton-max-batch must be >= 1, got {args.triton_max_batch}")
    if args.triton_queue_delay_us < 0:
        raise UsageError(f"--triton-queue-delay-us must be >= 0, got {args.triton_queue_delay_us}")
    if not args.triton_repo:
        given = [flag for flag, on in (("--triton-backend", args.triton_backend != DEFAULT_BACKEND),
                                       ("--triton-ensemble", args.triton_ensemble)) if on]
        if given:
            raise UsageError(f"{given[0]} needs --triton-repo DIR")
    if args.tensorrt and args.triton_backend == "python":
        raise UsageError("--tensorrt needs --triton-backend onnxruntime (the python backend runs on the CPU)")
    if args.triton_ensemble and args.batch_size is not None:
        raise UsageError("--triton-ensemble needs a dynamic batch; drop --batch-size")
    if args.random_weights:
        from vdm_engine.backbone import SHAPES

        if args.model not in SHAPES:
            raise UsageError(f"--random-weights needs an architecture name for --model, one of {sorted(SHAPES)}; "
                             f"got {args.model!r}")
        if args.gates:
            raise UsageError("--gates cannot be combined with --random-weights (random weights get random gates)")
    else:
        check_model(args.model, revision=args.revision)
    _check_quantize(args)
    check_out_file(args.out, args.overwrite)
    if args.triton_repo:
        check_out_dir(args.triton_repo, flag="--triton-repo")
    from vdm_engine.runtime import resolve_providers

    try:
        resolve_providers(args.providers)  # 'cuda' without onnxruntime-gpu is a ValueError
    except ImportError as e:  # onnxruntime is an extra; the message names the package to install
        raise UsageError(str(e)) from None


def _check_quantize(args) -> None:
    quant_flags = [f for f, v in (("--calibration-data", args.calibration_data),) if v is not None]
    if args.quantize is None:
        if quant_flags:
            raise UsageError(f"{quant_flags[0]} needs --quantize int8")
        return
    if args.fp16:
        raise UsageError("--quantize int8 starts from the fp32 graph; drop --fp16")
    for flag, v in (("--min-agreement", args.min_agreement), ("--min-iou", args.min_iou)):
        if not 0.0 <= v <= 1.0:
            raise UsageError(f"{flag} must be in [0, 1], got {v}")
    for flag, v in (("--calibration-images", args.calibration_images), ("--held-out-images", args.held_out_images)):
        if v < 1:
            raise UsageError(f"{flag} must be >= 1, got {v}")
    if args.calibration_data is not None:
        from vdm_engine.data import open_source

        open_source(args.calibration_data)  # ValueError (exit 2) for an unknown spec


def _run(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    outputs = list(dict.fromkeys(n for names in args.outputs for n in names))
    _check(args)
    quiet_transformers()  # after the checks: importing transformers takes seconds
    if args.verbose:
        logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
        logging.getLogger("vdm_engine.export").setLevel(logging.INFO)
    from vdm_engine.export import main_export

    result = main_export(
        args.model, out=args.out, gates=args.gates, revision=args.revision,
        allow_backbone_mismatch=args.allow_backbone_mismatch, untrained_gates=args.untrained_gates,
        random_weights=args.random_weights, labels=parse_labels(args.labels), dtype="fp16" if args.fp16 else "fp32", opset=args.opset,
        batch="dynamic" if args.batch_size is None else args.batch_size, outputs=outputs,
        uint8_input=args.uint8_input, threshold=args.threshold, atol=args.atol, providers=args.providers,
        overwrite=args.overwrite, triton_repo=args.triton_repo, triton_name=args.triton_name,
        triton_max_batch=args.triton_max_batch, triton_backend=args.triton_backend,
        triton_ensemble=args.triton_ensemble, triton_queue_delay_us=args.triton_queue_delay_us, tensorrt=args.tensorrt,
        quantize=args.quantize, calibration_data=args.calibration_data, calibration_images=args.calibration_images,
        held_out_images=args.held_out_images, min_agreement=args.min_agreement, min_iou=args.min_iou, status=_status,
    )
    print(result.summary())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(PROG, lambda: _run(argv))


if __name__ == "__main__":
    sys.exit(main())
