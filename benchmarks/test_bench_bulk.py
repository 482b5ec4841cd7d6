"""Bulk explanation on Ray Data against the single-process ``Explainer.explain`` loop, on vit-digits.

Timed (``--benchmark-only``): the digits (1797) repeated 48 times (86256 images, 85 blocks of
``BulkConfig.block_size``, 1024 here) go through ``explain_dataset`` (digits are held in memory, so
their uint8 images travel in the blocks and no decoding task runs; the default pool, one
single-threaded actor per CPU, against a loop with one torch thread per CPU) and through a plain loop of ``preprocess`` + ``explain`` over the same images in batches
of the same size, one pass before and one after the pipeline in the same process. ``extra_info``
records the loop's rate (the better pass), the pipeline's steady rate (the blocks after the first,
over the time from the first to the last), its end-to-end rate (the whole ``explain_dataset`` call: the driver's model
load, Ray Data and actor start-up, the model load in the actor, writing the shards), the start-up
until the first block was back, ``ray.init``'s time (in neither rate), and the ratios to the loop.
Under plain ``pytest`` the case runs once on 256 images in blocks of 64. Ray's workers run at nice 0
here (``RAY_worker_niceness``), as the loop does.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

pytest.importorskip("ray", reason="the serve extra is not installed: pip install 'vdm-engine[serve]'")
pytest.importorskip("pyarrow")

REPEAT = 48  # 86256 images: a steady phase of ~20 s, long beside Ray's start-up settling


def _loop_rate(explainer, images: np.ndarray, n: int, batch: int, passes: int) -> float:
    """Best-of-``passes`` images/s of preprocess + explain over images[i % len(images)], i < n."""
    best = 0.0
    for _ in range(passes):
        t0 = time.perf_counter()
        for s in range(0, n, batch):
            idx = np.arange(s, min(n, s + batch)) % len(images)
            explainer.explain(explainer.preprocess(list(images[idx]))).patch_mask.numpy()
        best = max(best, n / (time.perf_counter() - t0))
    return best


@pytest.mark.slow
@pytest.mark.benchmark(group="bulk")
def test_bulk_digits_vs_explain_loop(benchmark, tmp_path):
    import ray

    from benchmarks.conftest import cpu_model_name
    from vdm_engine import Explainer
    from vdm_engine.data import digits_split
    from vdm_engine.serve.bulk import BulkConfig, explain_dataset
    from vdm_engine.serve.bulk_sources import open_bulk_source

    timed = benchmark.enabled
    source = open_bulk_source("digits").repeat(REPEAT)
    if not timed:  # plain pytest: a short run that still crosses several blocks and shards
        source = type(source)(source.spec, source.description, source.table.slice(0, 256), source.loader,
                              source.in_memory)
    n = len(source)
    explainer = Explainer.from_pretrained("vit-digits").eval()
    images, _ = digits_split("all")
    threads = torch.get_num_threads()

    own = not ray.is_initialized()
    t0 = time.perf_counter()
    if own:
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray_init_s = time.perf_counter() - t0
    try:
        # Its own instance: the default pool, one single-threaded actor per CPU (the loop runs one
        # thread per CPU). In a shared instance (the tests' session, whose serve replicas hold some
        # CPUs) one actor asks for a quarter of a CPU, so that it never waits on CPUs others hold.
        pool = dict(cpus_per_actor=1.0) if own else dict(cpus_per_actor=0.25, concurrency=1)
        config = BulkConfig(dataset=f"digits*{REPEAT}", out=str(tmp_path / "bulk"), batch_size=None if timed else 64,
                            shard_size=1024 if timed else 64, **pool)
        batch = config.block_size(explainer.backbone.image_size)
        loop_before = _loop_rate(explainer, images, n, batch, passes=1)
        t0 = time.perf_counter()
        summary = benchmark.pedantic(explain_dataset, args=(config,), kwargs={"progress": False, "source": source},
                                     rounds=1, iterations=1)
        call_s = time.perf_counter() - t0
    finally:
        if own:
            ray.shutdown()
    loop_after = _loop_rate(explainer, images, n, batch, passes=1)
    assert summary["explained"] == n and summary["errors"] == 0 and summary["complete"]
    assert summary["block_size"] == batch
    loop, steady, e2e = max(loop_before, loop_after), summary["steady_images_per_s"], n / call_s
    benchmark.extra_info.update(
        case="bulk/digits", images=n, batch=batch, shard_size=config.shard_size,
        actors=config.concurrency or int(os.cpu_count() // config.cpus_per_actor), decode="uint8 images in the blocks",
        actor_cpus=config.cpus_per_actor, actor_threads=max(1, int(round(config.cpus_per_actor))), loop_threads=threads, device_name=cpu_model_name(),
        loop_images_per_s=round(loop, 1), loop_before_images_per_s=round(loop_before, 1),
        loop_after_images_per_s=round(loop_after, 1), bulk_steady_images_per_s=steady,
        bulk_end_to_end_images_per_s=round(e2e, 1), call_s=round(call_s, 2), startup_s=summary["startup_s"],
        ray_init_s=round(ray_init_s, 2), ratio_steady=round(steady / loop, 3) if steady else None,
        ratio_end_to_end=round(e2e / loop, 3), loadavg_1m=os.getloadavg()[0],
    )
