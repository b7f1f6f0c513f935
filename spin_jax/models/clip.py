"""CLIP text and vision transformers in Flax Linen, named like transformers' PyTorch CLIP.

Module paths mirror the transformers state-dict keys, so ``convert.torch_to_flax`` maps weights
with no model-specific renames: ``text_model.encoder.layers.3.self_attn.q_proj.weight`` lives at
``params["text_model"]["encoder"]["layers_3"]["self_attn"]["q_proj"]["kernel"]``.

- :class:`CLIPTextModel`: the Stable Diffusion text encoder (``text_encoder/``), and the text
  tower of :class:`CLIPModel`.
- :class:`CLIPTextModelWithProjection`: SDXL's second text encoder (``text_encoder_2/``,
  OpenCLIP bigG): the text tower plus ``text_projection`` of the pooled output.
- :class:`CLIPVisionModel`: the image tower; images are NHWC floats already resized and
  normalised with the CLIP mean/std.
- :class:`CLIPModel`: both towers with their projections and ``logit_scale`` (HF ``CLIPModel``
  layout, as PickScore and the aesthetic predictor publish it).

Checkpoint layouts: published SD repositories store the standalone text encoder with a
``text_model.`` prefix; transformers 5 writes it without. :func:`params_from_state_dict` accepts
both, :func:`params_to_state_dict` writes either.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from spin_jax.models import convert
from spin_jax.models.attention import attention
from spin_jax.platform import check_attention_impl

Params = dict[str, Any]


def quick_gelu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # exact erf, as torch's default
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


# ---------------------------------------------------------------------------------------------
# Configurations (the subset of transformers' CLIP configs the networks depend on).


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    projection_dim: int = 512  # used by CLIPTextModelWithProjection only


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    text: CLIPTextConfig = CLIPTextConfig()
    vision: CLIPVisionConfig = CLIPVisionConfig()
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592


def _bad(source: str, key: str, value: Any, expected: str) -> ValueError:
    return ValueError(f"{source}: '{key}' = {value!r} is not supported; expected {expected}")


def _parse(cls: type, config: Mapping[str, Any], source: str, prefix: str, model_type: str):
    if not isinstance(config, Mapping):
        raise ValueError(f"{source}: '{prefix or 'config'}' must be a JSON object, got {config!r}")
    found = config.get("model_type", model_type)
    if found != model_type:
        raise _bad(source, f"{prefix}model_type", found, repr(model_type))
    values = {}
    for field in dataclasses.fields(cls):
        value = config.get(field.name, field.default)
        key = prefix + field.name
        if field.name == "hidden_act":
            if value not in ACTIVATIONS:
                raise _bad(source, key, value, f"one of {sorted(ACTIVATIONS)}")
        elif field.name == "layer_norm_eps":
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise _bad(source, key, value, "a positive number")
            value = float(value)
        elif field.name == "eos_token_id":
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise _bad(source, key, value, "a non-negative integer")
        elif isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise _bad(source, key, value, "a positive integer")
        values[field.name] = value
    if values["hidden_size"] % values["num_attention_heads"]:
        raise _bad(
            source,
            prefix + "hidden_size",
            values["hidden_size"],
            f"a multiple of num_attention_heads ({values['num_attention_heads']})",
        )
    if cls is CLIPVisionConfig and values["image_size"] % values["patch_size"]:
        raise _bad(
            source,
            prefix + "image_size",
            values["image_size"],
            f"a multiple of patch_size ({values['patch_size']})",
        )
    return cls(**values)


def text_config_from_dict(
    config: Mapping[str, Any], *, source: str = "text_encoder/config.json", prefix: str = ""
) -> CLIPTextConfig:
    """Validates a transformers ``CLIPTextConfig`` JSON dict (missing keys take its defaults)."""
    return _parse(CLIPTextConfig, config, source, prefix, "clip_text_model")


def vision_config_from_dict(
    config: Mapping[str, Any], *, source: str = "config.json", prefix: str = ""
) -> CLIPVisionConfig:
    """Validates a transformers ``CLIPVisionConfig`` JSON dict (missing keys take its defaults)."""
    return _parse(CLIPVisionConfig, config, source, prefix, "clip_vision_model")


def clip_config_from_dict(config: Mapping[str, Any], *, source: str = "config.json") -> CLIPConfig:
    """Validates a transformers ``CLIPConfig`` JSON dict (``text_config`` + ``vision_config``)."""
    if not isinstance(config, Mapping):
        raise ValueError(f"{source}: the config must be a JSON object, got {config!r}")
    if config.get("model_type", "clip") != "clip":
        raise _bad(source, "model_type", config.get("model_type"), "'clip'")
    projection_dim = config.get("projection_dim", 512)
    if (
        isinstance(projection_dim, bool)
        or not isinstance(projection_dim, int)
        or projection_dim <= 0
    ):
        raise _bad(source, "projection_dim", projection_dim, "a positive integer")
    scale = config.get("logit_scale_init_value", 2.6592)
    if isinstance(scale, bool) or not isinstance(scale, int | float):
        raise _bad(source, "logit_scale_init_value", scale, "a number")
    return CLIPConfig(
        text=text_config_from_dict(
            config.get("text_config") or {}, source=source, prefix="text_config."
        ),
        vision=vision_config_from_dict(
            config.get("vision_config") or {}, source=source, prefix="vision_config."
        ),
        projection_dim=projection_dim,
        logit_scale_init_value=float(scale),
    )


def _check_impl(attention_impl: str | None) -> None:
    check_attention_impl(attention_impl)


# ---------------------------------------------------------------------------------------------
# Outputs (pytrees, so they pass through jit).


@struct.dataclass
class CLIPTextOutput:
    last_hidden_state: jax.Array  # [B, L, D], after final_layer_norm
    pooler_output: jax.Array  # [B, D], the EOS position of last_hidden_state
    hidden_states: tuple[jax.Array, ...] | None = None  # embeddings + each layer, before final LN


@struct.dataclass
class CLIPTextModelOutput:
    """transformers' ``CLIPTextModelOutput`` (plus the unprojected ``pooler_output``)."""

    text_embeds: jax.Array  # [B, P], text_projection(pooler_output), not normalised
    last_hidden_state: jax.Array  # [B, L, D], after final_layer_norm
    pooler_output: jax.Array  # [B, D], the EOS position of last_hidden_state
    hidden_states: tuple[jax.Array, ...] | None = None  # embeddings + each layer, before final LN


