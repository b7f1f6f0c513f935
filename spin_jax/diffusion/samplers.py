"""Diffusers' samplers as pure functions: the whole loop is one ``lax.scan``.

DPM-Solver++ (multistep), DDIM, Euler, Euler ancestral and LCM follow diffusers'
``DPMSolverMultistepScheduler`` / ``DDIMScheduler`` / ``EulerDiscreteScheduler`` /
``EulerAncestralDiscreteScheduler`` / ``LCMScheduler`` (as ``from_config`` builds them from the
model's scheduler config) step for step: the timesteps, noise levels and update coefficients
are computed on the host, in float32 with the same operations diffusers uses, when the sampler
is traced, and enter the compiled loop as constant per-step tables (public: ``*_timesteps``,
``*_tables``, and the stochastic steps' Gaussians ``euler_ancestral_transition`` /
``lcm_transition``). The loop body is then one model call plus a few fused multiply-adds.

``model_fn(x, t) -> eps or v`` (as ``schedule.prediction_type`` says) takes ``x`` [B, ...] float32,
exactly what diffusers' pipeline gives the UNet (the Euler samplers' ``x / sqrt(sigma^2 + 1)``),
and ``t`` [B]: int32 for DPM-Solver++, DDIM and LCM; float32 for Euler and Euler ancestral,
whose diffusers timesteps can be fractional (linspace spacing, Karras sigmas). ``x_T`` is
unit-variance noise (the Euler samplers multiply it by ``init_noise_sigma``). Wrap a sampler in
``jax.jit`` with ``model_fn`` closed over. ``default_sampler(schedule)`` names the sampler
diffusers' pipeline would use with the config's scheduler class.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from spin_jax.diffusion.schedule import (
    FINAL_SIGMAS_TYPES,
    TIMESTEP_SPACINGS,
    Schedule,
    _linspace_f32,
)

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def _check_steps(num_steps: int, schedule: Schedule) -> int:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int | np.integer):
        raise ValueError(f"num_steps must be a Python int, got {num_steps!r}")
    if not 1 <= num_steps <= schedule.num_train_timesteps:
        raise ValueError(
            f"num_steps={num_steps} must be in [1, num_train_timesteps="
            f"{schedule.num_train_timesteps}]"
        )
    return int(num_steps)


def _spacing(schedule: Schedule, default: str) -> str:
    spacing = schedule.timestep_spacing or default
    if spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"timestep_spacing={spacing!r} is not one of {TIMESTEP_SPACINGS}")
    return spacing


# ----------------------------------------------------------------------------------------------
# DPM-Solver++


def _sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma, by interpolation in log sigma (diffusers')."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * high_idx).reshape(sigma.shape)


def _dpm_alphas_cumprod(schedule: Schedule) -> np.ndarray:
    ac = schedule.alphas_cumprod.copy()
    if schedule.rescale_betas_zero_snr:
        ac[-1] = 2.0**-24  # diffusers: close to 0 so the first sigma is finite
    return ac


def dpm_solver_pp_timesteps(
    schedule: Schedule,
    num_steps: int,
    *,
    use_karras_sigmas: bool | None = None,
    final_sigmas_type: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps int64 [S], sigmas float32 [S + 1]) as ``DPMSolverMultistepScheduler.set_timesteps``.

    ``sigma = sqrt((1 - alpha_bar) / alpha_bar)``; the last sigma is 0 (``final_sigmas_type``
    ``zero``) or the smallest training sigma (``sigma_min``). S is usually ``num_steps``.
    """
    num_steps = _check_steps(num_steps, schedule)
    karras = schedule.use_karras_sigmas if use_karras_sigmas is None else use_karras_sigmas
    final = schedule.final_sigmas_type if final_sigmas_type is None else final_sigmas_type
    if final not in FINAL_SIGMAS_TYPES:
        raise ValueError(f"final_sigmas_type={final!r} is not one of {FINAL_SIGMAS_TYPES}")
    ac = _dpm_alphas_cumprod(schedule)
    T = schedule.num_train_timesteps
    one = np.float32(1)
    with np.errstate(divide="ignore"):
        lambdas = np.log(np.sqrt(ac)) - np.log(np.sqrt(one - ac))
    clipped_idx = int(np.searchsorted(lambdas[::-1], np.float32(schedule.lambda_min_clipped)))
    last = T - clipped_idx
    spacing = _spacing(schedule, "linspace")  # the class default of DPMSolverMultistepScheduler
    if spacing == "linspace":
        ts = np.linspace(0, last - 1, num_steps + 1).round()[::-1][:-1].copy().astype(np.int64)
    elif spacing == "leading":
        ratio = last // (num_steps + 1)
        ts = (np.arange(0, num_steps + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64)
        ts += schedule.steps_offset
    else:
        ratio = T / num_steps
        ts = np.arange(last, 0, -ratio).round().copy().astype(np.int64) - 1

    sigmas_train = ((one - ac) / ac) ** 0.5
    log_sigmas = np.log(sigmas_train)
    if karras:
        flipped = np.flip(sigmas_train).copy()
        # diffusers keeps a config's sigma_min / sigma_max as (hidden) options and reads them here.
        sigma_min = float(flipped[-1]) if schedule.sigma_min is None else schedule.sigma_min
        sigma_max = float(flipped[0]) if schedule.sigma_max is None else schedule.sigma_max
        rho = 7.0
        ramp = np.linspace(0, 1, num_steps)
        min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
        sigmas = (max_inv + ramp * (min_inv - max_inv)) ** rho
        ts = _sigma_to_t(sigmas, log_sigmas)
        if schedule.beta_schedule != "squaredcos_cap_v2":
            ts = ts.round()
    else:
        if ts.min() < 0 or ts.max() >= T:
            raise ValueError(
                f"{spacing} spacing with steps_offset={schedule.steps_offset} and {num_steps} "
                f"steps gives timesteps from {ts.min()} to {ts.max()}, outside [0, {T})"
            )
        sigmas = np.interp(ts, np.arange(0, T), sigmas_train)
    if final == "sigma_min":
        sigma_last = ((one - ac[0]) / ac[0]) ** 0.5
    else:
        sigma_last = 0.0
    sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32)
    return ts.astype(np.int64), sigmas


