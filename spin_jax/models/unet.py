"""Stable Diffusion UNet2DConditionModel (SD 1.x/2.x, SDXL, LCM) in Flax Linen (NHWC).

Follows diffusers' ``UNet2DConditionModel`` for the options SD 1.x, 2.x and SDXL use (SDXL's
``addition_embed_type="text_time"`` micro-conditioning, LCM's ``time_cond_proj_dim`` guidance
embedding, per-block and per-layer ``transformer_layers_per_block``); submodule names mirror the
diffusers state dict (``down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q``), so
``convert.torch_to_flax`` loads a diffusers checkpoint with no renames.
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
    guidance_scale_embedding,
    timestep_embedding,
)
from spin_jax.platform import check_attention_impl

Dtype = Any

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
ADDITION_EMBED_TYPES = (None, "text_time")

__all__ = [
    "UNet2DConditionModel",
    "check_added_cond_dims",
    "guidance_scale_embedding",
    "unet_dummy_inputs",
    "unet_from_config",
    "unet_param_shapes",
]


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
    # One count for the block, or one per resnet/attention pair (SSD-1B-style configs).
    transformer_layers: int | tuple[int, ...] = 1
    use_linear_projection: bool = False
    upcast_attention: bool = False
    attention_impl: str | None = None

    def transformer(self, j: int) -> Transformer2DModel:
        return Transformer2DModel(
            self.heads,
            self.out_channels // self.heads,
            num_layers=_per_block(self.transformer_layers, j + 1)[j],
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

    ``__call__(sample, timesteps, encoder_hidden_states, added_cond=None, timestep_cond=None)``:

    - ``added_cond`` (``addition_embed_type="text_time"``, SDXL; diffusers' ``added_cond_kwargs``):
      ``{"text_embeds": [B, D_pool], "time_ids": [B, K]}``; each time id is embedded with
      ``addition_time_embed_dim`` sinusoids, flattened after the pooled text embedding (so
      ``D_pool + K * addition_time_embed_dim == projection_class_embeddings_input_dim``), and
      passed through ``add_embedding``; the result is added to the time embedding.
      Required exactly when the config has text_time.
    - ``timestep_cond`` (``time_cond_proj_dim``, LCM): [B, time_cond_proj_dim], usually
      :func:`guidance_scale_embedding` of ``guidance_scale - 1``; projected by
      ``time_embedding.cond_proj`` and added to the timestep sinusoids. Optional, as in diffusers
      (omitted, the guidance term is skipped).
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
    transformer_layers_per_block: int | tuple[int | tuple[int, ...], ...] = 1
    reverse_transformer_layers_per_block: tuple[int | tuple[int, ...], ...] | None = None
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    use_linear_projection: bool = False
    upcast_attention: bool = False
    time_embedding_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    time_cond_proj_dim: int | None = None
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None
    remat: bool = False

    @property
    def context_dim(self) -> int:
        return _per_block(self.cross_attention_dim, 1)[0]

    @property
    def needs_added_cond(self) -> bool:
        return self.addition_embed_type == "text_time"

    def _added_embedding(self, added_cond: Any, b: int) -> jax.Array:
        """SDXL's text_time term: ``add_embedding(concat(text_embeds, sinusoids(time_ids)))``."""
        if not isinstance(added_cond, Mapping) or not {"text_embeds", "time_ids"} <= set(
            added_cond
        ):
            if added_cond is None:
                got = "none"
            elif isinstance(added_cond, Mapping):
                got = f"keys {sorted(added_cond)}"
            else:
                got = type(added_cond).__name__
            raise ValueError(
                "UNet with addition_embed_type='text_time' needs added_cond={'text_embeds': "
                f"[B, D_pool], 'time_ids': [B, K]}} (as diffusers' added_cond_kwargs); got {got}"
            )
        text, ids = jnp.asarray(added_cond["text_embeds"]), jnp.asarray(added_cond["time_ids"])
        a, p = self.addition_time_embed_dim, self.projection_class_embeddings_input_dim
        if text.ndim != 2 or ids.ndim != 2 or text.shape[0] != b or ids.shape[0] != b:
            raise ValueError(
                f"UNet added_cond must hold text_embeds [{b}, D_pool] and time_ids [{b}, K]; got "
                f"text_embeds {tuple(text.shape)}, time_ids {tuple(ids.shape)}"
            )
        if text.shape[1] + ids.shape[1] * a != p:
            raise ValueError(
                f"UNet added_cond: text_embeds dim {text.shape[1]} + {ids.shape[1]} time ids x "
                f"addition_time_embed_dim {a} = {text.shape[1] + ids.shape[1] * a} != "
                f"projection_class_embeddings_input_dim {p}"
            )
        time_embeds = timestep_embedding(
            ids.reshape(-1),
            a,
            flip_sin_to_cos=self.flip_sin_to_cos,
            freq_shift=self.freq_shift,
        ).reshape(b, -1)
        embeds = jnp.concatenate([text.astype(jnp.float32), time_embeds], axis=-1)
        temb_dim = self.time_embedding_dim or 4 * self.block_out_channels[0]
        return TimestepEmbedding(temb_dim, self.dtype, name="add_embedding")(
            embeds.astype(self.dtype)
        )

    @nn.compact
    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array | int | float,
        encoder_hidden_states: jax.Array,
        added_cond: Mapping[str, jax.Array] | None = None,
        timestep_cond: jax.Array | None = None,
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
        if added_cond is not None and not self.needs_added_cond:
            raise ValueError(
                "UNet got added_cond, but its config has addition_embed_type="
                f"{self.addition_embed_type!r} (only 'text_time', SDXL, takes it)"
            )
        if timestep_cond is not None and self.time_cond_proj_dim is None:
            raise ValueError(
                "UNet got timestep_cond, but its config has time_cond_proj_dim=None "
                "(only guidance-embedding UNets such as LCM take it)"
            )

        heads = _per_block(self.num_attention_heads or self.attention_head_dim, n)
        layers = _per_block(self.layers_per_block, n)
        tlayers = _per_block(self.transformer_layers_per_block, n)
        rev_tlayers = (
            tlayers[::-1]
            if self.reverse_transformer_layers_per_block is None
            else tuple(self.reverse_transformer_layers_per_block)
        )
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
        emb = TimestepEmbedding(
            temb_dim, self.dtype, cond_proj_dim=self.time_cond_proj_dim, name="time_embedding"
        )(temb, timestep_cond)
        if self.needs_added_cond:
            emb = emb + self._added_embedding(added_cond, b)

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
        rev_heads, rev_layers = heads[::-1], layers[::-1]
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
    "addition_embed_type": ADDITION_EMBED_TYPES,
    "num_class_embeds": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0,),
    "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,),
}
# Accepted and not needed by the network (the number of heads serves addition_embed_type
# "text" only).
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
    "reverse_transformer_layers_per_block",
    "attention_head_dim",
    "num_attention_heads",
    "use_linear_projection",
    "upcast_attention",
    "time_embedding_dim",
    "conv_in_kernel",
    "conv_out_kernel",
    "addition_embed_type",
    "addition_time_embed_dim",
    "projection_class_embeddings_input_dim",
    "time_cond_proj_dim",
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