@struct.dataclass
class CLIPVisionOutput:
    last_hidden_state: jax.Array  # [B, 1 + N, D], no post_layernorm (as transformers)
    pooler_output: jax.Array  # [B, D], post_layernorm of the class token
    hidden_states: tuple[jax.Array, ...] | None = None  # encoder input + each layer


@struct.dataclass
class CLIPOutput:
    text_embeds: jax.Array  # [B_text, P], projected and L2-normalised
    image_embeds: jax.Array  # [B_image, P], projected and L2-normalised
    logits_per_text: jax.Array  # [B_text, B_image] = exp(logit_scale) * cos
    logits_per_image: jax.Array  # [B_image, B_text]


# ---------------------------------------------------------------------------------------------
# Shared encoder.


def _dense(features: int, name: str, dtype: Any, use_bias: bool = True) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name)


def _layer_norm(eps: float, name: str, dtype: Any) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=jnp.float32, name=name)


class CLIPAttention(nn.Module):
    hidden_size: int
    num_heads: int
    causal: bool = False
    dtype: Any = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, d = x.shape
        heads = (b, n, self.num_heads, d // self.num_heads)
        q = _dense(d, "q_proj", self.dtype)(x).reshape(heads)
        k = _dense(d, "k_proj", self.dtype)(x).reshape(heads)
        v = _dense(d, "v_proj", self.dtype)(x).reshape(heads)
        out = attention(q, k, v, implementation=self.attention_impl, is_causal=self.causal)
        return _dense(d, "out_proj", self.dtype)(out.reshape(b, n, d))


class CLIPMLP(nn.Module):
    hidden_size: int
    intermediate_size: int
    hidden_act: str
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = _dense(self.intermediate_size, "fc1", self.dtype)(x)
        x = ACTIVATIONS[self.hidden_act](x)
        return _dense(self.hidden_size, "fc2", self.dtype)(x)


class CLIPEncoderLayer(nn.Module):
    config: CLIPTextConfig | CLIPVisionConfig
    causal: bool = False
    dtype: Any = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        h = _layer_norm(c.layer_norm_eps, "layer_norm1", self.dtype)(x)
        x = x + CLIPAttention(
            c.hidden_size,
            c.num_attention_heads,
            self.causal,
            self.dtype,
            self.attention_impl,
            name="self_attn",
        )(h)
        h = _layer_norm(c.layer_norm_eps, "layer_norm2", self.dtype)(x)
        return x + CLIPMLP(
            c.hidden_size, c.intermediate_size, c.hidden_act, self.dtype, name="mlp"
        )(h)


class CLIPEncoder(nn.Module):
    """``layers_0 .. layers_{n-1}``; returns the output and every intermediate state."""

    config: CLIPTextConfig | CLIPVisionConfig
    causal: bool = False
    dtype: Any = jnp.float32
    attention_impl: str | None = None
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, num_layers: int) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        layer_cls = nn.remat(CLIPEncoderLayer) if self.remat else CLIPEncoderLayer
        states = [x]
        for i in range(num_layers):
            x = layer_cls(
                self.config, self.causal, self.dtype, self.attention_impl, name=f"layers_{i}"
            )(x)
            states.append(x)
        return x, tuple(states)