def _alpha_sigma_lambda(sigma: np.float32) -> tuple[np.float32, np.float32, np.float32]:
    one = np.float32(1)
    alpha = one / ((sigma**2 + one) ** np.float32(0.5))
    sig = sigma * alpha
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sig)
    return alpha, sig, lam


def _dpm_tables(
    schedule: Schedule,
    num_steps: int,
    order: int,
    lower_order_final: bool,
    final_sigmas_type: str,
    use_karras_sigmas: bool,
    euler_at_final: bool,
    solver_type: str,
) -> dict[str, np.ndarray]:
    """Per-step constants. Step i turns the model output into x0 = m0 and updates
    ``x <- A x + B m0 + C (m0 - m1) + E (m1 - m2)`` with m1, m2 the previous x0 predictions."""
    ts, sigmas = dpm_solver_pp_timesteps(
        schedule,
        num_steps,
        use_karras_sigmas=use_karras_sigmas,
        final_sigmas_type=final_sigmas_type,
    )
    n = len(ts)
    one, half = np.float32(1), np.float32(0.5)
    rows = {k: np.zeros(n, np.float32) for k in ("alpha", "sigma", "A", "B", "C", "E")}
    for i in range(n):
        alpha_t, sigma_t, lam_t = _alpha_sigma_lambda(sigmas[i + 1])
        alpha_s0, sigma_s0, lam_s0 = _alpha_sigma_lambda(sigmas[i])
        rows["alpha"][i], rows["sigma"][i] = alpha_s0, sigma_s0
        final = i == n - 1 and (
            euler_at_final or (lower_order_final and n < 15) or final_sigmas_type == "zero"
        )
        second = i == n - 2 and lower_order_final and n < 15
        if order == 1 or i < 1 or final:
            step_order = 1
        elif order == 2 or i < 2 or second:
            step_order = 2
        else:
            step_order = 3
        # Steps to sigma 0 (or between equal sigmas) divide by zero; the coefficients they
        # really use stay finite, the rest is checked below.
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            h = lam_t - lam_s0
            em1 = np.exp(-h) - one  # exp(-h) - 1
            rows["A"][i] = sigma_t / sigma_s0
            rows["B"][i] = -(alpha_t * em1)
            if step_order == 2:
                lam_s1 = _alpha_sigma_lambda(sigmas[i - 1])[2]
                r0 = (lam_s0 - lam_s1) / h
                if solver_type == "midpoint":
                    rows["C"][i] = -half * (alpha_t * em1) / r0
                else:
                    rows["C"][i] = (alpha_t * (em1 / h + one)) / r0
            elif step_order == 3:
                lam_s1 = _alpha_sigma_lambda(sigmas[i - 1])[2]
                lam_s2 = _alpha_sigma_lambda(sigmas[i - 2])[2]
                r0, r1 = (lam_s0 - lam_s1) / h, (lam_s1 - lam_s2) / h
                c1 = alpha_t * (em1 / h + one)  # coefficient of D1
                c2 = alpha_t * ((em1 + h) / h**2 - half)  # minus the coefficient of D2
                k = r0 / (r0 + r1)
                # D1 = (1 + k) D1_0 - k D1_1, D2 = (D1_0 - D1_1) / (r0 + r1),
                # D1_0 = (m0 - m1) / r0, D1_1 = (m1 - m2) / r1.
                rows["C"][i] = (c1 * (one + k) - c2 / (r0 + r1)) / r0
                rows["E"][i] = (-c1 * k + c2 / (r0 + r1)) / r1
    rows["t"] = ts.astype(np.int32)
    for v in rows.values():
        if not np.all(np.isfinite(v)):
            bad = np.nonzero(~np.isfinite(v))[0].tolist()
            raise ValueError(
                f"DPM-Solver++ coefficients are not finite at steps {bad} of {n} (sigmas "
                f"{sigmas.tolist()}): two equal consecutive noise levels make a zero-length step "
                "that only first order or the midpoint second-order update can take"
            )
    return rows


