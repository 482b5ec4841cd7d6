"""Images are never silently wrong and never blow up memory: decoding files (16-bit, pixel limit,
reduction while decoding, EXIF orientation, upscaling warnings), bounded overlays, and one
preprocessing for the PyTorch explainer and the ONNX runtime."""

from __future__ import annotations

import json
import os
import struct
import sys
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from vdm_engine import Explainer
from vdm_engine.cli.explain import main
from vdm_engine.images import (
    DEFAULT_MAX_PIXELS,
    MAX_PIXELS_ENV,
    load_image,
    pil_to_rgb8,
    read_image,
    resolve_max_pixels,
    upscale_warning,
)
from vdm_engine.preprocessing import ImageSpec, preprocess_images, resize_images
from vdm_engine.registry import embedded_model_dir
from vdm_engine.visualize import MAX_WIDTH, PANEL_MAX_SIDE, overlay, overlay_scale

from tests.conftest import BackgroundRun


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _gradient(h, w):
    """A smooth RGB gradient (compresses to almost nothing as PNG)."""
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None]
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :]
    a = np.empty((h, w, 3), np.uint8)
    a[..., 0] = np.broadcast_to(x, (h, w))
    a[..., 1] = np.broadcast_to(y, (h, w))
    a[..., 2] = 128
    return a


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _write_png16(path, a: np.ndarray) -> None:
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit RGB): a (H, W, C) uint16, C in 1..4."""
    H, W, C = a.shape
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[C]
    raw = b"".join(b"\x00" + a[y].astype(">u2").tobytes() for y in range(H))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, 16, color_type, 0, 0, 0))
                     + _png_chunk(b"IDAT", zlib.compress(raw)) + _png_chunk(b"IEND", b""))


def _png_header_only(path, width, height):
    """A PNG whose header claims width x height pixels, with a token of (invalid) image data."""
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _png_chunk(b"IEND", b""))


# ----- 16-bit images ----------------------------------------------------------------------------
def test_16bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    a = np.zeros((4, 256), np.uint16)
    a[:3] = np.linspace(0, 65535, 256 * 3).round().astype(np.uint16).reshape(3, 256)
    a[3, :3] = (65535, 32768, 32767)
    Image.fromarray(a).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode in ("I;16", "I"), im.mode  # what Pillow gives for 16-bit grayscale
    px = load_image(tmp_path / "g16.png")
    assert px.shape == (4, 256, 3) and px.dtype == np.uint8
    assert (px[3, :3, 0] == (255, 128, 127)).all()  # the max maps to 255, mid values to mid values
    np.testing.assert_array_equal(px, np.repeat((a >> 8).astype(np.uint8)[..., None], 3, axis=-1))
    assert len(np.unique(px)) == 256  # the whole 8-bit range is used, nothing saturates


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_16bit_png_of_every_colour_type_keeps_its_high_byte(tmp_path, channels):
    rng = np.random.default_rng(channels)
    a = rng.integers(0, 65536, size=(7, 11, channels), dtype=np.uint16)
    a[0, 0] = 65535
    _write_png16(tmp_path / "x.png", a)
    px = load_image(tmp_path / "x.png")
    hi = (a >> 8).astype(np.uint8)
    expected = np.repeat(hi[..., :1], 3, axis=-1) if channels <= 2 else hi[..., :3]
    np.testing.assert_array_equal(px, expected)
    assert px[0, 0].tolist() == [255, 255, 255]


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_16bit_pil_images_in_memory_are_scaled_the_same_way(mode, tiny_explainer):
    a = np.array([[0, 255, 256, 32768, 65535, 40000]], dtype=np.uint16)
    dtype = {"I;16": "<u2", "I;16B": ">u2", "I": np.int32}[mode]
    im = Image.fromarray(a.astype(dtype))
    if im.mode != mode:
        im = Image.frombytes(mode, (6, 1), a.astype(dtype).tobytes())
    assert im.mode == mode
    expected = (a >> 8).astype(np.uint8)
    np.testing.assert_array_equal(pil_to_rgb8(im)[..., 0], expected)
    # the Python API gives what the 8-bit image would give, not a clipped copy
    assert torch.equal(tiny_explainer.preprocess(im), tiny_explainer.preprocess(expected))


def test_mode_I_outside_16_bits_is_clipped_to_the_16_bit_range():
    im = Image.fromarray(np.array([[-5, 70000, 65535]], dtype=np.int32))
    assert pil_to_rgb8(im)[0, :, 0].tolist() == [0, 255, 255]


# ----- pixel limit ------------------------------------------------------------------------------
def test_too_many_pixels_are_refused_before_decoding(tmp_path, monkeypatch):
    from PIL import ImageFile

    Image.fromarray(_rgb(100, 80)).save(tmp_path / "a.png")
    Image.fromarray(_rgb(100, 80)).save(tmp_path / "a.jpg")

    def no_decoding(self):
        raise AssertionError("decoded before the size check")

    with monkeypatch.context() as m:
        m.setattr(ImageFile.ImageFile, "load", no_decoding)
        for name in ("a.png", "a.jpg"):
            with pytest.raises(ValueError) as e:
                read_image(tmp_path / name, max_pixels=7999)
            msg = str(e.value)
            for part in (name, "80x100", "7999", "--max-pixels 8000", f"{MAX_PIXELS_ENV}=8000",
                         "refused before decoding"):
                assert part in msg, msg
    assert read_image(tmp_path / "a.png", max_pixels=8000).pixels.shape == (100, 80, 3)


def test_the_limit_comes_from_the_argument_then_the_environment(tmp_path, monkeypatch):
    Image.fromarray(_rgb(20, 20)).save(tmp_path / "a.png")
    assert resolve_max_pixels() == DEFAULT_MAX_PIXELS == 100_000_000
    monkeypatch.setenv(MAX_PIXELS_ENV, "399")
    assert resolve_max_pixels() == 399
    with pytest.raises(ValueError, match="20x20"):
        read_image(tmp_path / "a.png")
    assert read_image(tmp_path / "a.png", max_pixels=400).pixels.shape == (20, 20, 3)  # the argument wins
    monkeypatch.setenv(MAX_PIXELS_ENV, "1e9")
    assert resolve_max_pixels() == 10**9
    for bad in ("lots", "0", "-3"):
        monkeypatch.setenv(MAX_PIXELS_ENV, bad)
        with pytest.raises(ValueError, match=MAX_PIXELS_ENV):
            resolve_max_pixels()
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_pixels must be a positive integer"):
            resolve_max_pixels(bad)


def test_a_header_claiming_gigapixels_is_refused_by_default(tmp_path):
    _png_header_only(tmp_path / "bomb.png", 200_000, 200_000)
    with pytest.raises(ValueError, match=r"200000x200000 \(40000\.0 megapixels\).*limit of 100 megapixels"):
        read_image(tmp_path / "bomb.png")


def test_pillow_decompression_bomb_checks_become_value_errors(tmp_path, monkeypatch):
    """Pillow's global limit neither overrides ours for PNG/JPEG nor escapes as its own error or warning."""
    Image.fromarray(_rgb(100, 100)).save(tmp_path / "a.png")
    Image.fromarray(_rgb(100, 100)).save(tmp_path / "a.bmp")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4000)  # 10000 pixels > 2x: DecompressionBombError
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_image(tmp_path / "a.png").pixels.shape == (100, 100, 3)  # our limit governs
        with pytest.raises(ValueError, match="a.bmp"):
            read_image(tmp_path / "a.bmp")
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)  # > 1x: DecompressionBombWarning
        with pytest.raises(ValueError, match="unsupported image format BMP"):
            read_image(tmp_path / "a.bmp")


