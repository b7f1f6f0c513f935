"""Euler, Euler ancestral and LCM follow diffusers' schedulers step for step, given the same model."""

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

# The scheduler configs of stabilityai/stable-diffusion-xl-base-1.0, stabilityai/sdxl-turbo and
# latent-consistency/lcm-sdxl.
SDXL = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.19.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
TURBO = dict(
    SDXL,
    _class_name="EulerAncestralDiscreteScheduler",
    _diffusers_version="0.24.0.dev0",
    timestep_spacing="trailing",
)
LCM_SDXL = {
    "_class_name": "LCMScheduler",
    "_diffusers_version": "0.22.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "dynamic_thresholding_ratio": 0.995,
    "num_train_timesteps": 1000,
    "original_inference_steps": 50,
    "prediction_type": "epsilon",
    "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0,
    "set_alpha_to_one": True,
    "steps_offset": 1,
    "thresholding": False,
    "timestep_scaling": 10.0,
    "timestep_spacing": "leading",
    "trained_betas": None,
}
DMD2_TIMESTEPS = [999, 749, 499, 249]
STEPS = [1, 2, 4, 7, 12]
SPACINGS = ["leading", "linspace", "trailing"]
X_T = np.random.RandomState(0).randn(2, 4, 4, 3).astype(np.float32)


# The same deterministic, nonlinear "model" in both frameworks (t may be fractional).
def model_torch(x, t):
    return torch.sin(x * (1 + t.float() / 1000)) * 0.8 + 0.3 * x


def recording_model(records, t_dtype):
    """model_fn that logs (input, t) of every call, in step order, from inside the scan."""

    def log(x, t):
        records.append((np.asarray(x), np.asarray(t)))

    def model(x, t):
        assert t.shape == (x.shape[0],) and t.dtype == t_dtype
        jax.debug.callback(log, x, t, ordered=True)
        return jnp.sin(x * (1 + t.astype(jnp.float32)[:, None, None, None] / 1000)) * 0.8 + 0.3 * x

    return model


def run_diffusers(scheduler, num_steps=None, timesteps=None, noises=None, monkeypatch=None):
    """The pipeline's loop: init_noise_sigma, scale_model_input, UNet, step. Returns the UNet's
    inputs and timesteps per step and the final sample."""
    if timesteps is not None:
        scheduler.set_timesteps(timesteps=timesteps)
    else:
        scheduler.set_timesteps(num_steps)
    if noises is not None:  # step i's randn_tensor returns noises[i]
        module = type(scheduler).__module__
        calls = iter(range(len(noises)))
        monkeypatch.setattr(
            f"{module}.randn_tensor",
            lambda *a, **k: torch.from_numpy(np.array(noises[next(calls)])),
        )
    x = torch.from_numpy(X_T) * scheduler.init_noise_sigma
    inputs = []
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(x, t)
        inputs.append((inp.numpy().copy(), float(t)))
        x = scheduler.step(model_torch(inp, t), t, x).prev_sample
    return inputs, x.numpy()


def close(ours, ref, rtol=1e-5, scale=0.0):
    ours = np.asarray(ours)
    assert ours.shape == ref.shape and np.all(np.isfinite(ours))
    err, scale = np.abs(ours - ref).max(), max(np.abs(ref).max(), scale)
    assert err <= rtol * scale, (err, scale)


def check(sampler, cls, cfg, num_steps=None, timesteps=None, noisy=False, monkeypatch=None):
    """Every step's UNet input and timestep, and the result, as diffusers' pipeline loop.

    With zero terminal SNR the sample starts at ~4096 x_T (values ~1e4, float32 ulp ~1e-3) and
    the first step cancels it down to ~1: one rounding more or less there (a fused multiply-add,
    torch's float32 sqrt giving sigma_max 4096.0 where numpy gives 4095.9998) moves every later
    step by ~1e-4, a tenth of that ulp. Those runs are checked to 3e-4, the others to 1e-5."""
    rtol = 3e-4 if cfg.get("rescale_betas_zero_snr") else 1e-5
    schedule = schedule_from_config(cfg)
    ref_sched = cls.from_config(cfg)
    n = len(timesteps) if timesteps is not None else num_steps
    noises = np.random.RandomState(1).randn(n, *X_T.shape).astype(np.float32) if noisy else None
    ref_inputs, ref = run_diffusers(ref_sched, num_steps, timesteps, noises, monkeypatch)
    records = []
    t_dtype = jnp.int32 if sampler is samplers.lcm else jnp.float32
    kwargs = dict(timesteps=timesteps)
    if noisy:
        kwargs["noises"] = noises
    ours = sampler(recording_model(records, t_dtype), X_T, schedule, num_steps or 4, **kwargs)
    ours = np.asarray(jax.block_until_ready(ours))
    assert len(records) == len(ref_inputs)
    for (x, t), (ref_x, ref_t) in zip(records, ref_inputs, strict=True):
        np.testing.assert_allclose(t, np.full(X_T.shape[0], ref_t, np.float32), rtol=1e-6)
        close(x, ref_x, rtol)
    close(ours, ref, rtol, scale=float(np.abs(X_T).max() * ref_sched.init_noise_sigma))