def dpm_solver_pp(
    model_fn: ModelFn,
    x_T: jax.Array,
    schedule: Schedule,
    num_steps: int = 20,
    *,
    order: int | None = None,
    lower_order_final: bool | None = None,
    final_sigmas_type: str | None = None,
    use_karras_sigmas: bool | None = None,
    euler_at_final: bool | None = None,
    solver_type: str | None = None,
) -> jax.Array:
    """Deterministic multistep DPM-Solver++ from noise ``x_T`` [B, ...] to x_0 (float32).

    Options left ``None`` take the schedule's values, i.e. what
    ``DPMSolverMultistepScheduler.from_config(config)`` uses: order 2, midpoint, lower-order
    final steps, ``final_sigmas_type="zero"``, no Karras sigmas, unless the config says otherwise.
    """
    order = schedule.solver_order if order is None else order
    if order not in (1, 2, 3):
        raise ValueError(f"order={order!r} must be 1, 2 or 3")
    solver_type = schedule.solver_type if solver_type is None else solver_type
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type={solver_type!r} must be 'midpoint' or 'heun'")
    tables = _dpm_tables(
        schedule,
        num_steps,
        order,
        schedule.lower_order_final if lower_order_final is None else lower_order_final,
        schedule.final_sigmas_type if final_sigmas_type is None else final_sigmas_type,
        schedule.use_karras_sigmas if use_karras_sigmas is None else use_karras_sigmas,
        schedule.euler_at_final if euler_at_final is None else euler_at_final,
        solver_type,
    )
    eps_pred = schedule.prediction_type == "epsilon"
    x_T = jnp.asarray(x_T, jnp.float32)
    batch = x_T.shape[0]

    def body(carry, row):
        x, m1, m2 = carry
        out = model_fn(x, jnp.full((batch,), row["t"], jnp.int32)).astype(jnp.float32)
        if eps_pred:
            m0 = (x - row["sigma"] * out) / row["alpha"]
        else:
            m0 = row["alpha"] * x - row["sigma"] * out
        x = row["A"] * x + row["B"] * m0 + row["C"] * (m0 - m1) + row["E"] * (m1 - m2)
        return (x, m0, m1), None

    zeros = jnp.zeros_like(x_T)
    xs = {k: jnp.asarray(v) for k, v in tables.items()}
    (x0, _, _), _ = jax.lax.scan(body, (x_T, zeros, zeros), xs)
    return x0


# ----------------------------------------------------------------------------------------------
# DDIM


def ddim_timesteps(schedule: Schedule, num_steps: int) -> np.ndarray:
    """Timesteps (int64) as ``DDIMScheduler.set_timesteps``."""
    num_steps = _check_steps(num_steps, schedule)
    T = schedule.num_train_timesteps
    spacing = _spacing(schedule, "leading")  # the class default of DDIMScheduler
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, num_steps).round()[::-1].copy().astype(np.int64)
    elif spacing == "leading":
        ratio = T // num_steps
        ts = (np.arange(0, num_steps) * ratio).round()[::-1].copy().astype(np.int64)
        ts += schedule.steps_offset
    else:
        ratio = T / num_steps
        ts = np.round(np.arange(T, 0, -ratio)).astype(np.int64) - 1
    if ts.min() < 0 or ts.max() >= T:
        raise ValueError(
            f"{spacing} spacing with steps_offset={schedule.steps_offset} and {num_steps} steps "
            f"gives timesteps from {ts.min()} to {ts.max()}, outside [0, {T})"
        )
    return ts


def _ddim_tables(schedule: Schedule, num_steps: int, eta: float) -> dict[str, np.ndarray]:
    ts = ddim_timesteps(schedule, num_steps)
    ac = schedule.alphas_cumprod
    one = np.float32(1)
    set_alpha_to_one = True if schedule.set_alpha_to_one is None else schedule.set_alpha_to_one
    final_ac = one if set_alpha_to_one else ac[0]
    # diffusers steps back by T // num_steps whatever the spacing.
    prev = ts - schedule.num_train_timesteps // num_steps
    a_t = ac[ts]
    a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], final_ac).astype(np.float32)
    b_t, b_prev = one - a_t, one - a_prev
    variance = (b_prev / b_t) * (one - a_t / a_prev)
    std = np.float32(eta) * variance ** np.float32(0.5)
    return {
        "t": ts.astype(np.int32),
        "sqrt_a": a_t ** np.float32(0.5),
        "sqrt_b": b_t ** np.float32(0.5),
        "sqrt_a_prev": a_prev ** np.float32(0.5),
        "dir": (one - a_prev - std**2) ** np.float32(0.5),
        "std": std.astype(np.float32),
    }