# ----- reduction while decoding -----------------------------------------------------------------
def test_small_images_are_decoded_as_they_are(tmp_path):
    a = _rgb(120, 100)
    Image.fromarray(a).save(tmp_path / "a.png")
    d = read_image(tmp_path / "a.png", model_size=(32, 32))  # less than 4x the model size: untouched
    np.testing.assert_array_equal(d.pixels, a)
    assert d.original_size == (120, 100) and not d.reduced and d.format == "PNG" and d.warnings == ()


def test_large_png_is_reduced_to_about_twice_the_model_size(tmp_path):
    a = _gradient(1000, 700)
    Image.fromarray(a).save(tmp_path / "a.png")
    d = read_image(tmp_path / "a.png", model_size=(32, 32))
    assert d.original_size == (1000, 700) and d.reduced
    h, w = d.pixels.shape[:2]
    assert 64 <= min(h, w) < 128 and d.pixels.dtype == np.uint8
    np.testing.assert_array_equal(d.pixels, np.asarray(Image.fromarray(a).reduce(10)))
    assert read_image(tmp_path / "a.png").pixels.shape == (1000, 700, 3)  # no model size: full size


def test_large_jpeg_is_decoded_at_a_reduced_scale(tmp_path, monkeypatch):
    from PIL import JpegImagePlugin

    a = _gradient(1024, 960)
    Image.fromarray(a).save(tmp_path / "a.jpg", quality=95)
    drafts = []
    draft = JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft",
                        lambda self, mode, size: drafts.append(size) or draft(self, mode, size))
    d = read_image(tmp_path / "a.jpg", model_size=(32, 32))
    assert drafts and d.original_size == (1024, 960)
    assert 64 <= min(d.pixels.shape[:2]) < 128
    # the same picture: the model's pixels from the reduced decode are close to those of the full one
    spec = ImageSpec(size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3)
    full = np.asarray(Image.open(tmp_path / "a.jpg").convert("RGB"))
    diff = (preprocess_images(d.pixels, spec) - preprocess_images(full, spec)).abs().max()
    assert diff < 0.05, diff


