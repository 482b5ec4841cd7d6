"""What a bulk run explains: a source spec turned into a fixed, ordered list of images.

``open_bulk_source(spec)`` returns a ``BulkSource``: an Arrow table with one row per image
(``index``, ``id``, ``label``, ``path``, ``data``) in a fixed order, so that image ``index`` always
lands in the same shard, and a small picklable loader for images that have neither a path nor
bytes (the in-memory data sets). Specs:

- ``digits[:SPLIT]`` -- scikit-learn's digits (``all`` by default; ``train``, ``val``, ``test``),
  ids ``digits/{i}`` (``vdm_engine.data.digits_ids``), true labels;
- ``toy[:N[:SEED]]`` -- ``toy_batch(N, SEED)`` (default 4096 images, seed 0: the training pool),
  ids ``toy:{N}:{SEED}/{i}``, true labels;
- ``imagefolder:PATH`` -- every image file under PATH, sorted; ids are paths relative to PATH;
- ``hf:NAME[:SPLIT]`` -- a Hugging Face data set: a folder written by ``save_to_disk`` or a data
  set in the local cache (offline); ids ``{SPLIT}/{i}``;
- ``FILE.parquet`` / ``FILE.jsonl`` -- one row per image: a ``path`` column (relative paths are
  taken from the file's folder) or the encoded image bytes (parquet: a binary ``image``/``bytes``
  column or Hugging Face's ``{bytes, path}`` struct; JSONL: base64 in ``image_base64``); optional
  ``id`` and ``label`` columns.

Nothing here decodes images; bad images are the decoding task's business (an errors file).
"""

from __future__ import annotations

import base64
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["BulkSource", "open_bulk_source", "SOURCE_FORMS"]

SOURCE_FORMS = "'digits[:SPLIT]', 'toy[:N[:SEED]]', 'imagefolder:PATH', 'hf:NAME[:SPLIT]', or a .parquet/.jsonl file"
_PATH_COLUMNS = ("path", "image_path", "file", "filename")
_BYTES_COLUMNS = ("image", "bytes", "image_bytes", "data")
_TOY_DEFAULT = (4096, 0)  # ToySource's pool


@dataclass(frozen=True)
class BulkSource:
    """Images in a fixed order.

    Attributes:
        spec: the spec string as given.
        description: one line for the summary.
        table: pyarrow Table, one row per image: ``index`` int64 (0..n-1), ``id`` string (unique),
            ``label`` int64 (true label, null when unknown), ``path`` string and ``data`` binary
            (either may be null).
        loader: ``loader(indices) -> list of (h, w, 3) uint8 arrays`` for rows without path or data.
        in_memory: the loader returns arrays it holds decoded, all of one shape (digits, toy): a bulk
            run sends them in its blocks instead of decoding them in separate tasks.
    """

    spec: str
    description: str
    table: object
    loader: object | None = None
    in_memory: bool = False

    def __len__(self) -> int:
        return self.table.num_rows

    def repeat(self, times: int) -> "BulkSource":
        """The same images ``times`` times over (ids ``{id}#{r}``), e.g. to time a larger run."""
        import pyarrow as pa

        if times < 1:
            raise ValueError(f"repeat needs times >= 1, got {times}")
        n = len(self)
        t = pa.concat_tables([self.table] * times)
        ids = [f"{i}#{r}" for r in range(times) for i in self.table.column("id").to_pylist()]
        t = t.set_column(0, "index", pa.array(np.arange(n * times, dtype=np.int64)))
        t = t.set_column(1, "id", pa.array(ids, pa.string()))
        loader = None if self.loader is None else _Modulo(self.loader, n)
        return BulkSource(f"{self.spec}*{times}", f"{self.description}, {times} times", t, loader, self.in_memory)


# ----- loaders: picklable, cache what they load once per worker process --------------------------
@dataclass(frozen=True)
class _DigitsLoader:
    offset: int

    def __call__(self, indices) -> list:
        images = _digits_cached()
        return [images[self.offset + int(i)] for i in indices]


@functools.lru_cache(maxsize=1)
def _digits_cached() -> np.ndarray:
    from vdm_engine.data import digits_split

    return digits_split("all")[0]


@dataclass(frozen=True)
class _Modulo:
    """A loader over a repeated source: index i is image i % n of the original."""

    loader: object
    n: int

    def __call__(self, indices) -> list:
        return self.loader([int(i) % self.n for i in indices])


