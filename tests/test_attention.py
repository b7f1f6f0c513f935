"""The XLA attention path against a NumPy softmax(QK^T / sqrt(d)) V, with masks and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spin_jax.models.attention import attention, unblocked, xla_attention


def numpy_attention(q, k, v, mask=None):
    q, k, v = (np.asarray(x, np.float64).transpose(0, 2, 1, 3) for x in (q, k, v))
    logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
    if mask is not None:
        logits = np.where(mask, logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return (p @ v).transpose(0, 2, 1, 3)


def qkv(b=2, lq=7, lk=5, h=3, d=8, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal((b, n, h, d)).astype(np.float32) * 2 for n in (lq, lk, lk))


def test_matches_numpy_and_jax():
    q, k, v = qkv()
    out = np.asarray(xla_attention(*map(jnp.asarray, (q, k, v))))
    np.testing.assert_allclose(out, numpy_attention(q, k, v), atol=1e-5)
    ref = jax.nn.dot_product_attention(q, k, v)
    np.testing.assert_allclose(out, np.asarray(ref), atol=1e-5)
    # attention() routes "xla" (and CPU "auto") here, upcast or not
    for impl in ("xla", "auto", None):
        got = attention(*map(jnp.asarray, (q, k, v)), implementation=impl, upcast=True)
        np.testing.assert_allclose(np.asarray(got), out, atol=1e-6)


def test_causal_and_mask():
    q, k, v = qkv(lq=6, lk=6)
    causal = np.tril(np.ones((6, 6), bool))
    got = xla_attention(q, k, v, is_causal=True)
    np.testing.assert_allclose(np.asarray(got), numpy_attention(q, k, v, causal), atol=1e-5)
    # a padding mask [B, 1, 1, Lk], as the BLIP text decoder passes
    keep = np.ones((2, 1, 1, 6), bool)
    keep[1, ..., 4:] = False
    got = xla_attention(q, k, v, mask=jnp.asarray(keep))
    np.testing.assert_allclose(np.asarray(got), numpy_attention(q, k, v, keep), atol=1e-5)
    both = xla_attention(q, k, v, mask=jnp.asarray(keep), is_causal=True)
    np.testing.assert_allclose(np.asarray(both), numpy_attention(q, k, v, keep & causal), atol=1e-5)


def check_gradient(q, k, v, seed):
    """xla_attention's gradient of a random projection against jax's; returns the loss."""
    w = jnp.asarray(np.random.default_rng(seed).standard_normal(q.shape), jnp.float32)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * w)

    ours = jax.grad(loss(xla_attention), argnums=(0, 1, 2))(q, k, v)
    ref = jax.grad(loss(jax.nn.dot_product_attention), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(ours, ref, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)
    return loss(xla_attention), ours


def test_gradient_matches_jax():
    check_gradient(*map(jnp.asarray, qkv(seed=1)), seed=2)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_inputs(dtype):
    q, k, v = qkv(seed=3)
    out = xla_attention(*(jnp.asarray(x, dtype) for x in (q, k, v)))
    assert out.dtype == dtype
    ref = numpy_attention(*(np.asarray(jnp.asarray(x, dtype), np.float32) for x in (q, k, v)))
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=3e-2)


def test_cpu_row_blocks_follow_the_machine_and_length():
    from spin_jax.models.attention import cpu_row_block

    assert cpu_row_block(1024, "cpu") == 512 and cpu_row_block(4096, "cpu") == 512
    assert cpu_row_block(1280, "cpu") == 256  # 5 x 256
    assert cpu_row_block(1000, "cpu") == 0 and cpu_row_block(256, "cpu") == 0
    assert cpu_row_block(4096, "gpu") == cpu_row_block(4096, "tpu") == 0


def test_long_sequences_blocked_on_cpu_match_numpy_with_the_same_gradient():
    q, k, v = qkv(b=1, lq=1024, lk=1024, h=2, d=8, seed=4)
    jaxpr = str(jax.make_jaxpr(xla_attention)(q, k, v))
    assert "_row_blocked" in jaxpr  # the blocked form ran (this suite runs on CPU)
    with unblocked():  # what FLOP counts trace (a new function: traces are cached per function)
        traced = jax.make_jaxpr(lambda *a: xla_attention(*a))(q, k, v)
    assert "_row_blocked" not in str(traced)
    out = np.asarray(xla_attention(*map(jnp.asarray, (q, k, v))))
    np.testing.assert_allclose(out, numpy_attention(q, k, v), atol=1e-5)
    # a mask keeps the unblocked form, which agrees
    keep = jnp.ones((1, 1, 1, 1024), bool)
    np.testing.assert_allclose(np.asarray(xla_attention(q, k, v, mask=keep)), out, atol=1e-6)
    loss, ours = check_gradient(*map(jnp.asarray, (q, k, v)), seed=5)
    remat = jax.grad(jax.checkpoint(loss))(q, k, v)
    np.testing.assert_allclose(np.asarray(remat), np.asarray(ours[0]), atol=1e-6)