def ddim(
    model_fn: ModelFn,
    x_T: jax.Array,
    schedule: Schedule,
    num_steps: int = 50,
    eta: float = 0.0,
    *,
    key: jax.Array | None = None,
) -> jax.Array:
    """DDIM from noise ``x_T`` [B, ...] to x_0 (float32); deterministic at ``eta=0``.

    ``eta > 0`` adds noise drawn from ``key`` (required then). Predicted x0 is clipped to
    ``clip_sample_range`` when the config's ``clip_sample`` is true (DDIMScheduler's default).
    """
    eta = float(eta)
    if eta < 0:
        raise ValueError(f"eta={eta} must be >= 0")
    if eta > 0 and key is None:
        raise ValueError("ddim with eta > 0 needs a PRNG key")
    tables = _ddim_tables(schedule, num_steps, eta)
    eps_pred = schedule.prediction_type == "epsilon"
    clip = True if schedule.clip_sample is None else schedule.clip_sample
    clip_range = schedule.clip_sample_range
    x_T = jnp.asarray(x_T, jnp.float32)
    batch = x_T.shape[0]

    def body(x, row):
        i, row = row
        out = model_fn(x, jnp.full((batch,), row["t"], jnp.int32)).astype(jnp.float32)
        if eps_pred:
            x0 = (x - row["sqrt_b"] * out) / row["sqrt_a"]
            eps = out
        else:
            x0 = row["sqrt_a"] * x - row["sqrt_b"] * out
            eps = row["sqrt_a"] * out + row["sqrt_b"] * x
        if clip:
            x0 = jnp.clip(x0, -clip_range, clip_range)
        x = row["sqrt_a_prev"] * x0 + row["dir"] * eps
        if eta > 0:
            x = x + row["std"] * jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
        return x, None

    xs = {k: jnp.asarray(v) for k, v in tables.items()}
    steps = jnp.arange(len(tables["t"]), dtype=jnp.int32)
    x0, _ = jax.lax.scan(body, x_T, (steps, xs))
    return x0


# ----------------------------------------------------------------------------------------------
# Custom timesteps, shared by Euler, Euler ancestral and LCM


def check_timesteps(timesteps, schedule: Schedule) -> np.ndarray:
    """Validates custom ``timesteps`` (integers, strictly descending, in [0, T)); int64 [S]."""
    if isinstance(timesteps, jax.core.Tracer):
        raise ValueError("timesteps must be concrete (a list or numpy array), not a traced value")
    try:
        raw = np.asarray(timesteps)
    except (TypeError, ValueError):
        raise ValueError(f"timesteps={timesteps!r} must be a list of integers") from None
    if raw.ndim != 1 or raw.shape[0] == 0:
        raise ValueError(f"timesteps={timesteps!r} must be a non-empty 1-D list of integers")
    if raw.dtype == bool or not np.issubdtype(raw.dtype, np.number):
        raise ValueError(f"timesteps={timesteps!r} must be integers")
    values = raw.tolist()
    for v in values:
        if not float(v).is_integer():
            raise ValueError(f"timesteps={values} has the non-integer value {v!r}")
    ts = raw.astype(np.int64)
    T = schedule.num_train_timesteps
    for v in ts.tolist():
        if not 0 <= v < T:
            raise ValueError(
                f"timesteps={ts.tolist()} has {v}, outside [0, num_train_timesteps={T})"
            )
    for a, b in zip(ts[:-1].tolist(), ts[1:].tolist(), strict=True):
        if a == b:
            raise ValueError(f"timesteps={ts.tolist()} repeats {a}")
        if b > a:
            raise ValueError(f"timesteps={ts.tolist()} must be descending ({a} then {b})")
    return ts


def _spaced_timesteps(schedule: Schedule, num_steps: int) -> np.ndarray:
    """float32 timesteps of the Euler schedulers' ``set_timesteps`` (class default: linspace)."""
    num_steps = _check_steps(num_steps, schedule)
    T = schedule.num_train_timesteps
    spacing = _spacing(schedule, "linspace")
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, num_steps, dtype=np.float32)[::-1].copy()
    elif spacing == "leading":
        ratio = T // num_steps
        ts = (np.arange(0, num_steps) * ratio).round()[::-1].copy().astype(np.float32)
        ts += schedule.steps_offset
    else:
        ratio = T / num_steps
        ts = np.arange(T, 0, -ratio).round().copy().astype(np.float32) - 1
    if ts.min() < 0 or ts.max() > T - 1:
        raise ValueError(
            f"{spacing} spacing with steps_offset={schedule.steps_offset} and {num_steps} steps "
            f"gives timesteps from {ts.min()} to {ts.max()}, outside [0, {T})"
        )
    return ts


def _euler_train_sigmas(schedule: Schedule) -> np.ndarray:
    """sqrt((1 - alpha_bar) / alpha_bar), float32, after the Euler classes' zero-SNR fix."""
    ac = _dpm_alphas_cumprod(schedule)  # the same 2**-24 for the last alpha_bar
    one = np.float32(1)
    return ((one - ac) / ac) ** np.float32(0.5)


