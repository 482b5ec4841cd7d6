"""Explainer.compile: bucket choice, padding and slicing, and compiled == eager (aot_eager on the CPU)."""

import pytest
import torch

from vdm_engine.compiled import bucket_for, pad_batch


def test_bucket_for_and_pad_batch():
    buckets = (1, 2, 4, 8)
    assert [bucket_for(n, buckets) for n in (1, 2, 3, 4, 5, 8, 9, 100)] == [1, 2, 4, 4, 8, 8, 8, 8]
    with pytest.raises(ValueError, match="at least one image"):
        bucket_for(0, buckets)
    x = torch.arange(6.0).view(3, 2)
    padded = pad_batch(x, 4)
    assert padded.shape == (4, 2) and torch.equal(padded[:3], x) and torch.equal(padded[3], torch.zeros(2))
    assert pad_batch(x, 3) is x
    with pytest.raises(ValueError, match="cannot pad a batch of 3 down to 2"):
        pad_batch(x, 2)


def test_compiled_matches_eager_through_padding_and_chunks(tiny_explainer, pixels, close):
    """3 images -> bucket 4 (one padded row); 5 images -> chunks of 4 and 1, the 1 padded to 4 (largest
    bucket exceeded). One bucket keeps it to one compilation per function."""
    compiled = tiny_explainer.compile(batch_sizes=(4, 4), backend="aot_eager")
    assert compiled.buckets == (4,)
    calls = []
    real = compiled._explain
    compiled._explain = lambda pv: calls.append(pv.shape[0]) or real(pv)
    for n in (3, 5):
        got = compiled.explain(pixels[:n])
        expected = tiny_explainer.explain(pixels[:n])
        assert got.patch_mask.shape == expected.patch_mask.shape == (n, 16)
        for name in ("logits", "patch_mask", "layer_masks"):
            close(getattr(got, name), getattr(expected, name), 1e-5, 1e-5, f"{name}, batch {n}")
        close(compiled.predict(pixels[:n]), tiny_explainer.backbone(pixels[:n]), 1e-5, 1e-5, f"predict, batch {n}")
    assert calls == [4, 4, 4]  # 3 padded to 4; 5 as 4 + (1 padded to 4)
    with pytest.raises(ValueError, match="batch_sizes must be positive"):
        tiny_explainer.compile(batch_sizes=(0, 4), backend="aot_eager")


def test_compiled_k_level_gates_return_the_ranking(tiny_backbone, pixels, close):
    """K-level gates: the compiled explain returns patch_rank too, equal to eager."""
    from vdm_engine import Explainer, Gates

    from tests.conftest import make_tiny_levels

    ex = Explainer(tiny_backbone, Gates.stack(make_tiny_levels(tiny_backbone, 3), main_level=1), kernels="reference").eval()
    compiled = ex.compile(batch_sizes=(4,), backend="aot_eager")
    assert compiled.outputs[-1] == "patch_rank"
    got, expected = compiled.explain(pixels[:3]), ex.explain(pixels[:3])
    assert got.patch_rank is not None and got.patch_rank.shape == (3, 16)
    for name in ("logits", "patch_mask", "layer_masks", "patch_rank"):
        close(getattr(got, name), getattr(expected, name), 1e-5, 1e-5, name)
