"""Building blocks shared by the Stable Diffusion UNet and VAE (Flax Linen, NHWC).

Each module mirrors a diffusers PyTorch module and names its submodules after the PyTorch
attributes (``to_out.0`` -> ``to_out_0``), so ``convert.torch_to_flax`` maps weights without
model-specific renames. Parameters are float32; ``dtype`` is the compute dtype. Normalisation
statistics are always reduced in float32.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from spin_jax.models.attention import attention

Dtype = Any


def timestep_embedding(
    timesteps: jax.Array,
    dim: int,
    *,
    flip_sin_to_cos: bool = True,
    freq_shift: float = 0.0,
    max_period: float = 10000.0,
) -> jax.Array:
    """Sinusoidal embedding of ``timesteps`` [B] -> float32 [B, dim], as diffusers' Timesteps."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32)
    freqs = jnp.exp(exponent / (half - freq_shift))
    args = jnp.asarray(timesteps).astype(jnp.float32)[:, None] * freqs[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class GroupNorm(nn.Module):
    """GroupNorm over the channels of NHWC (or [B, L, C]) inputs, as torch.nn.GroupNorm.

    One pass over the input for the sums of x and x^2 (float32), then one fused scale-and-shift
    per channel: 1.5-2.7x faster than ``flax.linen.GroupNorm`` on XLA:CPU at the UNet's shapes
    (bench/RESULTS.md). Params ``scale`` and ``bias`` are named as flax's, so checkpoints and
    the diffusers mapping are unchanged.
    """

    num_groups: int
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        if c % self.num_groups:
            raise ValueError(
                f"GroupNorm: {c} channels are not divisible by {self.num_groups} groups"
            )
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        b, per_group = x.shape[0], c // self.num_groups
        xf = x.astype(jnp.float32)
        axes = tuple(range(1, x.ndim - 1))
        n = per_group * int(np.prod([x.shape[a] for a in axes]))
        sums = jnp.stack([xf.sum(axes), (xf * xf).sum(axes)])  # [2, B, C]
        sums = sums.reshape(2, b, self.num_groups, per_group).sum(-1) / n
        mean, var = sums[0], jnp.maximum(sums[1] - sums[0] * sums[0], 0.0)
        inv = jnp.repeat(jax.lax.rsqrt(var + self.epsilon), per_group, axis=1)  # [B, C]
        gain = scale * inv
        shift = bias - jnp.repeat(mean, per_group, axis=1) * gain
        bshape = (b,) + (1,) * len(axes) + (c,)
        y = xf * gain.reshape(bshape) + shift.reshape(bshape)
        return y.astype(self.dtype)


def group_norm(groups: int, eps: float, dtype: Dtype, name: str) -> GroupNorm:
    # Statistics in float32 whatever the compute dtype; output in the compute dtype.
    return GroupNorm(num_groups=groups, epsilon=eps, dtype=dtype, name=name)


def dense(features: int, dtype: Dtype, name: str, use_bias: bool = True) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name)


def conv3x3(features: int, dtype: Dtype, name: str, stride: int = 1, padding: Any = 1) -> nn.Conv:
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    return nn.Conv(
        features,
        (3, 3),
        strides=(stride, stride),
        padding=padding,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


class Conv1x1(nn.Module):
    """A 1x1 convolution stored as PyTorch stores it (HWIO kernel), computed as a matmul.

    Works on any ``[..., C]`` input, so it serves both NHWC maps and ``[B, L, C]`` tokens.
    """

    features: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (1, 1, x.shape[-1], self.features)
        )
        y = jnp.dot(x.astype(self.dtype), kernel[0, 0].astype(self.dtype))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(self.dtype)
        return y


