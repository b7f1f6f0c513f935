"""Single-file Stable Diffusion checkpoints (the original Stability/CompVis layout) <-> diffusers.

Many models are published as one ``.safetensors`` file holding every network under the names of
the original code: ``model.diffusion_model.*`` (the UNet: ``input_blocks`` / ``middle_block`` /
``output_blocks``), ``first_stage_model.*`` (the VAE: ``encoder.down.N.block.M``,
``mid.attn_1``, ...) and the text encoder(s): ``cond_stage_model.transformer.*`` (SD 1.x, CLIP
ViT-L with transformers' names), ``cond_stage_model.model.*`` (SD 2.x, OpenCLIP ViT-H),
``conditioner.embedders.0.transformer.*`` + ``conditioner.embedders.1.model.*`` (SDXL: CLIP
ViT-L + OpenCLIP bigG). ``read_single_file`` renames them to the diffusers/transformers names
``load_pretrained`` reads from a diffusers folder and infers each network's config from the
tensor shapes; ``write_single_file`` is the reverse.

The renaming is a table of module prefixes (``input_blocks.4.1.`` <-> ``down_blocks.1.
attentions.0.``) with a small table of inner names per module kind, used in both directions, so
every key either maps or is reported: nothing is dropped silently.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from spin_jax.models.weights import PICKLE_EXTS, map_safetensors

FAMILIES = ("sd1", "sd2", "sdxl")

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# text encoder prefixes per family: network -> (prefix, layout)
TEXT_PREFIXES: dict[str, dict[str, tuple[str, str]]] = {
    "sd1": {"text_encoder": ("cond_stage_model.transformer.", "hf")},
    "sd2": {"text_encoder": ("cond_stage_model.model.", "openclip")},
    "sdxl": {
        "text_encoder": ("conditioner.embedders.0.transformer.", "hf"),
        "text_encoder_2": ("conditioner.embedders.1.model.", "openclip"),
    },
}

# Tensors of the file that are deliberately not converted (see read_single_file's docstring).
_SKIPPED_PREFIXES = ("model_ema.",)
_SKIPPED_KEYS = {
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "logvar",
    "denoiser.sigmas",
    "denoiser.log_sigmas",
}
_SKIPPED_TEXT_SUFFIXES = ("embeddings.position_ids", "logit_scale")

_MAX_LISTED = 8


@dataclass
class SingleFile:
    """What ``read_single_file`` found in one checkpoint.

    ``configs``: network -> the config dict a diffusers folder would hold (``unet/config.json``
    etc.), plus ``scheduler`` (a scheduler_config.json) and ``model_index`` (pipeline class and
    flags). ``state_dicts``: network -> {diffusers/transformers key: array}, read-only views of
    the memory-mapped file in its dtype (a fused OpenCLIP qkv is split into three views).
    ``skipped``: the file's keys that were deliberately not converted.
    """

    path: str
    family: str
    configs: dict[str, dict[str, Any]]
    state_dicts: dict[str, dict[str, np.ndarray]]
    skipped: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Module-kind tables: inner module names, original -> diffusers ("param": the prefix names one
# layer, whose weight/bias keep their names).

_INNER: dict[str, dict[str, str]] = {
    "param": {"": ""},
    "unet_res": {
        "in_layers.0": "norm1",
        "in_layers.2": "conv1",
        "emb_layers.1": "time_emb_proj",
        "out_layers.0": "norm2",
        "out_layers.3": "conv2",
        "skip_connection": "conv_shortcut",
    },
    "vae_res": {
        "norm1": "norm1",
        "conv1": "conv1",
        "norm2": "norm2",
        "conv2": "conv2",
        "nin_shortcut": "conv_shortcut",
    },
    "vae_attn": {
        "norm": "group_norm",
        "q": "to_q",
        "k": "to_k",
        "v": "to_v",
        "proj_out": "to_out.0",
    },
}
_INNER_BACK = {kind: {v: k for k, v in t.items()} for kind, t in _INNER.items()}
# Kinds whose inner names are the same on both sides, checked against a pattern.
_PATTERNS = {
    "transformer": re.compile(
        r"(norm|proj_in|proj_out)\.(weight|bias)"
        r"|transformer_blocks\.\d+\.("
        r"attn[12]\.to_[qkv]\.weight|attn[12]\.to_out\.0\.(weight|bias)"
        r"|norm[123]\.(weight|bias)|ff\.net\.0\.proj\.(weight|bias)|ff\.net\.2\.(weight|bias))"
    ),
    "clip_hf": re.compile(
        r"embeddings\.(token|position)_embedding\.weight"
        r"|encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|layer_norm[12]"
        r"|mlp\.fc[12])\.(weight|bias)"
        r"|final_layer_norm\.(weight|bias)"
    ),
}

Pair = tuple[str, str, str]  # (original prefix, diffusers prefix, kind)


def _inner(kind: str, inner: str, forward: bool) -> str | None:
    if kind in _PATTERNS:
        return inner if _PATTERNS[kind].fullmatch(inner) else None
    module, _, leaf = inner.rpartition(".")
    if leaf not in ("weight", "bias"):
        return None
    table = _INNER[kind] if forward else _INNER_BACK[kind]
    if module not in table:
        return None
    return f"{table[module]}.{leaf}" if table[module] else leaf


def _unet_pairs(levels: int, lpb: int, up_attn: set[int] | None = None) -> list[Pair]:
    """``up_attn``: the up levels with attentions (decides where the upsampler sits, ``.1.conv``
    or ``.2.conv``); None accepts both, for reading."""
    pairs: list[Pair] = [
        ("input_blocks.0.0.", "conv_in.", "param"),
        ("time_embed.0.", "time_embedding.linear_1.", "param"),
        ("time_embed.2.", "time_embedding.linear_2.", "param"),
        ("label_emb.0.0.", "add_embedding.linear_1.", "param"),
        ("label_emb.0.2.", "add_embedding.linear_2.", "param"),
        ("out.0.", "conv_norm_out.", "param"),
        ("out.2.", "conv_out.", "param"),
        ("middle_block.0.", "mid_block.resnets.0.", "unet_res"),
        ("middle_block.1.", "mid_block.attentions.0.", "transformer"),
        ("middle_block.2.", "mid_block.resnets.1.", "unet_res"),
    ]
    k = 1
    for lvl in range(levels):
        for j in range(lpb):
            pairs.append((f"input_blocks.{k}.0.", f"down_blocks.{lvl}.resnets.{j}.", "unet_res"))
            pairs.append(
                (f"input_blocks.{k}.1.", f"down_blocks.{lvl}.attentions.{j}.", "transformer")
            )
            k += 1
        if lvl < levels - 1:
            pairs.append((f"input_blocks.{k}.0.op.", f"down_blocks.{lvl}.downsamplers.0.conv.", "param"))  # fmt: skip
            k += 1
    for i in range(levels):
        for j in range(lpb + 1):
            k = i * (lpb + 1) + j
            pairs.append((f"output_blocks.{k}.0.", f"up_blocks.{i}.resnets.{j}.", "unet_res"))
            pairs.append((f"output_blocks.{k}.1.", f"up_blocks.{i}.attentions.{j}.", "transformer"))
        if i < levels - 1:
            k = i * (lpb + 1) + lpb
            slots = (1, 2) if up_attn is None else ((2,) if i in up_attn else (1,))
            for s in slots:
                pairs.append((f"output_blocks.{k}.{s}.conv.", f"up_blocks.{i}.upsamplers.0.conv.", "param"))  # fmt: skip
    return pairs


def _vae_pairs(levels: int, lpb: int) -> list[Pair]:
    pairs: list[Pair] = [
        ("quant_conv.", "quant_conv.", "param"),
        ("post_quant_conv.", "post_quant_conv.", "param"),
    ]
    for side in ("encoder", "decoder"):
        pairs += [
            (f"{side}.conv_in.", f"{side}.conv_in.", "param"),
            (f"{side}.conv_out.", f"{side}.conv_out.", "param"),
            (f"{side}.norm_out.", f"{side}.conv_norm_out.", "param"),
            (f"{side}.mid.block_1.", f"{side}.mid_block.resnets.0.", "vae_res"),
            (f"{side}.mid.block_2.", f"{side}.mid_block.resnets.1.", "vae_res"),
            (f"{side}.mid.attn_1.", f"{side}.mid_block.attentions.0.", "vae_attn"),
        ]
    for lvl in range(levels):
        for j in range(lpb):
            pairs.append((f"encoder.down.{lvl}.block.{j}.", f"encoder.down_blocks.{lvl}.resnets.{j}.", "vae_res"))  # fmt: skip
        if lvl < levels - 1:
            pairs.append((f"encoder.down.{lvl}.downsample.conv.", f"encoder.down_blocks.{lvl}.downsamplers.0.conv.", "param"))  # fmt: skip
    for i in range(levels):
        b = levels - 1 - i  # the original decoder numbers its levels from the bottom
        for j in range(lpb + 1):
            pairs.append((f"decoder.up.{b}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}.", "vae_res"))  # fmt: skip
        if i < levels - 1:
            pairs.append((f"decoder.up.{b}.upsample.conv.", f"decoder.up_blocks.{i}.upsamplers.0.conv.", "param"))  # fmt: skip
    return pairs


def _rename(
    tensors: Mapping[str, np.ndarray], pairs: list[Pair], forward: bool
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Renames every key by its longest known module prefix; returns (renamed, unknown keys)."""
    table = {(p[0] if forward else p[1]): p for p in pairs}
    out: dict[str, np.ndarray] = {}
    unknown: list[str] = []
    for key, value in tensors.items():
        new = None
        dots = [i for i, c in enumerate(key) if c == "."]
        for i in reversed(dots):
            pair = table.get(key[: i + 1])
            if pair is None:
                continue
            inner = _inner(pair[2], key[i + 1 :], forward)
            if inner is not None:
                new = (pair[1] if forward else pair[0]) + inner
                if pair[2] == "vae_attn" and value.ndim == (4 if forward else 2):
                    # the original VAE attention uses 1x1 convs, diffusers linear layers
                    value = value.reshape(value.shape[:2] if forward else (*value.shape, 1, 1))
            break
        if new is None or new in out:
            unknown.append(key)
        else:
            out[new] = value
    return out, unknown


