"""The Ray Serve deployment: one explainer per replica, dynamic batching, FastAPI ingress.

Each request is read, size-checked, decoded and preprocessed in its own handler; only then do its
images join a batch, one row each (``@serve.batch``). One forward pass answers the batch and Ray
Serve hands each call exactly its own row back, so a request's answer holds its rows only, and a
bad request never reaches the batch of others.

Endpoints: ``POST /v1/explain`` (``?overlay=png``, ``?verify=1``), ``POST /v1/predict``,
``GET /v1/stats``, ``/healthz``, ``/readyz``, and the Open Inference Protocol (KServe v2) subset:
``/v2``, ``/v2/health/live``, ``/v2/health/ready``, ``GET /v2/models/{name}``,
``/v2/models/{name}/ready``, ``POST /v2/models/{name}[/versions/1]/infer``.

No ``from __future__ import annotations`` here: FastAPI reads the handlers' annotations at runtime.
"""

import asyncio
import functools
import gc
import io
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from vdm_engine.explainer import Explanation
from vdm_engine.records import explanation_records, overlay_caption, prediction_records

from .backend import ServingModel
from .config import ServeConfig
from .oip import HEADER_LENGTH, encode_infer_response, model_metadata, parse_infer_request
from .requests import RequestError, check_length, parse_images

__all__ = ["VdmServer", "app", "build_app", "deployment"]

app = FastAPI(title="vdm-serve", description="Vision DiffMask explanations of ViT predictions")

#: Environment variables a replica needs to load the same model as the process that deployed it.
#: Bodies up to this size are decoded on the event loop (well under a millisecond for a small
#: image; a worker-thread hop costs about as much); larger ones in a worker thread.
INLINE_DECODE_BYTES = 256 * 1024

_PASSED_ENV = ("HF_HOME", "HF_HUB_OFFLINE", "HF_HUB_CACHE", "VDM_GATES_HOME", "VDM_KERNELS", "VDM_MAX_IMAGE_PIXELS",
               "TRITON_INTERPRET", "OMP_NUM_THREADS")


@app.exception_handler(RequestError)
async def _request_error(request: Request, exc: RequestError):
    return JSONResponse({"error": exc.message}, status_code=exc.status)


@app.exception_handler(Exception)
async def _server_error(request: Request, exc: Exception):  # pragma: no cover - a bug, still one line of JSON
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return JSONResponse({"error": f"internal error: {type(exc).__name__}: {first}"}, status_code=500)


def _flag(value: str | None) -> bool:
    if value is None:
        return False
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on", ""):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise RequestError(400, f"verify={value!r}; expected 1 or 0")


