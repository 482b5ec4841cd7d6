"""Decoding image files safely: never silently wrong, never a memory blow-up.

``read_image`` opens a PNG or JPEG file and checks its size against a pixel limit before decoding
anything; 16-bit images are scaled to 8 bits (never clipped); large images are reduced while
decoding (JPEG DCT scaling via ``Image.draft``, then a box-filter ``Image.reduce``) to about twice
the model's input size, so an 8000x8000 PNG costs one 8-bit decode and no float copy; EXIF
orientation is applied; an image upscaled more than 8x to reach the model's input size comes back
with a warning. ``pil_to_rgb8`` is the same 8-bit conversion for PIL images already in memory.

Only numpy and Pillow are imported here (no torch).
"""

from __future__ import annotations

import io
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, JpegImagePlugin, PngImagePlugin, UnidentifiedImageError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "MAX_PIXELS_ENV",
    "SUPPORTED_FORMATS",
    "UPSCALE_WARN_FACTOR",
    "DecodedImage",
    "decode_image",
    "load_image",
    "pil_to_rgb8",
    "read_image",
    "resolve_max_pixels",
    "upscale_warning",
]

SUPPORTED_FORMATS = ("PNG", "JPEG")
DEFAULT_MAX_PIXELS = 100_000_000  # 100 megapixels: 300 MB as 8-bit RGB
MAX_PIXELS_ENV = "VDM_MAX_IMAGE_PIXELS"
UPSCALE_WARN_FACTOR = 8.0
REDUCE_GAP = 2  # large images are reduced to no less than this multiple of the model's input size

# PIL modes holding 16 significant bits (mode "I" is what a 16-bit grayscale PNG used to open as).
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class DecodedImage:
    """An image file decoded for a model.

    Attributes:
        pixels: (h, w, 3) uint8 RGB, upright (EXIF orientation applied), possibly reduced.
        original_size: (H, W) of the stored image, upright, before any reduction.
        format: ``"PNG"`` or ``"JPEG"``.
        warnings: human-readable notes on how the image was adapted (e.g. heavy upscaling).
    """

    pixels: np.ndarray
    original_size: tuple[int, int]
    format: str
    warnings: tuple[str, ...] = ()

    @property
    def reduced(self) -> bool:
        return tuple(self.pixels.shape[:2]) != tuple(self.original_size)


def resolve_max_pixels(max_pixels: int | None = None) -> int:
    """The pixel limit: ``max_pixels`` if given, else ``$VDM_MAX_IMAGE_PIXELS``, else 100 megapixels.

    Raises:
        ValueError: the limit (argument or environment variable) is not a positive integer.
    """
    if max_pixels is None:
        raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
        if not raw:
            return DEFAULT_MAX_PIXELS
        try:
            max_pixels = int(float(raw)) if "e" in raw.lower() else int(raw.replace("_", ""))
        except ValueError:
            raise ValueError(
                f"{MAX_PIXELS_ENV}={raw!r} is not a number of pixels; expected a positive integer"
            ) from None
        if max_pixels <= 0:
            raise ValueError(f"{MAX_PIXELS_ENV}={raw!r} must be a positive number of pixels")
        return max_pixels
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, (int, np.integer)) or max_pixels <= 0:
        raise ValueError(f"max_pixels must be a positive integer, got {max_pixels!r}")
    return int(max_pixels)


def upscale_warning(size: tuple[int, int], model_size: tuple[int, int], *,
                    factor: float = UPSCALE_WARN_FACTOR) -> str | None:
    """A warning when resizing an (H, W) image to ``model_size`` (H, W) upscales it more than
    ``factor`` times in either dimension, else None."""
    (h, w), (mh, mw) = size, model_size
    fy, fx = mh / max(1, h), mw / max(1, w)
    if max(fx, fy) <= factor:
        return None
    return (
        f"upscaled {max(fx, fy):.3g}x (width {fx:.3g}x, height {fy:.3g}x) from {w}x{h} to the model's {mw}x{mh} "
        f"input, more than {factor:g}x: the explanation is of interpolated pixels"
    )


def pil_to_rgb8(im) -> np.ndarray:
    """A PIL image as (H, W, 3) uint8 RGB; 16-bit modes are scaled (value >> 8), not clipped.

    Mode ``I`` is taken as 16-bit (0..65535, values outside are clipped), as PNG decoding gives it.
    Alpha is dropped. Raises ``ValueError`` for float images (mode ``F``), whose scale is ambiguous.
    """
    return np.asarray(_to_8bit(im).convert("RGB"))