# ----------------------------------------------------------------------------------------------
# Euler


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", SPACINGS)
def test_euler_matches_diffusers(spacing, prediction_type):
    cfg = dict(SDXL, timestep_spacing=spacing, prediction_type=prediction_type)
    for n in STEPS:
        check(samplers.euler, diffusers.EulerDiscreteScheduler, cfg, n)


@pytest.mark.parametrize(
    "options",
    [
        dict(use_karras_sigmas=True),
        dict(use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0, timestep_spacing="trailing"),
        dict(final_sigmas_type="sigma_min", timestep_spacing="linspace"),
        dict(interpolation_type="log_linear"),
        dict(timestep_type="continuous", prediction_type="v_prediction"),
        dict(
            rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction"
        ),
        dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="linspace"),
        dict(timestep_spacing=None),  # no key: the class default, linspace
    ],
    ids=[
        "karras",
        "karras_min_max",
        "sigma_min",
        "log_linear",
        "continuous_v",
        "zero_snr",
        "cosine",
        "default_spacing",
    ],  # fmt: skip
)
def test_euler_options_match_diffusers(options):
    cfg = {k: v for k, v in dict(SDXL, **options).items() if v is not None or k == "trained_betas"}
    for n in (1, 4, 7):
        check(samplers.euler, diffusers.EulerDiscreteScheduler, cfg, n)


def test_euler_custom_timesteps_match_diffusers():
    check(samplers.euler, diffusers.EulerDiscreteScheduler, SDXL, timesteps=DMD2_TIMESTEPS)
    check(samplers.euler, diffusers.EulerDiscreteScheduler, SDXL, timesteps=[980, 500, 3])


