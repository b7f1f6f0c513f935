"""Schedule parsing, equality and forward noising against diffusers' PyTorch schedulers."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spin_jax.diffusion import (
    Schedule,
    add_noise,
    pred_to_eps,
    pred_to_x0,
    schedule_from_config,
    snr,
    target,
)

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
diffusers.utils.logging.set_verbosity_error()
warnings.filterwarnings("ignore", category=FutureWarning)

# The scheduler config the Stable Diffusion 1.5 repository ships.
SD15 = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}


@pytest.mark.parametrize(
    "cfg",
    [
        SD15,
        dict(beta_schedule="linear"),
        dict(beta_schedule="squaredcos_cap_v2", num_train_timesteps=999),
        dict(
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            rescale_betas_zero_snr=True,
        ),
        dict(trained_betas=np.linspace(1e-4, 0.03, 300).tolist(), num_train_timesteps=300),
    ],
    ids=["sd15", "linear", "cosine", "zero_snr", "trained"],
)
def test_alphas_cumprod_match_diffusers(cfg):
    ref = diffusers.DDIMScheduler.from_config(cfg).alphas_cumprod.numpy()
    ours = schedule_from_config(cfg).alphas_cumprod
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=2e-6, atol=1e-7)


def test_equality_hash_and_jit():
    a, b = schedule_from_config(SD15), schedule_from_config(dict(SD15))
    assert a == b and hash(a) == hash(b)
    assert a != schedule_from_config(dict(SD15, prediction_type="v_prediction"))
    assert a != schedule_from_config(dict(SD15, beta_end=0.0121))
    assert len({a, b}) == 1
    with pytest.raises(ValueError):  # read-only
        a.alphas_cumprod[0] = 0.0
    # A pytree without leaves: a plain jit argument and a static one both work.
    assert jax.tree_util.tree_leaves(a) == []
    f = jax.jit(lambda s, t: snr(s, t))
    np.testing.assert_allclose(f(a, jnp.array([10])), f(b, jnp.array([10])))
    g = jax.jit(lambda t, s: snr(s, t), static_argnums=1)
    np.testing.assert_allclose(g(jnp.array([10]), a), f(a, jnp.array([10])))


def test_defaults_follow_diffusers_loading():
    s = schedule_from_config(SD15, source="sd15")
    assert s.prediction_type == "epsilon" and s.steps_offset == 1
    assert s.timestep_spacing is None  # each sampler's class default, as from_config gives
    assert s.set_alpha_to_one is False and s.clip_sample is False
    assert (s.solver_order, s.final_sigmas_type, s.lower_order_final) == (2, "zero", True)
    # A loaded scheduler's config marks defaulted keys; they must not pin the values.
    loaded = dict(diffusers.PNDMScheduler.from_config(SD15).config)
    assert "timestep_spacing" in loaded["_use_default_values"]
    assert schedule_from_config(loaded) == s
    dpm = dict(diffusers.DPMSolverMultistepScheduler.from_config(loaded).config)
    assert schedule_from_config(dpm).timestep_spacing is None


@pytest.mark.parametrize(
    "key,value",
    [
        ("thresholding", True),
        ("variance_type", "learned_range"),
        ("prediction_type", "sample"),
        ("timestep_spacing", "uniform"),
        ("beta_schedule", "sigmoid"),
        ("algorithm_type", "sde-dpmsolver++"),
        ("use_exponential_sigmas", True),
        ("steps_offset", "1"),
        ("set_alpha_to_one", 1),
        ("solver_order", 4),
        ("some_new_option", 3),
    ],
)
def test_unsupported_options_name_source_key_value(key, value):
    with pytest.raises(ValueError) as e:
        schedule_from_config(dict(SD15, **{key: value}), source="m/scheduler_config.json")
    msg = str(e.value)
    assert "m/scheduler_config.json" in msg and key in msg and repr(value) in msg


def test_harmless_foreign_options_accepted():
    cfg = dict(
        SD15,
        variance_type="fixed_small",
        thresholding=False,
        predict_x0=True,
        sample_max_value=2.0,
        use_karras_sigmas=True,
        solver_type="bh2",
    )
    s = schedule_from_config(cfg)
    assert s.use_karras_sigmas and s.solver_type == "midpoint"
    with pytest.raises(ValueError, match="trained_betas"):
        schedule_from_config(dict(SD15, trained_betas=[0.1] * 10))
    with pytest.raises(ValueError, match="JSON object"):
        schedule_from_config([1, 2])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_noising_and_targets_match_diffusers(prediction_type):
    cfg = dict(SD15, prediction_type=prediction_type)
    ref = diffusers.DDIMScheduler.from_config(cfg)
    s = schedule_from_config(cfg)
    rng = np.random.RandomState(0)
    x0 = rng.randn(4, 3, 3, 2).astype(np.float32)
    noise = rng.randn(4, 3, 3, 2).astype(np.float32)
    t = np.array([0, 1, 500, 999])
    x0_t, noise_t, t_t = torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)
    x_t = np.asarray(add_noise(s, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t)))
    np.testing.assert_allclose(x_t, ref.add_noise(x0_t, noise_t, t_t).numpy(), rtol=1e-6, atol=1e-6)
    tgt = np.asarray(target(s, x0, noise, t))
    want = noise if prediction_type == "epsilon" else ref.get_velocity(x0_t, noise_t, t_t).numpy()
    np.testing.assert_allclose(tgt, want, rtol=1e-6, atol=1e-6)
    # A perfect prediction gives back x0 and the noise (t=999 avoids dividing by ~0 for eps).
    np.testing.assert_allclose(pred_to_x0(s, tgt, x_t, t), x0, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(pred_to_eps(s, tgt, x_t, t), noise, rtol=1e-4, atol=1e-4)
    ac = ref.alphas_cumprod.numpy()[t]
    np.testing.assert_allclose(snr(s, t), ac / (1 - ac), rtol=1e-5)


def test_schedule_repr_and_fields():
    s = Schedule(alphas_cumprod=np.linspace(0.99, 0.01, 10))
    assert s.num_train_timesteps == 10 and "num_train_timesteps=10" in repr(s)
    assert s == Schedule(alphas_cumprod=np.linspace(0.99, 0.01, 10).tolist())
