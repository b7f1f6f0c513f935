"""The loss family against independent NumPy formulas (ALGORITHMS.md)."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from spin_jax import losses, parallel

B = 16


def _np_neg_log_sigmoid(u):
    return np.logaddexp(0.0, -u)  # -log(1 / (1 + exp(-u))), stable in float64


def np_pairwise(pw, pl, rw, rl, beta, sign_l=1.0):
    inside = -(beta / 2) * ((pw - rw) - sign_l * (pl - rl))
    return np.mean(_np_neg_log_sigmoid(inside)), np.mean(inside > 0), np.mean(inside)


def np_kto(p, r, desirable, beta, lam_d=1.0, lam_u=1.0, z0=None):
    g = r - p
    z0 = max(0.0, g.mean()) if z0 is None else z0
    s = np.where(desirable, 1.0, -1.0)
    lam = np.where(desirable, lam_d, lam_u)
    return np.mean(lam * (1 - 1 / (1 + np.exp(-s * beta * (g - z0))))), z0


def _errors(seed, n=4, scale=0.05):
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.5, 1.5, size=(1, B))
    return [(base + scale * rng.standard_normal((1, B))).astype(np.float32)[0] for _ in range(n)]


def _maybe_jit(fn, use_jit, **static):
    f = functools.partial(fn, **static)
    return jax.jit(f) if use_jit else f


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize("name", ["spin", "dpo"])
def test_pairwise_matches_numpy(name, use_jit):
    pw, pl, rw, rl = _errors(0)
    beta = 40.0
    loss, metrics = _maybe_jit(getattr(losses, name), use_jit, beta=beta)(pw, pl, rw, rl)
    want, acc, margin = np_pairwise(*(x.astype(np.float64) for x in (pw, pl, rw, rl)), beta)
    chex.assert_shape(loss, ())
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(metrics["implicit_acc"], acc, rtol=1e-6)
    np.testing.assert_allclose(metrics["reward_margin"], margin, rtol=1e-4, atol=1e-5)
    w, lo = ("real", "syn") if name == "spin" else ("w", "l")
    np.testing.assert_allclose(metrics[f"err_policy_{w}"], pw.mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics[f"err_ref_{lo}"], rl.mean(), rtol=1e-6)
    np.testing.assert_allclose(
        metrics[f"reward_{w}"] - metrics[f"reward_{lo}"], margin, rtol=1e-4, atol=1e-4
    )
    chex.assert_tree_all_finite(metrics)
    for v in metrics.values():
        chex.assert_shape(v, ())


@pytest.mark.parametrize("use_jit", [False, True])
def test_seppo_matches_numpy(use_jit):
    pw, pl, rw, rl = _errors(1)
    beta = 30.0
    loss, metrics = _maybe_jit(losses.seppo, use_jit, beta=beta)(pw, pl, rw, rl)
    sign = np.where(rw - pw >= 0, 1.0, -1.0)
    assert 0 < (sign > 0).mean() < 1  # both branches exercised
    want, acc, _ = np_pairwise(*(x.astype(np.float64) for x in (pw, pl, rw, rl)), beta, sign)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(metrics["implicit_acc"], acc)
    np.testing.assert_allclose(metrics["anchor_loser_frac"], (sign > 0).mean())
    # With every anchor +1 SePPO is SPIN-Diffusion.
    pw_better = np.minimum(pw, rw - 1e-3)
    np.testing.assert_allclose(
        losses.seppo(pw_better, pl, rw, rl, beta)[0], losses.spin(pw_better, pl, rw, rl, beta)[0]
    )


@pytest.mark.parametrize("use_jit", [False, True])
def test_kto_matches_numpy(use_jit):
    p, r, _, _ = _errors(2)
    desirable = np.arange(B) % 3 != 0
    beta = 25.0
    fn = _maybe_jit(losses.kto, use_jit, beta=beta, lambda_d=1.0, lambda_u=0.7)
    loss, metrics = fn(p, r, desirable)
    want, z0 = np_kto(p.astype(np.float64), r.astype(np.float64), desirable, beta, 1.0, 0.7)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(metrics["z0"], z0, rtol=1e-5, atol=1e-7)
    g = r - p
    np.testing.assert_allclose(metrics["reward_desirable"], g[desirable].mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["reward_undesirable"], g[~desirable].mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["desirable_frac"], desirable.mean())
    # Integer labels work as booleans.
    np.testing.assert_allclose(
        losses.kto(p, r, desirable.astype(np.int32), beta)[0], losses.kto(p, r, desirable, beta)[0]
    )


def test_kto_given_z0():
    # A train step that accumulates micro-batches passes the whole batch's z0.
    p, r, _, _ = _errors(4)
    desirable = np.arange(B) % 2 == 0
    loss, metrics = losses.kto(p, r, desirable, 25.0, z0=np.float32(0.03))
    want, _ = np_kto(p.astype(np.float64), r.astype(np.float64), desirable, 25.0, z0=0.03)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    assert float(metrics["z0"]) == pytest.approx(0.03)
    grad = jax.grad(lambda z: losses.kto(p, r, desirable, 25.0, z0=z)[0])(0.03)
    assert float(grad) == 0.0  # a reference point, not a parameter


def test_kto_z0_clamped_at_zero():
    p, r, _, _ = _errors(3)
    worse = p + 0.5  # policy worse than reference everywhere: mean reward < 0
    _, metrics = losses.kto(worse, r, np.ones(B, bool), 10.0)
    assert float(metrics["z0"]) == 0.0


def test_sft_and_per_sample_error():
    rng = np.random.default_rng(4)
    pred = rng.standard_normal((B, 4, 4, 3)).astype(np.float32)
    target = rng.standard_normal((B, 4, 4, 3)).astype(np.float32)
    err = losses.per_sample_error(jnp.asarray(pred, jnp.bfloat16), jnp.asarray(target))
    chex.assert_shape(err, (B,))
    assert err.dtype == jnp.float32
    want = ((pred.astype(jnp.bfloat16).astype(np.float32) - target) ** 2).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(err, want, rtol=1e-5)
    loss, metrics = jax.jit(losses.sft)(err)
    np.testing.assert_allclose(loss, want.mean(), rtol=1e-5)
    assert set(metrics) >= {"loss", "err_policy"}
    with pytest.raises(ValueError, match="shape"):
        losses.per_sample_error(pred, target[:, :2])


@pytest.mark.parametrize("name", ["spin", "dpo", "seppo"])
def test_log2_at_reference(name):
    pw, pl, _, _ = _errors(5)
    for beta in (1.0, 5000.0, 1e6):
        loss, metrics = getattr(losses, name)(pw, pl, pw, pl, beta)
        # log 2 up to float32 rounding of log1p (a few ulp).
        assert float(loss) == pytest.approx(np.log(2.0), rel=1e-6)
        assert float(metrics["implicit_acc"]) == 0.0  # no pair strictly inside > 0
        assert float(metrics["reward_margin"]) == 0.0


def test_spin_gradient_signs_and_stop_gradient():
    pw, pl, rw, rl = _errors(6)
    grads = jax.grad(lambda *e: losses.spin(*e, 100.0)[0], argnums=(0, 1, 2, 3))(pw, pl, rw, rl)
    # Descent lowers the policy's error on real data and raises it on the opponent's samples.
    assert np.all(np.asarray(grads[0]) > 0)
    assert np.all(np.asarray(grads[1]) < 0)
    # The opponent's errors carry no gradient.
    assert not np.any(np.asarray(grads[2])) and not np.any(np.asarray(grads[3]))
    g_kto = jax.grad(lambda p, r: losses.kto(p, r, np.ones(B, bool), 10.0)[0], argnums=(0, 1))
    gp, gr = g_kto(pw, rw)
    assert np.all(np.asarray(gp) >= 0) and not np.any(np.asarray(gr))


@pytest.mark.parametrize("name", ["spin", "dpo", "seppo", "kto"])
def test_finite_at_huge_beta(name):
    pw, pl, rw, rl = _errors(7, scale=0.3)
    beta = 1e6
    if name == "kto":
        fn = lambda p: losses.kto(p, rw, np.arange(B) % 2 == 0, beta)[0]  # noqa: E731
        args = (pw,)
    else:
        fn = lambda p, q: getattr(losses, name)(p, q, rw, rl, beta)[0]  # noqa: E731
        args = (pw, pl)
    loss, grads = jax.jit(jax.value_and_grad(fn, argnums=tuple(range(len(args)))))(*args)
    chex.assert_tree_all_finite((loss, grads))
    if name in ("spin", "dpo"):
        want, _, _ = np_pairwise(*(x.astype(np.float64) for x in (pw, pl, rw, rl)), beta)
        assert want > 1e3  # the logistic loss is far in its linear tail
        np.testing.assert_allclose(loss, want, rtol=1e-5)


def test_kto_z0_is_global_under_jit_and_shard_map():
    mesh = parallel.make_mesh()
    p, r, _, _ = _errors(8)
    # Per-device halves differ strongly so a per-shard mean would be visibly wrong.
    r = r + np.where(np.arange(B) < B // 2, 0.3, -0.1).astype(np.float32)
    desirable = np.arange(B) % 2 == 0
    sharding = parallel.batch_sharding(mesh)
    args = [jax.device_put(x, sharding) for x in (p, r, desirable)]
    want_loss, want_z0 = np_kto(p.astype(np.float64), r.astype(np.float64), desirable, 20.0)

    loss, metrics = jax.jit(functools.partial(losses.kto, beta=20.0))(*args)
    np.testing.assert_allclose(metrics["z0"], want_z0, rtol=1e-5)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)

    axes = ("data", "fsdp")

    def per_shard(axis_name):
        def f(p, r, d):
            loss, m = losses.kto(p, r, d, 20.0, axis_name=axis_name)
            return loss, m["z0"]

        spec = P(axes)
        return jax.jit(
            jax.shard_map(
                f, mesh=mesh, in_specs=(spec, spec, spec), out_specs=(P(), P()), check_vma=False
            )
        )

    loss, z0 = per_shard(axes)(*args)
    np.testing.assert_allclose(z0, want_z0, rtol=1e-5)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    # Without the axis name each shard would use its own mean: the test data tells them apart.
    _, z0_local = per_shard(None)(*args)
    assert abs(float(z0_local) - want_z0) > 1e-2


def test_bad_inputs():
    pw, pl, rw, rl = _errors(9)
    for beta in (0.0, -1.0, float("nan")):
        for name in ("spin", "dpo", "seppo"):
            with pytest.raises(ValueError, match="beta"):
                getattr(losses, name)(pw, pl, rw, rl, beta)
        with pytest.raises(ValueError, match="beta"):
            losses.kto(pw, rw, np.ones(B, bool), beta)
    with pytest.raises(ValueError, match="shape"):
        losses.spin(pw, pl[:3], rw, rl, 1.0)
    with pytest.raises(ValueError, match="shape"):
        losses.sft(np.ones((2, 3), np.float32))
    # A traced beta is accepted (it cannot be checked); the value is used as given.
    loss = jax.jit(lambda b: losses.spin(pw, pl, rw, rl, b)[0])(7.0)
    np.testing.assert_allclose(loss, losses.spin(pw, pl, rw, rl, 7.0)[0], rtol=1e-6)
    for name in ("sft", "spin", "dpo", "kto", "seppo"):
        assert callable(getattr(losses, name))