def _init_noise_sigma(schedule: Schedule, sigmas: np.ndarray) -> np.float32:
    """What the Euler schedulers multiply unit noise by: max sigma, or sqrt(max^2 + 1) (leading)."""
    top = np.max(sigmas).astype(np.float32)
    if _spacing(schedule, "linspace") == "leading":
        return (top**2 + np.float32(1)) ** np.float32(0.5)
    return top


def _noise_source(key, noises, n: int, x_T: jax.Array, name: str):
    """Step i's noise: ``noises[i]`` if given, else ``normal(fold_in(key, i))``."""
    if noises is not None:
        noises = jnp.asarray(noises, jnp.float32)
        if noises.shape != (n, *x_T.shape):
            raise ValueError(
                f"{name}: noises has shape {noises.shape}, expected {(n, *x_T.shape)} "
                f"(one noise per step, each shaped like x_T)"
            )
        return lambda i: noises[i]
    if key is None:
        raise ValueError(f"{name} is stochastic: pass key= (a PRNG key) or noises=")
    return lambda i: jax.random.normal(jax.random.fold_in(key, i), x_T.shape, jnp.float32)


def _x0_from_sigma_space(out, x, row, eps_pred: bool):
    """x0 predicted by the Euler schedulers' ``step`` (x is the unscaled, sigma-space sample)."""
    if eps_pred:
        return x - row["sigma"] * out
    return out * row["v_out"] + x / row["v_div"]


def _finish(scanned, start: jax.Array, return_states: bool):
    """x0, or (x0, states float32 [S + 1, *x_T.shape]): states[0] is the sampler's starting
    sample (x_T times init_noise_sigma for Euler), states[i + 1] the sample after step i, so
    step i's transition is states[i] -> states[i + 1] at the tables' row i."""
    x0, states = scanned
    if not return_states:
        return x0
    return x0, jnp.concatenate([start[None], states], axis=0)


def _euler_rows(ts: np.ndarray, sigmas: np.ndarray) -> dict[str, np.ndarray]:
    sig = sigmas[: len(ts)].astype(np.float32)
    one = np.float32(1)
    scale = (sig**2 + one) ** np.float32(0.5)
    return {
        "t": ts.astype(np.float32),
        "sigma": sig,
        "scale": scale,  # model input is x / scale
        "v_out": -sig / scale,
        "v_div": sig**2 + one,
    }


# ----------------------------------------------------------------------------------------------
# Euler (EulerDiscreteScheduler)


def euler_timesteps(
    schedule: Schedule, num_steps: int = 4, timesteps=None
) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps float32 [S], sigmas float32 [S + 1]) as ``EulerDiscreteScheduler.set_timesteps``.

    The timesteps are what the UNet receives; they are fractional for ``linspace`` spacing (e.g.
    7 steps of 1000), Karras sigmas and ``timestep_type="continuous"`` (then 0.25 log sigma, with
    v-prediction), so they stay float32. ``interpolation_type="log_linear"`` gives S + 2 sigmas,
    as diffusers does (the last step then ends at the smallest training sigma).
    """
    continuous = (
        schedule.timestep_type == "continuous" and schedule.prediction_type == "v_prediction"
    )
    if timesteps is not None:
        if schedule.use_karras_sigmas:
            raise ValueError("timesteps cannot be given with use_karras_sigmas=True (as diffusers)")
        if continuous:
            raise ValueError(
                "timesteps cannot be given with timestep_type='continuous' and v_prediction "
                "(as diffusers)"
            )
        ts = check_timesteps(timesteps, schedule).astype(np.float32)
    else:
        ts = _spaced_timesteps(schedule, num_steps)
    n = len(ts)
    T = schedule.num_train_timesteps
    ac = _dpm_alphas_cumprod(schedule)
    train = _euler_train_sigmas(schedule)
    log_sigmas = np.log(train)
    if schedule.interpolation_type == "linear":
        sigmas = np.interp(ts, np.arange(0, T), train)
    else:  # log_linear: geometric from the largest to the smallest training sigma
        sigmas = np.exp(_linspace_f32(float(np.log(train[-1])), float(np.log(train[0])), n + 1))
    if schedule.use_karras_sigmas:
        sigma_min = float(sigmas[-1]) if schedule.sigma_min is None else schedule.sigma_min
        sigma_max = float(sigmas[0]) if schedule.sigma_max is None else schedule.sigma_max
        rho = 7.0
        ramp = np.linspace(0, 1, n)
        min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
        sigmas = (max_inv + ramp * (min_inv - max_inv)) ** rho
        ts = _sigma_to_t(sigmas, log_sigmas)
    one = np.float32(1)
    if schedule.final_sigmas_type == "sigma_min":
        sigma_last = ((one - ac[0]) / ac[0]) ** np.float32(0.5)
    else:
        sigma_last = 0.0
    sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32)
    if continuous:
        ts = np.float32(0.25) * np.log(sigmas[:n])
    return ts.astype(np.float32), sigmas


def euler_tables(schedule: Schedule, num_steps: int = 4, timesteps=None) -> dict[str, np.ndarray]:
    """Per-step float32 constants of ``euler``: ``t`` (UNet timestep), ``sigma``, ``scale``
    (model input = x / scale), ``v_out``, ``v_div`` (x0 = out v_out + x / v_div for v-prediction),
    ``dt`` (sigma_next - sigma); ``init_noise_sigma`` is a 0-d entry."""
    ts, sigmas = euler_timesteps(schedule, num_steps, timesteps)
    rows = _euler_rows(ts, sigmas)
    rows["dt"] = (sigmas[1 : len(ts) + 1] - rows["sigma"]).astype(np.float32)
    rows["init_noise_sigma"] = np.asarray(_init_noise_sigma(schedule, sigmas), np.float32)
    return rows


def euler(
    model_fn: ModelFn,
    x_T: jax.Array,
    schedule: Schedule,
    num_steps: int = 4,
    *,
    timesteps=None,
    return_states: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Deterministic Euler in sigma space (``EulerDiscreteScheduler``, s_churn = 0) to x_0.

    ``x_T`` is unit-variance noise [B, ...]; it is scaled by ``init_noise_sigma`` here.
    ``model_fn(x / sqrt(sigma^2 + 1), t)`` gets float32 ``t`` [B] (see ``euler_timesteps``).
    ``timesteps`` (integers, descending), if given, replace the spaced ones and ``num_steps``
    (as diffusers' pipelines do). ``return_states``: also return the trajectory (``_states``).
    """
    tables = euler_tables(schedule, num_steps, timesteps)
    init = tables.pop("init_noise_sigma")
    eps_pred = schedule.prediction_type == "epsilon"
    x_T = jnp.asarray(x_T, jnp.float32)
    batch = x_T.shape[0]

    def body(x, row):
        out = model_fn(x / row["scale"], jnp.full((batch,), row["t"], jnp.float32))
        x0 = _x0_from_sigma_space(out.astype(jnp.float32), x, row, eps_pred)
        d = (x - x0) / row["sigma"]
        x = x + d * row["dt"]
        return x, x if return_states else None

    xs = {k: jnp.asarray(v) for k, v in tables.items()}
    return _finish(jax.lax.scan(body, x_T * init, xs), x_T * init, return_states)