def _unknown_error(where: str, unknown: list[str], what: str) -> ValueError:
    shown = ", ".join(unknown[:_MAX_LISTED])
    more = f" (and {len(unknown) - _MAX_LISTED} more)" if len(unknown) > _MAX_LISTED else ""
    return ValueError(f"{where}: {len(unknown)} {what}: {shown}{more}")


def _indices(keys, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


# --------------------------------------------------------------------------------------------
# Structure of the original UNet / VAE from their keys.


def _ldm_unet_structure(keys: list[str], where: str) -> tuple[int, int]:
    """(levels, layers per block) of an original UNet from its block numbering."""
    n_in = len(_indices(keys, r"input_blocks\.(\d+)\."))
    n_out = len(_indices(keys, r"output_blocks\.(\d+)\."))
    ops = _indices(keys, r"input_blocks\.(\d+)\.0\.op\.")
    lpb = ops[0] - 1 if ops else n_in - 1
    levels = n_in // (lpb + 1) if lpb > 0 else 0
    expected_ops = [(lvl + 1) * (lpb + 1) for lvl in range(levels - 1)]
    if lpb < 1 or n_in != levels * (lpb + 1) or ops != expected_ops or n_out != n_in:
        raise ValueError(
            f"{where}: the UNet's blocks are not laid out as Stable Diffusion's "
            f"({n_in} input blocks, downsamplers at {ops}, {n_out} output blocks)"
        )
    return levels, lpb


def _ldm_vae_structure(keys: list[str], where: str) -> tuple[int, int]:
    levels = len(_indices(keys, r"encoder\.down\.(\d+)\."))
    lpb = len(_indices(keys, r"encoder\.down\.0\.block\.(\d+)\."))
    if levels < 1 or lpb < 1:
        raise ValueError(f"{where}: the VAE has no encoder.down.N.block.M tensors")
    return levels, lpb


# --------------------------------------------------------------------------------------------
# Text encoders.


def _hf_text_from_file(t: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    # Older files store CLIPTextModel's inner module without the "text_model." level.
    return {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in t.items()}


_OPENCLIP_LAYER = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}
_OPENCLIP_LAYER_BACK = {v: k for k, v in _OPENCLIP_LAYER.items()}
_OPENCLIP_TOP = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "text_projection": "text_projection.weight",  # transposed: OpenCLIP computes x @ P
}
_OPENCLIP_TOP_BACK = {v: k for k, v in _OPENCLIP_TOP.items()}
_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)")
_HF_LAYER = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")


