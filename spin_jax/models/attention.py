"""Attention through ``jax.nn.dot_product_attention``, the implementation chosen by config."""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = (None, "xla", "cudnn")


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

    ``implementation``: None/"xla" (any backend) or "cudnn" (flash attention on NVIDIA GPUs,
    float16/bfloat16 only). ``upcast`` computes the XLA path in float32, as diffusers'
    ``upcast_attention`` does for SD 2.x; cuDNN accumulates in float32 anyway.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r} not in {IMPLEMENTATIONS}")
    if implementation == "xla":
        implementation = None
    dtype = q.dtype
    if implementation == "cudnn" and dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(
            f"attention implementation 'cudnn' needs bfloat16/float16 compute, got {dtype}; "
            "set the compute dtype to bfloat16 or the implementation to None"
        )
    if upcast and implementation is None:
        q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    out = jax.nn.dot_product_attention(
        q, k, v, mask=mask, is_causal=is_causal, implementation=implementation
    )
    return out.astype(dtype)
