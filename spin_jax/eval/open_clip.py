"""open_clip checkpoints (HPSv2) on the project's CLIP code: config and state-dict names.

open_clip's ``CLIP`` and transformers' ``CLIPModel`` compute the same network; only the names
and two layouts differ. :func:`open_clip_to_hf` renames an open_clip state dict:

  visual.conv1                         -> vision_model.embeddings.patch_embedding
  visual.class_embedding               -> vision_model.embeddings.class_embedding
  visual.positional_embedding          -> vision_model.embeddings.position_embedding.weight
  visual.ln_pre / visual.ln_post       -> vision_model.pre_layrnorm / .post_layernorm
  visual.proj [width, dim]             -> visual_projection.weight (transposed: x @ proj)
  token_embedding / positional_embedding -> text_model.embeddings.token/position_embedding
  ln_final                             -> text_model.final_layer_norm
  text_projection [width, dim]         -> text_projection.weight (transposed)
  {visual.,}transformer.resblocks.N.   -> {vision,text}_model.encoder.layers.N.
      ln_1 / ln_2                      -> layer_norm1 / layer_norm2
      attn.in_proj_weight/bias [3D..]  -> self_attn.{q,k,v}_proj (split in q, k, v order)
      attn.out_proj                    -> self_attn.out_proj
      mlp.c_fc / mlp.c_proj            -> mlp.fc1 / mlp.fc2
  logit_scale                          -> logit_scale

The text tower of open_clip is causal and pools at ``argmax(token ids)`` (the end-of-text token
has the largest id); :func:`clip_config_from_open_clip` sets ``eos_token_id = 2``, which makes
the project's CLIP text model pool the same way (the transformers convention for such configs).
Activation: exact GELU unless the config says ``quick_gelu``; LayerNorm eps 1e-5.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from spin_jax.models.clip import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

# open_clip's model_configs/ViT-H-14.json (the tower HPSv2 fine-tunes).
VIT_H_14 = {
    "embed_dim": 1024,
    "vision_cfg": {
        "image_size": 224,
        "layers": 32,
        "width": 1280,
        "head_width": 80,
        "patch_size": 14,
    },
    "text_cfg": {
        "context_length": 77,
        "vocab_size": 49408,
        "width": 1024,
        "heads": 16,
        "layers": 24,
    },
}

_BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_TOP = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {
    "visual.proj": "visual_projection.weight",
    "text_projection": "text_projection.weight",
}
_RESBLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")
# Buffers and heads open_clip checkpoints may carry that the scorer does not use.
_SKIPPED = ("attn_mask",)


def open_clip_to_hf(
    state_dict: Mapping[str, np.ndarray], *, source: str = "checkpoint"
) -> dict[str, np.ndarray]:
    """open_clip ``CLIP`` state dict (numpy) -> transformers ``CLIPModel`` names and layouts.

    A ``module.`` prefix (DDP checkpoints) is removed. Unknown keys raise a ValueError naming
    them (an open_clip variant this mapping does not cover: attentional pooling, CoCa, ...).
    """
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    out: dict[str, np.ndarray] = {}
    unknown = []
    for key, value in state_dict.items():
        value = np.asarray(value)
        if key in _TOP:
            out[_TOP[key]] = value
        elif key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = np.ascontiguousarray(value.T)
        elif key.endswith(_SKIPPED):
            continue
        elif m := _RESBLOCK.match(key):
            tower = "vision_model" if m.group(1) else "text_model"
            prefix = f"{tower}.encoder.layers.{m.group(2)}."
            rest = m.group(3)
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                leaf = "weight" if rest.endswith("weight") else "bias"
                if value.shape[0] % 3:
                    raise ValueError(
                        f"{source}: '{key}' has shape {value.shape}; the first "
                        "axis must hold q, k and v"
                    )
                for name, part in zip(
                    ("q_proj", "k_proj", "v_proj"), np.split(value, 3), strict=True
                ):
                    out[f"{prefix}self_attn.{name}.{leaf}"] = part
                continue
            module, _, leaf = rest.rpartition(".")
            if module not in _BLOCK:
                unknown.append(key)
                continue
            out[f"{prefix}{_BLOCK[module]}.{leaf}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"{source}: tensors that are not part of an open_clip ViT CLIP "
            f"({len(unknown)}): {', '.join(sorted(unknown)[:10])}"
        )
    return out


def _get_int(cfg: Mapping[str, Any], key: str, default: Any, source: str) -> int:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{source}: '{key}' = {value!r} must be a positive integer")
    return value


def clip_config_from_open_clip(
    config: Mapping[str, Any], *, source: str = "open_clip config"
) -> CLIPConfig:
    """open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``, ``quick_gelu``) ->
    the project's :class:`CLIPConfig`. Defaults are open_clip's own (head width 64, mlp ratio 4,
    text width 512, 8 heads, 12 layers, 77 tokens, vocab 49408)."""
    if not isinstance(config, Mapping) or not isinstance(config.get("vision_cfg"), Mapping):
        raise ValueError(
            f"{source}: expected an open_clip model config with 'embed_dim', "
            "'vision_cfg' and 'text_cfg'"
        )
    vision, text = config["vision_cfg"], config.get("text_cfg") or {}
    for cfg, name in ((vision, "vision_cfg"), (text, "text_cfg")):
        bad = [
            k
            for k in (
                "attentional_pool",
                "global_average_pool",
                "no_ln_pre",
                "proj_bias",
                "embed_cls",
                "hf_model_name",
            )
            if cfg.get(k)
        ]
        if cfg.get("pool_type", "argmax" if name == "text_cfg" else "tok") not in ("argmax", "tok"):
            bad.append("pool_type")
        if bad:
            raise ValueError(
                f"{source}: {name} options {bad} are not supported (plain ViT CLIP "
                "only, as HPSv2's ViT-H-14)"
            )
    act = "quick_gelu" if config.get("quick_gelu") else "gelu"
    v_width = _get_int(vision, "width", 768, source)
    head_width = _get_int(vision, "head_width", 64, source)
    if v_width % head_width:
        raise ValueError(
            f"{source}: vision width {v_width} is not a multiple of head_width {head_width}"
        )
    t_width = _get_int(text, "width", 512, source)
    image_size = vision.get("image_size", 224)
    if isinstance(image_size, list | tuple):
        if len(set(image_size)) != 1:
            raise ValueError(f"{source}: non-square image_size {image_size} is not supported")
        image_size = image_size[0]
    image_size = _get_int({"image_size": image_size}, "image_size", 224, source)
    patch_size = _get_int(vision, "patch_size", 16, source)
    if image_size % patch_size:
        raise ValueError(
            f"{source}: image_size {image_size} is not a multiple of patch_size {patch_size}"
        )
    mlp_v = float(vision.get("mlp_ratio", 4.0))
    mlp_t = float(text.get("mlp_ratio", 4.0))
    return CLIPConfig(
        text=CLIPTextConfig(
            vocab_size=_get_int(text, "vocab_size", 49408, source),
            hidden_size=t_width,
            intermediate_size=int(t_width * mlp_t),
            num_hidden_layers=_get_int(text, "layers", 12, source),
            num_attention_heads=_get_int(text, "heads", 8, source),
            max_position_embeddings=_get_int(text, "context_length", 77, source),
            hidden_act=act,
            layer_norm_eps=1e-5,
            eos_token_id=2,  # pool at argmax(ids), as open_clip
        ),
        vision=CLIPVisionConfig(
            hidden_size=v_width,
            intermediate_size=int(v_width * mlp_v),
            num_hidden_layers=_get_int(vision, "layers", 12, source),
            num_attention_heads=v_width // head_width,
            num_channels=3,
            image_size=image_size,
            patch_size=patch_size,
            hidden_act=act,
            layer_norm_eps=1e-5,
        ),
        projection_dim=_get_int(config, "embed_dim", 512, source),
    )


def hf_to_open_clip(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Inverse of :func:`open_clip_to_hf` (q, k, v fused back into ``in_proj``)."""
    top = {v: k for k, v in _TOP.items()}
    transposed = {v: k for k, v in _TRANSPOSED.items()}
    block = {v: k for k, v in _BLOCK.items()}
    layer = re.compile(r"^(vision|text)_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
    out: dict[str, np.ndarray] = {}
    qkv: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for key, value in state_dict.items():
        value = np.asarray(value)
        if key in top:
            out[top[key]] = value
        elif key in transposed:
            out[transposed[key]] = np.ascontiguousarray(value.T)
        elif m := layer.match(key):
            prefix = (
                "visual." if m.group(1) == "vision" else ""
            ) + f"transformer.resblocks.{m.group(2)}."
            module, leaf = m.group(3), m.group(4)
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((prefix, leaf), {})[module.split(".")[1][0]] = value
            elif module in block:
                out[f"{prefix}{block[module]}.{leaf}"] = value
            else:
                raise ValueError(f"hf_to_open_clip: no open_clip name for {key}")
        elif not key.endswith("position_ids"):
            raise ValueError(f"hf_to_open_clip: no open_clip name for {key}")
    for (prefix, leaf), parts in qkv.items():
        out[f"{prefix}attn.in_proj_{leaf}"] = np.concatenate([parts["q"], parts["k"], parts["v"]])
    return out
