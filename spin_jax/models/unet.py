"""Stable Diffusion 1.x/2.x UNet2DConditionModel in Flax Linen (NHWC).

Follows diffusers' ``UNet2DConditionModel`` for the options SD 1.x and 2.x use; submodule names
mirror the diffusers state dict (``down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q``),
so ``convert.torch_to_flax`` loads a diffusers checkpoint with no renames.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from spin_jax.models.layers import (
    Downsample2D,
    ResnetBlock2D,
    TimestepEmbedding,
    Transformer2DModel,
    Upsample2D,
    group_norm,
    timestep_embedding,
)
from spin_jax.platform import check_attention_impl

Dtype = Any

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")


def _per_block(value: Any, n: int) -> tuple:
    if isinstance(value, Sequence) and not isinstance(value, str):
        return tuple(value)
    return (value,) * n


class _BlockOptions(nn.Module):
    """Fields every UNet block shares."""

    out_channels: int
    num_layers: int
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    output_scale_factor: float = 1.0
    dtype: Dtype = jnp.float32
    remat: bool = False

    def resnet(self, j: int) -> ResnetBlock2D:
        cls = nn.remat(ResnetBlock2D) if self.remat else ResnetBlock2D
        return cls(
            self.out_channels,
            groups=self.norm_num_groups,
            eps=self.norm_eps,
            output_scale_factor=self.output_scale_factor,
            dtype=self.dtype,
            name=f"resnets_{j}",
        )


class _AttnOptions(_BlockOptions):
    heads: int = 8
    transformer_layers: int = 1
    use_linear_projection: bool = False
    upcast_attention: bool = False
    attention_impl: str | None = None

    def transformer(self, j: int) -> Transformer2DModel:
        return Transformer2DModel(
            self.heads,
            self.out_channels // self.heads,
            num_layers=self.transformer_layers,
            norm_num_groups=self.norm_num_groups,
            use_linear_projection=self.use_linear_projection,
            upcast=self.upcast_attention,
            attention_impl=self.attention_impl,
            remat=self.remat,
            dtype=self.dtype,
            name=f"attentions_{j}",
        )


class DownBlock2D(_BlockOptions):
    add_downsample: bool = True
    downsample_padding: int = 1

    @nn.compact
    def __call__(self, x, temb, context=None):
        states = []
        for j in range(self.num_layers):
            x = self.resnet(j)(x, temb)
            states.append(x)
        if self.add_downsample:
            x = Downsample2D(
                self.out_channels, self.downsample_padding, self.dtype, name="downsamplers_0"
            )(x)
            states.append(x)
        return x, states


class CrossAttnDownBlock2D(_AttnOptions):
    add_downsample: bool = True
    downsample_padding: int = 1

    @nn.compact
    def __call__(self, x, temb, context):
        states = []
        for j in range(self.num_layers):
            x = self.resnet(j)(x, temb)
            x = self.transformer(j)(x, context)
            states.append(x)
        if self.add_downsample:
            x = Downsample2D(
                self.out_channels, self.downsample_padding, self.dtype, name="downsamplers_0"
            )(x)
            states.append(x)
        return x, states


class UNetMidBlock2DCrossAttn(_AttnOptions):
    @nn.compact
    def __call__(self, x, temb, context):
        x = self.resnet(0)(x, temb)
        x = self.transformer(0)(x, context)
        return self.resnet(1)(x, temb)


class UpBlock2D(_BlockOptions):
    add_upsample: bool = True

    @nn.compact
    def __call__(self, x, skips, temb, context=None, upsample_size=None):
        for j in range(self.num_layers):
            x = jnp.concatenate([x, skips[-1 - j].astype(x.dtype)], axis=-1)
            x = self.resnet(j)(x, temb)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, self.dtype, name="upsamplers_0")(x, upsample_size)
        return x


class CrossAttnUpBlock2D(_AttnOptions):
    add_upsample: bool = True

    @nn.compact
    def __call__(self, x, skips, temb, context, upsample_size=None):
        for j in range(self.num_layers):
            x = jnp.concatenate([x, skips[-1 - j].astype(x.dtype)], axis=-1)
            x = self.resnet(j)(x, temb)
            x = self.transformer(j)(x, context)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, self.dtype, name="upsamplers_0")(x, upsample_size)
        return x


class UNet2DConditionModel(nn.Module):
    """Noise (or v) prediction network: ``(sample NHWC, timesteps, context [B, L, D]) -> NHWC``.

    Fields are diffusers' config keys (defaults as diffusers) plus ``dtype`` (compute dtype;
    parameters stay float32), ``attention_impl`` (None | "auto" | "xla" | "cudnn") and ``remat``
    (rematerialise every resnet and transformer block to save training memory).
    ``attention_head_dim`` is, as in diffusers, the number of heads unless
    ``num_attention_heads`` is given.
    """

    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )
    up_block_types: tuple[str, ...] = (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    )
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple[int, ...] = 1280
    transformer_layers_per_block: int | tuple[int, ...] = 1
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    use_linear_projection: bool = False
    upcast_attention: bool = False
    time_embedding_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None
    remat: bool = False

    @property
    def context_dim(self) -> int:
        return _per_block(self.cross_attention_dim, 1)[0]

    @nn.compact
    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array | int | float,
        encoder_hidden_states: jax.Array,
    ) -> jax.Array:
        n = len(self.block_out_channels)
        if sample.ndim != 4 or sample.shape[-1] != self.in_channels:
            raise ValueError(
                f"UNet sample must be NHWC with {self.in_channels} channels, got {sample.shape}"
            )
        context = encoder_hidden_states
        if context.ndim != 3 or context.shape[-1] != self.context_dim:
            raise ValueError(
                f"UNet encoder_hidden_states must be [B, L, {self.context_dim}], got "
                f"{context.shape}"
            )
        check_attention_impl(self.attention_impl)
        b = sample.shape[0]
        t = jnp.asarray(timesteps)
        if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, b)):
            raise ValueError(f"UNet timesteps must be a scalar or [{b}], got shape {t.shape}")
        t = jnp.broadcast_to(t.reshape(-1) if t.ndim else t, (b,))

        heads = _per_block(self.num_attention_heads or self.attention_head_dim, n)
        layers = _per_block(self.layers_per_block, n)
        tlayers = _per_block(self.transformer_layers_per_block, n)
        common = dict(
            norm_num_groups=self.norm_num_groups,
            norm_eps=self.norm_eps,
            dtype=self.dtype,
            remat=self.remat,
        )

        def attn_options(i):
            return dict(
                heads=heads[i],
                transformer_layers=tlayers[i],
                use_linear_projection=self.use_linear_projection,
                upcast_attention=self.upcast_attention,
                attention_impl=self.attention_impl,
            )

        # Time embedding: sinusoids in float32, the MLP in the compute dtype.
        temb = timestep_embedding(
            t,
            self.block_out_channels[0],
            flip_sin_to_cos=self.flip_sin_to_cos,
            freq_shift=self.freq_shift,
        ).astype(self.dtype)
        temb_dim = self.time_embedding_dim or 4 * self.block_out_channels[0]
        emb = TimestepEmbedding(temb_dim, self.dtype, name="time_embedding")(temb)

        x = sample
        if self.center_input_sample:
            x = 2 * x - 1.0
        pad = (self.conv_in_kernel - 1) // 2
        x = nn.Conv(
            self.block_out_channels[0],
            (self.conv_in_kernel,) * 2,
            padding=((pad, pad), (pad, pad)),
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name="conv_in",
        )(x)

        skips = [x]
        for i, kind in enumerate(self.down_block_types):
            opts = dict(
                out_channels=self.block_out_channels[i],
                num_layers=layers[i],
                add_downsample=i < n - 1,
                downsample_padding=self.downsample_padding,
                name=f"down_blocks_{i}",
                **common,
            )
            if kind == "CrossAttnDownBlock2D":
                x, states = CrossAttnDownBlock2D(**opts, **attn_options(i))(x, emb, context)
            elif kind == "DownBlock2D":
                x, states = DownBlock2D(**opts)(x, emb)
            else:
                raise ValueError(f"unknown down block type {kind!r}; known: {DOWN_BLOCK_TYPES}")
            skips.extend(states)

        mid = UNetMidBlock2DCrossAttn(
            out_channels=self.block_out_channels[-1],
            num_layers=1,
            output_scale_factor=self.mid_block_scale_factor,
            name="mid_block",
            **common,
            **attn_options(n - 1),
        )
        x = mid(x, emb, context)

        # When H or W is not divisible by 2**(n-1), upsample to the skip's size (as diffusers).
        up_factor = 2 ** (n - 1)
        odd = sample.shape[1] % up_factor or sample.shape[2] % up_factor
        rev_channels = self.block_out_channels[::-1]
        rev_heads, rev_layers, rev_tlayers = heads[::-1], layers[::-1], tlayers[::-1]
        for i, kind in enumerate(self.up_block_types):
            num = rev_layers[i] + 1
            res, skips = skips[-num:], skips[:-num]
            last = i == n - 1
            size = tuple(skips[-1].shape[1:3]) if (odd and not last) else None
            opts = dict(
                out_channels=rev_channels[i],
                num_layers=num,
                add_upsample=not last,
                name=f"up_blocks_{i}",
                **common,
            )
            if kind == "CrossAttnUpBlock2D":
                x = CrossAttnUpBlock2D(
                    **opts,
                    heads=rev_heads[i],
                    transformer_layers=rev_tlayers[i],
                    use_linear_projection=self.use_linear_projection,
                    upcast_attention=self.upcast_attention,
                    attention_impl=self.attention_impl,
                )(x, res, emb, context, size)
            elif kind == "UpBlock2D":
                x = UpBlock2D(**opts)(x, res, emb, None, size)
            else:
                raise ValueError(f"unknown up block type {kind!r}; known: {UP_BLOCK_TYPES}")

        x = nn.silu(group_norm(self.norm_num_groups, self.norm_eps, self.dtype, "conv_norm_out")(x))
        pad = (self.conv_out_kernel - 1) // 2
        x = nn.Conv(
            self.out_channels,
            (self.conv_out_kernel,) * 2,
            padding=((pad, pad), (pad, pad)),
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name="conv_out",
        )(x)
        return x.astype(sample.dtype)


# ------------------------------------------------------------------------------------------
# Config validation

# Keys whose value must be what diffusers' default gives (or one of a few equivalents):
# anything else selects a feature this implementation does not have.
_UNET_FIXED: dict[str, tuple] = {
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "act_fn": ("silu", "swish"),
    "dropout": (0.0,),
    "dual_cross_attention": (False,),
    "class_embed_type": (None,),
    "addition_embed_type": (None,),
    "addition_time_embed_dim": (None,),
    "num_class_embeds": (None,),
    "time_cond_proj_dim": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0,),
    "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "projection_class_embeddings_input_dim": (None,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,),
    "reverse_transformer_layers_per_block": (None,),
}
# Accepted and not needed by the network.
_UNET_IGNORED = ("sample_size", "addition_embed_type_num_heads")
# Passed to the module.
_UNET_FIELDS = (
    "in_channels",
    "out_channels",
    "center_input_sample",
    "flip_sin_to_cos",
    "freq_shift",
    "down_block_types",
    "up_block_types",
    "block_out_channels",
    "layers_per_block",
    "downsample_padding",
    "mid_block_scale_factor",
    "norm_num_groups",
    "norm_eps",
    "cross_attention_dim",
    "transformer_layers_per_block",
    "attention_head_dim",
    "num_attention_heads",
    "use_linear_projection",
    "upcast_attention",
    "time_embedding_dim",
    "conv_in_kernel",
    "conv_out_kernel",
)
UNET_CONFIG_KEYS = (
    frozenset(_UNET_FIXED)
    | frozenset(_UNET_IGNORED)
    | frozenset(_UNET_FIELDS)
    | {"only_cross_attention"}
)


def config_error(source: str, key: str, value: Any, why: str) -> ValueError:
    return ValueError(f"{source}: {key}={value!r} {why}")


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int_or_list(source, key, value, n, *, allow_none=False, minimum=1):
    """An int or a list of n ints (each >= minimum) -> int or tuple."""
    if value is None and allow_none:
        return None
    if is_int(value) and value >= minimum:
        return value
    if (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and len(value) == n
        and all(is_int(v) and v >= minimum for v in value)
    ):
        return tuple(value)
    raise config_error(
        source, key, value, f"must be an int >= {minimum} or a list of {n} such ints"
    )


def _same(value: Any, allowed: Any) -> bool:
    # None and booleans must match exactly (0 is not False); numbers and strings by value.
    if value is allowed:
        return True
    if value is None or allowed is None or isinstance(value, bool) or isinstance(allowed, bool):
        return False
    return value == allowed


def check_fixed(source: str, config: Mapping[str, Any], fixed: Mapping[str, tuple]) -> None:
    for key, allowed in fixed.items():
        if key in config and not any(_same(config[key], a) for a in allowed):
            raise config_error(
                source,
                key,
                config[key],
                f"is not supported (supported: {', '.join(repr(a) for a in allowed)})",
            )


def check_known(source: str, config: Mapping[str, Any], known: frozenset) -> dict[str, Any]:
    """Drops ``_``-prefixed keys; raises on any key outside ``known``."""
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(
            f"{source}: unknown config key(s) {', '.join(repr(k) for k in unknown)} "
            f"(value {config[unknown[0]]!r}); this implementation does not know them"
        )
    return config


def unet_from_config(
    config: Mapping[str, Any],
    *,
    dtype: Dtype = jnp.float32,
    attention_impl: str | None = None,
    remat: bool = False,
    source: str = "unet/config.json",
) -> UNet2DConditionModel:
    """Builds the UNet from a diffusers ``unet/config.json`` dict, refusing what it cannot run."""
    if not isinstance(config, Mapping):
        raise ValueError(f"{source}: expected a JSON object, got {type(config).__name__}")
    config = check_known(source, config, UNET_CONFIG_KEYS)
    check_fixed(source, config, _UNET_FIXED)
    check_attention_impl(attention_impl)

    defaults = UNet2DConditionModel()
    kw = {k: config.get(k, getattr(defaults, k)) for k in _UNET_FIELDS}

    down, up = kw["down_block_types"], kw["up_block_types"]
    channels = kw["block_out_channels"]
    for key, value, known in (
        ("down_block_types", down, DOWN_BLOCK_TYPES),
        ("up_block_types", up, UP_BLOCK_TYPES),
    ):
        if isinstance(value, str) or not isinstance(value, Sequence) or not value:
            raise config_error(source, key, value, "must be a non-empty list of block type names")
        for v in value:
            if v not in known:
                raise config_error(
                    source, key, value, f"has unsupported block type {v!r} (known: {known})"
                )
    n = len(down)
    if len(up) != n:
        raise config_error(
            source, "up_block_types", up, f"must have as many entries as down_block_types ({n})"
        )
    if (
        isinstance(channels, str)
        or not isinstance(channels, Sequence)
        or len(channels) != n
        or not all(is_int(c) and c > 0 for c in channels)
    ):
        raise config_error(
            source, "block_out_channels", channels, f"must be a list of {n} positive ints"
        )
    groups = kw["norm_num_groups"]
    if not is_int(groups) or groups < 1 or any(c % groups for c in channels):
        raise config_error(
            source,
            "norm_num_groups",
            groups,
            f"must be an int dividing every block_out_channels {channels}",
        )
    for key in (
        "in_channels",
        "out_channels",
        "downsample_padding",
        "conv_in_kernel",
        "conv_out_kernel",
    ):
        minimum = 0 if key == "downsample_padding" else 1
        if not is_int(kw[key]) or kw[key] < minimum:
            raise config_error(source, key, kw[key], f"must be an int >= {minimum}")
    for key in ("conv_in_kernel", "conv_out_kernel"):
        if kw[key] % 2 == 0:
            raise config_error(source, key, kw[key], "must be odd")
    kw["layers_per_block"] = _int_or_list(source, "layers_per_block", kw["layers_per_block"], n)
    kw["transformer_layers_per_block"] = _int_or_list(
        source, "transformer_layers_per_block", kw["transformer_layers_per_block"], n
    )
    kw["attention_head_dim"] = _int_or_list(
        source, "attention_head_dim", kw["attention_head_dim"], n
    )
    kw["num_attention_heads"] = _int_or_list(
        source, "num_attention_heads", kw["num_attention_heads"], n, allow_none=True
    )
    heads = _per_block(kw["num_attention_heads"] or kw["attention_head_dim"], n)
    for i, (c, h) in enumerate(zip(channels, heads, strict=True)):
        if c % h:
            key = "num_attention_heads" if kw["num_attention_heads"] else "attention_head_dim"
            raise config_error(
                source, key, kw[key], f"gives {h} heads for block {i}, which has {c} channels"
            )
    cross = _int_or_list(source, "cross_attention_dim", kw["cross_attention_dim"], n)
    if isinstance(cross, tuple):
        if len(set(cross)) != 1:
            raise config_error(
                source,
                "cross_attention_dim",
                cross,
                "per-block values must all be equal (one context)",
            )
        cross = cross[0]
    kw["cross_attention_dim"] = cross
    only = config.get("only_cross_attention", False)
    flags = only if isinstance(only, Sequence) and not isinstance(only, str) else [only]
    if any(f is not False for f in flags):
        raise config_error(
            source, "only_cross_attention", only, "is not supported (supported: False)"
        )
    if kw["time_embedding_dim"] is not None and not (
        is_int(kw["time_embedding_dim"]) and kw["time_embedding_dim"] > 0
    ):
        raise config_error(
            source, "time_embedding_dim", kw["time_embedding_dim"], "must be null or an int > 0"
        )
    for key in ("norm_eps", "freq_shift", "mid_block_scale_factor"):
        if isinstance(kw[key], bool) or not isinstance(kw[key], (int, float)):
            raise config_error(source, key, kw[key], "must be a number")
    for key in (
        "center_input_sample",
        "flip_sin_to_cos",
        "use_linear_projection",
        "upcast_attention",
    ):
        if not isinstance(kw[key], bool):
            raise config_error(source, key, kw[key], "must be true or false")
    kw["down_block_types"] = tuple(down)
    kw["up_block_types"] = tuple(up)
    kw["block_out_channels"] = tuple(channels)
    return UNet2DConditionModel(**kw, dtype=dtype, attention_impl=attention_impl, remat=remat)


def unet_dummy_inputs(model: UNet2DConditionModel, batch: int = 1, size: int | None = None):
    """Smallest valid inputs (as ShapeDtypeStructs) for ``init``/cost analysis."""
    size = size or 2 ** (len(model.block_out_channels) - 1)
    return (
        jax.ShapeDtypeStruct((batch, size, size, model.in_channels), jnp.float32),
        jax.ShapeDtypeStruct((batch,), jnp.int32),
        jax.ShapeDtypeStruct((batch, 1, model.context_dim), jnp.float32),
    )


def unet_param_shapes(model: UNet2DConditionModel) -> dict[str, Any]:
    """The params tree as ``jax.ShapeDtypeStruct`` leaves, without allocating anything."""
    variables = jax.eval_shape(model.init, jax.random.key(0), *unet_dummy_inputs(model))
    return variables["params"]
