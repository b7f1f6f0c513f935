"""Attention through ``jax.nn.dot_product_attention``, the implementation chosen per layer.

``implementation``: "auto" (cuDNN flash attention where this machine, dtype and head dim allow
it, XLA elsewhere; the rule is ``spin_jax.platform.choose_attention``), None/"xla" (XLA on any
backend) or "cudnn" (cuDNN where the head dim allows, XLA for the other layers; refused with a
clear ValueError on a machine or dtype cuDNN cannot run at all).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from spin_jax.platform import IMPLEMENTATIONS, resolve_attention

__all__ = ["IMPLEMENTATIONS", "attention"]


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    implementation: str | None = None,
    mask: jax.Array | None = None,
    is_causal: bool = False,
    upcast: bool = False,
) -> jax.Array:
    """Multi-head attention on ``[B, L, H, D]`` inputs, returning ``[B, L, H, D]``.

    The implementation is resolved here, at trace time, from the compute dtype (``q.dtype``)
    and head dim (``q.shape[-1]``). ``upcast`` computes the XLA path in float32, as diffusers'
    ``upcast_attention`` does for SD 2.x; cuDNN accumulates in float32 anyway.
    """
    dtype = q.dtype
    impl = resolve_attention(
        implementation, dtype=dtype, head_dim=q.shape[-1], masked=mask is not None
    )
    if impl == "xla":
        impl = None  # jax's default path (XLA), as before
        if upcast:
            q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, implementation=impl)
    return out.astype(dtype)