def _openclip_from_file(
    t: Mapping[str, np.ndarray], n_layers: int, keep_projection: bool
) -> tuple[dict[str, np.ndarray], list[str], list[str]]:
    """OpenCLIP text tower -> CLIPTextModel(WithProjection) names; (tensors, unknown, skipped).

    Resblocks from ``n_layers`` on, and the projection unless ``keep_projection``, are skipped.
    """
    out: dict[str, np.ndarray] = {}
    unknown: list[str] = []
    skipped: list[str] = []
    for key, value in t.items():
        if key in _OPENCLIP_TOP:
            if key == "text_projection" and not keep_projection:
                skipped.append(key)
            else:
                out[_OPENCLIP_TOP[key]] = value.T if key == "text_projection" else value
            continue
        m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", key)
        if m:
            layer, leaf = int(m.group(1)), m.group(2)
            if layer >= n_layers:
                skipped.append(key)
                continue
            if value.shape[0] % 3:
                unknown.append(key)
                continue
            width = value.shape[0] // 3  # fused [q; k; v] along the output axis
            for j, name in enumerate("qkv"):
                out[f"text_model.encoder.layers.{layer}.self_attn.{name}_proj.{leaf}"] = value[
                    j * width : (j + 1) * width
                ]
            continue
        m = _RESBLOCK.fullmatch(key)
        if m and m.group(2) in _OPENCLIP_LAYER:
            layer = int(m.group(1))
            if layer >= n_layers:
                skipped.append(key)
                continue
            out[f"text_model.encoder.layers.{layer}.{_OPENCLIP_LAYER[m.group(2)]}.{m.group(3)}"] = (
                value
            )
            continue
        unknown.append(key)
    return out, unknown, skipped