@serve.deployment
@serve.ingress(app)
class VdmServer:
    """One explainer (``ServingModel``) and two dynamic batchers: explain and predict."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.model = ServingModel(config)
        for method in (self._explain_rows, self._predict_rows):
            method.set_max_batch_size(config.max_batch)
            method.set_batch_wait_timeout_s(config.batch_wait_ms / 1000.0)
        self.started = time.time()
        self.stats = {k: {"batches": 0, "rows": 0, "max_batch_size": 0} for k in ("explain", "predict")}
        self.requests = {"ok": 0}
        self._metric = None
        try:
            from ray.serve import metrics

            self._metric = metrics.Histogram(
                "vdm_batch_size", description="images per forward pass formed by the server's batcher",
                boundaries=[1, 2, 4, 8, 16, 32, 64, 128], tag_keys=("endpoint",))
        except Exception:  # pragma: no cover - metrics are optional
            pass
        self.ready = False
        # Forward passes run one at a time on their own thread, never queued behind request decoding.
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="vdm-model")
        self._warm_up()
        # What is loaded by now (Ray, FastAPI, torch, the model: ~500k objects) lives as long as the
        # replica; frozen, the collector's full passes skip it (one took ~0.5 s, a stall for every
        # request in flight).
        gc.collect()
        gc.freeze()

    def _warm_up(self) -> None:
        """Ready means warm: one batch through explain (with the masked check when available) and predict."""
        H, W = self.model.model_size or self.model.image_size
        x = self.model.preprocess([np.full((H, W, 3), 128, dtype=np.uint8)])
        self.model.explain_batch(x, [True] if self.model.can_verify else None)
        self.model.predict_batch(x)
        self.ready = True

    # ----- batching ----------------------------------------------------------------------------
    def _count(self, kind: str, n: int) -> None:
        s = self.stats[kind]
        s["batches"] += 1
        s["rows"] += n
        s["max_batch_size"] = max(s["max_batch_size"], n)
        if self._metric is not None:
            self._metric.observe(n, tags={"endpoint": kind})

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _explain_rows(self, rows: list[tuple[torch.Tensor, bool]]) -> list[dict]:
        """Rows (input (1, ...), verify?) -> one forward pass -> each row's own results."""
        n = len(rows)
        x = torch.cat([r[0] for r in rows])
        verify = [r[1] for r in rows]
        out = await self._run_model(self.model.explain_batch, x, verify if any(verify) else None)
        self._count("explain", n)
        return [{**{k: v[i] for k, v in out.items()}, "batch_size": n} for i in range(n)]

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _predict_rows(self, rows: list[torch.Tensor]) -> list[tuple[torch.Tensor, int]]:
        n = len(rows)
        logits = await self._run_model(self.model.predict_batch, torch.cat(rows))
        self._count("predict", n)
        return [(logits[i], n) for i in range(n)]

    async def _run_model(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._model_thread, functools.partial(fn, *args))

    async def _explain(self, x: torch.Tensor, verify: bool) -> list[dict]:
        return await asyncio.gather(*(self._explain_rows((x[i:i + 1], verify)) for i in range(x.shape[0])))

    # ----- reading requests ----------------------------------------------------------------------
    async def _body(self, request: Request) -> bytes:
        limit = self.config.max_body_bytes
        check_length(request.headers.get("content-length"), limit)
        chunks, n = [], 0
        async for chunk in request.stream():
            n += len(chunk)
            if n > limit:
                raise RequestError(413, f"request body is over {limit} bytes; the limit is vdm-serve --max-body-mb")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _images(self, request: Request):
        body = await self._body(request)
        if len(body) <= INLINE_DECODE_BYTES:
            return self._decode(body, request.headers.get("content-type"))
        return await asyncio.to_thread(self._decode, body, request.headers.get("content-type"))

    def _decode(self, body: bytes, content_type: str | None):
        """Body -> (images, is_json, model inputs (B, ...))."""
        images, is_json = parse_images(body, content_type, max_images=self.config.max_images,
                                       max_pixels=self.config.max_pixels, model_size=self.model.model_size)
        return images, is_json, self.model.preprocess([im.pixels for im in images])

    def _provenance(self) -> dict:
        return self.model.describe()

    # ----- /v1 ---------------------------------------------------------------------------------
    @app.post("/v1/explain")
    async def explain(self, request: Request, overlay: str | None = None, verify: str | None = None):
        """One image (image/png, image/jpeg) -> its record; JSON {"images": [...]} -> {"results": [...]}."""
        if overlay not in (None, "png"):
            raise RequestError(400, f"overlay={overlay!r}; the only overlay format is png")
        check = _flag(verify)
        if check and not self.model.can_verify:
            raise RequestError(400, "verify needs the masked pass: serve --model, or a graph exported with "
                                    "the masked_logits and kl outputs")
        images, is_json, x = await self._images(request)
        if overlay and len(images) != 1:
            raise RequestError(400, f"overlay=png draws one image; this request has {len(images)}")
        rows = await self._explain(x, check)
        exp = Explanation(logits=torch.stack([r["logits"] for r in rows]),
                          patch_mask=torch.stack([r["patch_mask"] for r in rows]), layer_masks=None,
                          grid=self.model.grid, image_size=self.model.image_size,
                          patch_rank=torch.stack([r["patch_rank"] for r in rows]) if "patch_rank" in rows[0] else None)
        records = explanation_records(exp, self.model.id2label, top_k=self.config.top_k,
                                      threshold=self.config.threshold)
        prov = self._provenance()
        for rec, img, row in zip(records, images, rows):
            rec.update(image_size=list(img.original_size), warnings=list(img.warnings), **prov)
            if check:
                rec["verify"] = {"agree": bool(row["agree"]), "kl": float(row["kl"]),
                                 "masked_kept_fraction": float(row["masked_kept"])}
        headers = {"X-Batch-Size": ",".join(str(r["batch_size"]) for r in rows)}
        self.requests["ok"] += 1
        if overlay:
            png = await asyncio.to_thread(self._overlay_png, images[0].pixels, exp.grid_mask()[0].numpy(), records[0])
            headers.update({"X-Label": str(records[0]["label"]), "X-Score": f"{records[0]['score']:.6f}"})
            return Response(content=png, media_type="image/png", headers=headers)
        return JSONResponse({"results": records} if is_json else records[0], headers=headers)

    def _overlay_png(self, pixels: np.ndarray, grid: np.ndarray, record: dict) -> bytes:
        from vdm_engine.visualize import overlay

        buf = io.BytesIO()
        overlay(pixels, grid, threshold=self.config.threshold,
                caption=overlay_caption(self.model.name, record)).save(buf, format="PNG")
        return buf.getvalue()

    @app.post("/v1/predict")
    async def predict(self, request: Request):
        """Plain inference (no gates): label, score and top-k per image."""
        images, is_json, x = await self._images(request)
        rows = await asyncio.gather(*(self._predict_rows(x[i:i + 1]) for i in range(x.shape[0])))
        records = prediction_records(torch.stack([r[0] for r in rows]), self.model.id2label, top_k=self.config.top_k)
        prov = {"model": self.model.name, "model_sha256": self.model.model_sha256}
        for rec, img in zip(records, images):
            rec.update(image_size=list(img.original_size), warnings=list(img.warnings), **prov)
        self.requests["ok"] += 1
        headers = {"X-Batch-Size": ",".join(str(r[1]) for r in rows)}
        return JSONResponse({"results": records} if is_json else records[0], headers=headers)

    @app.get("/v1/stats")
    async def stats(self):
        """This replica's batching so far: batches formed, rows, mean and largest batch size, per endpoint."""
        out = {"replica": serve.get_replica_context().replica_tag, "pid": os.getpid(),
               "uptime_s": time.time() - self.started, "max_batch": self.config.max_batch,
               "batch_wait_ms": self.config.batch_wait_ms, "requests_ok": self.requests["ok"],
               "compiled_batch_sizes": list(self.model.compiled.buckets) if self.model.compiled else None}
        for k, s in self.stats.items():
            out[k] = {**s, "mean_batch_size": s["rows"] / s["batches"] if s["batches"] else None}
        return out

    @app.get("/healthz")
    async def healthz(self):
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(self):
        if not self.ready:
            return JSONResponse({"ready": False, "error": "warming up"}, status_code=503)
        return {"ready": True, **self._provenance()}

    # ----- Open Inference Protocol (KServe v2) ---------------------------------------------------
    def _check_name(self, name: str, version: str | None = None) -> None:
        if name != self.config.oip_name:
            raise RequestError(404, f"unknown model {name!r}; this server has {self.config.oip_name!r}")
        if version not in (None, "1"):
            raise RequestError(404, f"model {name!r} has version 1 only, not {version!r}")

    @app.get("/v2")
    async def v2_server(self):
        return {"name": "vdm-serve", "version": "1", "extensions": ["binary_tensor_data"]}

    @app.get("/v2/health/live")
    async def v2_live(self):
        return {"live": True}

    @app.get("/v2/health/ready")
    async def v2_ready(self):
        return JSONResponse({"ready": self.ready}, status_code=200 if self.ready else 503)

    @app.get("/v2/models/{name}")
    async def v2_model(self, name: str):
        self._check_name(name)
        return model_metadata(name, self.model.platform, [self.model.input_spec], self.model.output_specs)

    @app.get("/v2/models/{name}/ready")
    async def v2_model_ready(self, name: str):
        self._check_name(name)
        return JSONResponse({"name": name, "ready": self.ready}, status_code=200 if self.ready else 503)

    @app.post("/v2/models/{name}/infer")
    async def v2_infer(self, name: str, request: Request):
        return await self._infer(name, None, request)

    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def v2_infer_version(self, name: str, version: str, request: Request):
        return await self._infer(name, version, request)

    async def _infer(self, name: str, version: str | None, request: Request):
        self._check_name(name, version)
        body = await self._body(request)
        names = [t.name for t in self.model.output_specs]
        array, asked, rid = parse_infer_request(body, request.headers.get(HEADER_LENGTH), self.model.input_spec, names)
        x = torch.from_numpy(array.copy())
        try:
            x = self.model.check_input(x)
        except ValueError as e:
            raise RequestError(400, " ".join(str(e).split())) from None
        rows = await self._explain(x, False)
        outputs = {n: torch.stack([r[n] for r in rows]).numpy() for n in names}
        data, headers = encode_infer_response(name, outputs, asked, rid)
        headers["X-Batch-Size"] = ",".join(str(r["batch_size"]) for r in rows)
        self.requests["ok"] += 1
        return Response(content=data, headers=headers, media_type=headers.pop("content-type"))