def test_euler_timestep_tables_match_diffusers():
    for spacing in SPACINGS:
        for karras in (False, True):
            cfg = dict(SDXL, timestep_spacing=spacing, use_karras_sigmas=karras)
            schedule = schedule_from_config(cfg)
            for n in [*range(1, 31), 50, 999]:
                ref = diffusers.EulerDiscreteScheduler.from_config(cfg)
                ref.set_timesteps(n)
                ts, sigmas = samplers.euler_timesteps(schedule, n)
                assert ts.dtype == np.float32 and sigmas.dtype == np.float32
                np.testing.assert_allclose(ts, ref.timesteps.numpy(), rtol=1e-6, atol=1e-4)
                np.testing.assert_allclose(sigmas, ref.sigmas.numpy(), rtol=1e-6)
                tab = samplers.euler_tables(schedule, n)
                np.testing.assert_allclose(tab["init_noise_sigma"], ref.init_noise_sigma, rtol=1e-6)
                ref_a = diffusers.EulerAncestralDiscreteScheduler.from_config(cfg)
                ref_a.set_timesteps(n)
                ts, sigmas = samplers.euler_ancestral_timesteps(schedule, n)
                np.testing.assert_array_equal(ts, ref_a.timesteps.numpy())
                np.testing.assert_allclose(sigmas, ref_a.sigmas.numpy(), rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Euler ancestral


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", SPACINGS)
def test_euler_ancestral_matches_diffusers(spacing, prediction_type, monkeypatch):
    cfg = dict(TURBO, timestep_spacing=spacing, prediction_type=prediction_type)
    for n in STEPS:
        check(samplers.euler_ancestral, diffusers.EulerAncestralDiscreteScheduler, cfg, n,
              noisy=True, monkeypatch=monkeypatch)  # fmt: skip


def test_euler_ancestral_zero_snr_matches_diffusers(monkeypatch):
    cfg = dict(TURBO, rescale_betas_zero_snr=True, prediction_type="v_prediction")
    check(samplers.euler_ancestral, diffusers.EulerAncestralDiscreteScheduler, cfg, 4,
          noisy=True, monkeypatch=monkeypatch)  # fmt: skip


def test_euler_ancestral_key_custom_timesteps_and_transition():
    schedule = schedule_from_config(TURBO)
    key = jax.random.key(5)
    noises = jnp.stack([jax.random.normal(jax.random.fold_in(key, i), X_T.shape) for i in range(4)])
    model = recording_model([], jnp.float32)
    a = samplers.euler_ancestral(model, X_T, schedule, 4, key=key)
    b = samplers.euler_ancestral(model, X_T, schedule, 4, noises=noises)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)  # up to XLA's fusion choices
    # Turbo's 4 trailing steps are [999, 749, 499, 249]: the same steps given explicitly.
    c = samplers.euler_ancestral(model, X_T, schedule, 2, timesteps=DMD2_TIMESTEPS, key=key)
    np.testing.assert_allclose(a, c, rtol=1e-6, atol=1e-6)
    # The transition helper rebuilds the returned trajectory from the tables, step by step.
    x0, states = samplers.euler_ancestral(model, X_T, schedule, 4, key=key, return_states=True)
    assert states.shape == (5, *X_T.shape)
    np.testing.assert_array_equal(states[-1], x0)
    tab = samplers.euler_ancestral_tables(schedule, 4)
    close(states[0], X_T * tab["init_noise_sigma"])
    for i in range(4):
        x = states[i]
        row = {k: v[i] for k, v in tab.items() if k != "init_noise_sigma"}
        out = model(x / row["scale"], jnp.full((2,), row["t"], jnp.float32))
        mean, std = samplers.euler_ancestral_transition(schedule, row, x, out)
        assert std == row["sigma_up"] and (std > 0) == (i < 3)
        close(mean + std * noises[i], np.asarray(states[i + 1]))
    close(x0, np.asarray(a))


# ----------------------------------------------------------------------------------------------
# LCM


@pytest.mark.parametrize(
    "options",
    [{}, dict(prediction_type="v_prediction"), dict(original_inference_steps=25, timestep_scaling=5.0),
     dict(clip_sample=True, clip_sample_range=0.5), dict(beta_schedule="linear", beta_start=1e-4,
     beta_end=0.02, set_alpha_to_one=False, prediction_type="v_prediction")],
    # (linear betas leave alpha_bar_999 = 4e-5: epsilon's x0 = (x - ...) / 0.0064 would magnify
    # torch's and numpy's one-ulp float32 differences 150 times, so that one runs v-prediction)
    ids=["lcm_sdxl", "v", "orig25_scale5", "clip", "linear_v"],
)  # fmt: skip
def test_lcm_matches_diffusers(options, monkeypatch):
    cfg = dict(LCM_SDXL, **options)
    for n in STEPS:
        check(samplers.lcm, diffusers.LCMScheduler, cfg, n, noisy=True, monkeypatch=monkeypatch)


@pytest.mark.parametrize("timesteps", [DMD2_TIMESTEPS, [999], [999, 500, 10, 0], [700, 300]])
def test_lcm_custom_timesteps_match_diffusers(timesteps, monkeypatch):
    # DMD2 loads LCMScheduler from SDXL's (EulerDiscreteScheduler) config.
    check(samplers.lcm, diffusers.LCMScheduler, SDXL, timesteps=timesteps, noisy=True,
          monkeypatch=monkeypatch)  # fmt: skip


