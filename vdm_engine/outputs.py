"""The names of an explanation's outputs (no torch: the CLIs' parsers read them)."""

from __future__ import annotations

__all__ = ["EXPLAIN_OUTPUTS"]

#: What ``Explainer.run`` (and an exported graph) can return, in graph order.
EXPLAIN_OUTPUTS = ("logits", "patch_mask", "layer_masks", "masked_logits", "kl", "patch_rank")
