"""Image sources for training gates, evaluating attributions and the demo classifiers.

A source spec is one string:

- ``toy`` -- generated grids of coloured patches; the label counts red patches in the top half and
  blue ones in the bottom half (the other way round they are decoys), and the ground-truth
  relevant patches come with every image (``toy_batch``);
- ``digits`` -- scikit-learn's handwritten digits (1797 real 8x8 scans shipped with the package),
  upscaled to 32x32 RGB;
- ``imagefolder:PATH`` -- every image file under a folder tree (labels ignored);
- ``hf:NAME[:SPLIT]`` -- a Hugging Face ``datasets`` data set, streamed (optional dependency).

Sources yield uint8 images; turning them into pixel values always goes through the backbone's own
processor settings (``Backbone.preprocess``). Labels are never needed to train gates.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

__all__ = [
    "TOY_GRID",
    "TOY_PATCH",
    "TOY_MAX_COUNT",
    "DIGITS_SIZE",
    "DataSource",
    "ToySource",
    "DigitsSource",
    "ImageFolderSource",
    "HFSource",
    "open_source",
    "toy_batch",
    "digits_split",
    "digits_ids",
    "toy_ids",
    "file_id",
    "pixel_batches",
]

# ----------------------------------------------------------------------------------------------
# toy: count red patches in the top half and blue patches in the bottom half
# ----------------------------------------------------------------------------------------------
TOY_GRID = (4, 4)  # patch grid (rows, cols)
TOY_PATCH = 8  # pixels per patch side: images are 32x32
TOY_MAX_COUNT = 5  # labels 0..5 target patches
_TOY_BACKGROUND = np.array([128, 128, 128], dtype=np.int16)
_TOY_RED, _TOY_BLUE = np.array([230, 30, 30], dtype=np.int16), np.array([30, 60, 230], dtype=np.int16)
# Other colours, none of them red or blue, in numbers drawn independently of the label.
_TOY_DISTRACTORS = np.array([[30, 190, 50], [240, 210, 40], [40, 200, 210], [240, 140, 20]], dtype=np.int16)
_TOY_MAX_DECOYS = 5
_TOY_MAX_DISTRACTORS = 3


def toy_batch(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Generate ``n`` toy counting images.

    Each image is a 4x4 grid of 8x8-pixel patches on a neutral grey background. The label counts
    the *targets* (0..5): red patches in the top half and blue patches in the bottom half. 0..5
    *decoys* are the other way round (blue on top, red below): each one looks exactly like a target
    in the other half, so which patches count is an exclusive-or of colour and position, and
    replacing a decoy changes nothing. 0..3 more patches carry other colours. Decoys and
    distractors are drawn independently of the label. Every patch gets a brightness jitter and
    every pixel small noise.

    Args:
        n: number of images (>= 1).
        seed: RNG seed; the same (n, seed) always gives the same batch.

    Returns:
        images uint8 (n, 32, 32, 3); labels int64 (n,) = number of target patches;
        relevant bool (n, 16) = which patches (row-major) are targets.
    """
    if int(n) < 1:
        raise ValueError(f"toy_batch needs n >= 1 images, got {n}")
    n = int(n)
    rng = np.random.default_rng(int(seed))
    gh, gw = TOY_GRID
    N, P = gh * gw, TOY_PATCH
    top = np.arange(N) < (gh // 2) * gw  # (N,) patch in the top half
    labels = rng.integers(0, TOY_MAX_COUNT + 1, size=n)
    n_dec = rng.integers(0, _TOY_MAX_DECOYS + 1, size=n)
    n_dis = rng.integers(0, _TOY_MAX_DISTRACTORS + 1, size=n)
    colours = np.broadcast_to(_TOY_BACKGROUND, (n, N, 3)).copy()
    relevant = np.zeros((n, N), dtype=bool)
    order = np.argsort(rng.random((n, N)), axis=1)  # a random permutation of patches per image
    for i in range(n):
        a, b, c = labels[i], labels[i] + n_dec[i], labels[i] + n_dec[i] + n_dis[i]
        tgt, dec, dis = order[i, :a], order[i, a:b], order[i, b:c]
        colours[i, tgt] = np.where(top[tgt, None], _TOY_RED, _TOY_BLUE)
        colours[i, dec] = np.where(top[dec, None], _TOY_BLUE, _TOY_RED)
        relevant[i, tgt] = True
        colours[i, dis] = _TOY_DISTRACTORS[rng.integers(0, len(_TOY_DISTRACTORS), size=len(dis))]
    # Per-patch brightness jitter and per-pixel noise.
    colours = colours + rng.integers(-12, 13, size=(n, N, 1))
    img = colours.reshape(n, gh, gw, 1, 1, 3).repeat(P, 3).repeat(P, 4)  # (n, gh, gw, P, P, 3)
    img = img.transpose(0, 1, 3, 2, 4, 5).reshape(n, gh * P, gw * P, 3)
    img = img + rng.integers(-10, 11, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), labels.astype(np.int64), relevant


# ----------------------------------------------------------------------------------------------
# digits: scikit-learn's 8x8 scans, upscaled
# ----------------------------------------------------------------------------------------------
DIGITS_SIZE = 32
_DIGITS_SPLITS = {"train": (0, 1297), "val": (1297, 1497), "test": (1497, 1797)}


def digits_split(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as 32x32 RGB uint8 images, in a fixed shuffled split.

    Splits (of 1797 images, one fixed permutation): ``train`` 1297, ``val`` 200, ``test`` 300,
    ``all`` 1797.

    Returns:
        images uint8 (n, 32, 32, 3) (white strokes on black), labels int64 (n,).
    """
    try:
        from sklearn.datasets import load_digits  # noqa: F401 (availability check)
    except ImportError as e:  # pragma: no cover - sklearn is a dev dependency
        raise ValueError("the 'digits' source needs scikit-learn: pip install scikit-learn") from e
    if split != "all" and split not in _DIGITS_SPLITS:
        raise ValueError(f"unknown digits split {split!r}; expected one of {sorted(_DIGITS_SPLITS) + ['all']}")
    images, labels = _digits_all()
    if split == "all":
        return images.copy(), labels.copy()
    lo, hi = _DIGITS_SPLITS[split]
    return images[lo:hi].copy(), labels[lo:hi].copy()


def digits_ids(split: str = "all") -> list[str]:
    """Stable ids of a digits split's images, in ``digits_split`` order: ``digits/{i}`` with ``i`` the
    image's position in the ``all`` order (so the ``test`` split starts at ``digits/1497``)."""
    if split != "all" and split not in _DIGITS_SPLITS:
        raise ValueError(f"unknown digits split {split!r}; expected one of {sorted(_DIGITS_SPLITS) + ['all']}")
    lo, hi = _DIGITS_SPLITS.get(split, (0, _DIGITS_SPLITS["test"][1]))
    return [f"digits/{i}" for i in range(lo, hi)]


def toy_ids(n: int, seed: int) -> list[str]:
    """Stable ids of ``toy_batch(n, seed)``'s images: ``toy:{n}:{seed}/{i}`` (an image depends on n and seed)."""
    return [f"toy:{int(n)}:{int(seed)}/{i}" for i in range(int(n))]


def file_id(path: str | os.PathLike, root: str | os.PathLike) -> str:
    """Stable id of an image file under an image folder: its path relative to ``root``, with '/'."""
    return Path(os.path.relpath(Path(path).resolve(), Path(root).resolve())).as_posix()


@functools.lru_cache(maxsize=1)
def _digits_all() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits, permuted once with a fixed seed, upscaled to 32x32 RGB (cached)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    perm = np.random.default_rng(1797).permutation(len(d.target))
    small = np.clip(d.images[perm] * (255.0 / 16.0), 0, 255).astype(np.uint8)  # (n, 8, 8)
    big = np.stack(
        [np.asarray(Image.fromarray(a).resize((DIGITS_SIZE, DIGITS_SIZE), Image.BILINEAR)) for a in small]
    )
    return np.repeat(big[..., None], 3, axis=-1), d.target[perm].astype(np.int64)


# ----------------------------------------------------------------------------------------------
# sources
# ----------------------------------------------------------------------------------------------
class DataSource:
    """A set of images from one spec string.

    Indexed sources (``len`` known) hand out uint8 images by index; streaming sources only iterate.
    ``pixel_batches`` turns either into preprocessed batches.
    """

    spec: str = ""
    indexed: bool = True

    def __len__(self) -> int:
        raise TypeError(f"{self.spec} is a streaming source without a length")

    def images(self, indices: np.ndarray) -> list:
        """uint8 (H, W, 3) arrays or PIL images for ``indices`` (indexed sources)."""
        raise TypeError(f"{self.spec} is a streaming source; iterate it instead")

    def stream(self, *, seed: int, rank: int = 0, world_size: int = 1) -> Iterator:
        """Endless iterator of images (streaming sources); ranks see disjoint items."""
        raise TypeError(f"{self.spec} is an indexed source")

    def validation(self, n: int) -> list:
        """``n`` held-out images for validation (disjoint from training where the source allows)."""
        raise NotImplementedError


class _ArraySource(DataSource):
    """In-memory uint8 images (M, H, W, 3) with a held-out generator for validation."""

    def __init__(self, spec: str, train: np.ndarray, held_out: Callable[[int], np.ndarray]):
        self.spec, self.train, self.held_out = spec, train, held_out

    def __len__(self) -> int:
        return len(self.train)

    def images(self, indices):
        return self.train[np.asarray(indices)]

    def validation(self, n: int):
        return self.held_out(n)


def ToySource(pool: int = 4096, seed: int = 0) -> DataSource:
    """A fixed pool of ``pool`` toy images (seeded); validation images come from another seed."""
    train, _, _ = toy_batch(pool, seed)
    return _ArraySource("toy", train, lambda n: toy_batch(n, seed + 1_000_003)[0])


def DigitsSource() -> DataSource:
    """Digits ``train`` split for training, ``val`` split for validation (``test`` stays unseen)."""
    train, _ = digits_split("train")

    def held_out(n: int):
        val, _ = digits_split("val")
        if n > len(val):
            raise ValueError(f"the digits val split has {len(val)} images, asked for {n}")
        return val[:n]

    return _ArraySource("digits", train, held_out)


_IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


class ImageFolderSource(DataSource):
    """Every image file under ``root`` (recursively, sorted); the last files are held out for validation."""

    def __init__(self, root: str | os.PathLike, *, val_fraction: float = 0.1):
        self.root = Path(root)
        self.spec = f"imagefolder:{root}"
        if not self.root.is_dir():
            raise ValueError(f"imagefolder: {self.root} is not a directory; expected a folder tree of images")
        files = sorted(p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in _IMAGE_EXTS)
        if not files:
            raise ValueError(f"imagefolder: no image files ({', '.join(sorted(_IMAGE_EXTS))}) under {self.root}")
        n_val = int(len(files) * val_fraction) if len(files) >= 10 else 0
        self.files = files[: len(files) - n_val]
        self.val_files = files[len(files) - n_val :] if n_val else files[: min(len(files), 8)]

    def __len__(self) -> int:
        return len(self.files)

    @staticmethod
    def _open(path: Path):
        from PIL import Image

        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except Exception as e:
            raise ValueError(f"imagefolder: cannot read image {path}: {e}") from e

    def images(self, indices):
        return [self._open(self.files[int(i)]) for i in np.asarray(indices)]

    def validation(self, n: int):
        return [self._open(p) for p in self.val_files[:n]]


class HFSource(DataSource):
    """A Hugging Face data set streamed with ``datasets`` (``load_dataset(name, split=..., streaming=True)``).

    The first ``val_size`` items are held out for validation; training streams the rest, shuffled in
    a buffer and sharded per rank.
    """

    indexed = False

    def __init__(self, name: str, split: str = "train", *, image_key: str | None = None, val_size: int = 256):
        self.name, self.split, self.val_size = name, split, val_size
        self.spec = f"hf:{name}:{split}"
        try:
            import datasets  # noqa: F401
        except ImportError as e:
            raise ValueError(
                f"the source '{self.spec}' needs the optional 'datasets' package (pip install datasets); "
                "offline, use imagefolder:PATH with images saved to disk instead"
            ) from e
        self._ds = self._load()
        self.image_key = image_key or self._find_image_key()

    def _load(self):
        import datasets

        try:
            return datasets.load_dataset(self.name, split=self.split, streaming=True)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(
                f"could not open the Hugging Face data set '{self.name}' (split '{self.split}'): {first}. "
                "It is neither cached nor downloadable here (offline?); use imagefolder:PATH instead"
            ) from e

    def _find_image_key(self) -> str:
        feats = getattr(self._ds, "features", None) or {}
        for key, feat in feats.items():
            if type(feat).__name__ == "Image":
                return key
        for key in ("image", "img", "pixel_values"):
            if key in feats:
                return key
        raise ValueError(f"the data set '{self.name}' has no image column; columns: {sorted(feats)}")

    def _iter(self, ds) -> Iterator:
        for item in ds:
            yield item[self.image_key]

    def stream(self, *, seed: int, rank: int = 0, world_size: int = 1):
        epoch = 0
        while True:
            ds = self._ds.skip(self.val_size)
            if world_size > 1:
                from datasets.distributed import split_dataset_by_node

                ds = split_dataset_by_node(ds, rank=rank, world_size=world_size)
            ds = ds.shuffle(seed=seed + epoch, buffer_size=1000)
            yield from self._iter(ds)
            epoch += 1

    def validation(self, n: int):
        return list(self._iter(self._ds.take(min(n, self.val_size))))


def open_source(spec: str, *, seed: int = 0) -> DataSource:
    """Parse a source spec (``toy``, ``digits``, ``imagefolder:PATH``, ``hf:NAME[:SPLIT]``)."""
    spec = str(spec).strip()
    if spec == "toy":
        return ToySource(seed=seed)
    if spec == "digits":
        return DigitsSource()
    if spec.startswith("imagefolder:"):
        path = spec[len("imagefolder:") :]
        if not path:
            raise ValueError("imagefolder: needs a path, e.g. imagefolder:/data/images")
        return ImageFolderSource(path)
    if spec.startswith("hf:"):
        rest = spec[3:]
        if not rest:
            raise ValueError("hf: needs a data set name, e.g. hf:cifar10 or hf:imagenet-1k:validation")
        # Names may contain one '/' (org/name); the split follows the last ':'.
        name, _, split = rest.partition(":")
        return HFSource(name, split or "train")
    raise ValueError(
        f"unknown data source {spec!r}; expected 'toy', 'digits', 'imagefolder:PATH' or 'hf:NAME[:SPLIT]'"
    )


def pixel_batches(
    source: DataSource,
    preprocess: Callable,
    batch_size: int,
    *,
    seed: int,
    start: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[torch.Tensor]:
    """Endless stream of (batch_size, 3, H, W) pixel batches, deterministic given ``seed``.

    Indexed sources are reshuffled every epoch with ``seed + epoch``; each rank takes a disjoint
    shard of every epoch's order. ``start`` skips that many batches (exact resume) without loading
    them for indexed sources.

    Args:
        source: a ``DataSource``.
        preprocess: images -> (B, 3, H, W) float32 (the backbone's ``preprocess``).
        batch_size: images per batch on this rank.
        seed, start, rank, world_size: order, position and sharding.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if source.indexed:
        M = len(source)
        per_rank = M // world_size
        if per_rank < 1:
            raise ValueError(f"{source.spec} has {M} images, too few for {world_size} ranks")
        per_epoch = max(1, per_rank // batch_size) if per_rank >= batch_size else 1
        step = start
        while True:
            epoch, b = divmod(step, per_epoch)
            order = np.random.default_rng([seed, epoch]).permutation(M)
            shard = order[rank * per_rank : (rank + 1) * per_rank]
            idx = shard[b * batch_size : (b + 1) * batch_size]
            if len(idx) < batch_size:  # tiny source: wrap around
                idx = np.resize(shard, batch_size)
            yield preprocess(source.images(idx))
            step += 1
    else:
        it = source.stream(seed=seed, rank=rank, world_size=world_size)
        buf: list = []
        skipped = 0
        for img in it:
            buf.append(img)
            if len(buf) == batch_size:
                if skipped < start:
                    skipped += 1
                else:
                    yield preprocess(buf)
                buf = []