def test_lcm_timesteps_key_and_transition():
    schedule = schedule_from_config(LCM_SDXL)
    for n in range(1, 51):
        ref = diffusers.LCMScheduler.from_config(LCM_SDXL)
        ref.set_timesteps(n)
        np.testing.assert_array_equal(samplers.lcm_timesteps(schedule, n), ref.timesteps.numpy())
    np.testing.assert_array_equal(
        samplers.lcm_timesteps(schedule, 4, DMD2_TIMESTEPS), np.array(DMD2_TIMESTEPS)
    )
    key = jax.random.key(2)
    noises = jnp.stack([jax.random.normal(jax.random.fold_in(key, i), X_T.shape) for i in range(4)])
    model = recording_model([], jnp.int32)
    a = samplers.lcm(model, X_T, schedule, timesteps=DMD2_TIMESTEPS, key=key)
    b = samplers.lcm(model, X_T, schedule, 9, timesteps=DMD2_TIMESTEPS, noises=noises)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    x0, states = samplers.lcm(
        model, X_T, schedule, timesteps=DMD2_TIMESTEPS, key=key, return_states=True
    )
    np.testing.assert_array_equal(states[0], X_T)
    np.testing.assert_array_equal(states[-1], x0)
    tab = samplers.lcm_tables(schedule, timesteps=DMD2_TIMESTEPS)
    ab = schedule.alphas_cumprod
    for i in range(4):
        x = states[i]
        row = {k: v[i] for k, v in tab.items()}
        mean, std = samplers.lcm_transition(
            schedule, row, x, model(x, jnp.full((2,), row["t"], jnp.int32))
        )
        want = np.sqrt(1 - ab[DMD2_TIMESTEPS[i + 1]]) if i < 3 else 0.0
        np.testing.assert_allclose(std, want, rtol=1e-6)
        close(mean + std * noises[i], np.asarray(states[i + 1]))
    close(x0, np.asarray(a))
    # Traced step indices work too (the trainer vmaps / scans over a trajectory's steps).
    rows = {k: jnp.asarray(v) for k, v in tab.items()}
    i = jnp.int32(1)
    row = jax.tree.map(lambda v: v[i], rows)
    mean, std = jax.jit(samplers.lcm_transition, static_argnums=0)(
        schedule, row, states[1], model(states[1], jnp.full((2,), row["t"], jnp.int32))
    )
    close(mean + std * noises[1], np.asarray(states[2]))


# ----------------------------------------------------------------------------------------------
# Configs, dispatch, jit, errors


def test_configs_parse_and_default_sampler():
    expect = {
        "EulerDiscreteScheduler": "euler",
        "EulerAncestralDiscreteScheduler": "euler_ancestral",
        "LCMScheduler": "lcm",
        "DDIMScheduler": "ddim",
        "DPMSolverMultistepScheduler": "dpm_solver_pp",
        "PNDMScheduler": "dpm_solver_pp",
        "DDPMScheduler": "dpm_solver_pp",
        "UniPCMultistepScheduler": "dpm_solver_pp",
    }
    for name, sampler in expect.items():
        cls = getattr(diffusers, name)
        loaded = dict(cls.from_config(SDXL).config)  # every option of the class, as saved
        s = schedule_from_config(loaded, source=name)
        assert s.class_name == name and samplers.default_sampler(s) == sampler
        assert sampler in samplers.SAMPLERS
    assert samplers.default_sampler(schedule_from_config({})) == "dpm_solver_pp"
    s = schedule_from_config(LCM_SDXL)
    assert (s.original_inference_steps, s.timestep_scaling, s.set_alpha_to_one) == (50, 10.0, True)
    # LCMScheduler's own beta defaults are Stable Diffusion's.
    bare = {"_class_name": "LCMScheduler"}
    np.testing.assert_allclose(
        schedule_from_config(bare).alphas_cumprod,
        diffusers.LCMScheduler.from_config(bare).alphas_cumprod.numpy(),
        rtol=2e-6,
    )
    s = schedule_from_config(
        dict(SDXL, timestep_type="continuous", interpolation_type="log_linear")
    )
    assert (s.timestep_type, s.interpolation_type) == ("continuous", "log_linear")


@pytest.mark.parametrize(
    "key,value",
    [
        ("_class_name", "FlowMatchEulerDiscreteScheduler"),
        ("_class_name", "MyScheduler"),
        ("interpolation_type", "cubic"),
        ("timestep_type", "fractional"),
        ("sigma_min", "small"),
        ("sigma_max", -1.0),
        ("original_inference_steps", 2000),
        ("timestep_scaling", 0),
        ("use_beta_sigmas", True),
    ],
)
def test_bad_configs_name_source_key_value(key, value):
    with pytest.raises(ValueError) as e:
        schedule_from_config(dict(SDXL, **{key: value}), source="m/scheduler_config.json")
    msg = str(e.value)
    assert "m/scheduler_config.json" in msg and key in msg and repr(value) in msg