def _openclip_to_file(
    t: Mapping[str, np.ndarray], family: str
) -> tuple[dict[str, np.ndarray], list[str]]:
    out: dict[str, np.ndarray] = {}
    unknown: list[str] = []
    qkv: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for key, value in t.items():
        if key in _OPENCLIP_TOP_BACK:
            new = _OPENCLIP_TOP_BACK[key]
            out[new] = value.T if new == "text_projection" else value
            continue
        m = _HF_LAYER.fullmatch(key)
        if m:
            layer, module, leaf = int(m.group(1)), m.group(2), m.group(3)
            qm = re.fullmatch(r"self_attn\.([qkv])_proj", module)
            if qm:
                qkv.setdefault((layer, leaf), {})[qm.group(1)] = value
                continue
            if module in _OPENCLIP_LAYER_BACK:
                out[f"transformer.resblocks.{layer}.{_OPENCLIP_LAYER_BACK[module]}.{leaf}"] = value
                continue
        unknown.append(key)
    for (layer, leaf), parts in qkv.items():
        if set(parts) != set("qkv"):
            unknown += [
                f"text_model.encoder.layers.{layer}.self_attn.{n}_proj.{leaf}" for n in parts
            ]
            continue
        out[f"transformer.resblocks.{layer}.attn.in_proj_{leaf}"] = np.concatenate(
            [parts[n] for n in "qkv"], axis=0
        )
    if family == "sd2" and not unknown:
        # SD 2.x conditions on OpenCLIP's penultimate layer, so diffusers' text encoder has one
        # layer fewer than the file: write an all-zero last resblock (an identity: both
        # residual branches add zero) and an identity projection, which SD 2.x never reads.
        width = t["text_model.embeddings.token_embedding.weight"].shape[1]
        n = len(_indices(t, r"text_model\.encoder\.layers\.(\d+)\."))
        ff = t["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]
        dt = t["text_model.embeddings.token_embedding.weight"].dtype
        shapes = {
            "ln_1.weight": (width,),
            "ln_1.bias": (width,),
            "ln_2.weight": (width,),
            "ln_2.bias": (width,),
            "attn.in_proj_weight": (3 * width, width),
            "attn.in_proj_bias": (3 * width,),
            "attn.out_proj.weight": (width, width),
            "attn.out_proj.bias": (width,),
            "mlp.c_fc.weight": (ff, width),
            "mlp.c_fc.bias": (ff,),
            "mlp.c_proj.weight": (width, ff),
            "mlp.c_proj.bias": (width,),
        }
        for name, shape in shapes.items():
            out[f"transformer.resblocks.{n}.{name}"] = np.zeros(shape, dt)
        out.setdefault("text_projection", np.eye(width, dtype=dt))
    return out, unknown


# --------------------------------------------------------------------------------------------
# Configs inferred from diffusers-named tensors.


def _count(keys, pattern: str) -> int:
    return len(_indices(keys, pattern))


def _depth(keys, prefix: str) -> int:
    return _count(keys, re.escape(prefix) + r"transformer_blocks\.(\d+)\.")


def _unet_config(
    d: Mapping[str, np.ndarray], family: str, prediction_type: str, where: str
) -> dict:
    keys = list(d)
    levels = _count(keys, r"down_blocks\.(\d+)\.")
    lpb = _count(keys, r"down_blocks\.0\.resnets\.(\d+)\.")
    channels = [int(d[f"down_blocks.{lvl}.resnets.0.conv2.weight"].shape[0]) for lvl in range(levels)]  # fmt: skip
    down_attn = [any(k.startswith(f"down_blocks.{lvl}.attentions.") for k in keys) for lvl in range(levels)]  # fmt: skip
    up_attn = [any(k.startswith(f"up_blocks.{i}.attentions.") for k in keys) for i in range(levels)]
    if "mid_block.attentions.0.proj_in.weight" not in d:
        raise ValueError(f"{where}: the UNet's middle block has no attention (not an SD UNet)")
    mid_depth = _depth(keys, "mid_block.attentions.0.")
    depths = []
    for lvl in range(levels):
        ds = {_depth(keys, f"down_blocks.{lvl}.attentions.{j}.") for j in range(lpb)}
        if len(ds) > 1:
            raise ValueError(f"{where}: down block {lvl} has transformers of depths {sorted(ds)}")
        # levels without attention: 1, or the middle block's depth for the last one (diffusers
        # gives the middle block the last entry)
        depths.append(ds.pop() if down_attn[lvl] else (mid_depth if lvl == levels - 1 else 1))
    if depths[-1] != mid_depth:
        raise ValueError(
            f"{where}: the middle block's transformer depth {mid_depth} differs from the last "
            f"down block's {depths[-1]}, which diffusers' UNet2DConditionModel cannot express"
        )
    for i in range(levels):
        if not up_attn[i]:
            continue
        ds = {_depth(keys, f"up_blocks.{i}.attentions.{j}.") for j in range(lpb + 1)}
        if ds != {depths[levels - 1 - i]}:
            raise ValueError(
                f"{where}: up block {i} has transformer depths {sorted(ds)}, expected "
                f"{depths[levels - 1 - i]} (the mirrored down block's)"
            )
    proj_in = next(v for k, v in d.items() if k.endswith("proj_in.weight"))
    ctx = {int(v.shape[1]) for k, v in d.items() if k.endswith("attn2.to_k.weight")}
    if len(ctx) != 1:
        raise ValueError(f"{where}: cross-attention context widths differ: {sorted(ctx)}")
    if family == "sd1":
        heads: Any = 8
    else:  # SD 2.x / SDXL: head dim 64; diffusers' "attention_head_dim" means heads per block
        heads = [c // 64 for c in channels]
    time_dim = int(d["time_embedding.linear_1.weight"].shape[0])
    cfg: dict[str, Any] = {
        "_class_name": "UNet2DConditionModel",
        "sample_size": {
            "sd1": 64,
            "sd2": 96 if prediction_type == "v_prediction" else 64,
            "sdxl": 128,
        }[family],  # fmt: skip
        "in_channels": int(d["conv_in.weight"].shape[1]),
        "out_channels": int(d["conv_out.weight"].shape[0]),
        "conv_in_kernel": int(d["conv_in.weight"].shape[2]),
        "conv_out_kernel": int(d["conv_out.weight"].shape[2]),
        "block_out_channels": channels,
        "layers_per_block": lpb,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in down_attn],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attn],
        "transformer_layers_per_block": depths if any(x != 1 for x in depths) else 1,
        "attention_head_dim": heads,
        "cross_attention_dim": ctx.pop(),
        "use_linear_projection": proj_in.ndim == 2,
        # only matters in half precision; the 768-v SD 2.x models were trained with it
        "upcast_attention": family == "sd2" and prediction_type == "v_prediction",
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "act_fn": "silu",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
    }
    if time_dim != 4 * channels[0]:
        cfg["time_embedding_dim"] = time_dim
    if "add_embedding.linear_1.weight" in d:
        cfg["addition_embed_type"] = "text_time"
        cfg["projection_class_embeddings_input_dim"] = int(d["add_embedding.linear_1.weight"].shape[1])  # fmt: skip
        cfg["addition_embed_type_num_heads"] = 64
    return cfg


