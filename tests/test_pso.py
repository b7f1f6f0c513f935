"""PSO (Miao et al., ICLR 2025): the online loss against NumPy, offline PSO as Diffusion-DPO at
the distilled timesteps, the samplers' transition log-densities, and the trainer's PSO rows."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spin_jax import losses

B = 12


def np_pso_online(lw, lwr, ll, llr, beta, clip):
    # The formula in probability space, as ALGORITHMS.md writes it, in float64.
    r_w = np.clip(np.exp(lw - lwr), 1 - clip, 1 + clip)
    r_l = np.clip(np.exp(ll - llr), 1 - clip, 1 + clip)
    u = beta * (np.log(r_w) - np.log(r_l))
    return np.mean(np.logaddexp(0.0, -u)), np.mean(u > 0)


def _logps(seed, spread=0.3):
    rng = np.random.default_rng(seed)
    ref_w, ref_l = rng.normal(-1.0, 0.2, (2, B))
    return [
        (ref_w + spread * rng.standard_normal(B)).astype(np.float32),
        ref_w.astype(np.float32),
        (ref_l + spread * rng.standard_normal(B)).astype(np.float32),
        ref_l.astype(np.float32),
    ]


@pytest.mark.parametrize("beta,clip", [(5.0, 0.1), (50.0, 0.1), (5.0, 0.5), (0.7, 0.2)])
def test_pso_online_matches_numpy(beta, clip):
    lw, lwr, ll, llr = _logps(0)
    loss, metrics = jax.jit(losses.pso_online, static_argnums=(5,))(lw, lwr, ll, llr, beta, clip)
    want, acc = np_pso_online(*(x.astype(np.float64) for x in (lw, lwr, ll, llr)), beta, clip)
    chex.assert_shape(loss, ())
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(metrics["implicit_acc"], acc)
    lo, hi = np.log(1 - clip), np.log(1 + clip)
    for side, (p, r) in {"w": (lw, lwr), "l": (ll, llr)}.items():
        d = p.astype(np.float64) - r
        np.testing.assert_allclose(metrics[f"clip_frac_{side}"], np.mean((d < lo) | (d > hi)))
        np.testing.assert_allclose(metrics[f"log_ratio_{side}"], d.mean(), rtol=1e-5, atol=1e-6)


def test_pso_online_clip_boundaries():
    # Log-ratios just inside / outside [log 0.9, log 1.1]: outside ones are held at the bound
    # and give no gradient; inside ones pass through.
    clip = 0.1
    lo, hi = np.log(0.9), np.log(1.1)
    d_w = np.array([lo - 0.5, lo + 1e-3, 0.0, hi - 1e-3, hi + 0.5], np.float32)
    zeros = np.zeros_like(d_w)
    d_l = np.full_like(d_w, 0.02)
    loss, metrics = losses.pso_online(d_w, zeros, d_l, zeros, 5.0, clip)
    want, _ = np_pso_online(d_w.astype(np.float64), 0.0, d_l.astype(np.float64), 0.0, 5.0, clip)
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    np.testing.assert_allclose(metrics["clip_frac_w"], 2 / 5)
    grad = jax.grad(lambda x: losses.pso_online(x, zeros, d_l, zeros, 5.0, clip)[0])(d_w)
    assert grad[0] == 0 and grad[-1] == 0, grad
    assert np.all(np.asarray(grad[1:-1]) < 0), grad  # raising logp_w lowers the loss


def test_pso_online_log2_at_reference_and_gradient_sign():
    lw, _, ll, _ = _logps(1)
    loss, metrics = losses.pso_online(lw, lw, ll, ll, 5.0)
    np.testing.assert_allclose(loss, np.log(2.0), rtol=1e-6)
    np.testing.assert_allclose(metrics["implicit_acc"], 0.0)
    g_w, g_wr, g_l, g_lr = jax.grad(
        lambda a, b, c, d: losses.pso_online(a, b, c, d, 5.0)[0], argnums=(0, 1, 2, 3)
    )(lw, lw, ll, ll)
    # At theta = ref every pair contributes -beta/2 / B to d loss / d logp_w and +beta/2 / B to
    # d loss / d logp_l; the reference carries no gradient.
    np.testing.assert_allclose(g_w, np.full(B, -2.5 / B), rtol=1e-5)
    np.testing.assert_allclose(g_l, np.full(B, 2.5 / B), rtol=1e-5)
    assert not np.any(g_wr) and not np.any(g_lr)


def test_pso_online_bad_input():
    x = jnp.zeros(4)
    with pytest.raises(ValueError, match="beta"):
        losses.pso_online(x, x, x, x, 0.0)
    with pytest.raises(ValueError, match="clip"):
        losses.pso_online(x, x, x, x, 5.0, clip=1.5)
    with pytest.raises(ValueError, match="one shape"):
        losses.pso_online(x, x, x, jnp.zeros(3), 5.0)


def test_offline_pso_loss_is_dpo_and_reference_weight():
    rng = np.random.default_rng(2)
    pw, pl, rw, rl = (rng.uniform(0.5, 1.5, B).astype(np.float32) for _ in range(4))
    a, ma = losses.pso(pw, pl, rw, rl, 50.0)
    b, mb = losses.dpo(pw, pl, rw, rl, 50.0)
    np.testing.assert_array_equal(a, b)
    chex.assert_trees_all_equal(ma, mb)
    c, _ = losses.pso(pw, pl, rw, rl, 50.0, reference_weight=0.1)
    inside = -(50.0 / 2) * ((pw - rw) - 0.1 * (pl - rl)).astype(np.float64)
    np.testing.assert_allclose(c, np.mean(np.logaddexp(0.0, -inside)), rtol=1e-5)