def _num_layers(total: int, clip_skip: int) -> int:
    if isinstance(clip_skip, bool) or not isinstance(clip_skip, int):
        raise ValueError(f"clip_skip must be an int, got {clip_skip!r}")
    if not 0 <= clip_skip < total:
        raise ValueError(f"clip_skip={clip_skip} must be in [0, {total}) for {total} layers")
    return total - clip_skip


# ---------------------------------------------------------------------------------------------
# Text tower.


class CLIPTextEmbeddings(nn.Module):
    config: CLIPTextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        c = self.config
        embed = dict(dtype=self.dtype, param_dtype=jnp.float32)
        tokens = nn.Embed(c.vocab_size, c.hidden_size, name="token_embedding", **embed)
        positions = nn.Embed(
            c.max_position_embeddings, c.hidden_size, name="position_embedding", **embed
        )
        return tokens(input_ids) + positions(jnp.arange(input_ids.shape[1]))[None]


class CLIPTextTransformer(nn.Module):
    """transformers' ``CLIPTextModel`` body: embeddings, causal encoder, final_layer_norm."""

    config: CLIPTextConfig
    dtype: Any = jnp.float32
    attention_impl: str | None = None
    remat: bool = False

    @nn.compact
    def __call__(
        self, input_ids: jax.Array, *, output_hidden_states: bool = False, clip_skip: int = 0
    ) -> CLIPTextOutput:
        c = self.config
        _check_impl(self.attention_impl)
        if input_ids.ndim != 2 or not 0 < input_ids.shape[1] <= c.max_position_embeddings:
            raise ValueError(
                f"input_ids must be [batch, length] with 0 < length <= "
                f"max_position_embeddings ({c.max_position_embeddings}); got shape "
                f"{tuple(input_ids.shape)}"
            )
        num_layers = _num_layers(c.num_hidden_layers, clip_skip)
        input_ids = input_ids.astype(jnp.int32)
        x = CLIPTextEmbeddings(c, self.dtype, name="embeddings")(input_ids)
        x, states = CLIPEncoder(
            c, True, self.dtype, self.attention_impl, self.remat, name="encoder"
        )(x, num_layers)
        x = _layer_norm(c.layer_norm_eps, "final_layer_norm", self.dtype)(x)
        if c.eos_token_id == 2:
            # Configs written before transformers PR #24773 carry eos_token_id 2; transformers
            # then pools at the largest id (the EOS token of the original vocabulary).
            eos_pos = jnp.argmax(input_ids, axis=-1)
        else:
            eos_pos = jnp.argmax(input_ids == c.eos_token_id, axis=-1)  # first EOS
        pooled = jnp.take_along_axis(x, eos_pos[:, None, None], axis=1)[:, 0]
        return CLIPTextOutput(x, pooled, states if output_hidden_states else None)


class CLIPTextModel(nn.Module):
    """transformers ``CLIPTextModel``: params live under ``text_model``.

    ``__call__(input_ids, output_hidden_states=False, clip_skip=0)``: ``input_ids`` int [B, L]
    with L <= max_position_embeddings. ``clip_skip=k`` stops after ``num_hidden_layers - k``
    layers and applies ``final_layer_norm`` there, which is what diffusers' ``clip_skip`` (and
    A1111's "CLIP skip" minus one) computes: ``final_layer_norm(hidden_states[-(k + 1)])``.
    ``pooler_output`` then comes from that state too. ``hidden_states`` (when asked) are the
    embeddings followed by each executed layer's output, before ``final_layer_norm``, as
    transformers returns them.
    """

    config: CLIPTextConfig
    dtype: Any = jnp.float32
    attention_impl: str | None = None
    remat: bool = False

    @nn.compact
    def __call__(
        self, input_ids: jax.Array, output_hidden_states: bool = False, clip_skip: int = 0
    ) -> CLIPTextOutput:
        return CLIPTextTransformer(
            self.config, self.dtype, self.attention_impl, self.remat, name="text_model"
        )(input_ids, output_hidden_states=output_hidden_states, clip_skip=clip_skip)


