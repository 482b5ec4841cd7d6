"""Static u8s8 (QDQ, uint8 activations, 7-bit int8 weights) vs dynamic, ViT-B/16 shape b8, 2 threads."""
import sys, json, time
from pathlib import Path
import numpy as np
from benchmarks.cpu_targets import time_graphs
from vdm_engine.export.quantize import _fuse, _probe_nodes, _Calibration, _input_name
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
folder = Path(sys.argv[1])
src = folder / "explain.onnx"
fused = folder / "fused.onnx"
if not fused.is_file():
    _fuse(src, fused)
out = folder / "int8-static-u8.onnx"
rng = np.random.default_rng(0)
if not out.is_file():
    calib = rng.standard_normal((16, 3, 224, 224)).astype(np.float32)
    t = time.time()
    quantize_static(fused, out, _Calibration(_input_name(src), calib, 8), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True, reduce_range=True,
                    calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=_probe_nodes(fused),
                    extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
    print("quantized s", time.time() - t, flush=True)
paths = {"fp32 plain": folder / "plain.onnx", "int8 dynamic": folder / "int8-dynamic.onnx", "int8 static u8s8": out}
x = rng.standard_normal((8, 3, 224, 224)).astype(np.float32)
res = time_graphs(paths, x, 2, int(sys.argv[2]) if len(sys.argv) > 2 else 6, 3)
base = res["fp32 plain"]
for k, v in res.items():
    print(k, {m: round(base[m] / v[m], 3) for m in ("wall_ms_min", "wall_ms_median", "cpu_ms_min")})
