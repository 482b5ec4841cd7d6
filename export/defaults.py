"""The export's names and defaults (no torch: ``vdm-export --help`` reads them)."""

from __future__ import annotations

from vdm_engine.outputs import EXPLAIN_OUTPUTS

__all__ = ["OUTPUTS", "DEFAULT_OUTPUTS", "MIN_OPSET", "DEFAULT_OPSET", "TOLERANCES", "DEFAULT_MAX_BATCH_SIZE",
           "BACKENDS", "DEFAULT_BACKEND", "DEFAULT_QUEUE_DELAY_US"]

#: Every output the graph can produce, in the order they appear in the graph.
OUTPUTS = EXPLAIN_OUTPUTS
#: The outputs of ``export_onnx``, ``main_export`` and ``vdm-export`` when none are asked for: one
#: ViT pass (``masked_logits`` / ``kl`` add the masked second pass).
DEFAULT_OUTPUTS = ("logits", "patch_mask", "layer_masks")
#: The dynamo exporter writes opset 18 or newer.
MIN_OPSET = 18
#: The opset written unless another is asked for (``export_onnx``, ``main_export``, ``vdm-export --opset``).
DEFAULT_OPSET = 18
#: Maximum absolute difference allowed between onnxruntime and the fp32 PyTorch explainer.
TOLERANCES = {"fp32": 1e-4, "fp16": 1e-2}
#: ``max_batch_size`` of a dynamic-batch graph's Triton config (``vdm-export --triton-max-batch``).
DEFAULT_MAX_BATCH_SIZE = 32
#: ``vdm-export --triton-backend`` choices; onnxruntime is what a GPU server runs.
BACKENDS = ("onnxruntime", "python")
DEFAULT_BACKEND = "onnxruntime"
#: The dynamic batcher's ``max_queue_delay_microseconds`` (``vdm-export --triton-queue-delay-us``).
DEFAULT_QUEUE_DELAY_US = 100
