"""Model-randomisation sanity test (Adebayo et al. 2018, "Sanity Checks for Saliency Maps").

An explanation of a model should depend on the model: re-initialise the classifier head and then the
top k encoder blocks (cascading from the output, k = 1..L) and compare each method's patch scores on
the randomised model with its scores on the trained one. A rank correlation near 1 means the method
ignores what the model learned (it follows the input instead); a faithful method decorrelates.
"""

from __future__ import annotations

import copy
from typing import Callable, Iterable, Mapping

import numpy as np
import torch

from .metrics import patch_intensity, spearman

__all__ = ["randomised_backbone", "randomisation_test"]


def randomised_backbone(backbone, k: int, *, seed: int = 0):
    """A copy of ``backbone`` with its classifier head and top ``k`` encoder blocks re-initialised.

    Every ``nn.Linear`` / ``nn.LayerNorm`` in the head and those blocks gets PyTorch's default
    initialisation from a generator seeded with ``seed`` (the same weights for the same (k, seed)).
    The copy's fingerprint is recomputed, so trained gates see it as another backbone.

    Args:
        backbone: ``vdm_engine.Backbone`` (left untouched).
        k: blocks to randomise from the top, 0..L (0: the head only).
        seed: seeds the new weights.
    """
    L = backbone.num_layers
    if not 0 <= k <= L:
        raise ValueError(f"k must be in [0, {L}] (the backbone has {L} blocks), got {k}")
    rb = copy.deepcopy(backbone)
    rb._fingerprint = None
    rb.name_or_path = f"{backbone.name_or_path}+random-top-{k}"
    modules = rb.family.head_modules() + [rb.layers[i] for i in range(L - k, L)]
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for top in modules:
            for m in top.modules():
                if isinstance(m, (torch.nn.Linear, torch.nn.LayerNorm)):
                    m.reset_parameters()
                    if isinstance(m, torch.nn.LayerNorm):  # default init is the identity: perturb it too
                        m.weight.normal_(1.0, 0.5)
                        m.bias.normal_(0.0, 0.5)
    return rb.eval()


def _scores(methods: Mapping[str, Callable], pixel_values, target, batch_size) -> dict[str, torch.Tensor]:
    out = {m: [] for m in methods}
    for i in range(0, pixel_values.shape[0], batch_size):
        for m, fn in methods.items():
            out[m].append(torch.as_tensor(fn(pixel_values[i : i + batch_size], target[i : i + batch_size])).float().cpu())
    return {m: torch.cat(v) for m, v in out.items()}


def _summary(values: np.ndarray) -> dict:
    v = values[np.isfinite(values)]
    return {"mean": float(v.mean()) if v.size else float("nan"),
            "sem": float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else 0.0,
            "n": int(v.size)}


@torch.no_grad()
def _predict(backbone, pixel_values, batch_size):
    return torch.cat([backbone(pixel_values[i : i + batch_size].to(backbone.device, backbone.dtype)).argmax(-1).cpu()
                      for i in range(0, pixel_values.shape[0], batch_size)])


def randomisation_test(
    backbone,
    pixel_values: torch.Tensor,
    build_methods: Callable[[object], Mapping[str, Callable]],
    *,
    ks: Iterable[int] | None = None,
    seed: int = 0,
    batch_size: int = 32,
    original: Mapping[str, torch.Tensor] | None = None,
    reference: Mapping[str, str] | None = None,
) -> dict:
    """Cascading randomisation: rank correlation of each method's scores before and after.

    Args:
        backbone: the trained model.
        pixel_values: (M, 3, H, W) images.
        build_methods: backbone -> {name: attribution ``(pixel_values, target) -> (B, N)``}; called
            with the trained backbone and with every randomised copy (so a method can rebuild what
            it needs, e.g. DiffMask with retrained gates).
        ks: the numbers of top blocks randomised (default 1..L; the head is always randomised).
        seed: seeds the new weights.
        batch_size: images per attribution call.
        original: optional precomputed scores of the trained model {name: (M, N)}.
        reference: {name on the randomised copies: name on the trained model} for methods that exist
            only on the copies (``{"diffmask-retrained": "diffmask"}``); other names compare with
            themselves, and a name with nothing to compare with is skipped.

    Returns:
        ``{"ks": [...], "prediction_change": [...], "methods": {name: {"spearman": [{"mean", "sem",
        "n"} per k], "intensity_spearman": [... per k]}}}``: Spearman correlation per image between
        the scores on the trained and the randomised model (mean and standard error over images whose
        correlation is defined), and of the randomised model's scores with the patches' mean intensity.
    """
    ks = list(range(1, backbone.num_layers + 1)) if ks is None else [int(k) for k in ks]
    backbone.check_pixels(pixel_values)
    target = _predict(backbone, pixel_values, batch_size)
    before = dict(original or {})
    missing = {m: fn for m, fn in build_methods(backbone).items() if m not in before}
    before.update(_scores(missing, pixel_values, target, batch_size))
    intensity = patch_intensity(pixel_values, backbone.patch_size)
    result = {"ks": ks, "prediction_change": [], "methods": {}}
    for k in ks:
        rb = randomised_backbone(backbone, k, seed=seed)
        result["prediction_change"].append(float((_predict(rb, pixel_values, batch_size) != target).float().mean()))
        after = _scores(build_methods(rb), pixel_values, target, batch_size)
        for m, s in after.items():
            ref = (reference or {}).get(m, m)
            if ref not in before:
                continue
            e = result["methods"].setdefault(m, {"spearman": [], "intensity_spearman": []})
            e["spearman"].append(_summary(spearman(before[ref], s)))
            e["intensity_spearman"].append(_summary(spearman(intensity, s)))
    return result
