"""Images -> pixel values, one way for every path (PyTorch explainer, ONNX runtime, training, export).

``ImageSpec`` holds a checkpoint's image processor settings; ``resize_images`` turns PIL images,
uint8 arrays or uint8 tensors into a uint8 (N, H, W, 3) batch at the model size; ``preprocess_images``
rescales and normalises that into float32 ``pixel_values (N, 3, H, W)``; ``check_pixel_values``
validates a batch before a forward pass. Decoding files is ``vdm_engine.images``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .images import pil_to_rgb8

__all__ = ["ImageSpec", "check_pixel_values", "preprocess_images", "resize_images"]


@dataclass(frozen=True)
class ImageSpec:
    """Preprocessing read from a checkpoint's image processor config.

    Attributes:
        size: (height, width) the model expects.
        mean, std: per-channel normalisation applied after rescaling.
        rescale_factor: multiplier from uint8 to float (usually 1/255).
        resample: PIL resampling filter used for resizing.
    """

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    resample: int = 2

    def __post_init__(self):
        if len(self.size) != 2 or min(self.size) <= 0:
            raise ValueError(f"ImageSpec.size must be (height, width) > 0, got {self.size}")
        for field in ("mean", "std"):
            if len(getattr(self, field)) != 3:
                raise ValueError(f"ImageSpec.{field} must have 3 values, got {getattr(self, field)}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"ImageSpec.std must be positive, got {self.std}")

    @classmethod
    def from_processor_dict(cls, d: dict, default_size: tuple[int, int]) -> "ImageSpec":
        size = d.get("size", default_size)
        if isinstance(size, int):
            size = (size, size)
        elif isinstance(size, dict):
            crop = d.get("crop_size") if d.get("do_center_crop", True) else None
            if "height" in size:
                size = (size["height"], size["width"])
            elif isinstance(crop, dict) and "height" in crop:  # shortest_edge + center crop (DINOv2, CLIP): the crop
                size = (crop["height"], crop["width"])
            elif isinstance(crop, int):
                size = (crop, crop)
            else:
                size = default_size
        mean = d.get("image_mean", (0.5, 0.5, 0.5))
        std = d.get("image_std", (0.5, 0.5, 0.5))
        if isinstance(mean, (int, float)):
            mean = (mean,) * 3
        if isinstance(std, (int, float)):
            std = (std,) * 3
        return cls(
            size=tuple(int(s) for s in size),
            mean=tuple(float(m) for m in mean),
            std=tuple(float(s) for s in std),
            rescale_factor=float(d.get("rescale_factor", 1 / 255)),
            do_resize=bool(d.get("do_resize", True)),
            do_rescale=bool(d.get("do_rescale", True)),
            do_normalize=bool(d.get("do_normalize", True)),
            resample=int(d.get("resample", 2)),
        )

    def to_processor_dict(self) -> dict:
        return {
            "image_processor_type": "ViTImageProcessor",
            "do_resize": self.do_resize,
            "size": {"height": self.size[0], "width": self.size[1]},
            "resample": self.resample,
            "do_rescale": self.do_rescale,
            "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize,
            "image_mean": list(self.mean),
            "image_std": list(self.std),
        }


def check_pixel_values(pixel_values, num_channels: int, size: tuple[int, int]) -> None:
    """Validate a pixel batch; ``ValueError`` names what was wrong and what was expected.

    Type, rank, shape and dtype are always checked. Finiteness is checked for CPU tensors only:
    on an accelerator, reading the answer back would synchronise the device on every call (the
    cost is in benchmarks/results/gpu-h100-2026-11-26). Images from ``preprocess`` are checked on
    the CPU before they move; NaN pixels given directly on a GPU give NaN logits and masks.
    """
    exp = f"(B, {num_channels}, {size[0]}, {size[1]})"
    if not isinstance(pixel_values, torch.Tensor):
        raise ValueError(
            f"pixel_values must be a torch.Tensor of shape {exp}, got {type(pixel_values).__name__}; "
            "use preprocess(images) for PIL images or uint8 arrays"
        )
    if not pixel_values.is_floating_point():
        raise ValueError(
            f"pixel_values must be a float tensor {exp}, got dtype {pixel_values.dtype}; "
            "use preprocess(images) to turn uint8 images into normalised pixel values"
        )
    if pixel_values.dim() != 4:
        raise ValueError(f"pixel_values must have rank 4 {exp}, got shape {tuple(pixel_values.shape)}")
    if pixel_values.shape[0] == 0:
        raise ValueError(f"pixel_values is an empty batch; expected at least one image {exp}")
    if pixel_values.shape[1] != num_channels:
        raise ValueError(f"pixel_values must have {num_channels} channels {exp}, got shape {tuple(pixel_values.shape)}")
    if tuple(pixel_values.shape[2:]) != tuple(size):
        raise ValueError(f"pixel_values must be {size[0]}x{size[1]} {exp}, got shape {tuple(pixel_values.shape)}")
    if pixel_values.device.type != "cpu":
        return
    # One reduction first: a finite sum proves every pixel finite; only otherwise count the bad ones.
    if not bool(torch.isfinite(pixel_values.sum())) and not bool(torch.isfinite(pixel_values).all()):
        bad = int((~torch.isfinite(pixel_values)).sum())
        raise ValueError(f"pixel_values contains {bad} NaN or Inf values; expected finite pixels")


_INPUTS = ("a PIL image, a uint8 array or tensor (H, W), (H, W, C) or (N, H, W[, C]) with C in {1, 3, 4}, "
           "or a list of those")


def _to_uint8_list(images) -> list[np.ndarray]:
    """Normalise supported image inputs to a list of (H, W, 3) or (H, W) uint8 arrays.

    A 3-D uint8 torch tensor whose first dimension is 1, 3 or 4 and last is not is refused as
    ambiguous (channels-first (C, H, W) as torchvision reads images, or N grayscale images);
    numpy arrays of that shape are N grayscale images.
    """
    from PIL import Image

    def one(a) -> np.ndarray:
        if isinstance(a, Image.Image):
            return pil_to_rgb8(a)
        if isinstance(a, torch.Tensor):
            a = _numpy(a)
        if not isinstance(a, np.ndarray):
            raise ValueError(f"unsupported image type {type(a).__name__}; expected {_INPUTS}")
        _check_dtype(a)
        if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
            raise ValueError(
                f"an image of shape {a.shape} looks channels-first (C, H, W); expected channels-last (H, W, C): "
                "use a.permute(1, 2, 0) (torch) or a.transpose(1, 2, 0) (numpy)"
            )
        if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (1, 3, 4)):
            raise ValueError(f"an image array must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); got {a.shape}")
        if a.shape[0] == 0 or a.shape[1] == 0:
            raise ValueError(f"image has no pixels: shape {a.shape}")
        if a.ndim == 3 and a.shape[-1] == 1:
            a = a[..., 0]  # grayscale stays (H, W) until resized: a third of the memory
        elif a.ndim == 3 and a.shape[-1] == 4:
            a = a[..., :3]  # alpha dropped
        return a

    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise ValueError(f"no images given; expected {_INPUTS}")
        return [one(a) for a in images]
    if isinstance(images, torch.Tensor):
        images = _numpy(images)
        if images.ndim == 3 and images.shape[0] in (1, 3, 4) and images.shape[-1] not in (1, 3, 4):
            raise ValueError(
                f"a tensor of shape {tuple(images.shape)} is ambiguous: channels-first (C, H, W) or "
                f"{images.shape[0]} grayscale images (N, H, W)? Pass channels-last (H, W, C) "
                "(images.permute(1, 2, 0)) or a list of (H, W) images"
            )
    if isinstance(images, np.ndarray):
        if images.size == 0:
            raise ValueError(f"empty image array of shape {images.shape}; expected at least one image")
        if images.ndim == 4 or (images.ndim == 3 and images.shape[-1] not in (1, 3, 4)):
            _check_dtype(images)
            return [one(a) for a in images]
    return [one(images)]


def _numpy(t: torch.Tensor) -> np.ndarray:
    """A tensor as a numpy array; dtypes numpy lacks (bfloat16) are refused by name first."""
    t = t.detach().cpu()
    if t.dtype != torch.uint8 and t.is_floating_point():
        _check_dtype(t.float().numpy(), name=str(t.dtype).replace("torch.", ""))
    return t.numpy()


def _check_dtype(a: np.ndarray, name: str | None = None) -> None:
    if a.dtype == np.uint8:
        return
    name = name or str(a.dtype)
    if np.issubdtype(a.dtype, np.floating):
        finite = a[np.isfinite(a)] if a.size <= 1 << 24 else None
        rng = f" with values in [{finite.min():.4g}, {finite.max():.4g}]" if finite is not None and finite.size else ""
        raise ValueError(
            f"image arrays must be uint8 in [0, 255], got dtype {name}{rng}; float images are refused because "
            "their scale is ambiguous: for values in [0, 1] pass (a * 255).round().astype(np.uint8); normalised "
            "pixel_values (B, 3, H, W) go straight to explain()"
        )
    if a.dtype == np.uint16:
        raise ValueError(
            "image arrays must be uint8 in [0, 255], got dtype uint16; for 16-bit images pass "
            "(a >> 8).astype(np.uint8), or the PIL image (16-bit modes are scaled to 8 bits)"
        )
    raise ValueError(
        f"image arrays must be uint8 in [0, 255], got dtype {name}; convert with a.astype(np.uint8) "
        "if its values are already in 0..255"
    )


def resize_images(images, spec: ImageSpec) -> torch.Tensor:
    """Images at the model size: uint8 (N, H, W, 3), resized with PIL and ``spec.resample``.

    This is the input of a uint8 graph (``export_onnx(..., uint8_input=True)``), and what
    ``preprocess_images`` rescales and normalises.

    Args:
        images: a PIL image, a uint8 array or tensor (H, W), (H, W, C) or (N, H, W[, C]) with C in
            {1, 3, 4}, or a list of those (sizes may differ). PIL 16-bit images are scaled to 8
            bits; alpha is dropped.
        spec: the checkpoint's ``ImageSpec``.

    Raises:
        ValueError: an unsupported input, naming what was wrong and what is expected.
    """
    from PIL import Image

    arrays = _to_uint8_list(images)
    H, W = spec.size
    out = np.empty((len(arrays), H, W, 3), dtype=np.uint8)
    for i, a in enumerate(arrays):
        if a.shape[:2] != (H, W):
            if not spec.do_resize:
                raise ValueError(f"image {i} is {a.shape[0]}x{a.shape[1]}, expected {H}x{W} (resizing is off)")
            a = np.asarray(Image.fromarray(np.ascontiguousarray(a)).resize((W, H), resample=spec.resample))
        out[i] = a if a.ndim == 3 else a[..., None]
    return torch.from_numpy(out)


def preprocess_images(images, spec: ImageSpec) -> torch.Tensor:
    """Resize, rescale and normalise images into (N, 3, H, W) float32 pixel values.

    Accepts what ``resize_images`` accepts; the values are ``resize_images`` as float32, times
    ``spec.rescale_factor``, minus ``spec.mean``, over ``spec.std`` (each step as the spec says).
    """
    x = resize_images(images, spec).permute(0, 3, 1, 2).contiguous().to(torch.float32)  # copy the uint8, not floats
    if spec.do_rescale:
        x = x * spec.rescale_factor
    if spec.do_normalize:
        mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1)
        x = (x - mean) / std
    return x