def _transformer_layers(
    source: str, key: str, value: Any, layers: tuple[int, ...], *, block_list: bool = False
) -> int | tuple:
    """An int, or one entry per block: an int, or a list with one int per layer of the block.

    ``block_list``: a bare int is not accepted (``reverse_transformer_layers_per_block``).
    """
    n = len(layers)

    def count(v):
        return is_int(v) and v >= 1

    if count(value) and not block_list:
        return value
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == n:
        out = []
        for v, m in zip(value, layers, strict=True):
            if count(v):
                out.append(v)
            elif (
                isinstance(v, Sequence)
                and not isinstance(v, str)
                and len(v) == m
                and all(count(u) for u in v)
            ):
                out.append(tuple(v))
            else:
                break
        else:
            return tuple(out)
    what = "a list" if block_list else "an int >= 1 or a list"
    raise config_error(
        source,
        key,
        value,
        f"must be {what} of {n} entries, each an int >= 1 or a list of one int >= 1 per layer "
        f"(layers per block: {list(layers)})",
    )


def _check_added_embedding(source: str, kw: dict[str, Any]) -> None:
    """text_time needs both of its dims; without it they must be null (no feature uses them)."""
    kind = kw["addition_embed_type"]
    for key in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
        value = kw[key]
        if kind == "text_time":
            if not (is_int(value) and value > 0):
                raise config_error(
                    source, key, value, "must be an int > 0 with addition_embed_type='text_time'"
                )
        elif value is not None:
            raise config_error(
                source, key, value, f"is not supported with addition_embed_type={kind!r}"
            )
    if kind == "text_time" and (
        kw["projection_class_embeddings_input_dim"] <= kw["addition_time_embed_dim"]
    ):
        raise config_error(
            source,
            "projection_class_embeddings_input_dim",
            kw["projection_class_embeddings_input_dim"],
            f"leaves no room for the pooled text embedding next to time ids of "
            f"addition_time_embed_dim {kw['addition_time_embed_dim']}",
        )
    value = kw["time_cond_proj_dim"]
    if value is not None and not (is_int(value) and value > 0):
        raise config_error(source, "time_cond_proj_dim", value, "must be null or an int > 0")


