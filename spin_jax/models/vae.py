"""Stable Diffusion's AutoencoderKL (KL-regularised VAE) in Flax Linen (NHWC).

Follows diffusers' ``AutoencoderKL`` with ``Encoder``/``Decoder`` of DownEncoderBlock2D /
UpDecoderBlock2D blocks, a mid-block with one single-head attention, GroupNorm eps 1e-6, and
the optional 1x1 ``quant_conv``/``post_quant_conv``. Names mirror the diffusers state dict.
Latents here are unscaled; multiplying by ``scaling_factor`` is the caller's business.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from spin_jax.models.layers import (
    Attention,
    Conv1x1,
    Downsample2D,
    ResnetBlock2D,
    Upsample2D,
    conv3x3,
    group_norm,
)
from spin_jax.models.unet import check_fixed, check_known, config_error, is_int
from spin_jax.platform import check_attention_impl

Dtype = Any
_EPS = 1e-6  # every VAE normalisation layer


class MidBlock2D(nn.Module):
    """resnet, (single-head self-attention with GroupNorm and residual), resnet."""

    channels: int
    groups: int = 32
    add_attention: bool = True
    attention_impl: str | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        def resnet(j):
            return ResnetBlock2D(
                self.channels, groups=self.groups, eps=_EPS, dtype=self.dtype, name=f"resnets_{j}"
            )

        x = resnet(0)(x)
        if self.add_attention:
            x = Attention(
                heads=1,
                dim_head=self.channels,
                qkv_bias=True,
                upcast=True,  # diffusers upcasts this softmax; the block is small
                norm_num_groups=self.groups,
                norm_eps=_EPS,
                residual_connection=True,
                attention_impl=self.attention_impl,
                dtype=self.dtype,
                name="attentions_0",
            )(x)
        return resnet(1)(x)


class DownEncoderBlock2D(nn.Module):
    """Resnets without time embedding, then (except the last block) a padding-0 downsampler."""

    channels: int
    num_layers: int
    groups: int = 32
    add_downsample: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.num_layers):
            x = ResnetBlock2D(
                self.channels, groups=self.groups, eps=_EPS, dtype=self.dtype, name=f"resnets_{j}"
            )(x)
        if self.add_downsample:
            x = Downsample2D(self.channels, 0, self.dtype, name="downsamplers_0")(x)
        return x


class UpDecoderBlock2D(nn.Module):
    """Resnets without time embedding, then (except the last block) a nearest-2x upsampler."""

    channels: int
    num_layers: int
    groups: int = 32
    add_upsample: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.num_layers):
            x = ResnetBlock2D(
                self.channels, groups=self.groups, eps=_EPS, dtype=self.dtype, name=f"resnets_{j}"
            )(x)
        if self.add_upsample:
            x = Upsample2D(self.channels, self.dtype, name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    latent_channels: int
    groups: int = 32
    mid_block_add_attention: bool = True
    attention_impl: str | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = self.block_out_channels
        x = conv3x3(channels[0], self.dtype, "conv_in")(x)
        for i, ch in enumerate(channels):
            x = DownEncoderBlock2D(
                ch,
                self.layers_per_block,
                self.groups,
                add_downsample=i < len(channels) - 1,
                dtype=self.dtype,
                name=f"down_blocks_{i}",
            )(x)
        x = MidBlock2D(
            channels[-1],
            self.groups,
            self.mid_block_add_attention,
            self.attention_impl,
            self.dtype,
            name="mid_block",
        )(x)
        x = nn.silu(group_norm(self.groups, _EPS, self.dtype, "conv_norm_out")(x))
        return conv3x3(2 * self.latent_channels, self.dtype, "conv_out")(x)


class Decoder(nn.Module):
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    out_channels: int
    groups: int = 32
    mid_block_add_attention: bool = True
    attention_impl: str | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        channels = self.block_out_channels[::-1]
        x = conv3x3(channels[0], self.dtype, "conv_in")(z)
        x = MidBlock2D(
            channels[0],
            self.groups,
            self.mid_block_add_attention,
            self.attention_impl,
            self.dtype,
            name="mid_block",
        )(x)
        for i, ch in enumerate(channels):
            x = UpDecoderBlock2D(
                ch,
                self.layers_per_block + 1,
                self.groups,
                add_upsample=i < len(channels) - 1,
                dtype=self.dtype,
                name=f"up_blocks_{i}",
            )(x)
        x = nn.silu(group_norm(self.groups, _EPS, self.dtype, "conv_norm_out")(x))
        return conv3x3(self.out_channels, self.dtype, "conv_out")(x)


class AutoencoderKL(nn.Module):
    """``encode(images NHWC in [-1, 1]) -> (mean, logvar)``; ``decode(latents) -> images``.

    Outputs are float32 whatever the compute ``dtype``. ``__call__`` encodes and decodes the
    mean (used for ``init``).
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    def setup(self):
        channels = tuple(self.block_out_channels)
        common = dict(
            block_out_channels=channels,
            layers_per_block=self.layers_per_block,
            groups=self.norm_num_groups,
            mid_block_add_attention=self.mid_block_add_attention,
            attention_impl=self.attention_impl,
            dtype=self.dtype,
        )
        self.encoder = Encoder(latent_channels=self.latent_channels, **common)
        self.decoder = Decoder(out_channels=self.out_channels, **common)
        if self.use_quant_conv:
            self.quant_conv = Conv1x1(2 * self.latent_channels, dtype=self.dtype)
        if self.use_post_quant_conv:
            self.post_quant_conv = Conv1x1(self.latent_channels, dtype=self.dtype)

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        if images.ndim != 4 or images.shape[-1] != self.in_channels:
            raise ValueError(
                f"VAE images must be NHWC with {self.in_channels} channels, got {images.shape}"
            )
        h = self.encoder(images)
        if self.use_quant_conv:
            h = self.quant_conv(h)
        h = h.astype(jnp.float32)
        mean, logvar = jnp.split(h, 2, axis=-1)
        # As diffusers' DiagonalGaussianDistribution.
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, latents: jax.Array) -> jax.Array:
        if latents.ndim != 4 or latents.shape[-1] != self.latent_channels:
            raise ValueError(
                f"VAE latents must be NHWC with {self.latent_channels} channels, "
                f"got {latents.shape}"
            )
        z = latents
        if self.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, images: jax.Array) -> jax.Array:
        mean, _ = self.encode(images)
        return self.decode(mean)


