import numpy as np
import pytest
import torch
from PIL import Image

from vdm_engine import WeightsUnavailableError, load_backbone
from vdm_engine.backbone import patch_mask_reference, random_backbone


def test_explicit_forward_matches_hf_model(tiny_backbone, pixels, close):
    expected = tiny_backbone.model(pixel_values=pixels).logits
    close(tiny_backbone(pixels), expected, 1e-5, 1e-5, "logits")
    logits, hs = tiny_backbone.hidden_states(pixels)
    close(logits, expected, 1e-5, 1e-5, "hidden_states logits")
    L, B, T, D = tiny_backbone.num_layers, 5, tiny_backbone.num_tokens, tiny_backbone.hidden_size
    assert hs.shape == (L + 2, B, T, D)
    emb = tiny_backbone.model.vit.embeddings
    # h0: CLS parameter + raw patch projections (no position embeddings)
    close(hs[0, :, 0], emb.cls_token[0, 0].expand(B, D), 0, 0, "h0 cls")
    close(hs[0, :, 1:], tiny_backbone.embed_patches(pixels), 0, 0, "h0 patches")
    # h1 = embeddings with position embeddings, as the HF embedding module computes them
    close(hs[1], emb(pixels), 1e-6, 1e-6, "h1")
    # h(L+1) is the last layer output before the final layer norm
    out = tiny_backbone.model.vit(pixel_values=pixels).last_hidden_state
    close(tiny_backbone.model.vit.layernorm(hs[-1]), out, 1e-5, 1e-5, "h(L+1)")


def test_geometry_read_from_config(tiny_backbone):
    b = tiny_backbone
    assert b.grid == (4, 4) and b.num_patches == 16 and b.num_tokens == 17
    assert b.hidden_size == 36 and b.num_layers == 2 and b.num_hidden_states == 4 and b.num_labels == 10


def test_masked_pass_all_ones_equals_plain_forward(tiny_backbone, pixels, close):
    ph = torch.randn(tiny_backbone.hidden_size)
    ones = torch.ones(5, tiny_backbone.num_patches)
    assert (tiny_backbone.masked_logits(pixels, ones, ph) - tiny_backbone(pixels)).abs().max() < 1e-5


def test_masked_pass_all_zeros_equals_all_placeholder_input(tiny_backbone, pixels, close):
    b = tiny_backbone
    ph = torch.randn(b.hidden_size)
    zeros = torch.zeros(5, b.num_patches)
    all_placeholder = ph.expand(5, b.num_patches, b.hidden_size)
    expected = b.head(b.encode(b._assemble(all_placeholder)))
    close(b.masked_logits(pixels, zeros, ph), expected, 1e-5, 1e-5, "zero gates")
    # placeholder=None means zeros
    expected0 = b.head(b.encode(b._assemble(torch.zeros_like(all_placeholder))))
    close(b.masked_logits(pixels, zeros, None), expected0, 1e-5, 1e-5, "zero placeholder")


def test_k_masks_per_image_equal_one_mask_at_a_time(tiny_backbone, pixels, close):
    b = tiny_backbone
    g = torch.rand(5, 3, b.num_patches)
    ph = torch.randn(b.hidden_size)
    many = b.masked_logits(pixels, g, ph)
    assert many.shape == (5, 3, b.num_labels)
    for k in range(3):
        close(many[:, k], b.masked_logits(pixels, g[:, k], ph), 1e-5, 1e-5, f"mask {k}")


def test_patch_mask_reference_formula():
    B, K, N, D = 2, 3, 5, 7
    x, g, ph = torch.randn(B, N, D), torch.rand(B, K, N), torch.randn(D)
    cls, pos = torch.randn(D), torch.randn(N + 1, D)
    out = patch_mask_reference(x, g, ph, cls, pos)
    assert out.shape == (B * K, N + 1, D)
    b, k, n = 1, 2, 3
    expected = g[b, k, n] * x[b, n] + (1 - g[b, k, n]) * ph + pos[1 + n]
    assert torch.allclose(out[b * K + k, 1 + n], expected, atol=1e-6)
    assert torch.allclose(out[4, 0], cls + pos[0])


def test_load_from_local_save_pretrained_dir(tiny_model_dir, tiny_backbone, pixels, close):
    b = load_backbone(str(tiny_model_dir))
    close(b(pixels), tiny_backbone(pixels), 1e-6, 1e-6, "reloaded logits")
    assert b.image_spec == tiny_backbone.image_spec
    assert b.id2label[3] == "class_3"


def test_normalisation_comes_from_processor_config(tiny_model_dir):
    import json

    cfg_path = tiny_model_dir / "preprocessor_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["image_mean"], cfg["image_std"] = [0.1, 0.2, 0.3], [0.5, 0.25, 0.125]
    cfg_path.write_text(json.dumps(cfg))
    b = load_backbone(str(tiny_model_dir))
    img = np.full((32, 32, 3), 255, dtype=np.uint8)
    pv = b.preprocess(img)
    assert torch.allclose(pv[0, :, 0, 0], torch.tensor([0.9 / 0.5, 0.8 / 0.25, 0.7 / 0.125]))