def check_added_cond_dims(
    unet_config: Mapping[str, Any] | UNet2DConditionModel,
    text_embeds_dim: int,
    time_ids_len: int = 6,
    *,
    source: str = "unet/config.json",
) -> None:
    """Checks that a pooled text embedding of ``text_embeds_dim`` and ``time_ids_len`` time ids
    fill SDXL's ``add_embedding`` input: ``projection_class_embeddings_input_dim ==
    text_embeds_dim + time_ids_len * addition_time_embed_dim`` (SDXL base: 1280 + 6 x 256 =
    2816; the refiner has 5 time ids). ``unet_config``: the diffusers config dict or the model.
    """
    if isinstance(unet_config, UNet2DConditionModel):
        get = lambda k: getattr(unet_config, k)  # noqa: E731
    elif isinstance(unet_config, Mapping):
        get = unet_config.get
    else:
        raise ValueError(f"{source}: expected a JSON object, got {type(unet_config).__name__}")
    kind = get("addition_embed_type")
    if kind != "text_time":
        raise config_error(
            source,
            "addition_embed_type",
            kind,
            "must be 'text_time' for a UNet given pooled text embeddings and time ids",
        )
    a, p = get("addition_time_embed_dim"), get("projection_class_embeddings_input_dim")
    if not (is_int(a) and a > 0):
        raise config_error(source, "addition_time_embed_dim", a, "must be an int > 0")
    want = text_embeds_dim + time_ids_len * a
    if p != want:
        raise config_error(
            source,
            "projection_class_embeddings_input_dim",
            p,
            f"does not match the text encoder's pooled dim {text_embeds_dim} + {time_ids_len} "
            f"time ids x addition_time_embed_dim {a} = {want}",
        )


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
    layers = _per_block(kw["layers_per_block"], n)
    kw["transformer_layers_per_block"] = _transformer_layers(
        source, "transformer_layers_per_block", kw["transformer_layers_per_block"], layers
    )
    reverse = kw["reverse_transformer_layers_per_block"]
    if reverse is not None:
        # Up block i has layers_per_block[n - 1 - i] + 1 resnet/attention pairs.
        up_layers = tuple(c + 1 for c in layers[::-1])
        reverse = _transformer_layers(
            source, "reverse_transformer_layers_per_block", reverse, up_layers, block_list=True
        )
    elif isinstance(kw["transformer_layers_per_block"], tuple) and any(
        isinstance(v, tuple) for v in kw["transformer_layers_per_block"]
    ):
        raise config_error(
            source,
            "transformer_layers_per_block",
            config["transformer_layers_per_block"],
            "has per-layer lists, which need reverse_transformer_layers_per_block (as diffusers)",
        )
    kw["reverse_transformer_layers_per_block"] = reverse
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
    _check_added_embedding(source, kw)
    for key in ("norm_eps", "freq_shift", "mid_block_scale_factor"):
        if isinstance(kw[key], bool) or not isinstance(kw[key], (int, float)):
            raise config_error(source, key, kw[key], "must be a number")
    if kw["upcast_attention"] is None:
        kw["upcast_attention"] = False  # SDXL's published config says null; diffusers: falsy
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


def unet_dummy_inputs(
    model: UNet2DConditionModel, batch: int = 1, size: int | None = None, context_len: int = 1
) -> tuple:
    """Smallest valid inputs (as ShapeDtypeStructs) for ``init``/cost analysis.

    ``(sample, timesteps, context)``, then ``added_cond`` (six time ids, the rest of
    ``projection_class_embeddings_input_dim`` as the pooled embedding) for a text_time UNet and
    ``timestep_cond`` for a guidance-embedding one (``None`` in the added_cond slot if needed).
    """
    size = size or 2 ** (len(model.block_out_channels) - 1)
    f32 = jnp.float32
    args: list[Any] = [
        jax.ShapeDtypeStruct((batch, size, size, model.in_channels), f32),
        jax.ShapeDtypeStruct((batch,), jnp.int32),
        jax.ShapeDtypeStruct((batch, context_len, model.context_dim), f32),
    ]
    if model.needs_added_cond:
        a, p = model.addition_time_embed_dim, model.projection_class_embeddings_input_dim
        k = 6 if p > 6 * a else (p - 1) // a  # parameter shapes depend on the sum only
        args.append(
            {
                "text_embeds": jax.ShapeDtypeStruct((batch, p - k * a), f32),
                "time_ids": jax.ShapeDtypeStruct((batch, k), f32),
            }
        )
    if model.time_cond_proj_dim is not None:
        if not model.needs_added_cond:
            args.append(None)
        args.append(jax.ShapeDtypeStruct((batch, model.time_cond_proj_dim), f32))
    return tuple(args)


def unet_param_shapes(model: UNet2DConditionModel) -> dict[str, Any]:
    """The params tree as ``jax.ShapeDtypeStruct`` leaves, without allocating anything."""
    variables = jax.eval_shape(model.init, jax.random.key(0), *unet_dummy_inputs(model))
    return variables["params"]
