"""The Triton repository on a real tritonserver (one per session, tests/export/conftest.py): ready,
HTTP and gRPC inference equal to Explainer.explain, concurrent clients' rows, bad requests, the
ensemble on PNG bytes, and the onnxruntime repository accepted up to the backend it lacks here."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import torch

# The models of the session's repository (tests/export/conftest.py: triton_server).
TRITON_MODEL = "vit-digits"
TRITON_ORT_MODEL = "vit-digits_onnxruntime"
ATOL = 1e-5
OUTPUTS = ("logits", "patch_mask", "layer_masks")


@pytest.fixture(scope="session")
def digits_reference():
    """(uint8 test digits (40, ...), their pixel_values, {output: Explainer.explain of them}, the gates'
    provenance) for vit-digits."""
    from vdm_engine import Explainer
    from vdm_engine.data import digits_split

    explainer = Explainer.from_pretrained("vit-digits").eval()
    images = digits_split("test")[0][:40]
    x = explainer.preprocess(list(images))
    with torch.no_grad():
        e = explainer.explain(x)
    ref = {"logits": e.logits.numpy(), "patch_mask": e.patch_mask.numpy(), "layer_masks": e.layer_masks.numpy()}
    return images, x.numpy(), ref, explainer.provenance


def _assert_rows(got: dict, ref: dict, rows, what: str):
    for name in OUTPUTS:
        diff = np.abs(got[name] - ref[name][rows]).max()
        assert got[name].shape == ref[name][rows].shape, (what, name, got[name].shape)
        assert diff <= ATOL, f"{what}: {name} differs from Explainer.explain by {diff:.2e} (> {ATOL})"


def _http_infer(client, x: np.ndarray, *, binary: bool = True, model: str = TRITON_MODEL) -> dict:
    import tritonclient.http as httpclient

    inp = httpclient.InferInput("pixel_values", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    outs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in OUTPUTS]
    result = client.infer(model, [inp], outputs=outs)
    return {n: result.as_numpy(n) for n in OUTPUTS}


@pytest.fixture(scope="session")
def http(triton_server):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(triton_server.http_url, concurrency=1, network_timeout=120)
    yield client
    client.close()


def test_the_python_backend_repository_is_ready_with_its_provenance(triton_server, http, digits_reference):
    assert triton_server.is_ready() and http.is_server_live()
    assert triton_server.models == [TRITON_MODEL, f"{TRITON_MODEL}_decode", f"{TRITON_MODEL}_ensemble"]
    for model in (TRITON_MODEL, f"{TRITON_MODEL}_decode", f"{TRITON_MODEL}_ensemble"):
        assert http.is_model_ready(model), model
    config = http.get_model_config(TRITON_MODEL)
    assert config["backend"] == "python" and config["instance_group"][0]["kind"] == "KIND_CPU"
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 20000
    params = {k: v["string_value"] for k, v in config["parameters"].items()}
    gates = digits_reference[3]
    assert (params["vdm_gates_source"], params["vdm_gates_sha256"]) == (gates.source, gates.sha256) == (
        "shipped", gates.sha256) and len(gates.sha256) == 64
    from vdm_engine._io import sha256_file

    onnx_file = triton_server.model_repository / TRITON_MODEL / "1" / "model.onnx"
    assert params["vdm_model_sha256"] == sha256_file(onnx_file)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_http_inference_equals_explainer(http, digits_reference, binary):
    _, x, ref, _ = digits_reference
    got = _http_infer(http, x[:5], binary=binary)  # a prime batch
    _assert_rows(got, ref, slice(0, 5), f"HTTP {'binary' if binary else 'JSON'}")


def test_grpc_inference_equals_explainer(triton_server, digits_reference):
    import tritonclient.grpc as grpcclient

    _, x, ref, _ = digits_reference
    with grpcclient.InferenceServerClient(triton_server.grpc_url) as client:
        inp = grpcclient.InferInput("pixel_values", [7, *x.shape[1:]], "FP32")
        inp.set_data_from_numpy(x[7:14])
        result = client.infer(TRITON_MODEL, [inp], outputs=[grpcclient.InferRequestedOutput(n) for n in OUTPUTS])
        got = {n: result.as_numpy(n) for n in OUTPUTS}
        # asking for one output returns that one only
        only = client.infer(TRITON_MODEL, [inp], outputs=[grpcclient.InferRequestedOutput("patch_mask")])
        assert only.as_numpy("logits") is None and only.as_numpy("patch_mask").shape == (7, ref["patch_mask"].shape[1])
    _assert_rows(got, ref, slice(7, 14), "gRPC")


def test_concurrent_clients_get_their_own_rows_from_shared_batches(triton_server, http, digits_reference):
    import tritonclient.http as httpclient

    _, x, ref, _ = digits_reference
    n_clients = 12
    jobs = []  # (first row, batch size): 1, 2 or 3 distinct digits per client
    row = 0
    for i in range(n_clients):
        jobs.append((row, i % 3 + 1))
        row += i % 3 + 1
    before = http.get_inference_statistics(TRITON_MODEL)["model_stats"][0]
    barrier, results, errors = threading.Barrier(n_clients), {}, []

    def client_job(i):
        start, n = jobs[i]
        client = httpclient.InferenceServerClient(triton_server.http_url, network_timeout=120)
        try:
            barrier.wait(timeout=60)
            results[i] = _http_infer(client, x[start:start + n])
        except Exception as e:  # reported below, never lost in the thread
            errors.append(f"client {i}: {e!r}")
        finally:
            client.close()

    threads = [threading.Thread(target=client_job, args=(i,)) for i in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert not errors, errors
    for i, (start, n) in enumerate(jobs):
        _assert_rows(results[i], ref, slice(start, start + n), f"client {i} (rows {start}..{start + n - 1})")
    after = http.get_inference_statistics(TRITON_MODEL)["model_stats"][0]
    rows = int(after["inference_count"]) - int(before["inference_count"])
    executions = int(after["execution_count"]) - int(before["execution_count"])
    assert rows == row
    assert executions < n_clients, f"{n_clients} concurrent requests ran in {executions} executions: no batch formed"


def test_malformed_requests_get_errors_and_the_server_stays_up(triton_server, http, digits_reference):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    _, x, ref, _ = digits_reference

    def infer_raw(array, datatype="FP32"):
        inp = httpclient.InferInput("pixel_values", list(array.shape), datatype)
        inp.set_data_from_numpy(array)
        return http.infer(TRITON_MODEL, [inp])

    with pytest.raises(InferenceServerException, match="unexpected shape"):
        infer_raw(np.zeros((2, 3, 31, 32), np.float32))  # Triton checks the config's dims
    with pytest.raises(InferenceServerException, match="FP64"):
        infer_raw(np.zeros((1, 3, 32, 32), np.float64), "FP64")
    with pytest.raises(InferenceServerException, match="unexpected inference input 'images'"):
        inp = httpclient.InferInput("images", [1, 1], "BYTES")
        inp.set_data_from_numpy(np.array([[b"x"]], dtype=np.object_))
        http.infer(TRITON_MODEL, [inp])

    # A NaN request passes Triton's checks and is refused by the model, alone, while a good request
    # sent at the same moment (so possibly in the same batch) is answered correctly.
    bad = x[:2].copy()
    bad[1, 0, 3, 3] = np.nan
    outcome = {}

    def send(key, array):
        client = httpclient.InferenceServerClient(triton_server.http_url, network_timeout=120)
        try:
            outcome[key] = _http_infer(client, array)
        except InferenceServerException as e:
            outcome[key] = e
        finally:
            client.close()

    threads = [threading.Thread(target=send, args=("bad", bad)), threading.Thread(target=send, args=("good", x[2:4]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert isinstance(outcome["bad"], InferenceServerException) and "NaN" in str(outcome["bad"])
    assert outcome["bad"].status() == "400", outcome["bad"]
    _assert_rows(outcome["good"], ref, slice(2, 4), "the good request beside a bad one")

    with pytest.raises(InferenceServerException, match="cannot decode image"):
        inp = httpclient.InferInput("images", [1, 1], "BYTES")
        inp.set_data_from_numpy(np.array([[b"\x89PNG\r\n\x1a\n not really a png"]], dtype=np.object_))
        http.infer(f"{TRITON_MODEL}_ensemble", [inp])

    assert http.is_server_live() and http.is_server_ready() and triton_server.proc.poll() is None
    _assert_rows(_http_infer(http, x[4:6]), ref, slice(4, 6), "after the bad requests")


def test_the_ensemble_explains_png_bytes(http, digits_reference):
    import tritonclient.http as httpclient
    from PIL import Image

    images, _, ref, _ = digits_reference
    pngs = []
    for a in images[20:23]:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    inp = httpclient.InferInput("images", [3, 1], "BYTES")
    inp.set_data_from_numpy(np.array(pngs, dtype=np.object_).reshape(3, 1))
    result = http.infer(f"{TRITON_MODEL}_ensemble", [inp])
    _assert_rows({n: result.as_numpy(n) for n in OUTPUTS}, ref, slice(20, 23), "ensemble on PNG bytes")


def test_a_server_that_cannot_start_reports_its_log(tmp_path, tritonserver_dist):
    from vdm_engine.export.tritonserver import TritonServer

    repo = tmp_path / "repo"
    (repo / "bad" / "1").mkdir(parents=True)
    (repo / "bad" / "config.pbtxt").write_text('name: "bad"\nthis is not a config\n')
    server = TritonServer(repo, dist=tritonserver_dist, log_path=tmp_path / "server.log")
    with pytest.raises(RuntimeError, match="tritonserver exited with code"):
        server.start(timeout_s=60)
    assert server.proc.poll() is not None
    with pytest.raises(FileNotFoundError, match="no Triton model repository"):
        TritonServer(tmp_path / "nowhere")


def test_the_server_dies_with_the_process_that_started_it(tmp_path, tritonserver_dist):
    """PR_SET_PDEATHSIG: a SIGKILLed parent (a killed test session) leaves no server behind."""
    (tmp_path / "repo").mkdir()
    import vdm_engine.export.tritonserver as module

    # The child loads the module by its path (it imports nothing from vdm_engine): no torch to import.
    script = textwrap.dedent(f"""
        import importlib.util, sys, time
        spec = importlib.util.spec_from_file_location("tritonserver", {module.__file__!r})
        m = sys.modules["tritonserver"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(m)
        s = m.TritonServer({str(tmp_path / "repo")!r}, log_path={str(tmp_path / "server.log")!r}).start(timeout_s=120)
        print(s.pid, flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(parent.stdout.readline())
    finally:
        parent.kill()
        parent.wait()
    import time

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        # a zombie until its parent (init) reaps it: look at its state
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(")")[-1].split()[0] == "Z":
                    return
        except OSError:
            return
        time.sleep(0.2)
    os.kill(pid, 9)
    pytest.fail(f"tritonserver (pid {pid}) outlived the process that started it")


def test_the_load_generator_drives_the_server(triton_server, digits_reference, tmp_path):
    """benchmarks/serve_load.py's Triton target on the session's server, sized down: every request
    answered, the batch counts read from Triton's statistics, the provenance from the model config."""
    import argparse
    import importlib.util
    from pathlib import Path

    from PIL import Image

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "serve_load.py"
    spec = importlib.util.spec_from_file_location("serve_load_under_test", path)
    serve_load = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve_load)
    images, x, _, gates = digits_reference
    pngs = []
    for a in images[:6]:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    args = argparse.Namespace(model="vit-digits", onnx=None, out=str(tmp_path))
    target = serve_load.TritonTarget(args, server=triton_server, name=TRITON_MODEL)
    requests = {ep: serve_load.endpoint_requests(ep, pngs, x[:6]) for ep in ("oip", "oip-png")}
    results = serve_load.run_load(target, endpoints=["oip", "oip-png"], concurrency=[1, 3], n_requests=6,
                                  time_limit=60, warmup=0, requests=requests)
    assert [(r["endpoint"], r["concurrency"]) for r in results] == [("oip", 1), ("oip", 3), ("oip-png", 1), ("oip-png", 3)]
    for r in results:
        assert (r["ok"], r["errors"], r["sent"]) == (6, 0, 6), r
        assert 1.0 <= r["mean_batch_size"] <= 3.0 and r["batches"] <= 6, r
        assert r["server_queue_ms"] >= 0 and r["server_infer_ms"] > 0, r
    assert [r["mean_batch_size"] for r in results if r["concurrency"] == 1] == [1.0, 1.0]
    described = target.describe()
    assert described["backend"] == "python" and described["gates_sha256"] == gates.sha256
    assert target.stop() is None and triton_server.proc.poll() is None  # a server it does not own keeps running


def test_the_readme_client_runs_against_the_server(triton_server, monkeypatch, capsys):
    """README "Serve with Triton Inference Server": the client block, pointed at this server, runs as
    written from the repository root; the TritonServer block compiles (it would start a second server)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    section = (root / "README.md").read_text().split("\n## Serve with Triton Inference Server\n", 1)[1].split("\n## ", 1)[0]
    start, client = re.findall(r"^```py\n(.*?)^```", section, flags=re.S | re.M)
    compile(start, "README.md (TritonServer block)", "exec")
    assert "127.0.0.1:8000" in client
    monkeypatch.chdir(root)
    exec(compile(client.replace("127.0.0.1:8000", triton_server.http_url), "README.md (client block)", "exec"),
         {"__name__": "__readme__"})
    printed = capsys.readouterr().out
    assert printed.startswith("[6]"), printed  # docs/overlay/digit6.png


def test_the_onnxruntime_repository_fails_only_for_its_missing_backend(triton_server, http, digits_reference):
    from tritonclient.utils import InferenceServerException

    missing = "unable to find backend library for backend 'onnxruntime'"
    with pytest.raises(InferenceServerException) as info:
        http.load_model(TRITON_ORT_MODEL)
    # The whole message: the version is UNAVAILABLE for this reason and no other.
    assert re.fullmatch(rf"\[400\] load failed for model '{TRITON_ORT_MODEL}': version 1 is at UNAVAILABLE state: "
                        rf"Invalid argument: {missing}, try specifying runtime on the model configuration\.;?\s*",
                        str(info.value)), str(info.value)
    index = {m["name"]: m for m in http.get_model_repository_index()}
    assert index[TRITON_ORT_MODEL]["state"] == "UNAVAILABLE" and missing in index[TRITON_ORT_MODEL]["reason"]
    # Triton checks the config (fields, names, batching, instance groups, warmup) before it looks for
    # the backend: a broken copy fails there, with another message, and the log says why.
    import shutil

    broken = triton_server.model_repository / f"{TRITON_ORT_MODEL}_broken"
    shutil.copytree(triton_server.model_repository / TRITON_ORT_MODEL, broken)
    text = (broken / "config.pbtxt").read_text().replace(f'name: "{TRITON_ORT_MODEL}"', f'name: "{broken.name}"')
    text, n = re.subn(r"preferred_batch_size: \[[^\]]*\]", "preferred_batch_size: [ 64 ]", text)
    assert n == 1
    (broken / "config.pbtxt").write_text(text)
    try:
        with pytest.raises(InferenceServerException, match="failed to poll from model repository") as info:
            http.load_model(broken.name)
        assert missing not in str(info.value)
        assert "preferred size must be <= max batch size" in triton_server.log_path.read_text()
    finally:
        shutil.rmtree(broken)
    # Triton's strict readiness now reports the server not ready (a requested model is UNAVAILABLE, and
    # unloading does not clear that): this test runs last. The server is live and still serves.
    assert http.is_server_live() and http.is_model_ready(TRITON_MODEL)
    _, x, ref, _ = digits_reference
    _assert_rows(_http_infer(http, x[:3]), ref, slice(0, 3), "after the failed loads")


def test_the_wheel_is_fetched_once_and_a_failed_fetch_is_one_line(tmp_path, monkeypatch):
    """No network here: pip is replaced. A failure leaves no staging behind; a complete cache is used as is."""
    from vdm_engine.export import tritonserver
    from vdm_engine.export.tritonserver import TritonServerUnavailable, fetch_tritonserver

    if not (sys.platform.startswith("linux") and os.uname().machine == "x86_64"):
        pytest.skip("the wheel is for Linux x86-64")
    calls = []

    def pip_fails(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "WARNING: Retrying (...)\nERROR: No matching distribution "
                                                       "found for nvidia-pytriton==0.7.0\n")

    monkeypatch.setattr(tritonserver.subprocess, "run", pip_fails)
    with pytest.raises(TritonServerUnavailable, match=r"^pip download nvidia-pytriton==0\.7\.0 failed: ERROR: No matching"):
        fetch_tritonserver(cache_dir=tmp_path)
    assert "--no-deps" in calls[0] and "nvidia-pytriton==0.7.0" in calls[0] and list(tmp_path.iterdir()) == []
    (tmp_path / "0.7.0").mkdir()
    (tmp_path / "0.7.0" / ".complete").write_text("{}\n")
    assert fetch_tritonserver(cache_dir=tmp_path).root == tmp_path / "0.7.0" and len(calls) == 1
