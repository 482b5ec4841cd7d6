"""Latency under load: ``python -m benchmarks.serve_load`` starts ``vdm-serve`` on loopback and drives it.

For each endpoint (``/v1/predict``, ``/v1/explain``) and each concurrency (default 1, 8, 32) a
closed-loop generator keeps that many requests in flight until a fixed number of requests is done
or a time limit passes, whichever comes first (bounded and self-stopping; 127.0.0.1 only). Each
request is one PNG digit (300 different test digits in turn). The server's own ``/v1/stats`` is
read before and after each level, so the mean batch size is the one the server formed
(rows / batches), not one guessed from the client.

Writes ``serve_load.json`` (configuration, machine, load average, per-level results),
``serve_load.md`` (the table and the issue's two ratios) and ``serve_load.png`` (latency against
throughput) into ``--out``. The client shares the machine with the server: on a 2-core CPU it takes
part of the time it measures, as perf_analyzer would.

Example::

    python -m benchmarks.serve_load --requests 400 --time-limit 60 --out benchmarks/results/serve-cpu
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
ENDPOINTS = ("predict", "explain")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve_load", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit-digits", help="served model (default vit-digits)")
    p.add_argument("--onnx", default=None, help="serve this exported graph instead of --model")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--requests", type=int, default=400, help="requests per (endpoint, concurrency) level")
    p.add_argument("--time-limit", type=float, default=60.0, help="seconds per level at most (default 60)")
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated in-flight request counts")
    p.add_argument("--endpoints", default="predict,explain", help="comma-separated: predict, explain")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--batch-wait-ms", type=float, default=5.0)
    p.add_argument("--num-cpus", type=float, default=1.0, help="Ray CPUs per replica")
    p.add_argument("--warmup", type=int, default=20, help="untimed requests before each endpoint's levels")
    p.add_argument("--url", default=None, help="drive a server already running on loopback instead of starting one")
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


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_cpu(pid: int) -> tuple[float, str, int] | None:
    """(user + system CPU seconds, role, parent pid) of a live process from /proc; None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
    ppid, cpu = int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK
    if "ServeReplica" in cmd:
        role = "replica"
    elif "ProxyActor" in cmd:
        role = "proxy"
    elif "ServeController" in cmd:
        role = "controller"
    elif pid == os.getpid():
        role = "client"
    else:
        role = "ray and driver"  # gcs_server, raylet, idle workers, the vdm-serve process itself
    return cpu, role, ppid


def cpu_by_role(root: int | None) -> dict[str, float]:
    """CPU seconds used so far by this process ("client") and every descendant of ``root`` grouped by
    role (replica, proxy, controller, the rest); Linux /proc only, {} elsewhere."""
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


class Server:
    """``vdm-serve`` in a subprocess (its own local Ray instance); stopped with SIGINT like Ctrl-C."""

    def __init__(self, args):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "vdm_engine.cli.serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--max-batch", str(args.max_batch), "--batch-wait-ms", str(args.batch_wait_ms),
               "--num-cpus", str(args.num_cpus), "--device", args.device, "--max-queued", "1024"]
        cmd += ["--onnx", args.onnx] if args.onnx else ["--model", args.model]
        self.log = open(Path(args.out) / "server.log", "w")
        env = dict(os.environ, HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"))
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.returncode = None

    def wait_ready(self, timeout_s: float = 300.0) -> None:
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

    def stop(self, timeout_s: float = 60.0) -> int | None:
        """Ctrl-C (SIGINT); SIGKILL only if it has not exited after ``timeout_s``. Returns the exit code."""
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


async def _level(url: str, bodies: list[bytes], concurrency: int, n_requests: int, time_limit: float) -> dict:
    """``concurrency`` workers send requests back to back until ``n_requests`` are done or time is up."""
    import aiohttp

    latencies, errors, statuses = [], 0, {}
    next_i = 0
    deadline = time.perf_counter() + time_limit
    headers = {"Content-Type": "image/png"}
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency), timeout=timeout) as http:

        async def worker():
            nonlocal next_i, errors
            while next_i < n_requests and time.perf_counter() < deadline:
                body = bodies[next_i % len(bodies)]
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
    lat = np.asarray(latencies) * 1000.0
    pct = (lambda q: float(np.percentile(lat, q))) if len(lat) else (lambda q: float("nan"))
    return {"concurrency": concurrency, "sent": next_i, "ok": len(latencies), "errors": errors, "statuses": statuses,
            "elapsed_s": elapsed, "throughput_rps": len(latencies) / elapsed if elapsed > 0 else 0.0,
            "p50_ms": pct(50), "p90_ms": pct(90), "p95_ms": pct(95), "p99_ms": pct(99),
            "mean_ms": float(lat.mean()) if len(lat) else float("nan"),
            "stopped_by": "time limit" if next_i < n_requests else "request count"}


def run_load(url: str, *, endpoints: Sequence[str], concurrency: Sequence[int], n_requests: int, time_limit: float,
             warmup: int, bodies: list[bytes], server_pid: int | None = None) -> list[dict]:
    """Every (endpoint, concurrency) level against ``url``; the server's mean batch size from ``/v1/stats``;
    CPU milliseconds per request by process role (``server_pid``'s process tree and this client)."""
    results = []
    for ep in endpoints:
        if warmup:
            asyncio.run(_level(f"{url}/v1/{ep}", bodies, min(8, warmup), warmup, time_limit))
        for c in concurrency:
            before = _get_json(f"{url}/v1/stats")[ep]
            cpu0 = cpu_by_role(server_pid)
            res = asyncio.run(_level(f"{url}/v1/{ep}", bodies, c, n_requests, time_limit))
            cpu1 = cpu_by_role(server_pid)
            after = _get_json(f"{url}/v1/stats")[ep]
            batches, rows = after["batches"] - before["batches"], after["rows"] - before["rows"]
            cpu_ms = {k: 1000.0 * (v - cpu0.get(k, 0.0)) / max(res["sent"], 1) for k, v in sorted(cpu1.items())}
            res.update(endpoint=ep, batches=batches, mean_batch_size=rows / batches if batches else None,
                       cpu_ms_per_request=cpu_ms)
            results.append(res)
            print(f"{ep:8s} c={c:3d}: {res['ok']:5d} ok, {res['errors']} errors, {res['throughput_rps']:8.1f} req/s, "
                  f"p50 {res['p50_ms']:7.2f} ms, p99 {res['p99_ms']:7.2f} ms, mean batch {res['mean_batch_size'] or 0:.2f}, "
                  f"CPU ms/request " + ", ".join(f"{k} {v:.1f}" for k, v in cpu_ms.items()),
                  file=sys.stderr)
    return results


def summary(results: list[dict]) -> list[dict]:
    """The issue's targets: explain p99 within 15% of predict p99 at each concurrency; concurrency-32
    throughput >= 3x concurrency-1 (for each endpoint, with the highest and lowest levels run)."""
    by = {(r["endpoint"], r["concurrency"]): r for r in results}
    rows = []
    for c in sorted({r["concurrency"] for r in results}):
        if ("explain", c) in by and ("predict", c) in by:
            ratio = by[("explain", c)]["p99_ms"] / by[("predict", c)]["p99_ms"]
            rows.append({"what": f"explain p99 / predict p99, concurrency {c}", "value": ratio, "target": "<= 1.15",
                         "met": bool(ratio <= 1.15)})
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
    lines = [f"# vdm-serve under load: {cfg['model']} on {cfg['device']}", "",
             f"{m['cpu_model']} ({m['cpu_count']} cores), {m['gpu'] or 'no GPU'}; torch {m['torch']}, ray {m['ray']}; "
             f"{m['date_utc']}; load average before {doc['loadavg_before'][0]:.2f}, after {doc['loadavg_after'][0]:.2f}.",
             f"max batch {cfg['max_batch']}, batch wait {cfg['batch_wait_ms']} ms, {cfg['requests']} requests or "
             f"{cfg['time_limit']} s per level, one PNG digit per request, client on the same machine.", "",
             "| endpoint | concurrency | ok | errors | req/s | p50 ms | p95 ms | p99 ms | mean batch | CPU ms/request |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in doc["results"]:
        mb = f"{r['mean_batch_size']:.2f}" if r["mean_batch_size"] else "-"
        cpu = r.get("cpu_ms_per_request") or {}
        cpu_s = ", ".join(f"{k} {v:.1f}" for k, v in cpu.items()) + (f" (total {sum(cpu.values()):.1f})" if cpu else "-")
        lines.append(f"| {r['endpoint']} | {r['concurrency']} | {r['ok']} | {r['errors']} | {r['throughput_rps']:.1f} | "
                     f"{r['p50_ms']:.2f} | {r['p95_ms']:.2f} | {r['p99_ms']:.2f} | {mb} | {cpu_s} |")
    if doc["summary"]:
        lines += ["", "| target | value | wanted | met |", "|---|---:|---|---|"]
        lines += [f"| {s['what']} | {s['value']:.2f} | {s['target']} | {'yes' if s['met'] else '**no**'} |"
                  for s in doc["summary"]]
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for ep, color in zip(ENDPOINTS, ("tab:blue", "tab:red")):
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
    ax.set_title("vdm-serve: latency against throughput")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    endpoints = [e.strip() for e in args.endpoints.split(",") if e.strip()]
    bad = [e for e in endpoints if e not in ENDPOINTS]
    concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if bad or not endpoints:
        raise SystemExit(f"serve_load: --endpoints must be among {ENDPOINTS}, got {args.endpoints!r}")
    if not concurrency or min(concurrency) < 1 or args.requests < 1 or args.time_limit <= 0:
        raise SystemExit("serve_load: --concurrency, --requests and --time-limit must be positive")
    if args.url is not None:
        from urllib.parse import urlparse

        if urlparse(args.url).hostname not in LOOPBACK:
            raise SystemExit(f"serve_load: --url {args.url}: only loopback servers may be driven (127.0.0.1)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bodies = _digit_pngs()
    server = None
    load_before = list(os.getloadavg())
    try:
        if args.url is None:
            server = Server(args)
            server.wait_ready()
            url = server.url
        else:
            url = args.url.rstrip("/")
        ready = _get_json(f"{url}/readyz")
        results = run_load(url, endpoints=endpoints, concurrency=concurrency, n_requests=args.requests,
                           time_limit=args.time_limit, warmup=args.warmup, bodies=bodies,
                           server_pid=server.proc.pid if server is not None else None)
    finally:
        exit_code = server.stop() if server is not None else None
    doc = {"config": {"model": args.onnx or args.model, "device": args.device, "max_batch": args.max_batch,
                      "batch_wait_ms": args.batch_wait_ms, "requests": args.requests, "time_limit": args.time_limit,
                      "concurrency": concurrency, "endpoints": endpoints, "num_cpus_per_replica": args.num_cpus},
           "machine": _machine(), "server": {k: ready.get(k) for k in ("model", "model_sha256", "gates_sha256")},
           "loadavg_before": load_before, "loadavg_after": list(os.getloadavg()),
           "server_exit_code": exit_code, "results": results, "summary": summary(results)}
    (out / "serve_load.json").write_text(json.dumps(doc, indent=1))
    (out / "serve_load.md").write_text(markdown(doc))
    plot(results, out / "serve_load.png")
    print(markdown(doc))
    return doc


if __name__ == "__main__":
    main()