def test_dpm_solver_pp_karras_reads_sigma_min_max():
    # DPMSolverMultistepScheduler keeps a config's sigma_min / sigma_max and uses them for Karras.
    cfg = dict(SDXL, _class_name="DPMSolverMultistepScheduler", use_karras_sigmas=True,
               sigma_min=0.05, sigma_max=8.0)  # fmt: skip
    ref = diffusers.DPMSolverMultistepScheduler.from_config(cfg)
    ref.set_timesteps(9)
    ts, sigmas = samplers.dpm_solver_pp_timesteps(schedule_from_config(cfg), 9)
    np.testing.assert_array_equal(ts, ref.timesteps.numpy())
    np.testing.assert_allclose(sigmas, ref.sigmas.numpy(), rtol=1e-6)


@pytest.mark.parametrize("name", ["euler", "euler_ancestral", "lcm"])
def test_one_compile_one_scan(name):
    fn = samplers.SAMPLERS[name]
    cfg = {"euler": SDXL, "euler_ancestral": TURBO, "lcm": LCM_SDXL}[name]
    schedule = schedule_from_config(cfg)
    traces = []

    def model(x, t):
        traces.append(1)
        return jnp.sin(x) * 0.5 + 0.01 * t.astype(jnp.float32)[:, None, None, None]

    kwargs = {} if name == "euler" else {"key": jax.random.key(0)}

    @jax.jit
    def run(x):
        return fn(model, x, schedule, 4, **kwargs)

    a = run(jnp.asarray(X_T))
    b = run(jnp.asarray(X_T) + 1.0)
    assert len(traces) == 1 and a.shape == X_T.shape and not np.allclose(a, b)
    x0, states = jax.jit(lambda x: fn(model, x, schedule, 4, return_states=True, **kwargs))(X_T)
    close(x0, np.asarray(a))
    assert states.shape == (5, *X_T.shape)
    jaxpr = jax.make_jaxpr(lambda x: fn(model, x, schedule, 12, **kwargs))(X_T)
    assert [e.primitive.name for e in jaxpr.eqns].count("scan") == 1


def test_bad_arguments():
    s = schedule_from_config(SDXL)
    model = recording_model([], jnp.float32)
    lcm_model = recording_model([], jnp.int32)
    bad = [
        ([999, 999, 500], "repeats 999"),
        ([500, 749], "descending"),
        ([1000, 500], "1000, outside"),
        ([999, -1], "-1, outside"),
        ([999, 499.5], "non-integer value 499.5"),
        ([], "non-empty"),
        ([[999, 500]], "1-D"),
        (["999"], "integers"),
    ]
    for ts, match in bad:
        for fn, m, kw in ((samplers.euler, model, {}), (samplers.lcm, lcm_model, {"key": jax.random.key(0)}),
                          (samplers.euler_ancestral, model, {"key": jax.random.key(0)})):  # fmt: skip
            with pytest.raises(ValueError, match="timesteps") as e:
                fn(m, X_T, s, 4, timesteps=ts, **kw)
            assert match in str(e.value), (ts, str(e.value))
    for fn, m in ((samplers.euler_ancestral, model), (samplers.lcm, lcm_model)):
        with pytest.raises(ValueError, match="key"):
            fn(m, X_T, s, 4)
        with pytest.raises(ValueError, match="noises has shape"):
            fn(m, X_T, s, 4, noises=np.zeros((3, *X_T.shape), np.float32))
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        samplers.euler(model, X_T, schedule_from_config(dict(SDXL, use_karras_sigmas=True)), 4,
                       timesteps=DMD2_TIMESTEPS)  # fmt: skip
    with pytest.raises(ValueError, match="original_inference_steps"):
        samplers.lcm(lcm_model, X_T, s, 51, key=jax.random.key(0))
    with pytest.raises(ValueError, match="outside"):  # leading, steps_offset 1: t = 1000
        samplers.euler(model, X_T, s, 1000)
    with pytest.raises(ValueError, match="num_steps"):
        samplers.euler(model, X_T, s, 0)