def test_reduced_pixels_stay_close_to_the_full_size_resize(tmp_path):
    rng = np.random.default_rng(5)
    a = np.clip(_gradient(1500, 1200).astype(int) + rng.integers(-20, 21, (1500, 1200, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(a).save(tmp_path / "a.png")
    spec = ImageSpec(size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3)
    d = read_image(tmp_path / "a.png", model_size=spec.size)
    assert d.reduced
    diff = (preprocess_images(d.pixels, spec) - preprocess_images(a, spec)).abs().max()
    assert diff < 0.05, diff


# ----- EXIF orientation -------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_honoured(tmp_path, fmt, orientation):
    a = np.zeros((10, 20, 3), np.uint8)  # wide, red on the left half
    a[:, :10, 0] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"o.{fmt.lower()}"
    Image.fromarray(a).save(path, format=fmt, exif=exif)
    d = read_image(path)
    with Image.open(path) as im:
        expected = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    np.testing.assert_array_equal(d.pixels, expected)
    assert d.original_size == expected.shape[:2] == ((20, 10) if orientation in (6, 8) else (10, 20))


def test_exif_orientation_with_reduction(tmp_path):
    a = _gradient(200, 400)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(a).save(tmp_path / "o.png", exif=exif)
    d = read_image(tmp_path / "o.png", model_size=(32, 32))
    assert d.original_size == (400, 200) and d.reduced
    expected = np.asarray(Image.fromarray(a).reduce(3).transpose(Image.Transpose.ROTATE_270))
    np.testing.assert_array_equal(d.pixels, expected)


# ----- upscaling warnings -----------------------------------------------------------------------
def test_upscale_warning_names_the_factor():
    assert upscale_warning((32, 32), (32, 32)) is None
    assert upscale_warning((4, 4), (32, 32)) is None  # exactly 8x is fine
    w = upscale_warning((1, 1), (224, 224))
    assert "upscaled 224x" in w and "1x1" in w and "224x224" in w and "more than 8x" in w
    w = upscale_warning((3, 400), (32, 32))  # only the height is stretched
    assert "upscaled 10.7x" in w and "height 10.7x" in w


def test_a_1x1_image_explains_with_a_warning_in_its_record(tmp_path, model_and_gates, capsys):
    model, gates = model_and_gates
    Image.fromarray(np.full((1, 1, 3), 200, np.uint8)).save(tmp_path / "dot.png")
    Image.fromarray(_rgb(40, 48)).save(tmp_path / "ok.png")
    out = tmp_path / "out"
    rc = main([str(tmp_path / "dot.png"), str(tmp_path / "ok.png"), "--model", model, "--gates", gates,
               "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 0, err
    rec = json.loads((out / "dot.json").read_text())
    assert rec["image_size"] == [1, 1] and len(rec["warnings"]) == 1
    assert "upscaled 32x" in rec["warnings"][0] and "1x1" in rec["warnings"][0]
    assert "dot.png: upscaled 32x" in err
    assert np.array(rec["patch_mask"]).shape == (4, 4)
    ok = json.loads((out / "ok.json").read_text())
    assert ok["warnings"] == [] and ok["image_size"] == [40, 48]


# ----- the pixel limit in vdm-explain -----------------------------------------------------------
def test_cli_max_pixels_refuses_one_image_and_explains_the_others(tmp_path, model_and_gates, capsys, monkeypatch):
    model, gates = model_and_gates
    Image.fromarray(_rgb(100, 100)).save(tmp_path / "big.png")
    Image.fromarray(_rgb(32, 32)).save(tmp_path / "small.png")
    out = tmp_path / "out"
    rc = main([str(tmp_path / "big.png"), str(tmp_path / "small.png"), "--model", model, "--gates", gates,
               "--out", str(out), "--max-pixels", "5000"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "big.png: image is 100x100" in err and "--max-pixels 10000" in err
    assert sorted(p.name for p in out.iterdir()) == ["small.depth.png", "small.json", "small.overlay.png"]
    monkeypatch.setenv(MAX_PIXELS_ENV, "5000")
    assert main([str(tmp_path / "big.png"), "--model", model, "--gates", gates, "--out", str(out)]) == 2
    assert "big.png: image is 100x100" in capsys.readouterr().err
    assert main([str(tmp_path / "big.png"), "--model", model, "--gates", gates, "--out", str(out),
                 "--max-pixels", "10000"]) == 0
    monkeypatch.setenv(MAX_PIXELS_ENV, "many")
    assert main([str(tmp_path / "small.png"), "--model", model, "--gates", gates, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and [line for line in err.splitlines() if "error" in line] == [
        f"vdm-explain: error: {MAX_PIXELS_ENV}='many' is not a number of pixels; expected a positive integer"], err
    monkeypatch.delenv(MAX_PIXELS_ENV)
    assert main([str(tmp_path / "small.png"), "--model", model, "--gates", gates, "--max-pixels", "0"]) == 2
    assert "--max-pixels must be >= 1" in capsys.readouterr().err


# ----- bounded overlays -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "hw, panel",
    [((40, 48), (48 * 7, 40 * 7)), ((1, 1), (256, 256)), ((3000, 2000), (427, 640)), ((1, 4000), (640, 1)),
     ((600, 300), (300, 600)), ((100, 500), (500, 100))],
)
def test_overlay_panels_have_a_bounded_size(hw, panel):
    H, W = hw
    img = np.full((H, W, 3), 90, np.uint8)
    grid = np.linspace(0, 1, 16).reshape(4, 4)
    out = overlay(img, grid)
    for key in ("image", "heat", "grey"):
        x0, y0, x1, y1 = out.info["panels"][key]
        assert (x1 - x0, y1 - y0) == panel
    assert 256 <= out.size[0] <= MAX_WIDTH
    s = overlay_scale(H, W)
    assert panel == (max(1, round(W * s)), max(1, round(H * s)))
    x0, y0, x1, y1 = overlay(img, grid, max_side=300).info["panels"]["image"]
    assert max(x1 - x0, y1 - y0) <= 300


def test_overlay_caption_gets_room_on_narrow_images():
    out = overlay(np.zeros((2000, 10, 3), np.uint8), np.ones((4, 4)), caption=["a caption"])
    assert out.size[0] == 256 and out.size[1] > PANEL_MAX_SIDE


def test_cli_overlay_of_a_large_image_is_bounded(tmp_path, model_and_gates):
    model, gates = model_and_gates
    Image.fromarray(_gradient(1500, 2000)).save(tmp_path / "wide.png")
    out = tmp_path / "out"
    assert main([str(tmp_path / "wide.png"), "--model", model, "--gates", gates, "--out", str(out)]) == 0
    with Image.open(out / "wide.overlay.png") as png:
        assert max(png.size) <= MAX_WIDTH
    assert json.loads((out / "wide.json").read_text())["image_size"] == [1500, 2000]


# ----- one preprocessing for every path ---------------------------------------------------------
def test_preprocessing_names_are_shared_with_backbone():
    import vdm_engine.backbone as backbone
    import vdm_engine.preprocessing as preprocessing

    for name in ("ImageSpec", "check_pixel_values", "preprocess_images", "_to_uint8_list"):
        assert getattr(backbone, name) is getattr(preprocessing, name)


def test_resize_images_is_the_uint8_half_of_preprocess_images(tiny_explainer):
    spec = tiny_explainer.backbone.image_spec
    images = [_rgb(40, 24, 1), _rgb(32, 32, 2)[..., 0], Image.fromarray(_rgb(50, 50, 3)).convert("RGBA")]
    u8 = resize_images(images, spec)
    assert u8.dtype == torch.uint8 and u8.shape == (3, 32, 32, 3)
    x = u8.permute(0, 3, 1, 2).float() * spec.rescale_factor
    x = (x - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)
    assert torch.equal(x, preprocess_images(images, spec))


def _accepted_forms(seed: int = 11):
    """The same random uint8 pictures in every form the preprocess functions accept."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (3, 40, 36, 3), dtype=np.uint8)
    g = rng.integers(0, 256, (2, 20, 28), dtype=np.uint8)
    rgba = rng.integers(0, 256, (50, 50, 4), dtype=np.uint8)
    return {
        "array HWC": a[0],
        "array NHWC": a,
        "array HW": g[0],
        "array NHW": g,
        "array HW1": g[0][..., None],
        "array RGBA": rgba,
        "tensor HWC": torch.from_numpy(a[1].copy()),
        "tensor NHWC": torch.from_numpy(a.copy()),
        "PIL RGB": Image.fromarray(a[2]),
        "PIL L": Image.fromarray(g[1]),
        "PIL RGBA": Image.fromarray(rgba),
        "PIL I;16": Image.fromarray(g[0].astype(np.uint16) * 257),
        "list mixed": [a[0], torch.from_numpy(g[1].copy()), Image.fromarray(a[2]), rgba, g[0][..., None]],
        "tuple of tensors": tuple(torch.from_numpy(x.copy()) for x in a),
    }


@pytest.fixture(scope="module")
def digits_graphs(tmp_path_factory, digits_onnx):
    """The embedded vit-digits explainer and two exports: float pixel_values (the session's
    ``digits_onnx``) and uint8 images."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    if embedded_model_dir("vit-digits") is None:
        pytest.skip("the embedded vit-digits model is not built")
    from vdm_engine.export import export_onnx
    from vdm_engine.runtime import OnnxExplainer

    ex = Explainer.from_pretrained("vit-digits").eval()
    d = tmp_path_factory.mktemp("digits")
    export_onnx(ex, d / "uint8.onnx", uint8_input=True, validate=False)
    return ex, OnnxExplainer(digits_onnx, providers="cpu"), OnnxExplainer(d / "uint8.onnx", providers="cpu")


def test_explainer_and_onnx_explainer_give_identical_pixel_values(digits_graphs):
    ex, rt, rt8 = digits_graphs
    assert rt.image_spec == ex.backbone.image_spec == rt8.image_spec
    spec = ex.backbone.image_spec
    for form, images in _accepted_forms().items():
        ref = ex.preprocess(images)
        got = rt.preprocess(images)
        assert got.dtype == torch.float32 and torch.equal(got, ref), form
        u8 = rt8.preprocess(images)
        assert u8.dtype == torch.uint8 and u8.shape == (ref.shape[0], *spec.size, 3), form
        assert torch.equal(u8, resize_images(images, spec)), form
        assert torch.equal((u8.permute(0, 3, 1, 2).float() * spec.rescale_factor - 0.5) / 0.5, ref), form


def test_each_graph_explains_its_own_preprocessing_like_pytorch(digits_graphs, close):
    ex, rt, rt8 = digits_graphs
    images = _accepted_forms()["list mixed"]
    ref = ex.explain(ex.preprocess(images))
    for runtime in (rt, rt8):
        got = runtime.explain(runtime.preprocess(images))
        close(got.logits, ref.logits, 1e-4, 0.0, "logits")
        close(got.patch_mask, ref.patch_mask, 1e-4, 0.0, "patch_mask")


# ----- bad inputs to the Python API -------------------------------------------------------------
@pytest.mark.parametrize(
    "bad, match",
    [
        (np.full((32, 32, 3), 0.5, np.float32),
         r"uint8 in \[0, 255\], got dtype float32 with values in \[0.5, 0.5\].*255"),
        (np.full((2, 32, 32, 3), 300.0), r"got dtype float64 with values in \[300, 300\]"),
        (torch.rand(32, 32, 3), "got dtype float32"),
        (torch.rand(3, 32, 32, dtype=torch.bfloat16), "got dtype bfloat16"),
        (np.zeros((32, 32, 3), np.uint16), r"uint16.*a >> 8"),
        (np.zeros((32, 32, 3), np.int64), r"int64.*astype\(np.uint8\)"),
        (np.zeros((32, 32), bool), "got dtype bool"),
        (torch.zeros(3, 32, 32, dtype=torch.uint8), r"ambiguous: channels-first \(C, H, W\)"),
        (np.zeros((2, 3, 32, 32), np.uint8), r"looks channels-first.*transpose\(1, 2, 0\)"),
        (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), "looks channels-first"),
        (Image.fromarray(np.zeros((8, 8), np.float32)), "mode F"),
        ("picture.png", "unsupported image type str; expected a PIL image, a uint8 array"),
        ([np.zeros((8, 8, 3), np.uint8), None], "unsupported image type NoneType"),
        (np.zeros((0, 8, 3), np.uint8), "empty image array"),
        ([np.zeros((0, 8, 3), np.uint8)], "no pixels"),
        ((), "no images given"),
    ],
)
def test_bad_images_are_refused_with_what_was_expected(tiny_explainer, bad, match):
    with pytest.raises(ValueError, match=match):
        tiny_explainer.preprocess(bad)


def test_bad_images_are_refused_by_the_runtime_too(digits_graphs):
    _, rt, rt8 = digits_graphs
    for runtime in (rt, rt8):
        with pytest.raises(ValueError, match="got dtype float32"):
            runtime.preprocess(np.zeros((8, 8, 3), np.float32))
        with pytest.raises(ValueError, match="channels-first"):
            runtime.preprocess(torch.zeros(3, 8, 8, dtype=torch.uint8))


# ----- memory: the whole CLI on an 8000x8000 PNG (last here: its process runs beside the tests above) ---
_RSS_SCRIPT = """
import resource, sys
from vdm_engine.cli.explain import main
rc = main(sys.argv[1:])
hwm = [line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")]
print("PEAK_RSS_KB", hwm[0] if hwm else -1, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)
sys.exit(rc)
"""


class HugePngRun(BackgroundRun):
    """``_RSS_SCRIPT`` (the whole vdm-explain CLI in a fresh process) on an 8000x8000 PNG and the tiny
    ViT, started at once; ``wait()`` -> the finished process (stdout and stderr read)."""

    def __init__(self, root):
        from vdm_engine.backbone import random_backbone

        from tests.conftest import make_tiny_gates

        backbone = random_backbone("vit-tiny", seed=0)  # the model_and_gates fixture's model and gates
        backbone.save_pretrained(root / "tiny-vit")
        make_tiny_gates(backbone).save_pretrained(root / "gates", backbone=backbone)
        Image.fromarray(_gradient(8000, 8000)).save(root / "huge.png", compress_level=1)
        self.out = root / "out"
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        env.pop(MAX_PIXELS_ENV, None)
        super().__init__([sys.executable, "-c", _RSS_SCRIPT, str(root / "huge.png"), "--model", str(root / "tiny-vit"),
                          "--gates", str(root / "gates"), "--out", str(self.out)], env=env, timeout_s=300)



# the 8000x8000 run starts with the first test (its peak RSS is its own)
START_FIRST = ("huge_png_run",)


@pytest.fixture(scope="module")
def huge_png_run(tmp_path_factory):
    run = HugePngRun(tmp_path_factory.mktemp("huge_png"))
    yield run
    run.stop()


@pytest.mark.slow
def test_an_8000x8000_png_explains_in_well_under_1gb(huge_png_run):
    """The whole vdm-explain CLI in a fresh process: peak RSS < 1 GB (an 8-bit decode is 192 MB;
    no float32 or repeated full-size copies). Measured on the CPU box: 722 MiB, of which ~510 MiB
    is the same run on a 32x32 image (Python, torch, transformers).

    The peak is the child's own ``VmHWM``: its ``ru_maxrss`` starts at this pytest process's peak,
    because Linux carries the high-water mark of the address space a child replaces at exec into
    ``ru_maxrss`` (here the parent's, as subprocess uses vfork). Where ``/proc`` is missing,
    ``ru_maxrss`` is used (an upper bound).
    """
    proc = huge_png_run.wait()
    out = huge_png_run.out
    assert proc.returncode == 0, proc.stderr[-2000:]
    hwm_kb, maxrss_kb = (int(v) for v in proc.stdout.split("PEAK_RSS_KB")[1].split()[:2])
    peak_kb = hwm_kb if hwm_kb > 0 else maxrss_kb
    print(f"8000x8000 PNG through vdm-explain: peak RSS {peak_kb / 1024:.0f} MiB (VmHWM), "
          f"ru_maxrss {maxrss_kb / 1024:.0f} MiB")
    assert peak_kb < 1024 * 1024, f"peak RSS {peak_kb / 1024:.0f} MiB"
    rec = json.loads((out / "huge.json").read_text())
    assert rec["image_size"] == [8000, 8000] and rec["warnings"] == []
    with Image.open(out / "huge.overlay.png") as png:
        assert max(png.size) <= MAX_WIDTH
