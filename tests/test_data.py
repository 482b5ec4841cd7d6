"""Data sources: the toy generator's ground truth, digits splits, imagefolder, hf errors, batching."""

from __future__ import annotations

import builtins

import numpy as np
import pytest
import torch
from PIL import Image

from vdm_engine.data import (
    TOY_GRID,
    TOY_MAX_COUNT,
    TOY_PATCH,
    DataSource,
    ImageFolderSource,
    digits_split,
    open_source,
    pixel_batches,
    toy_batch,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread is fastest


def _patch_colours(images):
    """(n, 16, 3) mean colour of each patch of toy images."""
    n = len(images)
    gh, gw = TOY_GRID
    patches = images.reshape(n, gh, TOY_PATCH, gw, TOY_PATCH, 3).transpose(0, 1, 3, 2, 4, 5)
    return patches.reshape(n, gh * gw, -1, 3).mean(2)


def _red_blue(mean):
    red = (mean[..., 0] > 180) & (mean[..., 1] < 80) & (mean[..., 2] < 80)
    blue = (mean[..., 2] > 180) & (mean[..., 0] < 80) & (mean[..., 1] < 110)
    return red, blue


def test_toy_batch_shapes_and_ground_truth():
    images, labels, relevant = toy_batch(37, seed=3)
    gh, gw = TOY_GRID
    assert images.shape == (37, gh * TOY_PATCH, gw * TOY_PATCH, 3) and images.dtype == np.uint8
    assert labels.shape == (37,) and relevant.shape == (37, gh * gw) and relevant.dtype == bool
    assert (relevant.sum(1) == labels).all()
    assert labels.min() >= 0 and labels.max() <= TOY_MAX_COUNT
    # Relevant = red in the top half or blue in the bottom half; nothing else is.
    red, blue = _red_blue(_patch_colours(images))
    top = np.arange(gh * gw) < (gh // 2) * gw
    assert ((red & top) | (blue & ~top) == relevant).all()


def test_toy_batch_is_seeded_and_varies_decoys_and_distractors():
    a, b = toy_batch(64, 5), toy_batch(64, 5)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    c = toy_batch(64, 6)[0]
    assert not np.array_equal(a[0], c)
    # Decoys (blue on top, red below) and other colours vary independently of the label.
    images, labels, relevant = toy_batch(400, 1)
    mean = _patch_colours(images)
    red, blue = _red_blue(mean)
    top = np.arange(16) < 8
    decoys = ((blue & top) | (red & ~top)).sum(1)
    grey = np.abs(mean - 128).max(-1) < 30
    others = (~grey & ~red & ~blue).sum(1)
    assert decoys.min() == 0 and decoys.max() == 5 and others.min() == 0 and others.max() == 3
    assert abs(np.corrcoef(decoys, labels)[0, 1]) < 0.2 and abs(np.corrcoef(others, labels)[0, 1]) < 0.2


def test_toy_batch_rejects_bad_n():
    with pytest.raises(ValueError, match="n >= 1"):
        toy_batch(0, 0)


def test_digits_splits_are_disjoint_and_upscaled():
    tr, ytr = digits_split("train")
    va, _ = digits_split("val")
    te, yte = digits_split("test")
    assert tr.shape == (1297, 32, 32, 3) and va.shape[0] == 200 and te.shape[0] == 300
    assert tr.dtype == np.uint8 and set(np.unique(ytr)) == set(range(10))
    flat = {x.tobytes() for x in tr}
    assert sum(x.tobytes() in flat for x in te) <= 3  # a few scans are duplicated in the original data
    with pytest.raises(ValueError, match="unknown digits split"):
        digits_split("bogus")


def test_open_source_specs(tmp_path):
    assert len(open_source("digits")) == 1297
    assert len(open_source("toy")) > 1000
    with pytest.raises(ValueError, match="unknown data source"):
        open_source("cifar")
    with pytest.raises(ValueError, match="needs a path"):
        open_source("imagefolder:")
    with pytest.raises(ValueError, match="not a directory"):
        open_source(f"imagefolder:{tmp_path / 'nope'}")
    with pytest.raises(ValueError, match="no image files"):
        open_source(f"imagefolder:{tmp_path}")


def test_imagefolder_reads_nested_images_and_preprocesses(tmp_path, tiny_backbone):
    rng = np.random.default_rng(0)
    for i in range(13):
        sub = tmp_path / f"class{i % 3}"
        sub.mkdir(exist_ok=True)
        size = (20 + i, 17 + 2 * i)  # odd sizes: the backbone's processor resizes them
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(sub / f"img{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    src = open_source(f"imagefolder:{tmp_path}")
    assert isinstance(src, ImageFolderSource)
    assert len(src) + len(src.val_files) == 13
    batch = next(pixel_batches(src, tiny_backbone.preprocess, 5, seed=0))
    assert batch.shape == (5, 3, 32, 32) and batch.dtype == torch.float32
    tiny_backbone.check_pixels(batch)
    val = tiny_backbone.preprocess(src.validation(4))
    assert val.shape[1:] == (3, 32, 32)


def test_hf_source_gives_clear_error_without_datasets(monkeypatch):
    real_import = builtins.__import__

    def no_datasets(name, *a, **k):
        if name == "datasets" or name.startswith("datasets."):
            raise ImportError("No module named 'datasets'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(ValueError, match="optional 'datasets' package"):
        open_source("hf:cifar10:test")
    with pytest.raises(ValueError, match="needs a data set name"):
        open_source("hf:")


def test_hf_source_offline_error_names_the_dataset(monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="could not open the Hugging Face data set 'no-such/dataset-xyz'"):
        open_source("hf:no-such/dataset-xyz:train")


class _Counting(DataSource):
    spec = "counting"

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def images(self, indices):
        return np.asarray(indices)


def test_pixel_batches_resume_and_sharding():
    src = _Counting(40)
    ident = lambda idx: torch.as_tensor(idx)  # noqa: E731
    full = pixel_batches(src, ident, 8, seed=1)
    seq = [next(full) for _ in range(12)]  # 2.4 epochs
    resumed = pixel_batches(src, ident, 8, seed=1, start=7)
    for s in seq[7:]:
        assert torch.equal(next(resumed), s)
    epoch0 = torch.cat(seq[:5])
    assert sorted(epoch0.tolist()) == list(range(40))  # one epoch = a permutation
    r0 = pixel_batches(src, ident, 4, seed=1, rank=0, world_size=2)
    r1 = pixel_batches(src, ident, 4, seed=1, rank=1, world_size=2)
    a = torch.cat([next(r0) for _ in range(5)])
    b = torch.cat([next(r1) for _ in range(5)])
    assert set(a.tolist()).isdisjoint(b.tolist()) and len(set(a.tolist()) | set(b.tolist())) == 40


def test_hf_source_streams_a_local_dataset(tmp_path, tiny_backbone, monkeypatch):
    """The streaming path end to end on a parquet data set on disk (what the hub would serve)."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (24, 40, 3), dtype=np.uint8)) for _ in range(30)]
    ds = datasets.Dataset.from_dict({"img": imgs, "label": list(range(30))}).cast_column("img", datasets.Image())
    (tmp_path / "data").mkdir()
    ds.to_parquet(str(tmp_path / "data" / "train-00000.parquet"))
    src = open_source(f"hf:{tmp_path / 'data'}:train")
    assert not src.indexed and src.image_key == "img"
    src.val_size = 6
    val = tiny_backbone.preprocess(src.validation(4))
    assert val.shape == (4, 3, 32, 32)
    batches = pixel_batches(src, tiny_backbone.preprocess, 8, seed=0, rank=1, world_size=2)
    first = next(batches)
    assert first.shape == (8, 3, 32, 32)
    tiny_backbone.check_pixels(first)
