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


# ----------------------------------------------------------------------------------------------
# Offline PSO: the distilled timesteps and the train step.


def _config(**pso):
    from spin_jax.train.config import base_config

    c = base_config()
    c.objective = "pso"
    c.model.path = "/models/tiny"
    c.sample.sampler = "auto"
    for k, v in pso.items():
        if k.startswith("sample_"):
            c.sample[k.removeprefix("sample_")] = v
        else:
            c.pso[k] = v
    return c


def _schedule(kind):
    from tiny_sd import scheduler_config, sdxl_scheduler_config

    from spin_jax.diffusion import schedule_from_config

    return schedule_from_config(
        scheduler_config() if kind == "ddim" else sdxl_scheduler_config(kind)
    )


def test_distilled_timesteps():
    from spin_jax.diffusion import samplers
    from spin_jax.train import pso

    grid = [999, 749, 499, 249]
    # SDXL-Turbo (Euler ancestral, trailing): the sampler's 4 steps are the paper's grid.
    np.testing.assert_array_equal(pso.distilled_timesteps(_config(), _schedule("turbo")), grid)
    # LCM: what LCMScheduler visits (from its 50 distillation steps) ...
    lcm = pso.distilled_timesteps(_config(), _schedule("lcm"))
    np.testing.assert_array_equal(lcm, samplers.lcm_timesteps(_schedule("lcm"), 4))
    np.testing.assert_array_equal(lcm, [999, 759, 499, 259])
    # ... DMD2's custom sampler timesteps, the grid by rule, or given ones.
    dmd2 = _config(sample_timesteps=(999, 749, 499, 249))
    np.testing.assert_array_equal(pso.distilled_timesteps(dmd2, _schedule("lcm")), grid)
    np.testing.assert_array_equal(
        pso.distilled_timesteps(_config(timestep_source="grid"), _schedule("lcm")), grid
    )
    np.testing.assert_array_equal(
        pso.distilled_timesteps(_config(timestep_source="grid", num_steps=2), _schedule("ddim")),
        [999, 499],
    )
    given = _config(timesteps=(249, 999, 499))
    np.testing.assert_array_equal(
        pso.distilled_timesteps(given, _schedule("ddim")), [999, 499, 249]
    )
    with pytest.raises(ValueError, match="distinct integers"):
        pso.distilled_timesteps(_config(timesteps=(999, 1000)), _schedule("ddim"))


def test_no_few_step_scheduler_says_how_to_set_timesteps():
    from spin_jax.train import pso

    with pytest.raises(ValueError, match=r"DDIMScheduler.*--config\.pso\.timesteps=") as e:
        pso.distilled_timesteps(_config(), _schedule("ddim"))
    assert "/models/tiny" in str(e.value)


def test_train_step_draws_exactly_the_distilled_timesteps_and_equals_dpo():
    import optax
    from test_train_step import TEXT_PARAMS, encode_text, init_params, make_batch, unet_apply

    from spin_jax.train import step as step_lib
    from spin_jax.train.state import TrainState

    distilled = (999, 749, 499, 249)
    schedule = _schedule("turbo")
    batch = make_batch("pso", 512)
    drawn = step_lib.draw_inputs("pso", batch, jax.random.key(3), 1000, timesteps=distilled)
    assert set(np.asarray(drawn["t"]).tolist()) == set(distilled)
    np.testing.assert_array_equal(drawn["noise_a"], drawn["noise_b"])  # shared noise

    params = init_params()
    small = make_batch("pso", 8)
    out = {}
    for name in ("pso", "dpo"):
        fn = step_lib.make_train_step(name, unet_apply=unet_apply, encode_text=encode_text,
                                      schedule=schedule, beta=50.0, timesteps=distilled)  # fmt: skip
        state = TrainState.create(params, optax.sgd(1e-3))
        out[name] = jax.jit(fn)(state, params, TEXT_PARAMS, small, jax.random.key(0))
    np.testing.assert_allclose(out["pso"][1]["loss"], np.log(2), rtol=1e-6)  # theta = ref
    chex.assert_trees_all_close(out["pso"][1], out["dpo"][1], rtol=1e-6)
    chex.assert_trees_all_close(out["pso"][0].params, out["dpo"][0].params, rtol=1e-6)
    with pytest.raises(ValueError, match="timesteps"):
        step_lib.make_train_step("pso", unet_apply=unet_apply, schedule=schedule, beta=50.0,
                                 timesteps=(1000,))  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Transition log-densities against a direct Gaussian density.


