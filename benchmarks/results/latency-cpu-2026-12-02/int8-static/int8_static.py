"""Experiment: static (calibrated) int8 vs the dynamic recipe, ViT-B/16 shape, batch 8, 2 threads."""
import sys, time, json
from pathlib import Path
import numpy as np, torch
from benchmarks.cpu_targets import _explainer, _export, time_graphs, EXPLAIN
from vdm_engine.export.quantize import quantize_onnx, INT8_RECIPE, Int8Recipe
import dataclasses

folder = Path(sys.argv[1]); folder.mkdir(parents=True, exist_ok=True)
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 6
ex = _explainer("vit-b16")
plain = _export(ex, folder / "plain.onnx", ("logits",))
explain = _export(ex, folder / "explain.onnx", EXPLAIN)
rng = np.random.default_rng(0)
calib = rng.standard_normal((16, 3, 224, 224)).astype(np.float32)
paths = {"fp32 plain": plain}
dyn = folder / "int8-dynamic.onnx"
if not dyn.is_file():
    quantize_onnx(explain, dyn)
paths["int8 dynamic"] = dyn
st = folder / "int8-static.onnx"
if not st.is_file():
    t = time.time(); quantize_onnx(explain, st, calibration=calib); print("static quantize s", time.time() - t, flush=True)
paths["int8 static s8s8"] = st
x = rng.standard_normal((8, 3, 224, 224)).astype(np.float32)
res = time_graphs(paths, x, 2, rounds, 3)
print(json.dumps(res, indent=1))
base = res["fp32 plain"]
for k, v in res.items():
    print(k, {m: round(base[m] / v[m], 3) for m in v if isinstance(v[m], (int, float)) and m in base})