@dataclass(frozen=True)
class _ToyLoader:
    n: int
    seed: int

    def __call__(self, indices) -> list:
        images = _toy_cached(self.n, self.seed)
        return [images[int(i)] for i in indices]


@functools.lru_cache(maxsize=2)
def _toy_cached(n: int, seed: int) -> np.ndarray:
    from vdm_engine.data import toy_batch

    return toy_batch(n, seed)[0]


@dataclass(frozen=True)
class _HFLoader:
    name: str
    split: str
    image_key: str

    def __call__(self, indices) -> list:
        from vdm_engine.images import pil_to_rgb8

        ds = _hf_cached(self.name, self.split)
        out = []
        for i in indices:
            item = ds[int(i)][self.image_key]
            out.append(pil_to_rgb8(item) if hasattr(item, "convert") else np.asarray(item))
        return out


@functools.lru_cache(maxsize=2)
def _hf_cached(name: str, split: str):
    return _open_hf(name, split)


# ----- specs -------------------------------------------------------------------------------------
def open_bulk_source(spec: str) -> BulkSource:
    """Parse a bulk source spec (see the module docstring); ``ValueError`` with one line for a bad one."""
    spec = str(spec).strip()
    if not spec:
        raise ValueError(f"--dataset is empty; expected {SOURCE_FORMS}")
    head, _, rest = spec.partition(":")
    if head == "digits":
        return _digits(spec, rest or "all")
    if head == "toy":
        return _toy(spec, rest)
    if head == "imagefolder":
        return _imagefolder(spec, rest)
    if head == "hf":
        return _hf(spec, rest)
    suffix = Path(spec).suffix.lower()
    if suffix in (".parquet", ".jsonl", ".json"):
        return _manifest(spec, Path(spec))
    raise ValueError(f"unknown dataset {spec!r}; expected {SOURCE_FORMS}")


def _table(ids, labels=None, paths=None, data=None):
    import pyarrow as pa

    n = len(ids)
    if len(set(ids)) != n:
        seen, dup = set(), None
        for i in ids:
            if i in seen:
                dup = i
                break
            seen.add(i)
        raise ValueError(f"image ids must be unique; {dup!r} appears more than once")
    return pa.table({
        "index": pa.array(np.arange(n, dtype=np.int64)),
        "id": pa.array([str(i) for i in ids], pa.string()),
        "label": pa.array(labels if labels is not None else [None] * n, pa.int64()),
        "path": pa.array(paths if paths is not None else [None] * n, pa.string()),
        "data": pa.array(data if data is not None else [None] * n, pa.binary()),
    })


def _digits(spec: str, split: str) -> BulkSource:
    from vdm_engine.data import _DIGITS_SPLITS, digits_ids, digits_split

    ids = digits_ids(split)  # ValueError for an unknown split
    _, labels = digits_split(split)
    offset = 0 if split == "all" else _DIGITS_SPLITS[split][0]
    return BulkSource(spec, f"digits ({split} split): {len(ids)} images", _table(ids, labels.tolist()),
                      _DigitsLoader(offset), in_memory=True)


def _toy(spec: str, rest: str) -> BulkSource:
    from vdm_engine.data import toy_batch, toy_ids

    parts = rest.split(":") if rest else []
    try:
        vals = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"toy takes integers, toy[:N[:SEED]], got {spec!r}") from None
    if len(vals) > 2 or (vals and vals[0] < 1):
        raise ValueError(f"toy takes toy[:N[:SEED]] with N >= 1, got {spec!r}")
    n, seed = (vals + list(_TOY_DEFAULT)[len(vals):])[:2]
    _, labels, _ = toy_batch(n, seed)
    return BulkSource(spec, f"toy: {n} images (toy_batch seed {seed})", _table(toy_ids(n, seed), labels.tolist()),
                      _ToyLoader(n, seed), in_memory=True)


def _imagefolder(spec: str, path: str) -> BulkSource:
    from vdm_engine.data import ImageFolderSource, file_id

    if not path:
        raise ValueError("imagefolder: needs a path, e.g. imagefolder:/data/images")
    src = ImageFolderSource(path)  # ValueError: not a folder, no image files
    files = sorted(set(src.files) | set(src.val_files))
    ids = [file_id(f, path) for f in files]
    return BulkSource(spec, f"{spec}: {len(files)} image files", _table(ids, paths=[str(f.resolve()) for f in files]))