class CLIPTextModelWithProjection(nn.Module):
    """transformers ``CLIPTextModelWithProjection`` (SDXL's ``text_encoder_2``): params
    ``text_model`` and ``text_projection`` (no bias, hidden_size -> projection_dim).

    ``__call__(input_ids, output_hidden_states=False)`` -> :class:`CLIPTextModelOutput`.
    SDXL's context is ``hidden_states[-2]`` (the penultimate layer's output, without
    final_layer_norm) and its pooled embedding is ``text_embeds``; diffusers' SDXL ``clip_skip``
    picks an earlier hidden state but keeps ``text_embeds`` from the full model, so there is no
    ``clip_skip`` argument here: index ``hidden_states`` instead.
    """

    config: CLIPTextConfig
    dtype: Any = jnp.float32
    attention_impl: str | None = None
    remat: bool = False

    @nn.compact
    def __call__(
        self, input_ids: jax.Array, output_hidden_states: bool = False
    ) -> CLIPTextModelOutput:
        out = CLIPTextTransformer(
            self.config, self.dtype, self.attention_impl, self.remat, name="text_model"
        )(input_ids, output_hidden_states=output_hidden_states)
        proj = _dense(self.config.projection_dim, "text_projection", self.dtype, use_bias=False)
        return CLIPTextModelOutput(
            proj(out.pooler_output), out.last_hidden_state, out.pooler_output, out.hidden_states
        )


TEXT_ARCHITECTURES = {
    "CLIPTextModel": False,
    "CLIPTextModelWithProjection": True,
}


def text_encoder_from_config(
    config: Mapping[str, Any],
    *,
    dtype: Any = jnp.float32,
    attention_impl: str | None = None,
    remat: bool = False,
    with_projection: bool | None = None,
    source: str = "text_encoder/config.json",
) -> CLIPTextModel | CLIPTextModelWithProjection:
    """Builds the text encoder from a transformers ``CLIPTextConfig`` JSON dict.

    ``with_projection``: True -> :class:`CLIPTextModelWithProjection`, False ->
    :class:`CLIPTextModel`; None (default) follows the config's ``architectures``
    (transformers writes ``["CLIPTextModelWithProjection"]`` for SDXL's ``text_encoder_2``;
    a config without the key builds a :class:`CLIPTextModel`).
    """
    _check_impl(attention_impl)
    text_config = text_config_from_dict(config, source=source)
    if with_projection is None:
        archs = config.get("architectures") or []
        if isinstance(archs, str) or not isinstance(archs, list | tuple):
            raise _bad(source, "architectures", archs, "a list of class names")
        known = [a for a in archs if a in TEXT_ARCHITECTURES]
        if archs and not known:
            raise _bad(source, "architectures", archs, f"one of {sorted(TEXT_ARCHITECTURES)}")
        with_projection = bool(known) and TEXT_ARCHITECTURES[known[0]]
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(text_config, dtype, attention_impl, remat)


def text_encoder_param_shapes(model: CLIPTextModel | CLIPTextModelWithProjection) -> Params:
    """The params tree of ``model`` as ``jax.ShapeDtypeStruct`` leaves (no memory, no compute)."""
    ids = jnp.zeros((1, model.config.max_position_embeddings), jnp.int32)
    return jax.eval_shape(model.init, jax.random.key(0), ids)["params"]


# ---------------------------------------------------------------------------------------------
# Vision tower.