# ----------------------------------------------------------------------------------------------
# Euler ancestral (EulerAncestralDiscreteScheduler)


def euler_ancestral_timesteps(
    schedule: Schedule, num_steps: int = 4, timesteps=None
) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps float32 [S], sigmas float32 [S + 1]) as
    ``EulerAncestralDiscreteScheduler.set_timesteps``: linear interpolation, last sigma 0 (the
    class has no Karras, final-sigma or interpolation options). Its ``set_timesteps`` takes no
    custom timesteps; given ``timesteps`` are used as EulerDiscreteScheduler would."""
    if timesteps is not None:
        ts = check_timesteps(timesteps, schedule).astype(np.float32)
    else:
        ts = _spaced_timesteps(schedule, num_steps)
    train = _euler_train_sigmas(schedule)
    sigmas = np.interp(ts, np.arange(0, schedule.num_train_timesteps), train)
    return ts, np.concatenate([sigmas, [0.0]]).astype(np.float32)


def euler_ancestral_tables(
    schedule: Schedule, num_steps: int = 4, timesteps=None
) -> dict[str, np.ndarray]:
    """Per-step float32 constants of ``euler_ancestral``: those of ``euler_tables`` with ``dt =
    sigma_down - sigma``, plus ``sigma_up`` and ``sigma_down``. Step i draws
    ``x' ~ N(x + (x - x0) / sigma * dt, sigma_up^2 I)``."""
    ts, sigmas = euler_ancestral_timesteps(schedule, num_steps, timesteps)
    rows = _euler_rows(ts, sigmas)
    s_from, s_to = sigmas[:-1], sigmas[1:]
    with np.errstate(invalid="ignore"):
        up = (s_to**2 * (s_from**2 - s_to**2) / s_from**2) ** np.float32(0.5)
        down = (s_to**2 - up**2) ** np.float32(0.5)
    rows["sigma_up"] = up.astype(np.float32)
    rows["sigma_down"] = down.astype(np.float32)
    rows["dt"] = (down - s_from).astype(np.float32)
    rows["init_noise_sigma"] = np.asarray(_init_noise_sigma(schedule, sigmas), np.float32)
    return rows


