"""One adapter per model family behind ``Backbone``: how tokens are formed, a block is called, and the head reads.

The Vision DiffMask gates need what every Vision Transformer has: a patch projection, prefix tokens,
a stack of blocks and a head. An adapter maps one Hugging Face family onto that (``FAMILIES``, keyed
by the checkpoint's ``model_type``); ``Backbone`` delegates to it and the rest of the engine sees
only the ``Backbone``.

The token sequence is ``[prefix tokens (P); patch tokens (N)]``. The patch-masking op
(``patch_mask_reference``) builds ``[slot; patches]``: the slot is the LAST prefix token, so every
family reuses it (and its Triton kernel) with ``mask_args() -> (slot_token (D,), pos (N+1, D))``;
``complete(tokens)`` then prepends the other P-1 prefix tokens (formed: position embeddings added)
and applies the family's input norm (CLIP's ``pre_layrnorm``). Gates see the same ``[slot; patches]``
view of each hidden state (``Backbone.forward_states``): prefix tokens are never masked.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

__all__ = [
    "FAMILIES",
    "Family",
    "TraceBlock",
    "UnsupportedModelError",
    "family_for",
    "family_class",
    "supported_model_types",
    "DEFAULT_PROMPT",
]

#: The prompt template of CLIP zero-shot classes (``{}`` is the label).
DEFAULT_PROMPT = "a photo of a {}."


class UnsupportedModelError(ValueError):
    """The checkpoint's ``model_type`` has no adapter (``FAMILIES``)."""


def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def _layers(base: nn.Module) -> nn.ModuleList:
    """The block list under the 5.x (``base.layers``) or 4.x (``base.encoder.layer(s)``) layouts."""
    if hasattr(base, "layers"):
        return base.layers
    enc = base.encoder
    return enc.layers if hasattr(enc, "layers") else enc.layer


def _first(obj, *names):
    for n in names:
        cur = obj
        for part in n.split("."):
            cur = getattr(cur, part, None)
            if cur is None:
                break
        if cur is not None:
            return cur
    return None


@dataclass
class TraceBlock:
    """One pre-norm block written out for explicit attention (``attribution._attention``).

    h <- h + ls1(o(softmax(q k^T * scale + bias) v)) with q, k, v from ln1(h); h <- h + ls2(mlp(ln2(h))).
    ``bias`` is None or an additive (1, H, T, T) attention bias (BEiT's relative position bias).
    """

    ln1: nn.Module
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    ln2: nn.Module
    mlp: Callable
    ls1: Callable | None = None
    ls2: Callable | None = None
    bias: torch.Tensor | None = None


def _mlp(layer: nn.Module) -> Callable:
    if hasattr(layer, "mlp"):  # transformers >= 5 (and CLIP, DINOv2 in 4.x)
        return layer.mlp
    inter, out = layer.intermediate, layer.output.dense  # 4.x: ViTOutput adds the residual itself; use the dense only
    return lambda x: out(inter.intermediate_act_fn(inter.dense(x)))


def _attention_linears(layer: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear, nn.Linear]:
    att = _first(layer, "attention", "self_attn")
    q = _first(att, "q_proj", "attention.query")
    k = _first(att, "k_proj", "attention.key")
    v = _first(att, "v_proj", "attention.value")
    o = _first(att, "o_proj", "out_proj", "output.dense")
    if None in (q, k, v, o):
        raise ValueError(f"unsupported block layout {type(layer).__name__}: cannot find its q/k/v/out projections")
    return q, k, v, o


def _scale(s) -> Callable | None:
    if s is None or isinstance(s, (int, float)):
        return None if s in (None, 1.0) else (lambda x, s=float(s): x * s)
    if isinstance(s, nn.Parameter) or torch.is_tensor(s):
        return lambda x, s=s: x * s
    return s  # a LayerScale module


