"""Frozen ViT backbone: checkpoint loading and one explicit forward (preprocessing: ``preprocessing.py``).

The forward is a plain loop over the Hugging Face submodules (no hooks), so the same code runs
eagerly, under ``torch.compile`` and through ONNX export. Geometry (patch grid, hidden size, layer
count) is always read from the checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from ._io import atomic_write_json
from .preprocessing import ImageSpec, _to_uint8_list, check_pixel_values, preprocess_images  # noqa: F401 (re-exported)
from .provenance import backbone_fingerprint
from .models import EMBEDDED_MODELS, PRESETS, embedded_model_dir
from .families import DEFAULT_PROMPT, ClipFamily, Family, UnsupportedModelError, family_class

__all__ = [
    "PRESETS",
    "Backbone",
    "ImageSpec",
    "WeightsUnavailableError",
    "UnsupportedModelError",
    "load_backbone",
    "patch_mask_reference",
    "random_backbone",
    "SHAPES",
]

_PROCESSOR_FILE = "preprocessor_config.json"


class WeightsUnavailableError(OSError):
    """The checkpoint's weights could not be found locally nor downloaded."""


def patch_mask_reference(
    x: torch.Tensor,
    gates: torch.Tensor,
    placeholder: torch.Tensor | None,
    cls_token: torch.Tensor,
    pos_embed: torch.Tensor,
) -> torch.Tensor:
    """Blend patch embeddings with a placeholder under gates and assemble the token sequence.

    Args:
        x: (B, N, D) patch embeddings (before position embeddings).
        gates: (B, N) or (B, K, N) keep values in [0, 1]; K masks per image.
        placeholder: (D,) replacement vector, or None for zeros.
        cls_token: (D,) class token.
        pos_embed: (N+1, D) position embeddings.

    Returns:
        (B*K, N+1, D) tokens: row 0 = cls + pos[0]; row 1+n = g*x + (1-g)*placeholder + pos[1+n].
    """
    B, N, D = x.shape
    g = gates if gates.dim() == 3 else gates.unsqueeze(1)
    K = g.shape[1]
    g = g.to(x.dtype).unsqueeze(-1)  # (B, K, N, 1)
    xs = x.unsqueeze(1)  # (B, 1, N, D)
    if placeholder is None:
        patches = g * xs
    else:
        ph = placeholder.to(x.dtype)
        patches = g * xs + (1 - g) * ph
    patches = patches.reshape(B * K, N, D) + pos_embed[1:].to(x.dtype)
    cls = (cls_token + pos_embed[0]).to(x.dtype).expand(B * K, 1, D)
    return torch.cat([cls, patches], dim=1)


