"""Bulk explanation on Ray Data (``vdm-explain --dataset``): equal to ``Explainer.explain``, exact
after a SIGKILL and a rerun, unreadable images in the errors file, bad sources refused in one line.

Every run uses the session's Ray instance (``ray_session``); the killed driver is a subprocess that
joins it with ``--address``, started beside the uninterrupted run (two start-ups at once on 2 cores).
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("ray", reason="the serve extra is not installed: pip install 'vdm-engine[serve]'")
pytest.importorskip("pyarrow")

from tests.conftest import assert_close  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
# digits:test (300 images) in 30 shards of 10, explained in batches of 50 (fewer Ray blocks, a shorter run).
# Half a CPU per actor: the uninterrupted run and the driver that gets killed fit the session's 2 CPUs
# side by side (an actor still runs torch on one thread).
DIGITS = dict(dataset="digits:test", shard_size=10, batch_size=50, layer_masks=True, verify=True, cpus_per_actor=0.5,
              concurrency=1)


def _run(out, **kw):
    from vdm_engine.serve.bulk import BulkConfig, explain_dataset

    return explain_dataset(BulkConfig(out=str(out), **kw), progress=False, log=lambda m: None)


def _results(out):
    from vdm_engine.serve.bulk_output import read_results

    return read_results(out).to_pydict()


def _masks(rows, column="patch_mask") -> torch.Tensor:
    return torch.tensor(np.asarray(rows[column], dtype=np.float32))


class KilledDriver:
    """``vdm-explain --dataset`` over ``DIGITS`` in a subprocess joined to the session's Ray, SIGKILLed
    by a watcher thread as soon as its first shard is written; ``wait()`` -> (return code, stderr)."""

    def __init__(self, out: Path, address: str):
        self.out = out
        self.cmd = [sys.executable, "-m", "vdm_engine.cli.explain", "--dataset", DIGITS["dataset"], "--out", str(out),
                    "--shard-size", str(DIGITS["shard_size"]), "--batch-size", str(DIGITS["batch_size"]),
                    "--cpus-per-actor", str(DIGITS["cpus_per_actor"]), "--concurrency", "1", "--layer-masks", "--verify",
                    "--address", address, "--no-progress"]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(self.cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._watcher = threading.Thread(target=self._kill_after_first_shard, daemon=True)
        self._watcher.start()

    def _kill_after_first_shard(self):
        shards = self.out / "shards"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and self.proc.poll() is None and not any(shards.glob("part-*.parquet")):
            time.sleep(0.002)
        self.proc.send_signal(signal.SIGKILL)

    def wait(self) -> tuple[int, str]:
        self._watcher.join(timeout=200)
        _, err = self.proc.communicate(timeout=30)
        return self.proc.returncode, err.decode()


@pytest.fixture(scope="session")
def killed_driver(ray_session, tmp_path_factory):
    """The driver that gets SIGKILLed midway (``KilledDriver``), started before ``digits_run`` so that
    its start-up runs beside the uninterrupted run."""
    driver = KilledDriver(tmp_path_factory.mktemp("bulk_killed") / "killed", ray_session)
    yield driver
    driver.proc.kill()
    driver.proc.communicate()


@pytest.fixture(scope="session")
def digits_run(ray_session, killed_driver, tmp_path_factory):
    """An uninterrupted run over the 300 test digits, with layer masks and the masked check."""
    out = tmp_path_factory.mktemp("bulk_digits")
    summary = _run(out, **DIGITS)
    return out, summary


def test_bulk_masks_equal_explainer(digits_run, reference):
    from vdm_engine.data import digits_ids, digits_split

    out, summary = digits_run
    rows = _results(out)
    images, labels = digits_split("test")
    assert rows["id"] == digits_ids("test") and rows["index"] == list(range(300))
    pv = reference.preprocess(list(images))
    exp = reference.explain(pv)
    assert_close(_masks(rows), exp.patch_mask, 1e-5, 1e-5, "patch_mask")
    assert_close(_masks(rows, "layer_masks"), exp.layer_masks, 1e-5, 1e-5, "layer_masks")
    assert rows["label_index"] == exp.labels.tolist()
    assert_close(torch.tensor(rows["score"]), exp.probs.max(-1).values, 1e-5, 1e-5, "score")
    assert [t[0]["index"] for t in rows["top_k"]] == exp.labels.tolist() and len(rows["top_k"][0]) == 5
    assert_close(torch.tensor(rows["kept_fraction"]), exp.kept_fraction(0.5), 1e-6, 0, "kept_fraction")
    check = reference.verify(pv, exp)
    assert_close(torch.tensor(rows["kl"]), check.kl, 1e-5, 1e-4, "kl")
    assert rows["agree"] == check.agree.tolist()
    assert rows["true_label"] == labels.tolist()
    assert set(rows["gates_sha256"]) == {reference.gates.sha256} and set(rows["gates_source"]) == {"shipped"}
    # summary.json: the same numbers as the shards
    assert summary == json.loads((out / "summary.json").read_text())
    assert (summary["images"], summary["explained"], summary["errors"], summary["complete"]) == (300, 300, 0, True)
    assert summary["block_size"] == 50 and summary["startup_s"] > 0 and summary["steady_images_per_s"] > 0
    assert sum(summary["kept_fraction"]["counts"]) == 300
    assert summary["agreement_rate"] == pytest.approx(float(check.agree.float().mean()))
    assert sum(summary["per_class"].values()) == 300
    assert (out / "errors.jsonl").read_text() == ""


def test_sigkill_midway_then_rerun_is_exact(digits_run, killed_driver, capsys):
    """SIGKILL the driver (a subprocess) after its first shard, rerun (the CLI in this process): every
    image once, as uninterrupted."""
    from vdm_engine.cli.explain import main

    code, err = killed_driver.wait()
    assert code == -signal.SIGKILL, f"the run ended before it was killed: {err[-2000:]}"
    out, shards = killed_driver.out, killed_driver.out / "shards"
    before = sorted(p.name for p in shards.glob("part-*.parquet"))
    assert 1 <= len(before) < 30, before
    assert main(killed_driver.cmd[3:]) == 0  # the rerun: same command, in this process (already on the session's Ray)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"vdm-explain: 300 explained, 0 errors of 300 images; this run {300 - 10 * len(before)} in ")
    assert "images/s" in line and line.endswith(f"-> {out}")
    summary = json.loads((out / "summary.json").read_text())
    after, full = _results(out), _results(digits_run[0])
    assert after["id"] == full["id"] and len(set(after["id"])) == 300  # every image exactly once, in order
    for col in ("patch_mask", "layer_masks"):
        assert_close(_masks(after, col), _masks(full, col), 1e-6, 1e-6, col)
    for col in ("label_index", "agree", "true_label", "top_k"):
        assert after[col] == full[col], col
    assert summary["explained"] == 300 and summary["complete"]
    assert not list(shards.glob(".*.tmp"))


@pytest.mark.parametrize("batch_size, image_size, expected", [
    (None, (32, 32), 1024), (None, (224, 224), 64), (None, (384, 384), 32), (None, (5000, 5000), 1), (50, (224, 224), 50),
])
def test_block_size_rule(batch_size, image_size, expected):
    """The largest power of two up to 1024 whose float32 input fits 64 MiB, unless batch_size says."""
    from vdm_engine.serve.bulk import BulkConfig

    assert BulkConfig(dataset="digits", out="o", batch_size=batch_size).block_size(image_size) == expected


def _png(a: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def digit_folder(tmp_path_factory):
    """Eight test digits as PNGs in two sub-folders, plus three unreadable files."""
    from vdm_engine.data import digits_split

    root = tmp_path_factory.mktemp("digit_folder")
    images, _ = digits_split("test")
    good = {}
    for i, a in enumerate(images[:8]):
        rel = f"{'ab'[i % 2]}/d{i}.png"
        (root / rel).parent.mkdir(exist_ok=True)
        (root / rel).write_bytes(_png(a))
        good[rel] = a
    png = _png(images[0])
    bad = {"a/garbage.png": b"this is not an image", "b/truncated.png": png[: len(png) // 2], "empty.jpg": b""}
    for rel, data in bad.items():
        (root / rel).write_bytes(data)
    return root, good, bad


def test_corrupt_files_go_to_the_errors_file(digit_folder, reference, ray_session, tmp_path):
    root, good, bad = digit_folder
    summary = _run(tmp_path, dataset=f"imagefolder:{root}", shard_size=4, batch_size=4)
    errors = [json.loads(line) for line in (tmp_path / "errors.jsonl").read_text().splitlines()]
    assert sorted(e["id"] for e in errors) == sorted(bad)
    assert all(e["reason"] and e["path"].endswith(e["id"]) for e in errors)
    rows = _results(tmp_path)
    assert sorted(rows["id"]) == sorted(good)
    assert (summary["explained"], summary["errors"], summary["images"]) == (8, 3, 11)
    exp = reference.explain(reference.preprocess([good[i] for i in rows["id"]]))
    assert_close(_masks(rows), exp.patch_mask, 1e-5, 1e-5, "patch_mask")


def test_k_level_gates_store_patch_rank(ray_session, tmp_path):
    """With K-level gates (vit-digits' gates-levels) each shard holds a patch_rank column equal to the explainer's."""
    from vdm_engine import Explainer, Gates
    from vdm_engine.data import digits_split
    from vdm_engine.models import embedded_levels_dir

    levels = str(embedded_levels_dir("vit-digits"))
    _run(tmp_path, dataset="digits:test", limit=12, shard_size=6, batch_size=6, gates=levels, concurrency=1,
         cpus_per_actor=0.5)
    rows = _results(tmp_path)
    ex = Explainer.from_pretrained("vit-digits", gates=levels).eval()
    exp = ex.explain(ex.preprocess(list(digits_split("test")[0][:12])))
    assert rows["index"] == list(range(12)) and set(rows["gates_sha256"]) == {Gates.from_pretrained(levels).sha256}
    assert_close(_masks(rows, "patch_rank"), exp.patch_rank, 1e-5, 1e-5, "patch_rank")


def _decode(source, spec):
    """``bulk._decode_batch`` in this process (what a Ray task runs) on every row of ``source``."""
    from vdm_engine.serve.bulk import _decode_batch

    batch = {c: source.table.column(c).to_pylist() for c in source.table.column_names}
    return _decode_batch(batch, loader=source.loader, image_spec=spec, max_pixels=None)


def test_parquet_bytes_and_jsonl_paths(digit_folder, reference, tmp_path):
    """A parquet file of image bytes and a JSONL file of relative paths name and decode the same images."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vdm_engine.serve.bulk_sources import open_bulk_source

    root, good, _ = digit_folder
    names = sorted(good)
    data = [(root / n).read_bytes() for n in names] + [b"not an image"]
    pq.write_table(pa.table({"id": names + ["bad"], "image": data, "label": list(range(len(data)))}),
                   tmp_path / "list.parquet")
    rel = [os.path.relpath(root / n, tmp_path) for n in names]  # relative to the JSONL file's folder
    (tmp_path / "list.jsonl").write_text("".join(json.dumps({"path": r}) + "\n" for r in rel))
    a = open_bulk_source(str(tmp_path / "list.parquet"))
    b = open_bulk_source(str(tmp_path / "list.jsonl"))
    assert a.table.column("id").to_pylist() == names + ["bad"]
    assert b.table.column("id").to_pylist() == rel
    assert a.table.column("label").to_pylist() == list(range(len(data)))
    da, db = _decode(a, reference.backbone.image_spec), _decode(b, reference.backbone.image_spec)
    assert list(da["error"][:-1]) == list(db["error"]) == [""] * len(names) and "bad" in da["error"][-1]
    # uint8 images at the model size; the actor's preprocess turns them into exactly the Explainer's input
    assert da["pixels"].dtype == np.uint8 and da["pixels"].shape == (len(data), 32, 32, 3)
    expected = reference.preprocess([good[n] for n in names])
    assert torch.equal(reference.preprocess(da["pixels"][:-1]), expected)
    assert torch.equal(reference.preprocess(db["pixels"]), expected)


def test_hf_dataset_saved_to_disk(reference, tmp_path):
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    from vdm_engine.data import digits_split
    from vdm_engine.serve.bulk_sources import open_bulk_source

    images, labels = digits_split("val")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    ds = datasets.Dataset.from_dict({"image": [Image.fromarray(a) for a in images[:5]], "label": labels[:5].tolist()},
                                    features=features)
    ds.save_to_disk(str(tmp_path / "hf"))
    source = open_bulk_source(f"hf:{tmp_path / 'hf'}")
    assert source.table.column("id").to_pylist() == [f"train/{i}" for i in range(5)]
    assert source.table.column("label").to_pylist() == labels[:5].tolist()
    decoded = _decode(source, reference.backbone.image_spec)
    assert torch.equal(reference.preprocess(decoded["pixels"]), reference.preprocess(list(images[:5])))
    with pytest.raises(ValueError, match="splits \\['train'\\]"):
        datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dd"))
        open_bulk_source(f"hf:{tmp_path / 'dd'}:test")


@pytest.mark.parametrize("argv, expected", [
    (["--dataset", "nonsense", "--out", "{tmp}/o"], "unknown dataset 'nonsense'"),
    (["--dataset", "imagefolder:{tmp}/missing", "--out", "{tmp}/o"], "is not a directory"),
    (["--dataset", "digits:nope", "--out", "{tmp}/o"], "unknown digits split"),
    (["--dataset", "toy:x", "--out", "{tmp}/o"], "toy takes integers"),
    (["--dataset", "{tmp}/none.parquet", "--out", "{tmp}/o"], "no such file"),
    (["--dataset", "digits"], "--dataset needs --out DIR"),
    (["--dataset", "digits", "--out", "{tmp}/o", "--shard-size", "0"], "--shard-size must be >= 1"),
    (["img.png", "--dataset", "digits", "--out", "{tmp}/o"], "not both"),
    ([], "required: IMAGE (or --dataset SRC)"),
])
def test_bad_dataset_is_one_line_exit_2(argv, expected, tmp_path, capsys):
    from vdm_engine.cli.explain import main

    rc = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("vdm-explain: error: ") and expected in err[0], err


def test_without_ray_dataset_is_refused(monkeypatch, tmp_path, capsys):
    from vdm_engine.cli.explain import main

    monkeypatch.setitem(sys.modules, "ray.data", None)  # import ray.data -> ImportError
    rc = main(["--dataset", "digits", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "pip install 'vdm-engine[serve]'" in err[0], err


def test_other_run_in_out_is_refused(digits_run, capsys):
    from vdm_engine.cli.explain import main

    rc = main(["--dataset", "digits:test", "--out", str(digits_run[0]), "--shard-size", "50"])
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert rc == 2 and len(err) == 1 and "holds another bulk run (shard_size: 10 there, 50 now)" in err[0], err


def test_eval_takes_diffmask_masks_from_a_run(digits_run, tmp_path):
    """vdm-eval --diffmask-from DIR gives the same curves as recomputing the masks."""
    from vdm_engine.evaluation import PerturbationConfig, evaluate_model
    from vdm_engine.serve.bulk_output import read_masks

    cfg = PerturbationConfig(steps=4, replacements=("noise",), batch_size=16)
    kw = dict(n=24, config=cfg, progress=False, num_examples=2)
    fresh, _ = evaluate_model("vit-digits", "digits", ["diffmask"], **kw)
    stored, ex = evaluate_model("vit-digits", "digits", ["diffmask"], diffmask_from=read_masks(digits_run[0]), **kw)
    a, b = fresh["methods"]["diffmask"]["noise"], stored["methods"]["diffmask"]["noise"]
    for order in a:
        assert a[order]["auc_prob"] == pytest.approx(b[order]["auc_prob"], abs=1e-6)
        assert a[order]["prob"] == pytest.approx(b[order]["prob"], abs=1e-6)
    assert stored["diffmask_from"] == str(digits_run[0]) and ex["scores"]["diffmask"].shape == (2, 4, 4)
    with pytest.raises(ValueError, match="no stored mask"):  # the run has the test split only
        evaluate_model("vit-digits", "toy", ["diffmask"], diffmask_from=read_masks(digits_run[0]), n=4, progress=False)


def test_eval_cli_diffmask_from_bad_folder(tmp_path, capsys):
    from vdm_engine.cli.eval import main

    rc = main(["--data", "digits", "--methods", "diffmask", "--diffmask-from", str(tmp_path), "--out",
               str(tmp_path / "e"), "--no-plots"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "not a bulk run folder" in err[0], err


def test_actor_pool_sizes():
    """Default pool: one actor per GPU share, else per CPU share (less a decoding task's), from one up;
    an explicit concurrency is a fixed pool."""
    from vdm_engine.serve.bulk import BulkConfig, _actor_pool

    def sizes(resources, decoding=False, **kw):
        p = _actor_pool(BulkConfig(dataset="digits", out="o", **kw), resources, decoding=decoding)
        return p.min_size, p.max_size

    assert sizes({"CPU": 2.0}) == (1, 2)
    assert sizes({"CPU": 2.0}, decoding=True) == (1, 1)  # 1.5 CPUs left beside a 0.5-CPU decoding task
    assert sizes({"CPU": 8.0}, cpus_per_actor=2.0) == (1, 4)
    assert sizes({"CPU": 0.5}) == (1, 1)
    assert sizes({"CPU": 16.0, "GPU": 4.0}, num_gpus_per_actor=0.5) == (1, 8)
    assert sizes({"CPU": 16.0}, concurrency=3) == (3, 3)

