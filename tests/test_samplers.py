"""DPM-Solver++ and DDIM follow diffusers' schedulers step for step, given the same model."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spin_jax.diffusion import samplers, schedule_from_config

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
diffusers.utils.logging.set_verbosity_error()
warnings.filterwarnings("ignore", category=FutureWarning)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SD15 = {
    "_class_name": "PNDMScheduler",
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
SPACINGS = ["leading", "linspace", "trailing"]
PREDICTIONS = ["epsilon", "v_prediction"]
X_T = np.random.RandomState(0).randn(2, 4, 4, 3).astype(np.float32)


# The same deterministic, nonlinear "model" in both frameworks.
def model_torch(x, t):
    return torch.sin(x * (1 + t.float() / 1000)) * 0.8 + 0.3 * x


def model_jax(x, t):
    assert t.shape == (x.shape[0],) and t.dtype == jnp.int32
    return jnp.sin(x * (1 + t.astype(jnp.float32)[:, None, None, None] / 1000)) * 0.8 + 0.3 * x


def run_diffusers(scheduler, num_steps, step_kwargs=lambda i: {}):
    scheduler.set_timesteps(num_steps)
    x = torch.from_numpy(X_T)
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.step(model_torch(x, t), t, x, **step_kwargs(i)).prev_sample
    return x.numpy()


def assert_close(ours, ref):
    ours = np.asarray(ours)
    assert np.all(np.isfinite(ours))
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()


def check_dpm(cfg, steps=(1, 7, 20, 25)):
    schedule = schedule_from_config(cfg)
    for n in steps:
        ref_sched = diffusers.DPMSolverMultistepScheduler.from_config(cfg)
        ref = run_diffusers(ref_sched, n)
        ts, sigmas = samplers.dpm_solver_pp_timesteps(schedule, n)
        np.testing.assert_array_equal(ts, ref_sched.timesteps.numpy())
        np.testing.assert_allclose(sigmas, ref_sched.sigmas.numpy(), rtol=1e-5)
        ours = jax.jit(lambda x, n=n: samplers.dpm_solver_pp(model_jax, x, schedule, n))(X_T)
        assert_close(ours, ref)


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("spacing", SPACINGS)
def test_dpm_solver_pp_matches_diffusers(spacing, prediction_type):
    check_dpm(dict(SD15, timestep_spacing=spacing, prediction_type=prediction_type))


@pytest.mark.parametrize(
    "options",
    [
        dict(use_karras_sigmas=True),
        dict(use_karras_sigmas=True, final_sigmas_type="sigma_min", prediction_type="v_prediction"),
        dict(final_sigmas_type="sigma_min", timestep_spacing="trailing"),
        dict(final_sigmas_type="sigma_min", lower_order_final=False, solver_type="heun"),
        dict(solver_order=1),
        dict(solver_order=3, final_sigmas_type="sigma_min", lower_order_final=False),
        dict(euler_at_final=True, final_sigmas_type="sigma_min"),
        dict(
            rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction"
        ),
        dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1),
        dict(
            beta_schedule="linear",
            trained_betas=np.linspace(1e-4, 0.03, 500).tolist(),
            num_train_timesteps=500,
            timestep_spacing="leading",
        ),
    ],
    ids=[
        "karras",
        "karras_sigma_min_v",
        "sigma_min",
        "heun",
        "order1",
        "order3",
        "euler_final",
        "zero_snr",
        "cosine_clipped",
        "trained",
    ],
)
def test_dpm_solver_pp_options_match_diffusers(options):
    check_dpm(dict(SD15, **options), steps=(7, 20))


def test_dpm_solver_pp_keyword_overrides_match_config():
    schedule = schedule_from_config(SD15)
    cfg = dict(SD15, use_karras_sigmas=True, final_sigmas_type="sigma_min", solver_order=1)
    ref = run_diffusers(diffusers.DPMSolverMultistepScheduler.from_config(cfg), 9)
    ours = samplers.dpm_solver_pp(
        model_jax, X_T, schedule, 9, order=1, use_karras_sigmas=True, final_sigmas_type="sigma_min"
    )
    assert_close(ours, ref)


def test_timesteps_match_diffusers_for_many_step_counts():
    for spacing in SPACINGS:
        for karras in (False, True):
            cfg = dict(SD15, timestep_spacing=spacing, use_karras_sigmas=karras)
            schedule = schedule_from_config(cfg)
            for n in [*range(1, 31), 50, 99, 100, 250]:
                ref = diffusers.DPMSolverMultistepScheduler.from_config(cfg)
                ref.set_timesteps(n)
                ts, sigmas = samplers.dpm_solver_pp_timesteps(schedule, n)
                np.testing.assert_array_equal(ts, ref.timesteps.numpy())
                np.testing.assert_allclose(sigmas, ref.sigmas.numpy(), rtol=1e-6)
        ref = diffusers.DDIMScheduler.from_config(dict(SD15, timestep_spacing=spacing))
        for n in [*range(1, 31), 50, 99, 100, 250, 999]:
            ref.set_timesteps(n)
            ts = samplers.ddim_timesteps(schedule_from_config(ref.config), n)
            np.testing.assert_array_equal(ts, ref.timesteps.numpy())


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("spacing", SPACINGS)
def test_ddim_matches_diffusers(spacing, prediction_type):
    cfg = dict(SD15, timestep_spacing=spacing, prediction_type=prediction_type)
    schedule = schedule_from_config(cfg)
    for n in (1, 7, 20, 25):
        ref = run_diffusers(diffusers.DDIMScheduler.from_config(cfg), n)
        ours = jax.jit(lambda x, n=n: samplers.ddim(model_jax, x, schedule, n))(X_T)
        assert_close(ours, ref)


@pytest.mark.parametrize(
    "options,eta",
    [
        (dict(set_alpha_to_one=True), 0.0),
        (dict(clip_sample=True, clip_sample_range=0.8), 0.7),
        ({}, 1.0),  # DDIMScheduler's own defaults: set_alpha_to_one and clip_sample true
    ],
    ids=["alpha_one", "clip_eta", "ddim_defaults_eta"],
)
def test_ddim_options_and_eta_match_diffusers(options, eta):
    cfg = dict(
        {k: v for k, v in SD15.items() if k not in ("clip_sample", "_class_name")}, **options
    )
    cfg["_class_name"] = "DDIMScheduler"
    schedule = schedule_from_config(cfg)
    key = jax.random.key(3)

    def noise(i):  # the per-step noise the JAX sampler draws, handed to diffusers
        z = np.array(jax.random.normal(jax.random.fold_in(key, i), X_T.shape))
        return {"eta": eta, "variance_noise": torch.from_numpy(z)} if eta else {}

    ref = run_diffusers(diffusers.DDIMScheduler.from_config(cfg), 9, noise)
    assert_close(samplers.ddim(model_jax, X_T, schedule, 9, eta, key=key), ref)


def test_whole_loop_is_one_scan():
    schedule = schedule_from_config(SD15)
    calls = []

    def model(x, t):
        calls.append(1)
        return model_jax(x, t)

    for fn in (samplers.dpm_solver_pp, samplers.ddim):
        calls.clear()
        jaxpr = jax.make_jaxpr(lambda x, fn=fn: fn(model, x, schedule, 20))(X_T)
        assert [e.primitive.name for e in jaxpr.eqns].count("scan") == 1
        assert len(calls) == 1  # the model is traced once, inside the scan body


def test_bad_arguments():
    schedule = schedule_from_config(SD15)
    with pytest.raises(ValueError, match="num_steps"):
        samplers.dpm_solver_pp(model_jax, X_T, schedule, 0)
    with pytest.raises(ValueError, match="num_steps"):
        samplers.ddim(model_jax, X_T, schedule, 1001)
    with pytest.raises(ValueError, match="outside"):  # 1000 steps + steps_offset 1 -> t = 1000
        samplers.ddim(model_jax, X_T, schedule, 1000)
    with pytest.raises(ValueError, match="key"):
        samplers.ddim(model_jax, X_T, schedule, 5, eta=1.0)
    with pytest.raises(ValueError, match="order"):
        samplers.dpm_solver_pp(model_jax, X_T, schedule, 5, order=4)
    # Third order across two equal sigmas: diffusers returns NaN, we say why.
    degenerate = schedule_from_config(
        dict(SD15, use_karras_sigmas=True, final_sigmas_type="sigma_min", solver_order=3)
    )
    with pytest.raises(ValueError, match="zero-length step"):
        samplers.dpm_solver_pp(model_jax, X_T, degenerate, 20)