#: Seconds a stopping replica may spend finishing its in-flight requests (a batch takes milliseconds).
GRACEFUL_SHUTDOWN_S = 10.0


def deployment(config: ServeConfig, *, env: dict[str, str] | None = None):
    """The ``VdmServer`` deployment with ``config``'s replicas, resources (``num_gpus`` per replica on
    CUDA, fractions allowed) and queue bounds; ``env``: environment variables for the replicas
    (default: those of ``_PASSED_ENV`` set here)."""
    if env is None:
        env = {k: os.environ[k] for k in _PASSED_ENV if k in os.environ}
    actor = {"num_cpus": config.num_cpus, "num_gpus": config.gpus_per_replica}
    if env:
        actor["runtime_env"] = {"env_vars": dict(env)}
    return VdmServer.options(
        num_replicas=config.replicas,
        max_ongoing_requests=config.ongoing,
        max_queued_requests=config.max_queued_requests,
        ray_actor_options=actor,
        # A stopping replica finishes its in-flight requests (checked every half second) for at most
        # GRACEFUL_SHUTDOWN_S, then is killed: Ctrl-C and replica replacement stay bounded.
        graceful_shutdown_wait_loop_s=0.5,
        graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_S,
    )


def build_app(config: ServeConfig, *, env: dict[str, str] | None = None):
    """The bound application for ``serve.run`` (``deployment(config, env=env)`` bound to ``config``)."""
    return deployment(config, env=env).bind(config)