def np_gaussian_logp(x, mean, std):
    x, mean = np.asarray(x, np.float64), np.asarray(mean, np.float64)
    std = np.broadcast_to(np.asarray(std, np.float64), x.shape)
    d = -0.5 * ((x - mean) / std) ** 2 - np.log(std) - 0.5 * np.log(2 * np.pi)
    return d.reshape(x.shape[0], -1).mean(1)


def test_gaussian_log_prob_matches_numpy():
    from spin_jax.diffusion import samplers

    rng = np.random.default_rng(0)
    x, mean = rng.normal(size=(2, 3, 4, 4, 2)).astype(np.float32)
    for std in (np.float32(0.3), rng.uniform(0.1, 2.0, size=(3, 1, 1, 1)).astype(np.float32)):
        got = samplers.gaussian_log_prob(jnp.asarray(x), jnp.asarray(mean), std)
        np.testing.assert_allclose(got, np_gaussian_logp(x, mean, std), rtol=1e-5)


@pytest.mark.parametrize("kind", ["turbo", "lcm"])
def test_transition_log_prob_of_sampler_trajectory(kind):
    # A trajectory of the sampler with known step noises: each stochastic step's log-density
    # under the transition is the standard normal density of that noise, shifted by -log std;
    # and it equals the density of the Gaussian computed here in NumPy from the tables.
    from spin_jax.diffusion import samplers

    schedule = _schedule(kind)
    b, shape = 3, (4, 4, 2)
    rng = np.random.default_rng(1)
    w = rng.normal(size=shape).astype(np.float32) * 0.3

    def model_fn(x, t):
        return jnp.tanh(x * w) + 1e-3 * jnp.asarray(t, jnp.float32)[:, None, None, None]

    x_T = rng.normal(size=(b, *shape)).astype(np.float32)
    noises = rng.normal(size=(4, b, *shape)).astype(np.float32)
    if kind == "turbo":
        fn, log_prob = samplers.euler_ancestral, samplers.euler_ancestral_log_prob
        tables = samplers.euler_ancestral_tables(schedule, 4)
        tables.pop("init_noise_sigma")
        std_key = "sigma_up"
    else:
        fn, log_prob = samplers.lcm, samplers.lcm_log_prob
        tables = samplers.lcm_tables(schedule, 4)
        std_key = "std"
    _, states = fn(model_fn, x_T, schedule, 4, noises=noises, return_states=True)
    states = np.asarray(states, np.float64)
    for i in range(3):  # the last step is deterministic
        row = {k: v[i] for k, v in tables.items()}
        x = states[i]
        if kind == "turbo":
            out = np.asarray(model_fn(x / row["scale"], np.full(b, row["t"])), np.float64)
            x0 = x - row["sigma"] * out
            mean = x + (x - x0) / row["sigma"] * (row["sigma_down"] - row["sigma"])
        else:
            out = np.asarray(model_fn(x, np.full(b, row["t"])), np.float64)
            x0 = (x - row["sqrt_b"] * out) / row["sqrt_a"]
            mean = row["mean_scale"] * (row["c_out"] * x0 + row["c_skip"] * x)
        std = float(row[std_key])
        assert std > 0
        got = log_prob(schedule, row, jnp.asarray(x, jnp.float32),
                       jnp.asarray(states[i + 1], jnp.float32), jnp.asarray(out, jnp.float32))  # fmt: skip
        np.testing.assert_allclose(got, np_gaussian_logp(states[i + 1], mean, std), rtol=1e-4)
        np.testing.assert_allclose(got, np_gaussian_logp(noises[i], 0.0, 1.0) - np.log(std),
                                   rtol=1e-4)  # fmt: skip
    assert float(tables[std_key][3]) == 0.0
