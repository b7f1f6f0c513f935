"""BLIP's image encoder and its BERT text encoder with cross-attention, in Flax: ImageReward.

Module paths mirror the state-dict names of BLIP's PyTorch code (``models/vit.py`` and
``models/med.py`` of salesforce/BLIP, which ImageReward ships), so ``convert.torch_to_flax`` maps
``blip.visual_encoder.blocks.3.attn.qkv.weight`` to ``blip/visual_encoder/blocks_3/attn/qkv``.
One exception: BERT's ``query``/``key``/``value`` projections are named ``to_q``/``to_k``/``to_v``
in the Flax tree, because ``convert.torch_to_flax`` renames those three names so for legacy
diffusers checkpoints; :func:`bert_state_dict_to_flax_names` applies that rename explicitly and
:func:`bert_state_dict_from_flax_names` undoes it.

- :class:`BlipViT`: a timm-style ViT (pre-norm blocks, fused ``qkv`` with bias, exact GELU,
  LayerNorm eps 1e-6); returns every token after the final ``norm``.
- :class:`BlipBert`: BERT (post-norm) whose every layer also attends to the image tokens
  (``crossattention``; keys/values from ``encoder_width`` features). BLIP's embeddings have
  word and position embeddings only (no token types). Self-attention is bidirectional with
  the padding mask; transformers' ``BlipTextModel`` is the same network (``is_decoder=False``
  in its forward).
- :class:`ImageRewardModel`: ``blip`` (both encoders) + ``mlp`` (the linear head): the raw
  reward of the first text token (``[CLS]``) after cross-attention to the image.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from spin_jax.models.attention import IMPLEMENTATIONS, attention
from spin_jax.models.clip import ACTIVATIONS

HEAD_FEATURES = (1024, 128, 64, 16, 1)
HEAD_LAYERS = (0, 2, 4, 6, 7)  # nn.Sequential indices of the Linear layers (dropouts between)


@dataclasses.dataclass(frozen=True)
class BlipVisionConfig:
    """BLIP's ViT; the defaults are ``vit='large'`` at 224 px (ImageReward)."""

    image_size: int = 224
    patch_size: int = 16
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    layer_norm_eps: float = 1e-6


@dataclasses.dataclass(frozen=True)
class BlipTextConfig:
    """BLIP's ``med_config.json`` (a BERT-base config plus ``encoder_width``)."""

    vocab_size: int = 30524
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    encoder_width: int = 1024


def _positive_int(source: str, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{source}: '{key}' = {value!r} must be a positive integer")
    return value


def text_config_from_dict(
    config: Mapping[str, Any],
    *,
    encoder_width: int,
    source: str = "med_config.json",
) -> BlipTextConfig:
    """Validates BLIP's ``med_config.json``. ``encoder_width`` is the image encoder's width
    (BLIP overrides the file's value with it). The file's ``type_vocab_size`` is ignored: BLIP's
    embeddings have no token types."""
    if not isinstance(config, Mapping):
        raise ValueError(f"{source}: the config must be a JSON object, got {config!r}")
    if config.get("add_cross_attention") is False:
        raise ValueError(
            f"{source}: 'add_cross_attention' is false; ImageReward's text encoder "
            "cross-attends to the image"
        )
    values = {}
    for field in dataclasses.fields(BlipTextConfig):
        name = field.name
        if name == "encoder_width":
            continue
        value = config.get(name, field.default)
        if name == "hidden_act":
            if value not in ACTIVATIONS:
                raise ValueError(f"{source}: 'hidden_act' = {value!r} not in {sorted(ACTIVATIONS)}")
        elif name == "layer_norm_eps":
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"{source}: 'layer_norm_eps' = {value!r} must be positive")
            value = float(value)
        else:
            value = _positive_int(source, name, value)
        values[name] = value
    if values["hidden_size"] % values["num_attention_heads"]:
        raise ValueError(
            f"{source}: hidden_size {values['hidden_size']} is not a multiple of "
            f"num_attention_heads {values['num_attention_heads']}"
        )
    return BlipTextConfig(**values, encoder_width=encoder_width)


_QKV = (("query", "to_q"), ("key", "to_k"), ("value", "to_v"))


def bert_state_dict_to_flax_names(state: Mapping[str, Any]) -> dict[str, Any]:
    """``...self.query.weight`` -> ``...self.to_q.weight`` (and key, value): the Flax names."""
    out = {}
    for k, v in state.items():
        for torch_name, flax_name in _QKV:
            k = k.replace(f".self.{torch_name}.", f".self.{flax_name}.")
        out[k] = v
    return out


def bert_state_dict_from_flax_names(state: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`bert_state_dict_to_flax_names` (BLIP's own names)."""
    out = {}
    for k, v in state.items():
        for torch_name, flax_name in _QKV:
            k = k.replace(f".self.{flax_name}.", f".self.{torch_name}.")
        out[k] = v
    return out


def _check_impl(impl: str | None) -> None:
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention_impl {impl!r} not in {IMPLEMENTATIONS}")


def _dense(features: int, name: str, dtype: Any) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, name=name)


def _layer_norm(eps: float, name: str, dtype: Any) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=jnp.float32, name=name)


# ---------------------------------------------------------------------------------------------
# Vision: salesforce/BLIP models/vit.py names.


class _PatchEmbed(nn.Module):
    config: BlipVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        p = c.patch_size
        x = nn.Conv(
            c.hidden_size,
            (p, p),
            strides=(p, p),
            padding="VALID",
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name="proj",
        )(x)
        return x.reshape(x.shape[0], -1, c.hidden_size)  # row-major, as torch's flatten(2)


class _VitAttention(nn.Module):
    hidden_size: int
    num_heads: int
    dtype: Any = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, d = x.shape
        qkv = _dense(3 * d, "qkv", self.dtype)(x).reshape(b, n, 3, self.num_heads, -1)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        out = attention(q, k, v, implementation=self.attention_impl)
        return _dense(d, "proj", self.dtype)(out.reshape(b, n, d))


class _VitMlp(nn.Module):
    hidden_size: int
    intermediate_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = _dense(self.intermediate_size, "fc1", self.dtype)(x)
        x = jax.nn.gelu(x, approximate=False)
        return _dense(self.hidden_size, "fc2", self.dtype)(x)


class _VitBlock(nn.Module):
    config: BlipVisionConfig
    dtype: Any = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        h = _layer_norm(c.layer_norm_eps, "norm1", self.dtype)(x)
        x = x + _VitAttention(
            c.hidden_size, c.num_attention_heads, self.dtype, self.attention_impl, name="attn"
        )(h)
        h = _layer_norm(c.layer_norm_eps, "norm2", self.dtype)(x)
        return x + _VitMlp(c.hidden_size, c.intermediate_size, self.dtype, name="mlp")(h)


class BlipViT(nn.Module):
    """Images NHWC, resized and CLIP-normalised -> ``[B, 1 + patches, hidden]`` after ``norm``."""

    config: BlipVisionConfig
    dtype: Any = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        c = self.config
        _check_impl(self.attention_impl)
        b, h, w, ch = pixel_values.shape
        if (h, w, ch) != (c.image_size, c.image_size, 3):
            raise ValueError(
                f"pixel_values must be NHWC [batch, {c.image_size}, {c.image_size}, "
                f"3]; got {tuple(pixel_values.shape)}"
            )
        x = _PatchEmbed(c, self.dtype, name="patch_embed")(pixel_values.astype(self.dtype))
        num_positions = x.shape[1] + 1
        init = nn.initializers.normal(0.02)
        cls = self.param("cls_token", init, (1, 1, c.hidden_size), jnp.float32)
        pos = self.param("pos_embed", init, (1, num_positions, c.hidden_size), jnp.float32)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, c.hidden_size)), x], 1)
        x = x + pos.astype(self.dtype)
        for i in range(c.num_hidden_layers):
            x = _VitBlock(c, self.dtype, self.attention_impl, name=f"blocks_{i}")(x)
        return _layer_norm(c.layer_norm_eps, "norm", self.dtype)(x)


# ---------------------------------------------------------------------------------------------
# Text: salesforce/BLIP models/med.py names (BERT).


class _Embeddings(nn.Module):
    config: BlipTextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=jnp.float32)
        x = nn.Embed(c.vocab_size, c.hidden_size, name="word_embeddings", **kw)(input_ids)
        positions = jnp.arange(input_ids.shape[1])
        x = (
            x
            + nn.Embed(c.max_position_embeddings, c.hidden_size, name="position_embeddings", **kw)(
                positions
            )[None]
        )
        return _layer_norm(c.layer_norm_eps, "LayerNorm", self.dtype)(x)


class _BertSelfAttention(nn.Module):
    num_heads: int
    hidden_size: int
    dtype: Any = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array, mask: jax.Array | None) -> jax.Array:
        b, n, d = x.shape
        heads = self.num_heads
        q = _dense(d, "to_q", self.dtype)(x).reshape(b, n, heads, -1)
        k = _dense(d, "to_k", self.dtype)(context).reshape(b, context.shape[1], heads, -1)
        v = _dense(d, "to_v", self.dtype)(context).reshape(b, context.shape[1], heads, -1)
        out = attention(q, k, v, implementation=self.attention_impl, mask=mask)
        return out.reshape(b, n, d)


class _BertOutput(nn.Module):
    """``dense`` then post-norm with the residual (BertSelfOutput / BertOutput)."""

    hidden_size: int
    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, residual: jax.Array) -> jax.Array:
        x = _dense(self.hidden_size, "dense", self.dtype)(x)
        return _layer_norm(self.eps, "LayerNorm", self.dtype)(x + residual)