# ------------------------------------------------------------------------------------------
# Config validation

# shift_factor (SD3/Flux) and latents_mean/std (Playground v2.5) change how latents are
# normalised, which callers here do with scaling_factor alone: refused rather than ignored.
_VAE_FIXED: dict[str, tuple] = {
    "act_fn": ("silu", "swish"),
    "shift_factor": (None,),
    "latents_mean": (None,),
    "latents_std": (None,),
}
_VAE_IGNORED = (
    "sample_size",
    "scaling_factor",
    "force_upcast",
)
_VAE_FIELDS = (
    "in_channels",
    "out_channels",
    "down_block_types",
    "up_block_types",
    "block_out_channels",
    "layers_per_block",
    "latent_channels",
    "norm_num_groups",
    "use_quant_conv",
    "use_post_quant_conv",
    "mid_block_add_attention",
)
VAE_CONFIG_KEYS = frozenset(_VAE_FIXED) | frozenset(_VAE_IGNORED) | frozenset(_VAE_FIELDS)


def vae_from_config(
    config: Mapping[str, Any],
    *,
    dtype: Dtype = jnp.float32,
    attention_impl: str | None = None,
    source: str = "vae/config.json",
) -> AutoencoderKL:
    """Builds the VAE from a diffusers ``vae/config.json`` dict, refusing what it cannot run.

    ``scaling_factor`` (a positive number; SDXL 0.13025) and ``force_upcast`` (true/false: SDXL's
    VAE decodes in float32) are checked and left to the caller (they concern latents and
    precision, not the network); ``shift_factor`` and ``latents_mean/std`` must be null.
    """
    if not isinstance(config, Mapping):
        raise ValueError(f"{source}: expected a JSON object, got {type(config).__name__}")
    config = check_known(source, config, VAE_CONFIG_KEYS)
    check_fixed(source, config, _VAE_FIXED)
    check_attention_impl(attention_impl)
    scale = config.get("scaling_factor", 0.18215)
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not scale > 0:
        raise config_error(source, "scaling_factor", scale, "must be a positive number")
    if not isinstance(config.get("force_upcast", True), bool):
        raise config_error(source, "force_upcast", config["force_upcast"], "must be true or false")
    defaults = AutoencoderKL()
    kw = {k: config.get(k, getattr(defaults, k)) for k in _VAE_FIELDS}
    channels = kw["block_out_channels"]
    if (
        isinstance(channels, str)
        or not isinstance(channels, Sequence)
        or not channels
        or not all(is_int(c) and c > 0 for c in channels)
    ):
        raise config_error(
            source, "block_out_channels", channels, "must be a non-empty list of positive ints"
        )
    n = len(channels)
    for key, known in (
        ("down_block_types", "DownEncoderBlock2D"),
        ("up_block_types", "UpDecoderBlock2D"),
    ):
        value = kw[key]
        if isinstance(value, str) or not isinstance(value, Sequence) or len(value) != n:
            raise config_error(
                source, key, value, f"must be a list of {n} block names (one per channel)"
            )
        for v in value:
            if v != known:
                raise config_error(
                    source, key, value, f"has unsupported block type {v!r} (known: {known!r})"
                )
    groups = kw["norm_num_groups"]
    if not is_int(groups) or groups < 1 or any(c % groups for c in channels):
        raise config_error(
            source,
            "norm_num_groups",
            groups,
            f"must be an int dividing every block_out_channels {channels}",
        )
    for key in ("in_channels", "out_channels", "latent_channels", "layers_per_block"):
        if not is_int(kw[key]) or kw[key] < 1:
            raise config_error(source, key, kw[key], "must be an int >= 1")
    for key in ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
        if not isinstance(kw[key], bool):
            raise config_error(source, key, kw[key], "must be true or false")
    kw["down_block_types"] = tuple(kw["down_block_types"])
    kw["up_block_types"] = tuple(kw["up_block_types"])
    kw["block_out_channels"] = tuple(channels)
    return AutoencoderKL(**kw, dtype=dtype, attention_impl=attention_impl)


def vae_param_shapes(model: AutoencoderKL) -> dict[str, Any]:
    """The params tree as ``jax.ShapeDtypeStruct`` leaves, without allocating anything."""
    size = 2 ** (len(model.block_out_channels) - 1)
    images = jax.ShapeDtypeStruct((1, size, size, model.in_channels), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), images)["params"]