def _vae_config(d: Mapping[str, np.ndarray], family: str, prediction_type: str) -> dict:
    keys = list(d)
    levels = _count(keys, r"encoder\.down_blocks\.(\d+)\.")
    lpb = _count(keys, r"encoder\.down_blocks\.0\.resnets\.(\d+)\.")
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": int(d["encoder.conv_in.weight"].shape[1]),
        "out_channels": int(d["decoder.conv_out.weight"].shape[0]),
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [
            int(d[f"encoder.down_blocks.{lvl}.resnets.0.conv2.weight"].shape[0])
            for lvl in range(levels)
        ],
        "layers_per_block": lpb,
        "latent_channels": int(d["decoder.conv_in.weight"].shape[1]),
        "norm_num_groups": 32,
        "act_fn": "silu",
        "sample_size": {
            "sd1": 512,
            "sd2": 768 if prediction_type == "v_prediction" else 512,
            "sdxl": 1024,
        }[family],  # fmt: skip
        "scaling_factor": 0.13025 if family == "sdxl" else 0.18215,
        "force_upcast": True,
        "mid_block_add_attention": "encoder.mid_block.attentions.0.to_q.weight" in d,
        "use_quant_conv": "quant_conv.weight" in d,
        "use_post_quant_conv": "post_quant_conv.weight" in d,
    }


def _text_config(d: Mapping[str, np.ndarray], hidden_act: str, with_projection: bool) -> dict:
    vocab, width = (int(x) for x in d["text_model.embeddings.token_embedding.weight"].shape)
    proj = d.get("text_projection.weight")
    return {
        "architectures": ["CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": vocab,
        "hidden_size": width,
        "intermediate_size": int(d["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
        "projection_dim": int(proj.shape[0]) if proj is not None else width,
        "num_hidden_layers": _count(d, r"text_model\.encoder\.layers\.(\d+)\."),
        "num_attention_heads": width // 64,
        "max_position_embeddings": int(
            d["text_model.embeddings.position_embedding.weight"].shape[0]
        ),  # fmt: skip
        "hidden_act": hidden_act,
        "layer_norm_eps": 1e-5,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        # CLIP's vocabulary ends with <|startoftext|>, <|endoftext|>
        "bos_token_id": vocab - 2,
        "eos_token_id": vocab - 1,
        "pad_token_id": vocab - 1 if hidden_act == "quick_gelu" else 0,
    }


def _scheduler_config(family: str, prediction_type: str) -> dict:
    cfg = {
        "_class_name": "EulerDiscreteScheduler" if family == "sdxl" else "DDIMScheduler",
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": prediction_type,
        "steps_offset": 1,
        "timestep_spacing": "leading",
    }
    if family != "sdxl":
        cfg.update(clip_sample=False, set_alpha_to_one=False)
    return cfg


def _check_heads(configs: dict[str, dict], where: str) -> None:
    unet = configs["unet"]
    heads = unet.get("num_attention_heads") or unet["attention_head_dim"]
    chans = unet["block_out_channels"]
    per = list(heads) if isinstance(heads, (list, tuple)) else [heads] * len(chans)
    for c, h, t in zip(chans, per, unet["down_block_types"], strict=False):
        if "CrossAttn" in t and (h < 1 or c % h):
            raise ValueError(
                f"{where}: cannot infer the UNet's attention heads: {c} channels, {h} heads "
                "(SD 2.x/SDXL assume head dim 64); pass "
                "overrides={'unet': {'attention_head_dim': [...]}}"
            )
    for name in ("text_encoder", "text_encoder_2"):
        cfg = configs.get(name)
        if cfg and (cfg["num_attention_heads"] < 1 or cfg["hidden_size"] % cfg["num_attention_heads"]):  # fmt: skip
            raise ValueError(
                f"{where}: cannot infer {name}'s attention heads: width {cfg['hidden_size']}, "
                f"{cfg['num_attention_heads']} heads (head dim 64 assumed); pass "
                f"overrides={{'{name}': {{'num_attention_heads': ...}}}}"
            )


# --------------------------------------------------------------------------------------------
# Reading.


def _load(path: str, allow_pickle: bool) -> dict[str, np.ndarray]:
    if path.endswith(PICKLE_EXTS):
        if not allow_pickle:
            raise ValueError(
                f"{path} is a pickled checkpoint; unpickling runs arbitrary code, so it is refused. "
                "Convert it to safetensors, or pass allow_pickle=True if you trust it (needs torch)."
            )
        try:
            import torch
        except ImportError:
            raise ImportError(f"reading the pickled checkpoint {path} needs torch") from None
        try:  # tensors and plain containers only, even when pickles are allowed
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(
                f"{path}: torch.load(weights_only=True) cannot read it ({type(e).__name__}: "
                f"{str(e)[:200]}); convert it to safetensors with the tool that wrote it"
            ) from None
        state = state.get("state_dict", state)
        out = {}
        for k, v in state.items():
            if isinstance(v, torch.Tensor):
                v = v.float() if v.dtype == torch.bfloat16 else v
                out[k] = v.numpy()
        return out
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return map_safetensors(path, populate=False)


def _split(tensors: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    n = len(prefix)
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix)}


def _detect_family(keys: list[str], path: str) -> str:
    has = lambda p: any(k.startswith(p) for k in keys)  # noqa: E731
    if has("conditioner.embedders.0.model."):
        raise ValueError(f"{path}: an SDXL refiner checkpoint (one OpenCLIP encoder) is not supported")  # fmt: skip
    if has("conditioner.embedders."):  # a missing one of the two is reported by name later
        return "sdxl"
    if has("cond_stage_model.model."):
        return "sd2"
    if has("cond_stage_model.transformer."):
        return "sd1"
    raise ValueError(
        f"{path}: no text encoder found: expected keys under 'cond_stage_model.transformer.' "
        "(SD 1.x), 'cond_stage_model.model.' (SD 2.x) or 'conditioner.embedders.0.transformer.' "
        "+ 'conditioner.embedders.1.model.' (SDXL)"
    )


def file_family(path: str, *, allow_pickle: bool = False) -> str:
    """The family ("sd1" | "sd2" | "sdxl") of a single-file checkpoint, from its key names."""
    return _detect_family(list(_load(path, allow_pickle)), path)


def read_single_file(
    path: str,
    *,
    prediction_type: str | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    allow_pickle: bool = False,
) -> SingleFile:
    """Reads an original-layout SD 1.x / SD 2.x / SDXL checkpoint as diffusers-named networks.

    The family is told by the text encoder(s) (``cond_stage_model.transformer.`` SD 1.x,
    ``cond_stage_model.model.`` SD 2.x, ``conditioner.embedders.{0,1}.`` SDXL); the UNet must be
    under ``model.diffusion_model.`` and the VAE under ``first_stage_model.``. The architecture
    comes from the tensors (channels, layers per block, transformer depths, context width,
    linear or conv projections, in/out/latent channels, text widths/layers/vocabulary/positions,
    projection widths, SDXL's addition-embedding widths). What tensors cannot tell is assumed as
    the published models have it: UNet heads (SD 1.x: 8; SD 2.x/SDXL: channels // 64), text
    heads (width // 64), GroupNorm groups (32), ``hidden_act`` (``quick_gelu`` for CLIP ViT-L,
    ``gelu`` for OpenCLIP), VAE ``scaling_factor`` (0.18215; SDXL 0.13025), sample sizes.
    ``overrides`` ({network: {field: value}}) replaces inferred or assumed config fields.

    ``prediction_type`` (default ``"epsilon"``) cannot be read from the weights: the 768-v SD 2.x
    models (e.g. SD 2.0/2.1 768) need ``prediction_type="v_prediction"`` (which also sets the
    UNet's ``upcast_attention`` and the 768 px sample sizes).

    Skipped on purpose (listed in ``SingleFile.skipped``): EMA copies (``model_ema.*``), the
    training schedule buffers (``betas``, ``alphas_cumprod``, ``posterior_*``, ...,
    ``denoiser.sigmas``), ``position_ids`` and OpenCLIP's ``logit_scale``; for SD 2.x also the
    last OpenCLIP resblock and ``text_projection`` (SD 2.x conditions on the penultimate layer:
    diffusers' text encoder has one layer fewer). Any other key that does not map is an error.

    The tensors are memory-mapped: nothing is read until used, and the returned arrays are
    read-only views of the file in its dtype. Pickled checkpoints (``.ckpt`` etc.) are refused
    unless ``allow_pickle`` (then read with torch, which must be installed).
    """
    return convert_from_original(
        _load(path, allow_pickle), prediction_type=prediction_type, overrides=overrides, where=path
    )


def convert_from_original(
    tensors: Mapping[str, np.ndarray],
    *,
    prediction_type: str | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    where: str = "checkpoint",
) -> SingleFile:
    """``read_single_file`` on tensors already in memory ({original key: array}); ``where``
    names them in errors. Arrays are passed through as views (no copies)."""
    prediction_type = prediction_type or "epsilon"
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")  # fmt: skip
    path = where
    keys = list(tensors)
    family = _detect_family(keys, path)
    text_prefixes = TEXT_PREFIXES[family]
    known = (UNET_PREFIX, VAE_PREFIX, *(p for p, _ in text_prefixes.values()))
    skipped = [
        k
        for k in keys
        if k.startswith(_SKIPPED_PREFIXES)
        or k in _SKIPPED_KEYS
        or (k.startswith(known[2:]) and k.endswith(_SKIPPED_TEXT_SUFFIXES))
    ]
    skip = set(skipped)
    foreign = [k for k in keys if k not in skip and not k.startswith(known)]
    if foreign:
        raise _unknown_error(
            path, foreign, f"keys match no known prefix ({', '.join(known)}) of an {family} file"
        )
    parts = {}
    for name, prefix in (("unet", UNET_PREFIX), ("vae", VAE_PREFIX)) + tuple(
        (n, p) for n, (p, _) in text_prefixes.items()
    ):
        part = {k: v for k, v in _split(tensors, prefix).items() if prefix + k not in skip}
        if not part:
            raise ValueError(f"{path}: no {name} in this {family} file: expected keys under '{prefix}'")  # fmt: skip
        parts[name] = part

    state_dicts: dict[str, dict[str, np.ndarray]] = {}
    unknown: list[str] = []
    levels, lpb = _ldm_unet_structure(list(parts["unet"]), path)
    state_dicts["unet"], bad = _rename(parts["unet"], _unet_pairs(levels, lpb), forward=True)
    unknown += [UNET_PREFIX + k for k in bad]
    levels, lpb = _ldm_vae_structure(list(parts["vae"]), path)
    state_dicts["vae"], bad = _rename(parts["vae"], _vae_pairs(levels, lpb), forward=True)
    unknown += [VAE_PREFIX + k for k in bad]
    overrides = dict(overrides or {})
    for name, (prefix, layout) in text_prefixes.items():
        part = parts[name]
        if layout == "hf":
            sd = _hf_text_from_file(part)
            bad = [
                k for k in part if not _PATTERNS["clip_hf"].fullmatch(k.removeprefix("text_model."))
            ]
        else:
            n = _count(part, r"transformer\.resblocks\.(\d+)\.")
            n_keep = int(overrides.get(name, {}).get("num_hidden_layers", n - (family == "sd2")))
            sd, bad, dropped = _openclip_from_file(part, n_keep, keep_projection=family == "sdxl")
            skipped += [prefix + k for k in dropped]
        unknown += [prefix + k for k in bad]
        state_dicts[name] = sd
    if unknown:
        raise _unknown_error(path, unknown, "keys left over after mapping to diffusers names")

    configs: dict[str, dict[str, Any]] = {}
    act = "quick_gelu" if family == "sd1" else "gelu"
    infer = {
        "unet": lambda d: _unet_config(d, family, prediction_type, path),
        "vae": lambda d: _vae_config(d, family, prediction_type),
        # SDXL's first encoder is CLIP ViT-L (quick_gelu), its second OpenCLIP bigG
        "text_encoder": lambda d: _text_config(d, "quick_gelu" if family == "sdxl" else act, False),
        "text_encoder_2": lambda d: _text_config(d, "gelu", True),
    }
    for name, sd in state_dicts.items():
        try:
            configs[name] = infer[name](sd)
        except (KeyError, StopIteration) as e:
            what = (
                f"the tensor {e.args[0]!r} (diffusers name)" if e.args else "its attention layers"
            )
            raise ValueError(f"{path}: the {name} lacks {what}, which every {family} {name} has") from None  # fmt: skip
    configs["scheduler"] = _scheduler_config(family, prediction_type)
    configs["model_index"] = {
        "_class_name": "StableDiffusionXLPipeline"
        if family == "sdxl"
        else "StableDiffusionPipeline",
        **({"force_zeros_for_empty_prompt": True} if family == "sdxl" else {}),
    }
    for name, fields in overrides.items():
        if name not in configs:
            raise ValueError(f"overrides: unknown network {name!r} (this {family} file has {sorted(configs)})")  # fmt: skip
        configs[name].update(fields)
    if family == "sdxl":
        unet = configs["unet"]
        if not unet.get("addition_embed_type"):
            raise ValueError(f"{path}: an SDXL file whose UNet has no label_emb (addition embedding)")  # fmt: skip
        pooled = configs["text_encoder_2"]["projection_dim"]
        rest = unet["projection_class_embeddings_input_dim"] - pooled
        if "addition_time_embed_dim" not in (overrides.get("unet") or {}):
            if rest <= 0 or rest % 6:
                raise ValueError(
                    f"{path}: the UNet's addition embedding takes {unet['projection_class_embeddings_input_dim']} "
                    f"features, not the pooled text width {pooled} + 6 time ids"
                )
            unet["addition_time_embed_dim"] = rest // 6
    elif configs["unet"].get("addition_embed_type"):
        raise ValueError(f"{path}: the UNet has label_emb (a class/addition embedding), which {family} has not")  # fmt: skip
    _check_heads(configs, path)
    return SingleFile(path, family, configs, state_dicts, skipped)


# --------------------------------------------------------------------------------------------
# Writing.


def write_single_file(
    state_dicts: Mapping[str, Mapping[str, np.ndarray]],
    family: str,
    path: str,
    *,
    metadata: Mapping[str, str] | None = None,
) -> str:
    """Writes diffusers-named NumPy state dicts (``unet``, ``vae``, ``text_encoder`` and for SDXL
    ``text_encoder_2``) as one original-layout ``.safetensors`` file; returns ``path``.

    Text encoder keys may have transformers' ``text_model.`` level or not. For SD 2.x the file
    gets OpenCLIP's full depth: an all-zero last resblock (an identity) and an identity
    ``text_projection`` stand in for the layer and projection diffusers' text encoder does not
    have (``read_single_file`` skips them again). Every key must map: others are a ValueError.
    """
    from safetensors.numpy import save_file

    arrays = {
        k: np.ascontiguousarray(v) for k, v in convert_to_original(state_dicts, family).items()
    }
    save_file(arrays, path, metadata=dict(metadata) if metadata else None)
    return path


def convert_to_original(
    state_dicts: Mapping[str, Mapping[str, np.ndarray]], family: str
) -> dict[str, np.ndarray]:
    """``write_single_file`` without the file: {original key: array} (views where a rename
    is all it takes; fused qkv and the SD 2.x identity layer are new arrays)."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    needed = ("unet", "vae", *TEXT_PREFIXES[family])
    missing = [n for n in needed if n not in state_dicts]
    extra = [n for n in state_dicts if n not in needed]
    if missing or extra:
        raise ValueError(f"write_single_file({family}): needs networks {list(needed)}; missing {missing}, unexpected {extra}")  # fmt: skip
    out: dict[str, np.ndarray] = {}
    unknown: list[str] = []

    unet = state_dicts["unet"]
    levels = _count(unet, r"down_blocks\.(\d+)\.")
    lpb = _count(unet, r"down_blocks\.0\.resnets\.(\d+)\.")
    up_attn = {i for i in range(levels) if any(k.startswith(f"up_blocks.{i}.attentions.") for k in unet)}  # fmt: skip
    mapped, bad = _rename(unet, _unet_pairs(levels, lpb, up_attn), forward=False)
    out.update({UNET_PREFIX + k: v for k, v in mapped.items()})
    unknown += [f"unet: {k}" for k in bad]

    vae = state_dicts["vae"]
    levels = _count(vae, r"encoder\.down_blocks\.(\d+)\.")
    lpb = _count(vae, r"encoder\.down_blocks\.0\.resnets\.(\d+)\.")
    mapped, bad = _rename(vae, _vae_pairs(levels, lpb), forward=False)
    out.update({VAE_PREFIX + k: v for k, v in mapped.items()})
    unknown += [f"vae: {k}" for k in bad]

    for name, (prefix, layout) in TEXT_PREFIXES[family].items():
        sd = {
            (
                k
                if k.startswith("text_model.") or k == "text_projection.weight"
                else "text_model." + k
            ): v  # fmt: skip
            for k, v in state_dicts[name].items()
        }
        if layout == "hf":
            bad = [
                k
                for k in sd
                if not _PATTERNS["clip_hf"].fullmatch(k.removeprefix("text_model."))
                or not k.startswith("text_model.")
            ]
            mapped = {k: v for k, v in sd.items() if k not in bad}
        else:
            mapped, bad = _openclip_to_file(sd, family)
        out.update({prefix + k: v for k, v in mapped.items()})
        unknown += [f"{name}: {k}" for k in bad]
    if unknown:
        raise _unknown_error(f"write_single_file({family})", unknown, "keys have no original-layout name")  # fmt: skip
    return out