def upsample_nearest(x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
    """Nearest-neighbour upsampling of NHWC ``x``: 2x, or to ``size`` as torch's F.interpolate."""
    b, h, w, c = x.shape
    if size is None or tuple(size) == (2 * h, 2 * w):
        # Broadcast + reshape: one fusible copy, no gather.
        x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
        return x.reshape(b, 2 * h, 2 * w, c)
    oh, ow = size
    rows = np.minimum(np.floor(np.arange(oh) * (h / oh)).astype(np.int32), h - 1)
    cols = np.minimum(np.floor(np.arange(ow) * (w / ow)).astype(np.int32), w - 1)
    return x[:, rows][:, :, cols]


class Downsample2D(nn.Module):
    """3x3 stride-2 conv. ``padding=0`` pads right/bottom by one first (the VAE encoder)."""

    out_channels: int
    padding: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pad = ((0, 1), (0, 1)) if self.padding == 0 else self.padding
        return conv3x3(self.out_channels, self.dtype, "conv", stride=2, padding=pad)(x)


class Upsample2D(nn.Module):
    """Nearest 2x (or to ``output_size``) then a 3x3 conv."""

    out_channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, output_size: tuple[int, int] | None = None) -> jax.Array:
        x = upsample_nearest(x, output_size)
        return conv3x3(self.out_channels, self.dtype, "conv")(x)


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv twice, time embedding added after the first conv, 1x1 shortcut."""

    out_channels: int
    groups: int = 32
    eps: float = 1e-6
    output_scale_factor: float = 1.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        h = nn.silu(group_norm(self.groups, self.eps, self.dtype, "norm1")(x))
        h = conv3x3(self.out_channels, self.dtype, "conv1")(h)
        if temb is not None:
            t = dense(self.out_channels, self.dtype, "time_emb_proj")(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = nn.silu(group_norm(self.groups, self.eps, self.dtype, "norm2")(h))
        h = conv3x3(self.out_channels, self.dtype, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = Conv1x1(self.out_channels, dtype=self.dtype, name="conv_shortcut")(x)
        out = x.astype(self.dtype) + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class Attention(nn.Module):
    """diffusers' ``Attention``: q/k/v projections, multi-head attention, ``to_out.0``.

    Token input ``[B, L, C]``; an NHWC input is flattened to tokens and restored, as the VAE
    mid-block uses it (with ``norm_num_groups`` for its ``group_norm`` and a residual).
    """

    heads: int
    dim_head: int
    qkv_bias: bool = False
    upcast: bool = False
    norm_num_groups: int | None = None
    norm_eps: float = 1e-6
    residual_connection: bool = False
    attention_impl: str | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        residual = x
        if self.norm_num_groups is not None:
            x = group_norm(self.norm_num_groups, self.norm_eps, self.dtype, "group_norm")(x)
        shape = x.shape
        b, c = shape[0], shape[-1]
        x = x.reshape(b, -1, c)
        context = x if context is None else context
        inner = self.heads * self.dim_head
        q = dense(inner, self.dtype, "to_q", self.qkv_bias)(x)
        k = dense(inner, self.dtype, "to_k", self.qkv_bias)(context)
        v = dense(inner, self.dtype, "to_v", self.qkv_bias)(context)
        # [B, L, H*D] -> [B, L, H, D] is a free reshape; no transposes.
        q = q.reshape(b, q.shape[1], self.heads, self.dim_head)
        k = k.reshape(b, k.shape[1], self.heads, self.dim_head)
        v = v.reshape(b, v.shape[1], self.heads, self.dim_head)
        o = attention(q, k, v, implementation=self.attention_impl, upcast=self.upcast)
        o = dense(c, self.dtype, "to_out_0")(o.reshape(b, -1, inner))
        o = o.reshape(shape)
        if self.residual_connection:
            o = o + residual.astype(o.dtype)
        return o


class GEGLU(nn.Module):
    """Linear to 2x width, split, ``value * gelu(gate)`` with exact (erf) GELU."""

    dim_out: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = dense(2 * self.dim_out, self.dtype, "proj")(x)
        value, gate = jnp.split(h, 2, axis=-1)
        return value * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """``net.0`` = GEGLU(dim -> mult*dim), ``net.1`` = dropout (none here), ``net.2`` = Linear."""

    dim: int
    mult: int = 4
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = GEGLU(self.dim * self.mult, dtype=self.dtype, name="net_0")(x)
        return dense(self.dim, self.dtype, "net_2")(h)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention and GEGLU feed-forward, each residual."""

    dim: int
    heads: int
    dim_head: int
    upcast: bool = False
    norm_eps: float = 1e-5
    attention_impl: str | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        def norm(name):
            return nn.LayerNorm(
                epsilon=self.norm_eps, dtype=self.dtype, param_dtype=jnp.float32, name=name
            )

        def attn(name):
            return Attention(
                self.heads,
                self.dim_head,
                upcast=self.upcast,
                attention_impl=self.attention_impl,
                dtype=self.dtype,
                name=name,
            )

        x = x + attn("attn1")(norm("norm1")(x))
        x = x + attn("attn2")(norm("norm2")(x), context)
        x = x + FeedForward(self.dim, dtype=self.dtype, name="ff")(norm("norm3")(x))
        return x


