"""``vdm-serve --address`` onto a running Ray cluster (the tests' own instance), two replicas behind
one proxy, Ctrl-C removing that application only; Ray's Prometheus metrics carry the batch sizes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="the serve extra is not installed: pip install 'vdm-engine[serve]'")
requests = pytest.importorskip("requests")

DIGIT6 = Path(__file__).resolve().parents[2] / "docs" / "overlay" / "digit6.png"
PNG = {"Content-Type": "image/png"}


def _wait_serving(proc: subprocess.Popen, lines: list[str], timeout_s: float = 180.0) -> str:
    """Until vdm-serve says it is serving (after its own readiness check); that line."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in lines:
            if "vdm-serve: serving" in line:
                return line
        assert proc.poll() is None, f"vdm-serve exited with {proc.returncode}: {''.join(lines)}"
        time.sleep(0.2)
    raise TimeoutError(f"vdm-serve not serving after {timeout_s:.0f} s: {''.join(lines)}")


@pytest.mark.slow
def test_cli_joins_a_cluster_with_two_replicas_and_leaves_it_running(serve_port, server, reference):
    import ray

    address = ray.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "vdm_engine.cli.serve", "--address", address, "--app-name", "joined",
           "--route-prefix", "/joined", "--replicas", "2", "--num-cpus", "0.25", "--max-batch", "4",
           "--port", str(serve_port)]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    url = f"http://127.0.0.1:{serve_port}/joined"
    try:
        assert f"serving vit-digits at {url} " in _wait_serving(proc, lines)
        from vdm_engine.images import load_image

        want = reference.explain(reference.preprocess([load_image(DIGIT6)]))
        r = requests.post(f"{url}/v1/explain", data=DIGIT6.read_bytes(), headers=PNG, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["label_index"] == int(want.logits.argmax(-1))
        # Requests in flight together spread over both replicas (the ingress balances by open requests;
        # a replica joins it once its readiness is known, so this waits for the second up to 60 s).
        replicas, deadline = set(), time.monotonic() + 60
        with ThreadPoolExecutor(4) as pool:
            while len(replicas) < 2 and time.monotonic() < deadline:
                answers = list(pool.map(lambda _: requests.get(f"{url}/v1/stats", timeout=10), range(4)))
                replicas |= {a.json()["replica"] for a in answers if a.status_code == 200}
        assert len(replicas) == 2, f"one replica answered every request: {replicas}"
    finally:  # SIGTERM, as a process manager stops it (Ctrl-C is benchmarks/test_bench_serve's)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        reader.join(timeout=10)
    assert proc.returncode == 143, "".join(lines)  # Ray's own SIGTERM handler would abort (-6)
    # its application is gone, the cluster and the application beside it still serve
    assert requests.get(f"{url}/readyz", timeout=10).status_code == 404
    assert requests.get(f"{server}/readyz", timeout=10).status_code == 200
    assert ray.is_initialized() and ray.cluster_resources().get("CPU") == 2.0


def test_prometheus_metrics_carry_the_batch_sizes(server, metrics_port):
    """The server's ``vdm_batch_size`` histogram and Ray Serve's request counters, as Prometheus scrapes them."""
    for _ in range(3):
        assert requests.post(f"{server}/v1/explain", data=DIGIT6.read_bytes(), headers=PNG, timeout=60).ok
    def explain_batches(text: str) -> float:
        return sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines()
                   if l.startswith("ray_vdm_batch_size_count{") and 'endpoint="explain"' in l)

    deadline, text = time.monotonic() + 60, ""
    while time.monotonic() < deadline:  # replicas push their metrics every few seconds
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
            text = r.read().decode()
        if explain_batches(text) >= 3 and "ray_serve_num_http_requests" in text:
            break
        time.sleep(1.0)
    assert explain_batches(text) >= 3, "vdm_batch_size is missing explain batches in Ray's Prometheus metrics"
    assert "ray_serve_num_http_requests" in text