class Family(nn.Module):
    """Base adapter: a frozen HF image model seen as [prefix; patches] -> blocks -> head.

    Subclasses set ``model_types`` and ``hub_examples`` and implement the hooks. The HF model is held
    outside the module tree (the ``Backbone`` owns it); buffers computed at load (interpolated
    position embeddings, CLIP text embeddings) live here and move with the backbone.

    Args:
        model: the loaded HF model.
        image_size: (H, W) of the pixels fed at run time.
    """

    model_types: tuple[str, ...] = ()
    #: Head description and example hub ids, for the README table and errors.
    head_kind: str = ""
    hub_examples: tuple[str, ...] = ()
    #: Whether the family interpolates its position embeddings at run time for non-native sizes.
    interpolates: bool = False

    def __init__(self, model: nn.Module, image_size: tuple[int, int]):
        super().__init__()
        self.__dict__["model"] = model  # not a submodule: Backbone.model owns the weights
        self.run_size = _pair(image_size)
        try:
            self.base, self.layers, self.projection  # noqa: B018 (the layout this adapter reads)
        except AttributeError:
            raise ValueError(
                f"expected a {self.model_class(model.config).__name__} for model_type "
                f"{getattr(model.config, 'model_type', None)!r}, got {type(model).__name__}"
            ) from None

    # ----- loading ----------------------------------------------------------------------------
    @classmethod
    def model_class(cls, config):
        """The transformers class to load a checkpoint of this family with."""
        raise NotImplementedError

    # ----- geometry ---------------------------------------------------------------------------
    @property
    def base(self) -> nn.Module:
        raise NotImplementedError

    @staticmethod
    def geometry(config):
        """The config holding the vision geometry (hidden_size, patch_size, image_size, heads)."""
        return config

    @property
    def config(self):
        return self.geometry(self.model.config)

    @property
    def num_prefix(self) -> int:
        return 1

    @property
    def layers(self) -> nn.ModuleList:
        return _layers(self.base)

    @property
    def projection(self) -> nn.Conv2d:
        return self.base.embeddings.patch_embeddings.projection

    @property
    def num_labels(self) -> int:
        return int(self.config.num_labels)

    @property
    def id2label(self) -> dict[int, str]:
        return {int(k): v for k, v in self.config.id2label.items()}

    # ----- tokens -----------------------------------------------------------------------------
    def slot_token(self) -> torch.Tensor:
        """(D,) the last prefix token before position embeddings (h0's slot 0)."""
        return self.base.embeddings.cls_token.reshape(-1)

    def mask_args(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(slot token (D,), positions (N+1, D)) for ``patch_mask_reference``: row 0 of the result is
        the formed last prefix token, rows 1..N the patches plus their position embeddings."""
        raise NotImplementedError

    def prefix_head(self) -> torch.Tensor | None:
        """(P-1, D) the formed prefix tokens before the slot, or None when P == 1."""
        return None

    def enter(self, tokens: torch.Tensor) -> torch.Tensor:
        """The encoder input from the assembled tokens (identity unless the family norms its input)."""
        return tokens

    def complete(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, 1+N, D) ``[slot; patches]`` -> (B, P+N, D) encoder input."""
        head = self.prefix_head()
        if head is not None:
            tokens = torch.cat([head.to(tokens.dtype).expand(tokens.shape[0], -1, -1), tokens], dim=1)
        return self.enter(tokens)

    # ----- blocks and head --------------------------------------------------------------------
    def run_layer(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        out = layer(h)
        return out[0] if isinstance(out, tuple) else out

    def head(self, last: torch.Tensor) -> torch.Tensor:
        """(B, T, D) last block output -> (B, C) logits."""
        raise NotImplementedError

    def head_modules(self) -> list[nn.Module]:
        """The modules after the blocks (final norm, classifier), for model-randomisation checks."""
        raise NotImplementedError

    def hf_forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, C) logits from the family's own transformers forward (plain inference, not this engine)."""
        return self.model(pixel_values=pixel_values).logits

    def trace_blocks(self, num_tokens: int) -> list[TraceBlock]:
        """The blocks written out for explicit attention (rollout, Chefer, Grad-CAM)."""
        out = []
        for layer in self.layers:
            q, k, v, o = _attention_linears(layer)
            ln1 = _first(layer, "layernorm_before", "norm1", "layer_norm1")
            ln2 = _first(layer, "layernorm_after", "norm2", "layer_norm2")
            out.append(TraceBlock(ln1, q, k, v, o, ln2, _mlp(layer),
                                  _scale(getattr(layer, "layer_scale1", None)), _scale(getattr(layer, "layer_scale2", None)),
                                  self._trace_bias(layer, num_tokens)))
        return out

    def _trace_bias(self, layer: nn.Module, num_tokens: int) -> torch.Tensor | None:
        return None

    def fingerprint_extra(self) -> bytes | None:
        """Bytes beyond the HF weights that change the logits (CLIP's class prompts), or None."""
        return None

    # ----- helpers ----------------------------------------------------------------------------
    def _grid(self) -> tuple[int, int]:
        ph, pw = _pair(self.config.patch_size)
        return self.run_size[0] // ph, self.run_size[1] // pw


class ViTFamily(Family):
    """``ViTForImageClassification``: [CLS; patches] + absolute positions, head on the normed CLS."""

    model_types = ("vit",)
    head_kind = "linear on the normed CLS token"
    hub_examples = ("google/vit-base-patch16-224", "facebook/deit-small-patch16-224")

    @classmethod
    def model_class(cls, config):
        from transformers import ViTForImageClassification

        return ViTForImageClassification

    @property
    def base(self):
        return self.model.vit

    def mask_args(self):
        return self.base.embeddings.cls_token.reshape(-1), self.base.embeddings.position_embeddings[0]

    def head(self, last):
        return self.model.classifier(self.base.layernorm(last)[:, 0])

    def head_modules(self):
        return [self.model.classifier, self.base.layernorm]


class DeiTFamily(Family):
    """DeiT with a distillation token: [CLS; DIST; patches] + absolute positions; with the teacher
    head (``DeiTForImageClassificationWithTeacher``) the logits are the mean of the CLS and
    distillation heads, as transformers computes at inference."""

    model_types = ("deit",)
    head_kind = "mean of the CLS and distillation heads"
    hub_examples = ("facebook/deit-base-distilled-patch16-224", "facebook/deit-tiny-distilled-patch16-224")

    @classmethod
    def model_class(cls, config):
        import transformers

        archs = getattr(config, "architectures", None) or ["DeiTForImageClassificationWithTeacher"]
        name = "DeiTForImageClassification" if archs[0] == "DeiTForImageClassification" else \
            "DeiTForImageClassificationWithTeacher"
        return getattr(transformers, name)

    @property
    def base(self):
        return self.model.deit

    @property
    def num_prefix(self):
        return 2

    @property
    def num_labels(self):
        head = getattr(self.model, "cls_classifier", None) or self.model.classifier
        return int(head.out_features)

    def slot_token(self):
        return self.base.embeddings.distillation_token.reshape(-1)

    def mask_args(self):
        return self.slot_token(), self.base.embeddings.position_embeddings[0, 1:]

    def prefix_head(self):
        emb = self.base.embeddings
        return (emb.cls_token[0] + emb.position_embeddings[0, :1]).unsqueeze(0)  # (1, 1, D)

    def head(self, last):
        s = self.base.layernorm(last)
        if hasattr(self.model, "distillation_classifier"):
            return (self.model.cls_classifier(s[:, 0]) + self.model.distillation_classifier(s[:, 1])) / 2
        return self.model.classifier(s[:, 0])

    def head_modules(self):
        heads = [getattr(self.model, n) for n in ("cls_classifier", "distillation_classifier", "classifier")
                 if hasattr(self.model, n)]
        return heads + [self.base.layernorm]


class Dinov2Family(Family):
    """DINOv2 classifier: [CLS; patches] + position embeddings interpolated (bicubic, by the
    checkpoint's own ``interpolate_pos_encoding``) to the run-time grid once at load; the head reads
    [CLS; mean of the patch tokens] after the final norm."""

    model_types = ("dinov2",)
    head_kind = "linear on [CLS; mean of patch tokens]"
    hub_examples = ("facebook/dinov2-small-imagenet1k-1-layer", "facebook/dinov2-base-imagenet1k-1-layer")
    interpolates = True

    def __init__(self, model, image_size):
        super().__init__(model, image_size)
        emb = self.base.embeddings
        N = self._grid()[0] * self._grid()[1]
        D = emb.cls_token.shape[-1]
        with torch.no_grad():
            dummy = torch.zeros(1, 1 + N, D, dtype=emb.position_embeddings.dtype)
            pos = emb.interpolate_pos_encoding(dummy, self.run_size[0], self.run_size[1])
        # A buffer, so that it follows .to(device, dtype) and exports as a constant.
        self.register_buffer("pos", pos[0].detach().clone(), persistent=False)

    @classmethod
    def model_class(cls, config):
        from transformers import Dinov2ForImageClassification

        return Dinov2ForImageClassification

    @property
    def base(self):
        return self.model.dinov2

    def mask_args(self):
        return self.base.embeddings.cls_token.reshape(-1), self.pos

    def _patch_start(self) -> int:
        return 1

    def head(self, last):
        s = self.base.layernorm(last)
        pooled = torch.cat([s[:, 0], s[:, self._patch_start():].mean(1)], dim=1)
        return self.model.classifier(pooled)

    def head_modules(self):
        return [self.model.classifier, self.base.layernorm]


class Dinov2RegistersFamily(Dinov2Family):
    """DINOv2 with registers: [CLS + pos; R registers (no positions); patches + pos]."""

    model_types = ("dinov2_with_registers",)
    hub_examples = ("facebook/dinov2-with-registers-small-imagenet1k-1-layer",)

    @classmethod
    def model_class(cls, config):
        from transformers import Dinov2WithRegistersForImageClassification

        return Dinov2WithRegistersForImageClassification

    @property
    def base(self):
        return self.model.dinov2_with_registers

    @property
    def num_prefix(self):
        return 1 + int(self.config.num_register_tokens)

    def _patch_start(self):
        return self.num_prefix

    def __init__(self, model, image_size):
        super().__init__(model, image_size)
        # the slot is the last register, which has no position: row 0 of the masking positions is zero
        if self.num_prefix > 1:
            self.register_buffer("mask_pos", torch.cat([torch.zeros_like(self.pos[:1]), self.pos[1:]]), persistent=False)

    def slot_token(self):
        if self.num_prefix == 1:
            return super().slot_token()
        return self.base.embeddings.register_tokens[0, -1]

    def mask_args(self):
        if self.num_prefix == 1:
            return super().mask_args()
        return self.slot_token(), self.mask_pos

    def prefix_head(self):
        if self.num_prefix == 1:
            return None
        emb = self.base.embeddings
        cls = (emb.cls_token[0, 0] + self.pos[0]).unsqueeze(0)
        return torch.cat([cls.to(emb.register_tokens.dtype), emb.register_tokens[0, :-1]]).unsqueeze(0)


class BeitFamily(Family):
    """BEiT / data2vec-vision: [CLS; patches], usually no absolute positions but a relative position
    bias inside attention (per layer or shared); the head mean-pools the patch tokens and norms them
    (``use_mean_pooling``) or reads the normed CLS."""

    model_types = ("beit", "data2vec-vision")
    head_kind = "linear on the normed mean of patch tokens"
    hub_examples = ("microsoft/beit-base-patch16-224", "facebook/data2vec-vision-base-ft1k")

    def __init__(self, model, image_size):
        super().__init__(model, image_size)
        base = self.base
        self._shared = _first(base, "shared_position_bias", "encoder.relative_position_bias")
        params = inspect.signature(self.layers[0].forward).parameters
        self._v5 = "attention_mask" in params  # 5.x: biases enter as attention_mask; 4.x: relative_position_bias=
        T = self._grid()[0] * self._grid()[1] + 1
        with torch.no_grad():
            shared = self._relative_bias(self._shared, T) if self._shared is not None else None
        if shared is not None:
            self.register_buffer("shared_bias", shared.detach().clone(), persistent=False)
        else:
            self.shared_bias = None
        if self.base.embeddings.position_embeddings is None:  # relative positions only: zeros for the masking op
            cls = self.base.embeddings.cls_token
            self.register_buffer("zero_pos", cls.new_zeros(T, cls.shape[-1]), persistent=False)

    @classmethod
    def model_class(cls, config):
        import transformers

        if config.model_type == "data2vec-vision":
            return transformers.Data2VecVisionForImageClassification
        return transformers.BeitForImageClassification

    @property
    def base(self):
        return getattr(self.model, "beit", None) or self.model.data2vec_vision

    def _relative_bias(self, module: nn.Module, num_tokens: int) -> torch.Tensor:
        """(1, H, T, T) bias of one relative-position module at the run-time window."""
        return module(self._grid(), interpolate_pos_encoding=False, dim_size=num_tokens).reshape(
            1, -1, num_tokens, num_tokens)

    def mask_args(self):
        emb = self.base.embeddings
        cls = emb.cls_token.reshape(-1)
        if emb.position_embeddings is not None:
            return cls, emb.position_embeddings[0]
        return cls, self.zero_pos

    def run_layer(self, layer, h):
        shared = None if self.shared_bias is None else self.shared_bias.to(h.dtype)
        if self._v5:
            out = layer(h, attention_mask=shared, resolution=self.run_size)
        else:
            out = layer(h, relative_position_bias=shared, resolution=self.run_size)
        return out[0] if isinstance(out, tuple) else out

    def head(self, last):
        return self.model.classifier(self.base.pooler(self.base.layernorm(last)))

    def head_modules(self):
        mods = [self.model.classifier]
        if getattr(self.base.pooler, "layernorm", None) is not None:
            mods.append(self.base.pooler.layernorm)
        if isinstance(self.base.layernorm, nn.LayerNorm):
            mods.append(self.base.layernorm)
        return mods

    def trace_blocks(self, num_tokens):
        blocks = super().trace_blocks(num_tokens)
        for b, layer in zip(blocks, self.layers):
            b.ls1, b.ls2 = _scale(layer.lambda_1), _scale(layer.lambda_2)
        return blocks

    def _trace_bias(self, layer, num_tokens):
        own = _first(layer, "relative_position_bias", "attention.attention.relative_position_bias")
        bias = self._relative_bias(own, num_tokens) if own is not None else None
        if self.shared_bias is not None:
            bias = self.shared_bias if bias is None else bias + self.shared_bias
        return bias


class ClipFamily(Family):
    """CLIP as a zero-shot classifier: [CLS; patches] + absolute positions, ``pre_layrnorm`` before the
    blocks; logits = logit_scale * cos(visual_projection(post_layernorm(CLS)), text embedding of each
    class prompt). The text embeddings are computed once at load from ``labels`` and ``prompt``.

    Args:
        text_embeds: (C, E) projected text embeddings of the class prompts (normalised here); computed
            by ``load_backbone`` or read back from the gates they were saved with.
        labels: the C class names; prompt: the template they were written into.
    """

    model_types = ("clip",)
    head_kind = "cosine with text embeddings of --labels prompts (zero-shot)"
    hub_examples = ("openai/clip-vit-base-patch32", "openai/clip-vit-base-patch16")

    def __init__(self, model, image_size, *, text_embeds: torch.Tensor | None = None, labels: Sequence[str] = (),
                 prompt: str = DEFAULT_PROMPT):
        super().__init__(model, image_size)
        if text_embeds is None or not labels:
            raise ValueError("a CLIP backbone is a zero-shot classifier: it needs class labels and their text "
                             "embeddings (load_backbone(..., labels=[...]))")
        t = text_embeds.detach().float()
        self.register_buffer("text", t / t.norm(dim=-1, keepdim=True), persistent=False)
        self.labels = tuple(str(x) for x in labels)
        self.prompt = str(prompt)
        # transformers 4.x layers take (hidden, attention_mask, causal_attention_mask); 5.x (hidden, attention_mask).
        self._v4 = "causal_attention_mask" in inspect.signature(self.layers[0].forward).parameters

    @classmethod
    def model_class(cls, config):
        from transformers import CLIPModel

        return CLIPModel

    @property
    def base(self):
        return self.model.vision_model

    @staticmethod
    def geometry(config):
        return config.vision_config

    @property
    def projection(self):
        return self.base.embeddings.patch_embedding

    @property
    def num_labels(self):
        return len(self.labels)

    @property
    def id2label(self):
        return dict(enumerate(self.labels))

    def slot_token(self):
        return self.base.embeddings.class_embedding.reshape(-1)

    def mask_args(self):
        return self.slot_token(), self.base.embeddings.position_embedding.weight

    def enter(self, tokens):
        return self.base.pre_layrnorm(tokens)

    def run_layer(self, layer, h):
        out = layer(h, None, None) if self._v4 else layer(h, None)
        return out[0] if isinstance(out, tuple) else out

    def head(self, last):
        e = self.model.visual_projection(self.base.post_layernorm(last[:, 0]))
        e = e / e.norm(dim=-1, keepdim=True)
        return self.model.logit_scale.exp() * (e @ self.text.to(e.dtype).t())

    def head_modules(self):
        return [self.model.visual_projection, self.base.post_layernorm]

    def hf_forward(self, pixel_values):
        out = self.model.get_image_features(pixel_values=pixel_values)
        e = out if torch.is_tensor(out) else out.pooler_output  # 4.x: a tensor; 5.x: an output object
        e = e / e.norm(dim=-1, keepdim=True)
        return self.model.logit_scale.exp() * (e @ self.text.to(e.dtype).t())

    def fingerprint_extra(self):
        # The labels and the prompt, not the embedding bytes: those follow from the weights (hashed) and
        # the prompts, and their last bits change with the CPU thread count that computed them.
        return hashlib.sha256(json.dumps({"labels": list(self.labels), "prompt": self.prompt}).encode()).digest()

    @staticmethod
    def text_embeddings(model: nn.Module, tokenizer, labels: Sequence[str], prompt: str = DEFAULT_PROMPT) -> torch.Tensor:
        """(C, E) projected text embeddings of ``prompt.format(label)`` for each label."""
        if "{}" not in prompt:
            raise ValueError(f"the CLIP prompt must contain '{{}}' where the label goes, got {prompt!r}")
        enc = tokenizer([prompt.format(x) for x in labels], padding=True, return_tensors="pt")
        with torch.no_grad():
            out = model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc.get("attention_mask"))
        return out if torch.is_tensor(out) else out.pooler_output  # 4.x: a tensor; 5.x: an output object


#: model_type -> adapter class.
FAMILIES: dict[str, type[Family]] = {
    t: c for c in (ViTFamily, DeiTFamily, Dinov2Family, Dinov2RegistersFamily, BeitFamily, ClipFamily)
    for t in c.model_types
}


def supported_model_types() -> tuple[str, ...]:
    return tuple(FAMILIES)


def family_class(model_type: str, name: str = "") -> type[Family]:
    """The adapter class of a ``model_type``; ``UnsupportedModelError`` naming the supported ones."""
    cls = FAMILIES.get(str(model_type))
    if cls is None:
        what = f"'{name}' is a {model_type!r} checkpoint" if name else f"model_type {model_type!r}"
        raise UnsupportedModelError(
            f"{what}, which vdm-engine does not support; supported model types: {', '.join(FAMILIES)} "
            "(plain ViT-style encoders with patch tokens; hierarchical models such as Swin are not)"
        )
    return cls


def family_for(model: nn.Module, image_size: tuple[int, int], **kwargs) -> Family:
    """The adapter for a loaded HF model (kwargs: CLIP's ``text_embeds``, ``labels``, ``prompt``)."""
    return family_class(getattr(model.config, "model_type", None))(model, image_size, **kwargs)