class Transformer2DModel(nn.Module):
    """GroupNorm, proj_in (1x1 conv, or Linear with ``use_linear_projection``), transformer
    blocks over the H*W tokens, proj_out, residual. NHWC in and out."""

    heads: int
    dim_head: int
    num_layers: int = 1
    norm_num_groups: int = 32
    use_linear_projection: bool = False
    upcast: bool = False
    attention_impl: str | None = None
    remat: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        inner = self.heads * self.dim_head
        y = group_norm(self.norm_num_groups, 1e-6, self.dtype, "norm")(x).reshape(b, h * w, c)
        if self.use_linear_projection:
            y = dense(inner, self.dtype, "proj_in")(y)
        else:
            y = Conv1x1(inner, dtype=self.dtype, name="proj_in")(y)
        block_cls = nn.remat(BasicTransformerBlock) if self.remat else BasicTransformerBlock
        for i in range(self.num_layers):
            y = block_cls(
                inner,
                self.heads,
                self.dim_head,
                upcast=self.upcast,
                attention_impl=self.attention_impl,
                dtype=self.dtype,
                name=f"transformer_blocks_{i}",
            )(y, context)
        if self.use_linear_projection:
            y = dense(c, self.dtype, "proj_out")(y)
        else:
            y = Conv1x1(c, dtype=self.dtype, name="proj_out")(y)
        return y.reshape(b, h, w, c) + x.astype(y.dtype)


class TimestepEmbedding(nn.Module):
    """``linear_1`` -> SiLU -> ``linear_2`` on the sinusoidal embedding.

    With ``cond_proj_dim`` (LCM's guidance embedding, diffusers' ``time_cond_proj_dim``) a
    bias-free ``cond_proj`` maps ``condition`` [B, cond_proj_dim] to the input width and adds
    it to ``x`` before ``linear_1``. As in diffusers, a missing ``condition`` skips it.
    """

    dim: int
    dtype: Dtype = jnp.float32
    cond_proj_dim: int | None = None

    @nn.compact
    def __call__(self, x: jax.Array, condition: jax.Array | None = None) -> jax.Array:
        if condition is not None:
            if self.cond_proj_dim is None:
                raise ValueError("TimestepEmbedding got a condition but has no cond_proj_dim")
            if condition.ndim != 2 or condition.shape != (x.shape[0], self.cond_proj_dim):
                raise ValueError(
                    f"timestep condition must be [{x.shape[0]}, {self.cond_proj_dim}] "
                    f"(time_cond_proj_dim), got {tuple(condition.shape)}"
                )
            cond = dense(x.shape[-1], self.dtype, "cond_proj", use_bias=False)
            x = x.astype(self.dtype) + cond(condition.astype(self.dtype))
        x = nn.silu(dense(self.dim, self.dtype, "linear_1")(x))
        return dense(self.dim, self.dtype, "linear_2")(x)


def guidance_scale_embedding(w: jax.Array, dim: int) -> jax.Array:
    """Sinusoidal embedding of guidance weights ``w`` [B] -> float32 [B, dim].

    Equal to diffusers' ``get_guidance_scale_embedding`` (LatentConsistencyModelPipeline,
    StableDiffusionXLPipeline; from VDM): ``w * 1000`` against ``dim // 2`` frequencies
    ``10000 ** (-i / (dim // 2 - 1))``, sines then cosines, zero-padded when ``dim`` is odd.
    Those pipelines pass ``w = guidance_scale - 1`` (CFG written as ``uncond + scale * (cond -
    uncond)``, so LCM's ``w`` is one less) and ``dim = unet time_cond_proj_dim``; the result is
    the UNet's ``timestep_cond``.
    """
    w = jnp.asarray(w, jnp.float32)
    if w.ndim != 1:
        raise ValueError(f"guidance_scale_embedding: w must be 1-D [B], got shape {w.shape}")
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 4:
        raise ValueError(f"guidance_scale_embedding: dim must be an int >= 4, got {dim!r}")
    half = dim // 2
    # Frequencies rounded once from float64 (constants, the same on every backend). The
    # arguments reach w * 1000 rad, so a one-ulp difference in a float32 frequency (torch's
    # exp is not correctly rounded) moves the sinusoid by about |w| * 1e-4.
    freqs = np.exp(-math.log(10000.0) / (half - 1) * np.arange(half)).astype(np.float32)
    args = (w * 1000.0)[:, None] * jnp.asarray(freqs)[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb
