"""Tiny seeded models of every supported family (and Swin), built offline with ``save_pretrained``, and
the transformers-side computations the family tests compare with."""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

FAMILIES = ("deit", "dinov2", "dinov2_with_registers", "beit", "data2vec-vision", "clip")
LABELS = ("cat", "dog", "car", "tree", "boat")
COMMON = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=96, image_size=32,
              patch_size=8, num_channels=3, hidden_act="gelu")
PROCESSOR = {"do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
             "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3], "resample": 2}


def _classifier_kwargs():
    return dict(num_labels=len(LABELS), id2label=dict(enumerate(LABELS)), label2id={v: i for i, v in enumerate(LABELS)})


def _tokenizer(directory: Path):
    """A character-level CLIP BPE tokenizer (no merges): every prompt tokenises, offline."""
    from transformers import CLIPTokenizer

    chars = list(string.ascii_lowercase + string.digits + ".,-' ")
    vocab = {}
    for c in chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]:
        vocab.setdefault(c, len(vocab))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt")), len(vocab)


def build_model(kind: str, tmp: Path):
    """(model, processor dict) of one family with random weights."""
    import transformers as T

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(sum(map(ord, kind)))  # transformers' init draws from the global generator
        return _build(T, kind, tmp)


def _build(T, kind: str, tmp: Path):
    processor = dict(PROCESSOR, size={"height": 32, "width": 32})
    if kind == "deit":
        model = T.DeiTForImageClassificationWithTeacher(T.DeiTConfig(**COMMON, **_classifier_kwargs()))
    elif kind in ("dinov2", "dinov2_with_registers"):
        # Native grid 5x5 (40 px), run at 32 px: positions are interpolated to 4x4 as transformers does.
        kw = dict(COMMON, image_size=40, mlp_ratio=2, layerscale_value=0.5, **_classifier_kwargs())
        kw.pop("intermediate_size")
        if kind == "dinov2":
            model = T.Dinov2ForImageClassification(T.Dinov2Config(**kw))
        else:
            model = T.Dinov2WithRegistersForImageClassification(T.Dinov2WithRegistersConfig(num_register_tokens=3, **kw))
        processor = dict(PROCESSOR, size={"shortest_edge": 36}, do_center_crop=True, crop_size={"height": 32, "width": 32})
    elif kind == "beit":
        model = T.BeitForImageClassification(T.BeitConfig(
            **COMMON, use_relative_position_bias=True, use_absolute_position_embeddings=False,
            use_mean_pooling=True, layer_scale_init_value=0.1, **_classifier_kwargs()))
    elif kind == "data2vec-vision":
        model = T.Data2VecVisionForImageClassification(T.Data2VecVisionConfig(
            **COMMON, use_shared_relative_position_bias=True, use_relative_position_bias=False,
            use_absolute_position_embeddings=False, use_mean_pooling=True, layer_scale_init_value=0.1,
            **_classifier_kwargs()))
    elif kind == "clip":
        tok, vocab_size = _tokenizer(tmp / "tokenizer-src")
        text = dict(vocab_size=vocab_size, hidden_size=40, intermediate_size=80, num_hidden_layers=2,
                    num_attention_heads=2, max_position_embeddings=40, bos_token_id=vocab_size - 2,
                    eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
        vision = {k: v for k, v in COMMON.items()}
        model = T.CLIPModel(T.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24))
        processor = dict(PROCESSOR, size={"shortest_edge": 32}, do_center_crop=True, crop_size={"height": 32, "width": 32})
        model.__dict__["_vdm_tokenizer"] = tok
    elif kind == "swin":
        model = T.SwinForImageClassification(T.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                                                          num_heads=[1, 2], window_size=4, **_classifier_kwargs()))
    else:
        raise ValueError(kind)
    g = torch.Generator().manual_seed(sum(map(ord, kind)))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval(), processor


def save_model(kind: str, directory: Path) -> Path:
    model, processor = build_model(kind, directory.parent)
    model.save_pretrained(directory, safe_serialization=True)
    (directory / "preprocessor_config.json").write_text(json.dumps(processor))
    tok = model.__dict__.get("_vdm_tokenizer")
    if tok is not None:
        tok.save_pretrained(directory)
    return directory


def load(kind: str, directory: Path, **kw):
    from vdm_engine.backbone import load_backbone

    if kind == "clip":
        kw.setdefault("labels", list(LABELS))
    return load_backbone(str(directory), local_files_only=True, **kw)


def hf_model(kind: str, directory: Path, attn: str = "eager"):
    """The family's own transformers model, loaded independently of vdm_engine."""
    import transformers as T

    cls = {"deit": T.DeiTForImageClassificationWithTeacher, "dinov2": T.Dinov2ForImageClassification,
           "dinov2_with_registers": T.Dinov2WithRegistersForImageClassification, "beit": T.BeitForImageClassification,
           "data2vec-vision": T.Data2VecVisionForImageClassification, "clip": T.CLIPModel}[kind]
    return cls.from_pretrained(str(directory), attn_implementation=attn).eval()


_PROMPTS: dict[str, dict] = {}


def hf_logits_and_states(kind: str, model, directory: Path, pixel_values: torch.Tensor, *, attentions: bool = False):
    """transformers' own logits (B, C), ``output_hidden_states`` (L+1 of (B, T, D)) and, with
    ``attentions``, ``output_attentions`` (L of (B, H, T, T); needs eager attention)."""
    with torch.no_grad():
        if kind == "clip":
            if str(directory) not in _PROMPTS:
                from transformers import AutoTokenizer

                tok = AutoTokenizer.from_pretrained(str(directory))
                _PROMPTS[str(directory)] = dict(tok([f"a photo of a {x}." for x in LABELS], padding=True,
                                                    return_tensors="pt"))
            out = model(**_PROMPTS[str(directory)], pixel_values=pixel_values, output_hidden_states=True,
                        output_attentions=attentions)
            vision = out.vision_model_output
            return (out.logits_per_image, vision.hidden_states) + ((vision.attentions,) if attentions else ())
        out = model(pixel_values=pixel_values, output_hidden_states=True, output_attentions=attentions)
        return (out.logits, out.hidden_states) + ((out.attentions,) if attentions else ())


def prefix_tokens(kind: str) -> int:
    return {"deit": 2, "dinov2_with_registers": 4}.get(kind, 1)
