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

__all__ = ["IMPLEMENTATIONS", "attention", "xla_attention"]


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
        if upcast:
            q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
        return xla_attention(q, k, v, mask=mask, is_causal=is_causal).astype(dtype)
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, implementation=impl)
    return out.astype(dtype)


def xla_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | None = None,
    is_causal: bool = False,
) -> jax.Array:
    """Softmax attention in plain XLA ops on ``[B, L, H, D]``, logits and sums in float32.

    Two things make it 2-4x faster than ``jax.nn.dot_product_attention``'s XLA path on XLA:CPU
    (bench/RESULTS.md): the heads move next to the batch before the matmuls (batch dimensions
    leading, so each matmul is a plain batched GEMM), and the softmax's division is applied to
    the [L, D] output instead of the [L, L] probabilities. ``mask``: True where a query may
    attend, broadcastable to [B, H, L_q, L_k].
    """
    qh, kh, vh = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))  # [B, H, L, D]
    logits = jnp.einsum("bhqd,bhkd->bhqk", qh, kh, preferred_element_type=jnp.float32)
    logits = logits * (q.shape[-1] ** -0.5)
    if is_causal:
        causal = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))
        mask = causal if mask is None else mask & causal
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    # Subtracting the row maximum leaves the value unchanged: no gradient needs to flow through it.
    weights = jnp.exp(logits - jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True)))
    out = jnp.einsum("bhqk,bhkd->bhqd", weights.astype(v.dtype), vh,
                     preferred_element_type=jnp.float32)  # fmt: skip
    out = out / weights.sum(axis=-1, keepdims=True)
    return jnp.swapaxes(out, 1, 2).astype(q.dtype)
