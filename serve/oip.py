"""Open Inference Protocol (KServe v2) REST: the subset ``tritonclient.http`` uses for inference.

Requests and responses are JSON, or JSON followed by raw tensor bytes (the binary tensor data
extension: ``Inference-Header-Content-Length`` gives the JSON part's length, and each binary tensor
carries ``parameters.binary_data_size``). No Ray here.
"""

from __future__ import annotations

import json

import numpy as np

from .requests import RequestError, parse_json

__all__ = ["HEADER_LENGTH", "parse_infer_request", "encode_infer_response", "model_metadata"]

HEADER_LENGTH = "inference-header-content-length"
_DTYPES = {"FP32": np.float32, "UINT8": np.uint8, "FP16": np.float16, "FP64": np.float64, "INT64": np.int64,
           "INT32": np.int32}


def model_metadata(name: str, platform: str, inputs, outputs) -> dict:
    """``GET /v2/models/{name}``: name, versions, platform, inputs and outputs (``TensorSpec``s)."""
    return {"name": name, "versions": ["1"], "platform": platform,
            "inputs": [t.to_json() for t in inputs], "outputs": [t.to_json() for t in outputs]}


def parse_infer_request(body: bytes, header_length: str | None, input_spec, output_names) -> tuple[
        np.ndarray, list[tuple[str, bool]], str | None]:
    """Read an infer request for a model with one input ``input_spec``.

    Returns:
        (the input as a contiguous array of the spec's datatype and shape (B, ...),
        [(output name, as binary)] in the order asked (all outputs when none are named),
        the request id or None).

    Raises:
        RequestError(400): bad JSON, wrong tensor name, datatype or shape, data of the wrong size.
    """
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise RequestError(400, f"Inference-Header-Content-Length {header_length!r} is not a number") from None
        if not 0 <= n <= len(body):
            raise RequestError(400, f"Inference-Header-Content-Length {n} is outside the {len(body)}-byte body")
        head, binary = body[:n], body[n:]
    else:
        head, binary = body, b""
    doc = parse_json(head, what="inference request", expected="an inference request {\"inputs\": [...]}")
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list):
        raise RequestError(400, "inference request must be a JSON object with an \"inputs\" list")
    inputs = doc["inputs"]
    if len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise RequestError(400, f"expected exactly one input tensor {input_spec.name!r}, got {len(inputs)}")
    t = inputs[0]
    if t.get("name") != input_spec.name:
        raise RequestError(400, f"unexpected input {t.get('name')!r}; this model takes {input_spec.name!r}")
    if t.get("datatype") != input_spec.datatype:
        raise RequestError(400, f"input {input_spec.name!r} must be {input_spec.datatype}, got {t.get('datatype')!r}")
    shape = t.get("shape")
    if (not isinstance(shape, list) or len(shape) != len(input_spec.shape)
            or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
            or any(want != -1 and d != want for d, want in zip(shape, input_spec.shape)) or shape[0] < 1):
        raise RequestError(400, f"input {input_spec.name!r} must have shape {list(input_spec.shape)} "
                                f"(-1: any batch >= 1), got {shape!r}")
    dtype = np.dtype(_DTYPES[input_spec.datatype])
    count = int(np.prod(shape))
    size = (t.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        if size != count * dtype.itemsize or len(binary) != size:
            raise RequestError(400, f"input {input_spec.name!r}: binary data is {len(binary)} bytes "
                                    f"(binary_data_size {size}), expected {count * dtype.itemsize} for shape {shape}")
        array = np.frombuffer(binary, dtype=dtype).reshape(shape)
    else:
        if binary:
            raise RequestError(400, "binary data after the JSON header, but no input has binary_data_size")
        try:
            array = np.asarray(t.get("data"), dtype=dtype)
        except (TypeError, ValueError) as e:
            raise RequestError(400, f"input {input_spec.name!r}: data is not a list of numbers: {e}") from None
        if array.size != count:
            raise RequestError(400, f"input {input_spec.name!r}: {array.size} values for shape {shape} "
                                    f"({count} expected)")
        array = array.reshape(shape)
    default_binary = bool((doc.get("parameters") or {}).get("binary_data_output", False))
    asked = doc.get("outputs")
    if asked is None:
        outputs = [(n, default_binary) for n in output_names]
    else:
        if not isinstance(asked, list):
            raise RequestError(400, "\"outputs\" must be a list of {\"name\": ...}")
        outputs = []
        for o in asked:
            name = o.get("name") if isinstance(o, dict) else None
            if name not in output_names:
                raise RequestError(400, f"unknown output {name!r}; this model has {list(output_names)}")
            outputs.append((name, bool((o.get("parameters") or {}).get("binary_data", default_binary))))
    rid = doc.get("id")
    return np.ascontiguousarray(array), outputs, (str(rid) if rid is not None else None)


def encode_infer_response(model_name: str, outputs: dict[str, np.ndarray], asked: list[tuple[str, bool]],
                          request_id: str | None) -> tuple[bytes, dict[str, str]]:
    """The response body and headers: JSON, plus the binary tensors after it when any was asked binary."""
    doc: dict = {"model_name": model_name, "model_version": "1"}
    if request_id is not None:
        doc["id"] = request_id
    tensors, blobs = [], []
    for name, as_binary in asked:
        a = np.ascontiguousarray(outputs[name], dtype=np.float32)
        t = {"name": name, "datatype": "FP32", "shape": list(a.shape)}
        if as_binary:
            raw = a.tobytes()
            t["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            t["data"] = a.reshape(-1).tolist()
        tensors.append(t)
    doc["outputs"] = tensors
    head = json.dumps(doc).encode()
    if not blobs:
        return head, {"content-type": "application/json"}
    return head + b"".join(blobs), {"content-type": "application/octet-stream",
                                    "Inference-Header-Content-Length": str(len(head))}
