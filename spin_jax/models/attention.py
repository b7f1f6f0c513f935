"""Attention through ``jax.nn.dot_product_attention``, the implementation chosen per layer.

``implementation``: "auto" (cuDNN flash attention where this machine, dtype and head dim allow
it, XLA elsewhere; the rule is ``spin_jax.platform.choose_attention``), None/"xla" (XLA on any
backend) or "cudnn" (cuDNN where the head dim allows, XLA for the other layers; refused with a
clear ValueError on a machine or dtype cuDNN cannot run at all).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator

import jax
import jax.numpy as jnp

from spin_jax.platform import IMPLEMENTATIONS, describe_machine, resolve_attention

__all__ = ["IMPLEMENTATIONS", "attention", "cpu_row_block", "unblocked", "xla_attention"]


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
    the [L, D] output instead of the [L, L] probabilities. On a CPU, long unmasked sequences
    (:func:`cpu_row_block`) are computed one head and one block of query rows at a time, so the
    logits stay in cache (about 3x faster at 1024 and 4096 tokens); their gradient is the
    unblocked one. ``mask``: True where a query may attend, broadcastable to [B, H, L_q, L_k].
    """
    if is_causal:
        causal = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))
        mask = causal if mask is None else mask & causal
    block = cpu_row_block(q.shape[1]) if mask is None else 0
    if block:
        return _row_blocked(q, k, v, block)
    return _attention(q, k, v, mask)


# Query-row blocking on XLA:CPU, measured on 2 vCPUs (ms per call, bench/RESULTS.md): at
# [2, 1024, 8, 40] 84 unblocked, 24 in blocks of 512 rows (torch's SDPA 22); at 4096 tokens
# 1120 vs 357 (torch 340); at 256 tokens blocking is 2x slower (too little work per loop step).
_ROW_BLOCKS = (512, 256)
_MIN_BLOCKED_LEN = 1024


_UNBLOCKED = threading.local()


@contextlib.contextmanager
def unblocked() -> Iterator[None]:
    """Traces inside the block use the unblocked form everywhere: for FLOP counts, since XLA's
    cost analysis counts a loop's body once. Trace a function not traced before (JAX caches
    traces per function, not per this switch)."""
    before = getattr(_UNBLOCKED, "on", False)
    _UNBLOCKED.on = True
    try:
        yield
    finally:
        _UNBLOCKED.on = before


def cpu_row_block(len_q: int, platform: str | None = None) -> int:
    """Rows of queries per step of a blocked attention on this machine: 0 (unblocked) except
    on a CPU for sequences of at least 1024 queries, divisible by a block size (and outside
    :func:`unblocked`)."""
    if getattr(_UNBLOCKED, "on", False) or len_q < _MIN_BLOCKED_LEN:
        return 0
    platform = describe_machine().platform if platform is None else platform
    if str(platform).lower() != "cpu":
        return 0
    return next((b for b in _ROW_BLOCKS if len_q % b == 0), 0)


def _scaled(q: jax.Array) -> jax.Array:
    # The 1/sqrt(D) scale on the queries, not the [L_q, L_k] logits (as flax does): L_k/D times
    # fewer multiplies, and XLA:CPU materialises a scale broadcast to the logits' shape as an
    # operand of its fused matmul (10 ms of a 126 ms forward at bench_unet --size small).
    return q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)


def _attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
    qh, kh, vh = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))  # [B, H, L, D]
    logits = jnp.einsum("bhqd,bhkd->bhqk", _scaled(qh), kh, preferred_element_type=jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    # Subtracting the row maximum leaves the value unchanged: no gradient needs to flow through it.
    weights = jnp.exp(logits - jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True)))
    out = jnp.einsum("bhqk,bhkd->bhqd", weights.astype(v.dtype), vh,
                     preferred_element_type=jnp.float32)  # fmt: skip
    out = out / weights.sum(axis=-1, keepdims=True)
    return jnp.swapaxes(out, 1, 2).astype(q.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _row_blocked(q: jax.Array, k: jax.Array, v: jax.Array, block: int) -> jax.Array:
    b, n, h, d = q.shape
    blocks = n // block
    qb = _scaled(jnp.swapaxes(q, 1, 2)).reshape(b * h, blocks, block, d)
    kh, vh = (jnp.swapaxes(x, 1, 2).reshape(b * h, x.shape[1], d) for x in (k, v))

    def one(i):  # one head, one block of query rows: [block, L_k] logits
        head, rows = i // blocks, i % blocks
        logits = jnp.dot(qb[head, rows], kh[head].T, preferred_element_type=jnp.float32)
        weights = jnp.exp(logits - logits.max(axis=-1, keepdims=True))
        out = jnp.dot(weights.astype(v.dtype), vh[head], preferred_element_type=jnp.float32)
        return out / weights.sum(axis=-1, keepdims=True)

    out = jax.lax.map(one, jnp.arange(b * h * blocks))  # [B * H * blocks, block, D]
    return jnp.swapaxes(out.reshape(b, h, n, d), 1, 2).astype(q.dtype)


def _row_blocked_fwd(q, k, v, block):
    # Under differentiation the unblocked form runs: its backward pass is the faster one.
    return jax.vjp(lambda q, k, v: _attention(q, k, v, None), q, k, v)


def _row_blocked_bwd(block, vjp, g):
    return vjp(g)


_row_blocked.defvjp(_row_blocked_fwd, _row_blocked_bwd)