class Backbone(nn.Module):
    """A frozen Vision Transformer classifier with its preprocessing; the family's differences (prefix
    tokens, positions, block calls, head) live in ``family`` (``vdm_engine.families``).

    Geometry attributes: ``num_layers`` (L), ``hidden_size`` (D), ``grid`` (h, w), ``num_patches``
    (N = h*w), ``num_prefix_tokens`` (P), ``num_tokens`` (N+1, what the gates see),
    ``num_hidden_states`` (L+2), ``num_labels`` (C).
    """

    def __init__(self, model: nn.Module, image_spec: ImageSpec, *, name_or_path: str = "", revision: str | None = None,
                 family_kwargs: dict | None = None):
        super().__init__()
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.image_spec = image_spec
        self.name_or_path = name_or_path
        self.revision = revision
        self._fingerprint: str | None = None
        cls = family_class(getattr(model.config, "model_type", None), str(name_or_path))
        geometry = cls.geometry(model.config)
        ph, pw = _pair(geometry.patch_size)
        # Families that interpolate positions at run time (DINOv2) take the processor's size; the others
        # run at the size they were built for.
        size = tuple(image_spec.size) if cls.interpolates else _pair(geometry.image_size)
        self.family: Family = cls(model, size, **(family_kwargs or {}))
        self.grid = (size[0] // ph, size[1] // pw)
        self.patch_size = (ph, pw)
        self._image_size = (int(size[0]), int(size[1]))
        _, pos = self.family.mask_args()
        if pos.shape[0] != self.num_patches + 1:
            raise ValueError(
                f"position embeddings hold {pos.shape[0]} rows, expected {self.num_patches + 1} "
                f"(the last prefix token + {self.num_patches} patches)"
            )

    def train(self, mode: bool = True):
        # The backbone is frozen: it always runs in eval mode (no dropout).
        super().train(mode)
        self.model.eval()
        return self

    # ----- geometry ---------------------------------------------------------------------------
    @property
    def config(self):
        """The config with the vision geometry (for CLIP its ``vision_config``)."""
        return self.family.config

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_prefix_tokens(self) -> int:
        """P: tokens before the patches (CLS; DeiT's distillation token; DINOv2's registers)."""
        return self.family.num_prefix

    @property
    def num_tokens(self) -> int:
        """T of the hidden states the gates see: the last prefix token + N patches (N+1)."""
        return self.num_patches + 1

    @property
    def num_hidden_states(self) -> int:
        return self.num_layers + 2

    @property
    def num_labels(self) -> int:
        return self.family.num_labels

    @property
    def id2label(self) -> dict[int, str]:
        return self.family.id2label

    @property
    def model_type(self) -> str:
        return str(self.model.config.model_type)

    @property
    def image_size(self) -> tuple[int, int]:
        return self._image_size

    @property
    def zero_shot(self) -> dict | None:
        """CLIP: ``{"labels": [...], "prompt": "..."}`` the head was built from; None for other families."""
        labels = getattr(self.family, "labels", None)
        return None if labels is None else {"labels": list(labels), "prompt": self.family.prompt}

    @property
    def layers(self) -> nn.ModuleList:
        return self.family.layers

    @property
    def cls_token(self) -> torch.Tensor:
        """(D,) the token in row 0 of the patch-masking op: the class token for ViT, the last prefix
        token otherwise (``Family.mask_args``)."""
        return self.family.mask_args()[0]

    @property
    def pos_embed(self) -> torch.Tensor:
        """(N+1, D) position embeddings of row 0 and the patches (zeros where the family has none)."""
        return self.family.mask_args()[1]

    @property
    def fingerprint(self) -> str:
        """sha256 of the weights and the architecture (``provenance.backbone_fingerprint``).

        Computed once, on first use; ``load_backbone`` computes it before any device or dtype move,
        so it describes the weights as stored. CLIP's class prompts and their text embeddings enter it.
        """
        if self._fingerprint is None:
            fp = backbone_fingerprint(self.model)
            extra = self.family.fingerprint_extra()
            if extra is not None:
                fp = hashlib.sha256(fp.encode() + extra).hexdigest()
            self._fingerprint = fp
        return self._fingerprint

    @property
    def device(self) -> torch.device:
        return self.family.projection.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.family.projection.weight.dtype

    # ----- input ------------------------------------------------------------------------------
    def preprocess(self, images) -> torch.Tensor:
        """Turn images into ``pixel_values (N, 3, H, W)`` float32 with the checkpoint's settings.

        Accepts a PIL image, a list of PIL images or uint8 arrays, or a uint8 numpy array / tensor of
        shape (H, W), (H, W, C), (N, H, W) or (N, H, W, C) with C in {1, 3, 4}; 16-bit PIL images
        are scaled to 8 bits; anything else raises ``ValueError`` (see
        ``vdm_engine.preprocessing.resize_images``).
        """
        return preprocess_images(images, self.image_spec)

    def check_pixels(self, pixel_values) -> None:
        """Raise ``ValueError`` unless ``pixel_values`` is a float (B, C, H, W) batch for this model,
        finite when it is on the CPU (see ``check_pixel_values``)."""
        check_pixel_values(pixel_values, self.config.num_channels, self.image_size)

    # ----- forward ----------------------------------------------------------------------------
    def embed_patches(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, N, D) patch projections, before prefix tokens and position embeddings."""
        proj = self.family.projection
        return proj(pixel_values.to(proj.weight.dtype)).flatten(2).transpose(1, 2)

    def _assemble(self, patches: torch.Tensor) -> torch.Tensor:
        slot, pos = self.family.mask_args()
        first = (slot + pos[0]).to(patches.dtype).expand(patches.shape[0], 1, -1)
        return self.family.complete(torch.cat([first, patches + pos[1:].to(patches.dtype)], dim=1))

    def complete_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N+1, D) output of the patch-masking op -> (B, T, D) encoder input (the other prefix
        tokens prepended, the family's input norm applied; the identity for ViT)."""
        return self.family.complete(tokens)

    def _run_layer(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        return self.family.run_layer(layer, h)

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, D) encoder input -> (B, T, D) output of the last layer (before the final norm)."""
        h = tokens
        for layer in self.layers:
            h = self._run_layer(layer, h)
        return h

    def head(self, last: torch.Tensor) -> torch.Tensor:
        """(B, T, D) last-layer output -> (B, C) logits (the family's final norm and head)."""
        return self.family.head(last)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Plain inference: (B, 3, H, W) -> (B, C) logits."""
        return self.head(self.encode(self._assemble(self.embed_patches(pixel_values))))

    def hf_forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, C) logits from the family's own transformers forward: the plain-inference
        baseline benchmarks time (CLIP: ``get_image_features`` against the same text embeddings)."""
        return self.family.hf_forward(pixel_values)

    def forward_states(self, pixel_values: torch.Tensor, on_state: Callable[[int, torch.Tensor], None]) -> torch.Tensor:
        """One forward pass that hands each of the L+2 hidden states to ``on_state`` as it is produced.

        ``on_state(i, h_i)`` is called in depth order with h_i (B, N+1, D), the gates' view: the last
        prefix token (the CLS token for ViT) and the N patch tokens. h0 = [last prefix token; patch
        projections] without position embeddings, h1..hL the inputs of each encoder layer, h(L+1)
        the last layer's output before the final norm. With P > 1 prefix tokens (DeiT's distillation
        token, DINOv2's registers) h_i is ``full[:, P-1:]`` of the sequence the blocks run on.
        Nothing is kept here, so a state is freed once the next layer has read it (unless
        ``on_state`` keeps it).

        Returns:
            logits (B, C).
        """
        patches = self.embed_patches(pixel_values)
        slot = self.family.slot_token().to(patches.dtype).expand(patches.shape[0], 1, -1)
        on_state(0, torch.cat([slot, patches], dim=1))
        view = self.num_prefix_tokens - 1
        h = self._assemble(patches)
        on_state(1, h[:, view:] if view else h)
        for i, layer in enumerate(self.layers, start=2):
            h = self._run_layer(layer, h)
            on_state(i, h[:, view:] if view else h)
        return self.head(h)

    def hidden_states(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward pass returning logits and the L+2 hidden states stacked (the training path).

        Returns:
            logits (B, C) and hidden states (L+2, B, N+1, D) as described in ``forward_states``.
        """
        states: list[torch.Tensor] = []
        logits = self.forward_states(pixel_values, lambda i, h: states.append(h))
        return logits, torch.stack(states)

    def masked_logits_from_patches(
        self,
        patches: torch.Tensor,
        gates: torch.Tensor,
        placeholder: torch.Tensor | None,
        *,
        mask_fn: Callable | None = None,
    ) -> torch.Tensor:
        """Masked forward from precomputed patch embeddings.

        Args:
            patches: (B, N, D) from ``embed_patches``.
            gates: (B, N) or (B, K, N) keep values in [0, 1].
            placeholder: (D,) or None (zeros).
            mask_fn: the patch-masking op (``Ops.patch_mask``, same signature as
                ``patch_mask_reference``); default the reference.

        Returns:
            (B, C) logits, or (B, K, C) for K masks per image.
        """
        B, N, _ = patches.shape
        if gates.dim() not in (2, 3) or gates.shape[0] != B or gates.shape[-1] != N:
            raise ValueError(f"gates must be (B, N) or (B, K, N) with B={B}, N={N}; got {tuple(gates.shape)}")
        slot, pos = self.family.mask_args()
        tokens = (mask_fn or patch_mask_reference)(patches, gates, placeholder, slot, pos)
        logits = self.head(self.encode(self.complete_tokens(tokens)))
        return logits.view(B, gates.shape[1], -1) if gates.dim() == 3 else logits

    def masked_logits(
        self,
        pixel_values: torch.Tensor,
        gates: torch.Tensor,
        placeholder: torch.Tensor | None = None,
        *,
        mask_fn: Callable | None = None,
    ) -> torch.Tensor:
        """Forward pass with patch embeddings replaced under the gates.

        x'_n = g_n * x_n + (1 - g_n) * placeholder, before CLS concat and position embeddings.

        Args:
            pixel_values: (B, 3, H, W).
            gates: (B, N) or (B, K, N) keep values in [0, 1].
            placeholder: (D,) or None for zeros.
            mask_fn: the patch-masking op; default the reference.

        Returns:
            (B, C) logits, or (B, K, C).
        """
        return self.masked_logits_from_patches(self.embed_patches(pixel_values), gates, placeholder, mask_fn=mask_fn)

    # ----- persistence ------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write the HF model (safetensors) and ``preprocessor_config.json`` into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(directory, safe_serialization=True)
        atomic_write_json(directory / _PROCESSOR_FILE, self.image_spec.to_processor_dict())


def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def _local_files_only_default() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _read_processor_dict(source: str, revision: str | None, local_files_only: bool) -> dict:
    if os.path.isdir(source):
        path = Path(source) / _PROCESSOR_FILE
        if not path.is_file():
            raise ValueError(
                f"{source} has no {_PROCESSOR_FILE}; normalisation must come from the checkpoint. "
                "Save one with Backbone.save_pretrained or the ViT image processor's save_pretrained"
            )
        return json.loads(path.read_text())
    from huggingface_hub import hf_hub_download

    path = hf_hub_download(source, _PROCESSOR_FILE, revision=revision, local_files_only=local_files_only)
    return json.loads(Path(path).read_text())


def resolve_model_source(name_or_path: str) -> str:
    """Map a preset or embedded name to a hub id or local directory; pass others through."""
    name_or_path = str(name_or_path)
    if name_or_path in EMBEDDED_MODELS:
        d = embedded_model_dir(name_or_path)
        if d is None or not (d / "backbone" / "config.json").is_file():
            raise WeightsUnavailableError(
                f"the embedded model '{name_or_path}' is missing from this install; rebuild it with "
                f"`python -m vdm_engine.training.recipes {name_or_path.split('-', 1)[1]} --out DIR`"
            )
        return str(d / "backbone")
    return PRESETS.get(name_or_path, name_or_path)


def load_backbone(
    name_or_path: str = "vit-digits",
    *,
    revision: str | None = None,
    local_files_only: bool | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    attn_implementation: str = "sdpa",
    labels: Sequence[str] | None = None,
    prompt: str | None = None,
    text_embeds: torch.Tensor | None = None,
) -> Backbone:
    """Load a Vision Transformer classifier and its image processor settings.

    The family adapter is chosen from the checkpoint's ``model_type`` (``families.FAMILIES``: vit,
    deit, dinov2, dinov2_with_registers, beit, data2vec-vision, clip).

    Args:
        name_or_path: an embedded model (``vit-digits``, ``vit-toy``), a preset (``vit-b16``,
            ``vit-b16-cifar10``, ``vit-l16``), a Hugging Face hub id, or a local directory written
            by ``save_pretrained``.
        revision: hub revision (branch, tag or commit).
        local_files_only: never touch the network; defaults to ``HF_HUB_OFFLINE``.
        device, dtype: where and in which precision to place the weights.
        attn_implementation: ``"sdpa"`` (default) or ``"eager"``.
        labels: CLIP only (required there): the class names of the zero-shot head.
        prompt: CLIP only: the template the labels are written into (default ``"a photo of a {}."``).
        text_embeds: CLIP only: (C, E) text embeddings of the prompts saved earlier (with the gates);
            default: computed here with the checkpoint's tokenizer and text tower.

    Raises:
        WeightsUnavailableError: the weights are neither cached nor downloadable.
        UnsupportedModelError (a ``ValueError``): the checkpoint's family is not supported.
        ValueError: a CLIP checkpoint without ``labels``, or labels for a model that has its own head.
    """
    from transformers import AutoConfig

    source = resolve_model_source(name_or_path)
    if local_files_only is None:
        local_files_only = _local_files_only_default()
    try:
        config = AutoConfig.from_pretrained(source, revision=revision, local_files_only=local_files_only)
        family = family_class(config.model_type, str(name_or_path))
        zero_shot = family.model_types == ("clip",)
        if zero_shot and not labels:
            raise ValueError(
                f"'{name_or_path}' is a CLIP checkpoint, a zero-shot classifier: give its class names "
                "(labels=[...], --labels cat,dog,...)"
            )
        if labels and not zero_shot:
            raise ValueError(f"labels are for CLIP zero-shot checkpoints; '{name_or_path}' ({config.model_type}) has its own head")
        model = family.model_class(config).from_pretrained(
            source, revision=revision, local_files_only=local_files_only, attn_implementation=attn_implementation
        )
        processor = _read_processor_dict(source, revision, local_files_only)
        family_kwargs = None
        if zero_shot:
            prompt = prompt or DEFAULT_PROMPT
            if text_embeds is None:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, local_files_only=local_files_only)
                text_embeds = ClipFamily.text_embeddings(model, tokenizer, labels, prompt)
            elif tuple(text_embeds.shape) != (len(labels), int(config.projection_dim)):
                raise ValueError(f"text_embeds must be ({len(labels)}, {config.projection_dim}) for {len(labels)} "
                                 f"labels, got {tuple(text_embeds.shape)}")
            family_kwargs = dict(text_embeds=text_embeds, labels=list(labels), prompt=prompt)
    except ValueError:
        raise
    except Exception as e:  # hub / filesystem errors arrive under many types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsUnavailableError(
            f"could not load ViT weights for '{name_or_path}' (resolved to '{source}'): {first}. "
            "Without network access, download the checkpoint elsewhere, save it with "
            "save_pretrained, and pass that local directory instead (e.g. load_backbone('/path/to/dir'))"
        ) from e
    spec = ImageSpec.from_processor_dict(processor, _pair(family.geometry(config).image_size))
    backbone = Backbone(model, spec, name_or_path=str(name_or_path), revision=revision, family_kwargs=family_kwargs)
    backbone.fingerprint  # noqa: B018 (of the weights as stored, before any move)
    if device is not None or dtype is not None:
        backbone.to(device=device, dtype=dtype)
    return backbone


# Architectures by name, for random-weight models (tests, benchmarks, export timing offline).
SHAPES = {
    "vit-b16": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                    image_size=224, patch_size=16, num_labels=1000),
    "vit-l16": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                    image_size=224, patch_size=16, num_labels=1000),
    "vit-tiny": dict(hidden_size=36, num_hidden_layers=2, num_attention_heads=3, intermediate_size=72,
                     image_size=32, patch_size=8, num_labels=10),
}


def random_backbone(shape: str | dict = "vit-tiny", *, seed: int = 0, attn_implementation: str = "sdpa", **overrides) -> Backbone:
    """A ViT classifier with random weights and a given architecture (no download).

    Args:
        shape: a key of ``SHAPES`` (``vit-b16``, ``vit-l16``, ``vit-tiny``) or ViTConfig kwargs.
        seed: weight initialisation seed.
        overrides: ViTConfig fields replacing those of ``shape``.
    """
    from transformers import ViTConfig, ViTForImageClassification

    kwargs = dict(SHAPES[shape]) if isinstance(shape, str) else dict(shape)
    kwargs.update(overrides)
    kwargs.setdefault("id2label", {i: f"class_{i}" for i in range(kwargs.get("num_labels", 2))})
    kwargs.setdefault("label2id", {v: k for k, v in kwargs["id2label"].items()})
    config = ViTConfig(**kwargs)
    config._attn_implementation = attn_implementation
    # Built on the meta device: torch's default init of every layer (kaiming_uniform_ on ~86M weights for
    # ViT-B/16, most of the build time) is skipped, then the model's own init fills the weights once.
    with torch.device("meta"):
        model = ViTForImageClassification(config)
    model.to_empty(device="cpu")
    for module in model.modules():  # transformers 4.x marks modules initialised even on meta
        module.__dict__.pop("_is_hf_initialized", None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.init_weights()
    model.eval()
    spec = ImageSpec(size=_pair(config.image_size), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    return Backbone(model, spec, name_or_path=shape if isinstance(shape, str) else "random-vit")