class CLIPVisionEmbeddings(nn.Module):
    config: CLIPVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        c = self.config
        b, h, w, ch = pixel_values.shape
        if (h, w, ch) != (c.image_size, c.image_size, c.num_channels):
            raise ValueError(
                f"pixel_values must be NHWC [batch, {c.image_size}, {c.image_size}, "
                f"{c.num_channels}]; got shape {tuple(pixel_values.shape)}"
            )
        p = c.patch_size
        patches = nn.Conv(
            c.hidden_size,
            (p, p),
            strides=(p, p),
            padding="VALID",
            use_bias=False,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name="patch_embedding",
        )(pixel_values.astype(self.dtype))
        patches = patches.reshape(b, -1, c.hidden_size)  # row-major patches, as torch's flatten
        cls = self.param(
            "class_embedding", nn.initializers.normal(c.hidden_size**-0.5), (c.hidden_size,)
        )
        cls = jnp.broadcast_to(cls.astype(self.dtype), (b, 1, c.hidden_size))
        x = jnp.concatenate([cls, patches], axis=1)
        num_positions = x.shape[1]
        positions = nn.Embed(
            num_positions,
            c.hidden_size,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name="position_embedding",
        )
        return x + positions(jnp.arange(num_positions))[None]


class CLIPVisionTransformer(nn.Module):
    """transformers' ``CLIPVisionModel`` body: patches, pre_layrnorm, encoder, post_layernorm."""

    config: CLIPVisionConfig
    dtype: Any = jnp.float32
    attention_impl: str | None = None
    remat: bool = False

    @nn.compact
    def __call__(
        self, pixel_values: jax.Array, *, output_hidden_states: bool = False
    ) -> CLIPVisionOutput:
        c = self.config
        _check_impl(self.attention_impl)
        x = CLIPVisionEmbeddings(c, self.dtype, name="embeddings")(pixel_values)
        x = _layer_norm(c.layer_norm_eps, "pre_layrnorm", self.dtype)(x)  # sic: HF spelling
        x, states = CLIPEncoder(
            c, False, self.dtype, self.attention_impl, self.remat, name="encoder"
        )(x, c.num_hidden_layers)
        pooled = _layer_norm(c.layer_norm_eps, "post_layernorm", self.dtype)(x[:, 0])
        return CLIPVisionOutput(x, pooled, states if output_hidden_states else None)


class CLIPVisionModel(nn.Module):
    """transformers ``CLIPVisionModel``: params under ``vision_model``; input NHWC, normalised."""

    config: CLIPVisionConfig
    dtype: Any = jnp.float32
    attention_impl: str | None = None
    remat: bool = False

    @nn.compact
    def __call__(
        self, pixel_values: jax.Array, output_hidden_states: bool = False
    ) -> CLIPVisionOutput:
        return CLIPVisionTransformer(
            self.config, self.dtype, self.attention_impl, self.remat, name="vision_model"
        )(pixel_values, output_hidden_states=output_hidden_states)


def vision_model_from_config(
    config: Mapping[str, Any],
    *,
    dtype: Any = jnp.float32,
    attention_impl: str | None = None,
    source: str = "config.json",
) -> CLIPVisionModel:
    """Builds a :class:`CLIPVisionModel` from a transformers ``CLIPVisionConfig`` JSON dict."""
    _check_impl(attention_impl)
    return CLIPVisionModel(vision_config_from_dict(config, source=source), dtype, attention_impl)


# ---------------------------------------------------------------------------------------------
# Both towers.