def euler_ancestral_transition(
    schedule: Schedule, row: dict, x: jax.Array, model_out: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(mean, std) of the Gaussian step ``x -> x'`` given the model output at ``x`` (the
    unscaled sample; the model saw ``x / row["scale"]`` and ``row["t"]``). ``row``: one step of
    ``euler_ancestral_tables`` (numpy or JAX values; index the tables with a traced step)."""
    x0 = _x0_from_sigma_space(model_out, x, row, schedule.prediction_type == "epsilon")
    d = (x - x0) / row["sigma"]
    return x + d * row["dt"], row["sigma_up"]


def euler_ancestral(
    model_fn: ModelFn,
    x_T: jax.Array,
    schedule: Schedule,
    num_steps: int = 4,
    *,
    timesteps=None,
    key: jax.Array | None = None,
    noises: jax.Array | None = None,
    return_states: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Euler ancestral (``EulerAncestralDiscreteScheduler``) from unit noise ``x_T`` to x_0.

    Step i adds ``noises[i]`` ([S, *x_T.shape]) if given, else ``normal(fold_in(key, i))``,
    scaled by sigma_up (0 at the last step). ``model_fn`` gets float32 ``t`` [B].
    ``return_states``: also return the trajectory (see ``euler``).
    """
    tables = euler_ancestral_tables(schedule, num_steps, timesteps)
    init = tables.pop("init_noise_sigma")
    x_T = jnp.asarray(x_T, jnp.float32)
    noise = _noise_source(key, noises, len(tables["t"]), x_T, "euler_ancestral")
    batch = x_T.shape[0]

    def body(x, step):
        i, row = step
        out = model_fn(x / row["scale"], jnp.full((batch,), row["t"], jnp.float32))
        mean, std = euler_ancestral_transition(schedule, row, x, out.astype(jnp.float32))
        x = mean + noise(i) * std
        return x, x if return_states else None

    xs = {k: jnp.asarray(v) for k, v in tables.items()}
    steps = jnp.arange(len(tables["t"]), dtype=jnp.int32)
    return _finish(jax.lax.scan(body, x_T * init, (steps, xs)), x_T * init, return_states)


# ----------------------------------------------------------------------------------------------
# LCM (LCMScheduler)


def lcm_timesteps(schedule: Schedule, num_steps: int = 4, timesteps=None) -> np.ndarray:
    """Timesteps (int64 [S]) as ``LCMScheduler.set_timesteps``: ``num_steps`` picked evenly
    from the ``original_inference_steps`` distillation timesteps ``k, 2k, ... - 1`` (k = T //
    original_inference_steps), or the custom ``timesteps`` (e.g. DMD2's [999, 749, 499, 249])."""
    if timesteps is not None:
        return check_timesteps(timesteps, schedule)
    num_steps = _check_steps(num_steps, schedule)
    original = schedule.original_inference_steps
    T = schedule.num_train_timesteps
    if original > T:
        raise ValueError(f"original_inference_steps={original} exceeds num_train_timesteps={T}")
    if num_steps > original:
        raise ValueError(
            f"num_steps={num_steps} exceeds original_inference_steps={original}: LCM picks its "
            "steps from the distillation schedule"
        )
    k = T // original
    origin = (np.arange(1, original + 1) * k - 1)[::-1].copy()
    idx = np.floor(np.linspace(0, len(origin), num=num_steps, endpoint=False)).astype(np.int64)
    return origin[idx].astype(np.int64)


def lcm_tables(schedule: Schedule, num_steps: int = 4, timesteps=None) -> dict[str, np.ndarray]:
    """Per-step constants of ``lcm``: ``t`` (int32), ``sqrt_a``, ``sqrt_b`` (of alpha_bar_t),
    ``c_skip``, ``c_out`` and the re-noising ``mean_scale`` = sqrt(alpha_bar_prev), ``std`` =
    sqrt(1 - alpha_bar_prev); the last step has ``mean_scale`` 1, ``std`` 0 (no noise)."""
    ts = lcm_timesteps(schedule, num_steps, timesteps)
    ac = schedule.alphas_cumprod
    one = np.float32(1)
    prev = np.concatenate([ts[1:], ts[-1:]])  # diffusers: the last step's "previous" is itself
    a_t, a_prev = ac[ts], ac[prev]
    scaled = ts.astype(np.float32) * np.float32(schedule.timestep_scaling)
    sd2 = np.float32(0.5**2)
    last = np.arange(len(ts)) == len(ts) - 1
    return {
        "t": ts.astype(np.int32),
        "sqrt_a": np.sqrt(a_t),
        "sqrt_b": np.sqrt(one - a_t),
        "c_skip": sd2 / (scaled**2 + sd2),
        "c_out": scaled / (scaled**2 + sd2) ** np.float32(0.5),
        "mean_scale": np.where(last, one, np.sqrt(a_prev)).astype(np.float32),
        "std": np.where(last, np.float32(0), np.sqrt(one - a_prev)).astype(np.float32),
    }