class _BertAttention(nn.Module):
    config: BlipTextConfig
    dtype: Any = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array, mask: jax.Array | None) -> jax.Array:
        c = self.config
        h = _BertSelfAttention(
            c.num_attention_heads, c.hidden_size, self.dtype, self.attention_impl, name="self"
        )(x, context, mask)
        return _BertOutput(c.hidden_size, c.layer_norm_eps, self.dtype, name="output")(h, x)


class _BertIntermediate(nn.Module):
    config: BlipTextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = _dense(self.config.intermediate_size, "dense", self.dtype)(x)
        return ACTIVATIONS[self.config.hidden_act](x)


class _BertLayer(nn.Module):
    config: BlipTextConfig
    dtype: Any = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, image: jax.Array) -> jax.Array:
        c, dt, impl = self.config, self.dtype, self.attention_impl
        x = _BertAttention(c, dt, impl, name="attention")(x, x, mask)
        x = _BertAttention(c, dt, impl, name="crossattention")(x, image, None)
        h = _BertIntermediate(c, dt, name="intermediate")(x)
        return _BertOutput(c.hidden_size, c.layer_norm_eps, dt, name="output")(h, x)


class _BertEncoder(nn.Module):
    config: BlipTextConfig
    dtype: Any = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, image: jax.Array) -> jax.Array:
        for i in range(self.config.num_hidden_layers):
            x = _BertLayer(self.config, self.dtype, self.attention_impl, name=f"layer_{i}")(
                x, mask, image
            )
        return x


class BlipBert(nn.Module):
    """``(input_ids [B, L], attention_mask [B, L] of 0/1, image tokens [B, N, encoder_width])``
    -> last hidden state ``[B, L, hidden]``. No pooler (BLIP builds it without one)."""

    config: BlipTextConfig
    dtype: Any = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(
        self, input_ids: jax.Array, attention_mask: jax.Array, image_embeds: jax.Array
    ) -> jax.Array:
        c = self.config
        _check_impl(self.attention_impl)
        if input_ids.ndim != 2 or input_ids.shape[1] > c.max_position_embeddings:
            raise ValueError(
                f"input_ids must be [batch, length <= {c.max_position_embeddings}], "
                f"got {tuple(input_ids.shape)}"
            )
        if image_embeds.shape[-1] != c.encoder_width:
            raise ValueError(
                f"image_embeds width {image_embeds.shape[-1]} != encoder_width {c.encoder_width}"
            )
        x = _Embeddings(c, self.dtype, name="embeddings")(input_ids.astype(jnp.int32))
        mask = attention_mask.astype(bool)[:, None, None, :]  # [B, 1 (heads), 1 (queries), L]
        return _BertEncoder(c, self.dtype, self.attention_impl, name="encoder")(
            x, mask, image_embeds.astype(self.dtype)
        )


class MLPHead(nn.Module):
    """The published scorer heads (ImageReward, LAION aesthetic v2): Linear layers at
    ``nn.Sequential`` indices 0, 2, 4, 6, 7 with dropouts between and no activation."""

    features: tuple[int, ...] = HEAD_FEATURES
    indices: tuple[int, ...] = HEAD_LAYERS

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        for f, i in zip(self.features, self.indices, strict=True):
            x = nn.Dense(f, dtype=jnp.float32, param_dtype=jnp.float32, name=f"layers_{i}")(x)
        return x


class _Blip(nn.Module):
    vision: BlipVisionConfig
    text: BlipTextConfig
    dtype: Any = jnp.float32
    attention_impl: str | None = None

    def setup(self):
        self.visual_encoder = BlipViT(self.vision, self.dtype, self.attention_impl)
        self.text_encoder = BlipBert(self.text, self.dtype, self.attention_impl)

    def __call__(self, input_ids, attention_mask, pixel_values) -> jax.Array:
        image = self.visual_encoder(pixel_values)
        return self.text_encoder(input_ids, attention_mask, image)[:, 0]


class ImageRewardModel(nn.Module):
    """``(input_ids, attention_mask, pixel_values)`` -> raw reward ``[B]`` (before the
    published mean/std normalisation)."""

    vision: BlipVisionConfig
    text: BlipTextConfig
    dtype: Any = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(
        self, input_ids: jax.Array, attention_mask: jax.Array, pixel_values: jax.Array
    ) -> jax.Array:
        feats = _Blip(self.vision, self.text, self.dtype, self.attention_impl, name="blip")(
            input_ids, attention_mask, pixel_values
        )
        return MLPHead(name="mlp")(feats)[:, 0]


def imagereward_param_shapes(model: ImageRewardModel, text_length: int = 35) -> dict:
    """Params template (``jax.ShapeDtypeStruct`` leaves)."""
    v = model.vision
    ids = jnp.zeros((1, text_length), jnp.int32)
    images = jnp.zeros((1, v.image_size, v.image_size, 3), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), ids, ids, images)["params"]