def _normalize(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class CLIPModel(nn.Module):
    """transformers ``CLIPModel``: ``text_model``, ``vision_model``, ``text_projection``,
    ``visual_projection`` (no bias) and the scalar ``logit_scale``.

    ``model.apply(v, ids, method="get_text_features")`` -> [B, P] (projected, not normalised);
    ``method="get_image_features"`` likewise for NHWC images; ``__call__(ids, images)`` ->
    :class:`CLIPOutput` with ``exp(logit_scale) * cos`` logits, computed in float32.
    """

    config: CLIPConfig
    dtype: Any = jnp.float32
    attention_impl: str | None = None
    remat: bool = False

    def setup(self):
        c = self.config
        _check_impl(self.attention_impl)
        self.text_model = CLIPTextTransformer(c.text, self.dtype, self.attention_impl, self.remat)
        self.vision_model = CLIPVisionTransformer(
            c.vision, self.dtype, self.attention_impl, self.remat
        )
        self.text_projection = _dense(c.projection_dim, None, self.dtype, use_bias=False)
        self.visual_projection = _dense(c.projection_dim, None, self.dtype, use_bias=False)
        self.logit_scale = self.param(
            "logit_scale", lambda _: jnp.asarray(c.logit_scale_init_value, jnp.float32)
        )

    def get_text_features(self, input_ids: jax.Array, clip_skip: int = 0) -> jax.Array:
        return self.text_projection(self.text_model(input_ids, clip_skip=clip_skip).pooler_output)

    def get_image_features(self, pixel_values: jax.Array) -> jax.Array:
        return self.visual_projection(self.vision_model(pixel_values).pooler_output)

    def __call__(self, input_ids: jax.Array, pixel_values: jax.Array) -> CLIPOutput:
        text = _normalize(self.get_text_features(input_ids))
        image = _normalize(self.get_image_features(pixel_values))
        logits_per_text = jnp.exp(self.logit_scale) * text @ image.T
        return CLIPOutput(text, image, logits_per_text, logits_per_text.T)


def clip_from_config(
    config: Mapping[str, Any],
    *,
    dtype: Any = jnp.float32,
    attention_impl: str | None = None,
    source: str = "config.json",
) -> CLIPModel:
    """Builds a :class:`CLIPModel` from a transformers ``CLIPConfig`` JSON dict."""
    _check_impl(attention_impl)
    return CLIPModel(clip_config_from_dict(config, source=source), dtype, attention_impl)


def param_shapes(
    model: CLIPTextModel | CLIPTextModelWithProjection | CLIPVisionModel | CLIPModel,
) -> Params:
    """Params template (``jax.ShapeDtypeStruct`` leaves) of any of the four models."""
    key = jax.random.key(0)
    if isinstance(model, CLIPTextModel | CLIPTextModelWithProjection):
        return text_encoder_param_shapes(model)
    v = model.config.vision if isinstance(model, CLIPModel) else model.config
    images = jnp.zeros((1, v.image_size, v.image_size, v.num_channels), jnp.float32)
    if isinstance(model, CLIPVisionModel):
        return jax.eval_shape(model.init, key, images)["params"]
    ids = jnp.zeros((1, model.config.text.max_position_embeddings), jnp.int32)
    return jax.eval_shape(model.init, key, ids, images)["params"]


# ---------------------------------------------------------------------------------------------
# Weights in and out.

_LAYER_LEAVES = ("kernel", "bias", "scale", "embedding")
_TOWERS = ("text_model", "vision_model")


def _tower_prefix(params: Mapping[str, Any]) -> str | None:
    """``text_model`` / ``vision_model`` when ``params`` is a standalone tower, else None."""
    keys = list(params)
    return keys[0] if len(keys) == 1 and keys[0] in _TOWERS else None


def params_from_state_dict(
    state_dict: Mapping[str, np.ndarray],
    template: Mapping[str, Any],
    *,
    source: str = "checkpoint",
    dtype: Any = np.float32,
) -> Params:
    """Converts a transformers CLIP state dict (numpy) to Flax params shaped like ``template``.

    A standalone text/vision model's keys may carry the ``text_model.``/``vision_model.``
    prefix (published SD repositories, transformers 4) or not (transformers 5); both load.
    Mismatches raise ``convert.WeightMismatchError`` naming the tensors.
    """
    prefix = _tower_prefix(template)
    if prefix and not any(k.startswith(prefix + ".") for k in state_dict):
        state_dict = {f"{prefix}.{k}": v for k, v in state_dict.items()}
    return convert.torch_to_flax(state_dict, template, source=source, dtype=dtype)


def params_to_state_dict(
    params: Mapping[str, Any], *, strip_prefix: bool = False, dtype: Any = np.float32
) -> dict[str, np.ndarray]:
    """Flax params -> transformers state dict (numpy).

    Default keys keep the ``text_model.`` prefix of a standalone tower, which transformers 4 and
    5 (and so diffusers) both load; ``strip_prefix=True`` gives transformers 5's own layout.
    Bare parameters (``class_embedding``, ``logit_scale``) keep their names.
    """
    layers: Params = {}
    out = {}
    for path, value in convert._flatten(params).items():
        if path[-1] in _LAYER_LEAVES:
            node = layers
            for p in path[:-1]:
                node = node.setdefault(p, {})
            node[path[-1]] = value
        else:
            key = convert.path_to_torch_key(path[:-1], path[-1])
            out[key] = np.array(value, dtype=dtype, order="C")
    out.update(convert.flax_to_torch(layers, dtype=dtype))
    prefix = _tower_prefix(params)
    if strip_prefix and prefix:
        out = {k.removeprefix(prefix + "."): v for k, v in out.items()}
    return out
