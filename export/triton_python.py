"""The Triton Python-backend models of a ``vdm-export --triton-backend python`` repository.

A repository's ``model.py`` is a small shim (``triton_repo.python_model_text``): it puts the
exporting environment's site folders on ``sys.path`` (the backend stub does not inherit
``PYTHONPATH``) and hands every call to one of the classes here:

- ``ExplainerModel``: ``OnnxExplainer`` on the version folder's ``model.onnx``, on the CPU
  (``KIND_CPU``). Triton's dynamic batcher hands ``execute`` several requests; each is checked on
  its own (a bad one gets its own error), the good ones run as one batch, and each request gets
  exactly its own rows back.
- ``DecodeModel``: the ensemble's first step, PNG/JPEG bytes (``TYPE_STRING``, one image per row)
  -> the explainer's input, decoded (``vdm_engine.images.decode_image``) and preprocessed as
  ``vdm-serve`` does, from the image settings the config carries.

``triton_python_backend_utils`` exists only inside the stub, so it is imported in ``initialize``.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["ExplainerModel", "DecodeModel", "parameter"]


def parameter(model_config: dict, key: str, default: str | None = None) -> str | None:
    """A ``parameters { key: ... value: { string_value: ... } }`` entry of a parsed model config."""
    entry = (model_config.get("parameters") or {}).get(key)
    return entry.get("string_value", default) if entry else default


def _tensor(pb, name: str, t):
    """A response tensor from a CPU torch tensor, through DLPack: built from a numpy 2 array, the
    stub of Triton 2.51 (made for numpy 1) sends an empty tensor."""
    return pb.Tensor.from_dlpack(name, t.contiguous())


class _Model:
    def initialize(self, args: dict) -> None:
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        self.config = json.loads(args["model_config"])
        self.name = args["model_name"]

    def _error(self, message: str):
        pb = self.pb
        return pb.InferenceResponse(output_tensors=[], error=pb.TritonError(message, pb.TritonError.INVALID_ARG))

    def _input(self, request, name: str):
        t = self.pb.get_input_tensor_by_name(request, name)
        if t is None:  # Triton checks names against the config first; kept for a clear message
            raise ValueError(f"{self.name}: the request has no input {name!r}")
        return t.as_numpy()

    def finalize(self) -> None:
        pass


class ExplainerModel(_Model):
    """``pixel_values`` (B, 3, H, W) float32 (or (B, H, W, 3) uint8) -> the graph's outputs, B rows each."""

    def initialize(self, args: dict) -> None:
        super().initialize(args)
        import onnxruntime as ort

        from vdm_engine.runtime import OnnxExplainer

        opts = ort.SessionOptions()
        threads = int(parameter(self.config, "intra_op_threads", "0") or 0)
        if threads > 0:
            opts.intra_op_num_threads = threads
        path = Path(args["model_repository"]) / str(args["model_version"]) / "model.onnx"
        self.explainer = OnnxExplainer(path, providers="cpu", session_options=opts)
        self.outputs = [o["name"] for o in self.config["output"]]
        missing = [o for o in self.outputs if o not in self.explainer.output_names]
        if missing:
            raise ValueError(f"{self.name}: config.pbtxt lists outputs {missing} that {path} does not have")

    def execute(self, requests):
        import torch

        pb = self.pb
        responses, batch, owners = [None] * len(requests), [], []
        for i, request in enumerate(requests):
            try:
                x = self.explainer.check_inputs(self._input(request, self.explainer.input_name))
            except ValueError as e:  # rejected before it joins the batch
                responses[i] = self._error(" ".join(str(e).split()))
                continue
            batch.append(x)
            owners.append(i)
        if not batch:
            return responses
        try:
            out = self.explainer.run(torch.cat(batch) if len(batch) > 1 else batch[0])
        except Exception as e:  # one failed forward pass fails the requests in it, not the server
            for i in owners:
                responses[i] = pb.InferenceResponse(output_tensors=[], error=pb.TritonError(f"{self.name}: {e}"))
            return responses
        start = 0
        for i, x in zip(owners, batch):
            stop = start + x.shape[0]
            responses[i] = pb.InferenceResponse(
                output_tensors=[_tensor(pb, n, out[n][start:stop]) for n in self.outputs])
            start = stop
        return responses


class DecodeModel(_Model):
    """``images`` (B, 1) encoded PNG/JPEG bytes -> ``pixel_values`` for the explainer, B rows."""

    def initialize(self, args: dict) -> None:
        super().initialize(args)
        from vdm_engine.images import resolve_max_pixels
        from vdm_engine.preprocessing import ImageSpec

        image = json.loads(parameter(self.config, "image_processor") or "null")
        size = json.loads(parameter(self.config, "image_size") or "null")
        if not image or not size:
            raise ValueError(f"{self.name}: config.pbtxt lacks the image_processor / image_size parameters; "
                             "write the repository again with vdm-export --triton-ensemble")
        self.spec = ImageSpec.from_processor_dict(image, tuple(size))
        self.uint8 = parameter(self.config, "uint8_input", "false") == "true"
        self.max_pixels = resolve_max_pixels(int(parameter(self.config, "max_pixels", "0") or 0) or None)
        (inp,) = self.config["input"]
        (out,) = self.config["output"]
        self.input_name, self.output_name = inp["name"], out["name"]

    def _pixels(self, request):
        from vdm_engine.images import decode_image
        from vdm_engine.preprocessing import preprocess_images, resize_images

        items = self._input(request, self.input_name).reshape(-1)
        images = []
        for j, item in enumerate(items):
            data = item if isinstance(item, bytes) else bytes(item)
            images.append(decode_image(data, name=f"{self.input_name}[{j}]", max_pixels=self.max_pixels,
                                       model_size=self.spec.size).pixels)
        return resize_images(images, self.spec) if self.uint8 else preprocess_images(images, self.spec)

    def execute(self, requests):
        pb = self.pb
        responses = []
        for request in requests:  # decoding is per image by nature; the explainer step batches
            try:
                responses.append(pb.InferenceResponse(output_tensors=[_tensor(pb, self.output_name, self._pixels(request))]))
            except ValueError as e:
                responses.append(self._error(" ".join(str(e).split())))
        return responses
