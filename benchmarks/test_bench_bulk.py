"""Bulk explanation on Ray Data against the single-process ``Explainer.explain`` loop, on vit-digits.

The digits (1797) repeated three times (5391 images) go through ``explain_dataset`` (decoding tasks,
one explainer actor with as many torch threads as the loop has) and through a plain loop of
``preprocess`` + ``explain`` over the same images in batches of the same size. ``extra_info``
records both rates: end to end (Ray start-up, actor start-up and model load included) and steady
(after the first shard was written), and their ratios. Under plain ``pytest`` the case runs once on
256 images. Ray's workers run at nice 0 here (``RAY_worker_niceness``), as the loop does.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

pytest.importorskip("ray", reason="the serve extra is not installed: pip install 'vdm-engine[serve]'")
pytest.importorskip("pyarrow")

BATCH = 64
REPEAT = 3


def _loop_rate(explainer, images: np.ndarray, n: int, rounds: int) -> float:
    """Best-of-``rounds`` images/s of preprocess + explain over images[i % len(images)], i < n."""
    best = 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        for s in range(0, n, BATCH):
            idx = np.arange(s, min(n, s + BATCH)) % len(images)
            exp = explainer.explain(explainer.preprocess(list(images[idx])))
            exp.patch_mask.numpy()
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
    if not timed:  # plain pytest: a short run that still crosses several shards
        source = type(source)(source.spec, source.description, source.table.slice(0, 256), source.loader)
    n = len(source)
    explainer = Explainer.from_pretrained("vit-digits").eval()
    images, _ = digits_split("all")
    loop = _loop_rate(explainer, images, n, rounds=2 if timed else 1)

    own = not ray.is_initialized()
    if own:
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        # One actor with the loop's thread count; the decoding tasks take the remaining half CPU.
        # In a shared instance (the tests' session, whose serve replicas hold some CPUs) ask for a
        # quarter of one CPU per part, so that the run never waits on CPUs other users hold.
        cpus = max(1.0, float(ray.cluster_resources().get("CPU", 1)) - 0.5) if own else 0.25
        config = BulkConfig(dataset=f"digits*{REPEAT}", out=str(tmp_path / "bulk"), batch_size=BATCH,
                            shard_size=512 if timed else 64, cpus_per_actor=cpus, decode_cpus=0.5 if own else 0.25)
        summary = benchmark.pedantic(explain_dataset, args=(config,), kwargs={"progress": False, "source": source},
                                     rounds=1, iterations=1)
    finally:
        if own:
            ray.shutdown()
    assert summary["explained"] == n and summary["errors"] == 0 and summary["complete"]
    steady = summary["steady_images_per_s"]
    benchmark.extra_info.update(
        case="bulk/digits", images=n, batch=BATCH, shard_size=config.shard_size, actors=1,
        actor_cpus=config.cpus_per_actor, torch_threads=torch.get_num_threads(), device_name=cpu_model_name(),
        loop_images_per_s=round(loop, 1), bulk_images_per_s=summary["images_per_s"], bulk_steady_images_per_s=steady,
        startup_s=summary["startup_s"], ratio=round(steady / loop, 3) if steady else None,
        ratio_end_to_end=round(summary["images_per_s"] / loop, 3), loadavg_1m=os.getloadavg()[0],
    )