def test_missing_weights_give_a_clear_error(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="nobody/no-such-vit.*local directory"):
        load_backbone("nobody/no-such-vit", local_files_only=True)
    with pytest.raises(WeightsUnavailableError, match="google/vit-base-patch16-224"):
        load_backbone("vit-b16", local_files_only=True)


def test_non_vit_checkpoint_is_rejected(tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'bert' checkpoint"):
        load_backbone(str(tmp_path))


@pytest.mark.parametrize(
    "images",
    [
        np.zeros((32, 32, 3), np.uint8),
        np.zeros((2, 32, 32, 3), np.uint8),
        np.zeros((32, 32), np.uint8),
        np.zeros((3, 20, 20), np.uint8),  # batch of grayscale, resized
        torch.zeros(2, 40, 24, 3, dtype=torch.uint8),
        [Image.new("RGB", (50, 40)), Image.new("L", (32, 32)), Image.new("RGBA", (10, 10))],
    ],
)
def test_preprocess_accepts_images(tiny_backbone, images):
    pv = tiny_backbone.preprocess(images)
    n = len(images) if isinstance(images, list) else (1 if images.ndim == 2 or images.shape[-1] == 3 and images.ndim == 3 else images.shape[0])
    assert pv.shape == (n, 3, 32, 32) and pv.dtype == torch.float32
    tiny_backbone.check_pixels(pv)


def test_preprocess_resizes_with_pil_and_normalises(tiny_backbone):
    img = np.random.randint(0, 256, (64, 64, 3), dtype=np.uint8)
    pv = tiny_backbone.preprocess(img)
    resized = np.asarray(Image.fromarray(img).resize((32, 32), resample=2), dtype=np.float32)
    expected = torch.from_numpy(resized).permute(2, 0, 1) / 255 * 2 - 1  # mean = std = 0.5
    assert torch.allclose(pv[0], expected, atol=1e-5)


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((32, 32, 3), np.float32), "uint8"),
        (np.zeros((0, 32, 32, 3), np.uint8), "empty"),
        ([], "no images"),
        ("not an image", "unsupported image type"),
        (np.zeros((2, 32, 32, 5), np.uint8), r"\(H, W\)"),
    ],
)
def test_preprocess_rejects_bad_images(tiny_backbone, bad, match):
    with pytest.raises(ValueError, match=match):
        tiny_backbone.preprocess(bad)


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.zeros(3, 32, 32), "rank 4"),
        (torch.zeros(2, 1, 32, 32), "3 channels"),
        (torch.zeros(2, 3, 16, 32), "32x32"),
        (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), "float tensor"),
        (torch.zeros(0, 3, 32, 32), "empty batch"),
        (torch.full((2, 3, 32, 32), float("nan")), "NaN or Inf"),
        (torch.tensor([[[[float("inf")]]]]).expand(1, 3, 32, 32), "NaN or Inf"),
        (np.zeros((2, 3, 32, 32), np.float32), "torch.Tensor"),
    ],
)
def test_check_pixels_rejects_bad_input(tiny_backbone, bad, match):
    with pytest.raises(ValueError, match=match):
        tiny_backbone.check_pixels(bad)


def test_check_pixels_accepts_finite_values_whose_sum_overflows(tiny_backbone):
    tiny_backbone.check_pixels(torch.full((2, 3, 32, 32), 3e38))


def test_check_pixels_never_reads_values_back_from_a_device(tiny_backbone):
    """Off the CPU only the shape and dtype are checked: reading a value back would synchronise the
    device on every explain() call. A meta tensor has no values to read, so any read would raise."""
    tiny_backbone.check_pixels(torch.empty(2, 3, 32, 32, device="meta"))
    with pytest.raises(ValueError, match="32x32"):
        tiny_backbone.check_pixels(torch.empty(2, 3, 16, 32, device="meta"))


def test_random_backbone_is_seeded_and_fills_every_weight():
    """Built on the meta device, then initialised once: the same seed gives the same weights, another
    seed other weights, and nothing is left as uninitialised memory (norms 1 and 0, matrices std 0.02)."""
    a, b, c = (random_backbone("vit-tiny", seed=s).model.state_dict() for s in (0, 0, 1))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    norms = [k for k in a if "norm" in k]
    assert norms and all(torch.equal(a[k], torch.full_like(a[k], float(k.endswith("weight")))) for k in norms)
    matrices = [k for k, v in a.items() if v.dim() == 2]
    assert matrices and all(abs(a[k].std().item() - 0.02) < 0.005 for k in matrices), "not the model's own init"
    assert all(torch.isfinite(v).all() for v in a.values())