def read_image(path: str | os.PathLike, *, max_pixels: int | None = None,
               model_size: tuple[int, int] | None = None) -> DecodedImage:
    """Decode a PNG or JPEG file for a model of input size ``model_size``.

    Args:
        path: the image file.
        max_pixels: refuse images with more pixels (width * height) than this, before decoding;
            default ``resolve_max_pixels()`` (``$VDM_MAX_IMAGE_PIXELS`` or 100 megapixels).
        model_size: (H, W) the image will be resized to. When given, images at least 4x larger
            in both dimensions are reduced while decoding to no less than 2x that size (box
            filter; the final resize is the model's own), and heavy upscaling is reported in
            ``warnings``. None decodes at full size.

    Returns:
        ``DecodedImage`` with (h, w, 3) uint8 pixels.

    Raises:
        ValueError: missing file, unsupported format, too many pixels, corrupt data; the message
            starts with the path.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such file")
    if not path.is_file():
        raise ValueError(f"{path}: not a file")
    with open(path, "rb") as f:
        return _decode(f, str(path), max_pixels=max_pixels, model_size=model_size)


def decode_image(data: bytes, *, name: str = "image", max_pixels: int | None = None,
                 model_size: tuple[int, int] | None = None) -> DecodedImage:
    """``read_image`` for an encoded PNG or JPEG already in memory (an upload, a request body).

    Same checks and result as ``read_image``; messages start with ``name`` instead of a path.

    Raises:
        ValueError: empty data, unsupported format, too many pixels, corrupt or truncated data.
    """
    if not data:
        raise ValueError(f"{name}: empty (0 bytes); expected a PNG or JPEG image")
    return _decode(io.BytesIO(data), name, max_pixels=max_pixels, model_size=model_size)


def _decode(f, path: str, *, max_pixels: int | None, model_size: tuple[int, int] | None) -> DecodedImage:
    """Decode an open binary file ``f`` (named ``path`` in messages): the body of ``read_image``."""
    limit = resolve_max_pixels(max_pixels)
    try:
        im = _open_header(f, path)
        W, H = im.size
        if W * H > limit:
            raise ValueError(
                f"{path}: image is {W}x{H} ({W * H / 1e6:.1f} megapixels), above the limit of "
                f"{limit / 1e6:g} megapixels ({limit} pixels); refused before decoding. If you trust the file, "
                f"raise the limit with --max-pixels {W * H} (vdm-explain), {MAX_PIXELS_ENV}={W * H} or "
                f"read_image(..., max_pixels={W * H})"
            )
        if model_size is not None and im.format == "JPEG":
            r = _reduce_factor(W, H, model_size)
            if r > 1:  # decode at 1/2, 1/4 or 1/8 scale, never below W/r x H/r
                im.draft(None, (math.ceil(W / r), math.ceil(H / r)))
        im.load()
        orientation = _orientation(im)
        fmt = im.format
        im = _to_8bit(im)
        if model_size is not None:
            r = _reduce_factor(im.width, im.height, model_size)
            if r > 1:
                im = im.reduce(r)
        if orientation in _TRANSPOSE:
            im = im.transpose(_TRANSPOSE[orientation])
            if orientation >= 5:
                W, H = H, W
        pixels = np.asarray(im.convert("RGB"))
    except ValueError as e:
        msg = str(e)
        raise ValueError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None
    except Image.DecompressionBombError as e:  # only from PIL's own checks, past ours
        raise ValueError(f"{path}: refused by Pillow's decompression-bomb check: {e}") from None
    except (OSError, SyntaxError, EOFError) as e:  # truncated or corrupt data
        raise ValueError(f"{path}: cannot decode image: {e}") from None
    notes = []
    if model_size is not None:
        w = upscale_warning((H, W), model_size)
        if w is not None:
            notes.append(w)
    return DecodedImage(pixels=pixels, original_size=(H, W), format=fmt, warnings=tuple(notes))


def load_image(path: str | os.PathLike, *, max_pixels: int | None = None,
               model_size: tuple[int, int] | None = None) -> np.ndarray:
    """``read_image(...).pixels``: a PNG or JPEG file as (h, w, 3) uint8."""
    return read_image(path, max_pixels=max_pixels, model_size=model_size).pixels


def _open_header(f, path: Path):
    """Open a PNG or JPEG from its header only, with no decoding and no global size check (ours runs
    next). Other formats are identified only to name them in the error."""
    head = f.read(8)
    f.seek(0)
    if head.startswith(_PNG_MAGIC):
        return PngImagePlugin.PngImageFile(f)
    if head.startswith(_JPEG_MAGIC):
        # The JPEG plugin itself (not jpeg_factory): a multi-picture JPEG (MPO) is its first picture.
        return JpegImagePlugin.JpegImageFile(f)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(f) as other:
                fmt = other.format
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError):
        raise ValueError(f"{path}: not a readable image (expected PNG or JPEG)") from None
    raise ValueError(f"{path}: unsupported image format {fmt}; expected PNG or JPEG")


def _reduce_factor(W: int, H: int, model_size: tuple[int, int]) -> int:
    """Largest integer factor leaving the image at least REDUCE_GAP x the model size in both
    dimensions, whichever way EXIF turns it (1 = no reduction)."""
    mh, mw = (max(1, int(s)) for s in model_size)
    upright = min(W // (REDUCE_GAP * mw), H // (REDUCE_GAP * mh))
    turned = min(H // (REDUCE_GAP * mw), W // (REDUCE_GAP * mh))
    return max(1, min(upright, turned))


def _orientation(im) -> int:
    try:
        return int(im.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # malformed EXIF: keep the pixels as stored
        return 1


# EXIF orientation -> transpose, as ImageOps.exif_transpose; applied after reduction (a fraction of
# the full-size copy exif_transpose would make).
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}


def _to_8bit(im):
    """The image in an 8-bit mode PIL can reduce and convert to RGB: 16-bit -> L by value >> 8."""
    if im.mode in _SIXTEEN_BIT_MODES:
        a = np.asarray(im)
        if im.mode == "I":
            a = np.clip(a, 0, 65535)
        return Image.fromarray((a >> 8).astype(np.uint8))
    if im.mode == "F":
        raise ValueError("float images (PIL mode F) are not supported: their value range is ambiguous; "
                         "convert to 8-bit (mode L or RGB) first")
    if im.mode in ("L", "RGB"):
        return im
    try:
        return im.convert("RGB")
    except ValueError as e:
        raise ValueError(f"cannot convert PIL mode {im.mode} to RGB: {e}") from None