def _open_hf(name: str, split: str):
    import datasets

    if os.path.isdir(name):
        ds = datasets.load_from_disk(name)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"hf:{name} has splits {sorted(ds)}, not {split!r}; use hf:{name}:SPLIT")
            ds = ds[split]
        return ds
    return datasets.load_dataset(name, split=split)


def _hf(spec: str, rest: str) -> BulkSource:
    if not rest:
        raise ValueError("hf: needs a data set name or a save_to_disk folder, e.g. hf:cifar10:test")
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise ValueError(f"the dataset {spec!r} needs the optional 'datasets' package (pip install datasets)") from None
    # The split follows the last ':' (names may contain '/'; a local folder may not contain ':').
    name, _, split = rest.rpartition(":") if ":" in rest else (rest, "", "")
    split = split or "train"
    try:
        ds = _open_hf(name, split)
    except ValueError:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"could not open the Hugging Face data set {name!r} (split {split!r}) offline: {first}") from None
    feats = ds.features
    key = next((k for k, f in feats.items() if type(f).__name__ == "Image"), None)
    key = key or next((k for k in ("image", "img") if k in feats), None)
    if key is None:
        raise ValueError(f"the data set {name!r} has no image column; columns: {sorted(feats)}")
    def is_label(k):
        f = feats.get(k)
        return f is not None and (type(f).__name__ == "ClassLabel" or str(getattr(f, "dtype", "")).startswith("int"))

    label_key = next((k for k in ("label", "labels") if is_label(k)), None)
    labels = [int(v) for v in ds[label_key]] if label_key else None
    ids = [f"{split}/{i}" for i in range(len(ds))]
    return BulkSource(spec, f"{spec}: {len(ds)} images", _table(ids, labels), _HFLoader(name, split, key))


def _manifest(spec: str, path: Path) -> BulkSource:
    """A parquet or JSONL file listing images by path or by their encoded bytes."""
    if not path.is_file():
        raise ValueError(f"{path}: no such file (expected a .parquet or .jsonl list of images)")
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:
            raise ValueError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None
    else:
        rows = []
        with open(path, encoding="utf-8") as f:
            for ln, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{ln}: not a JSON object ({e.msg})") from None
                    if not isinstance(rows[-1], dict):
                        raise ValueError(f"{path}:{ln}: expected a JSON object per line")
    if not rows:
        raise ValueError(f"{path}: lists no images")
    cols = set(rows[0])
    path_col = next((c for c in _PATH_COLUMNS if c in cols and isinstance(rows[0][c], str)), None)
    bytes_col = next((c for c in _BYTES_COLUMNS if c in cols and isinstance(rows[0][c], (bytes, dict))), None)
    b64_col = "image_base64" if "image_base64" in cols else None
    if path_col is None and bytes_col is None and b64_col is None:
        raise ValueError(f"{path}: no image column; expected a path column ({', '.join(_PATH_COLUMNS)}), image bytes "
                         f"({', '.join(_BYTES_COLUMNS)}) or image_base64; columns: {sorted(cols)}")
    base = path.parent
    paths, data, ids = [], [], []
    for i, r in enumerate(rows):
        p = d = None
        if path_col is not None and r.get(path_col):
            p = str(r[path_col]) if os.path.isabs(str(r[path_col])) else str(base / str(r[path_col]))
        elif bytes_col is not None and r.get(bytes_col) is not None:
            v = r[bytes_col]
            d = v.get("bytes") if isinstance(v, dict) else v
        elif b64_col is not None and r.get(b64_col):
            try:
                d = base64.b64decode(r[b64_col], validate=True)
            except ValueError:
                d = b""  # not base64: reported by the decoding task like any unreadable image
        paths.append(p)
        data.append(d)
        ids.append(str(r["id"]) if r.get("id") is not None else (r.get(path_col) if p else f"{path.name}/{i}"))
    labels = None
    if "label" in cols:
        labels = [int(r["label"]) if isinstance(r.get("label"), (int, np.integer)) else None for r in rows]
    return BulkSource(spec, f"{path.name}: {len(rows)} images", _table(ids, labels, paths, data))