def lcm_transition(
    schedule: Schedule, row: dict, x: jax.Array, model_out: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(mean, std) of the LCM step ``x -> x' = sqrt(ab') denoised + sqrt(1 - ab') z`` given the
    model output at (``x``, ``row["t"]``); ``row``: one step of ``lcm_tables``. The last step is
    deterministic (std 0, mean = the consistency model's denoised sample)."""
    if schedule.prediction_type == "epsilon":
        x0 = (x - row["sqrt_b"] * model_out) / row["sqrt_a"]
    else:
        x0 = row["sqrt_a"] * x - row["sqrt_b"] * model_out
    if schedule.clip_sample:  # LCMScheduler's default is False (None here)
        x0 = jnp.clip(x0, -schedule.clip_sample_range, schedule.clip_sample_range)
    denoised = row["c_out"] * x0 + row["c_skip"] * x
    return row["mean_scale"] * denoised, row["std"]


def lcm(
    model_fn: ModelFn,
    x_T: jax.Array,
    schedule: Schedule,
    num_steps: int = 4,
    *,
    timesteps=None,
    key: jax.Array | None = None,
    noises: jax.Array | None = None,
    return_states: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Latent consistency sampling (``LCMScheduler``) from unit noise ``x_T`` to x_0.

    ``model_fn(x, t)`` gets the unscaled sample and int32 ``t`` [B]. Every step but the last
    re-noises the denoised sample with ``noises[i]`` ([S, *x_T.shape]) if given, else
    ``normal(fold_in(key, i))``. ``timesteps``, if given, replace ``num_steps``.
    ``return_states``: also return the trajectory (see ``euler``).
    """
    tables = lcm_tables(schedule, num_steps, timesteps)
    x_T = jnp.asarray(x_T, jnp.float32)
    noise = _noise_source(key, noises, len(tables["t"]), x_T, "lcm")
    batch = x_T.shape[0]

    def body(x, step):
        i, row = step
        out = model_fn(x, jnp.full((batch,), row["t"], jnp.int32))
        mean, std = lcm_transition(schedule, row, x, out.astype(jnp.float32))
        x = mean + std * noise(i)
        return x, x if return_states else None

    xs = {k: jnp.asarray(v) for k, v in tables.items()}
    steps = jnp.arange(len(tables["t"]), dtype=jnp.int32)
    return _finish(jax.lax.scan(body, x_T, (steps, xs)), x_T, return_states)


# ----------------------------------------------------------------------------------------------

SAMPLERS: dict[str, Callable[..., jax.Array]] = {
    "dpm_solver_pp": dpm_solver_pp,
    "ddim": ddim,
    "euler": euler,
    "euler_ancestral": euler_ancestral,
    "lcm": lcm,
}

_DEFAULT_SAMPLERS = {
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_ancestral",
    "LCMScheduler": "lcm",
    "DDIMScheduler": "ddim",
    "DPMSolverMultistepScheduler": "dpm_solver_pp",
}


def default_sampler(schedule: Schedule) -> str:
    """The ``SAMPLERS`` name of the sampler diffusers' pipeline would use with the model's own
    scheduler class; DPM-Solver++ for the other DDPM-family classes (PNDM, DDPM, ...) and for
    configs without ``_class_name``."""
    return _DEFAULT_SAMPLERS.get(schedule.class_name, "dpm_solver_pp")


# ----------------------------------------------------------------------------------------------
# Transition log-densities of the stochastic few-step samplers (online PSO)


def gaussian_log_prob(x: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
    """``log N(x; mean, std^2 I)`` averaged over the non-batch axes (ALGORITHMS.md, PSO):
    ``[B, ...] -> [B]`` float32. ``std`` > 0, a scalar or broadcastable to ``x``."""
    x, mean = x.astype(jnp.float32), mean.astype(jnp.float32)
    std = jnp.broadcast_to(jnp.asarray(std, jnp.float32), x.shape)
    z = (x - mean) / std
    dens = -0.5 * jnp.square(z) - jnp.log(std) - np.float32(0.5 * np.log(2 * np.pi))
    return jnp.mean(dens, axis=tuple(range(1, x.ndim)))


def euler_ancestral_log_prob(
    schedule: Schedule, row: dict, x: jax.Array, x_next: jax.Array, model_out: jax.Array
) -> jax.Array:
    """Per-example mean log-density [B] of the Euler ancestral step ``x -> x_next`` (states of
    ``euler_ancestral(..., return_states=True)``) given the model output at ``x``; ``row`` one
    stochastic step (``sigma_up`` > 0) of ``euler_ancestral_tables``."""
    mean, std = euler_ancestral_transition(schedule, row, x, model_out.astype(jnp.float32))
    return gaussian_log_prob(x_next, mean, std)


def lcm_log_prob(
    schedule: Schedule, row: dict, x: jax.Array, x_next: jax.Array, model_out: jax.Array
) -> jax.Array:
    """Per-example mean log-density [B] of the LCM step ``x -> x_next`` given the model output
    at ``x``; ``row`` one stochastic step (every step but the last) of ``lcm_tables``."""
    mean, std = lcm_transition(schedule, row, x, model_out.astype(jnp.float32))
    return gaussian_log_prob(x_next, mean, std)


TRANSITION_LOG_PROBS: dict[str, Callable[..., jax.Array]] = {
    "euler_ancestral": euler_ancestral_log_prob,
    "lcm": lcm_log_prob,
}
