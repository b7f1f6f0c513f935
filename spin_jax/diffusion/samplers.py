"""DPM-Solver++ (multistep) and DDIM as pure functions: the whole loop is one ``lax.scan``.

Both follow diffusers' ``DPMSolverMultistepScheduler`` / ``DDIMScheduler`` (as ``from_config``
builds them from the model's scheduler config) step for step: the timesteps, noise levels and
update coefficients are computed on the host, in float32 with the same operations diffusers
uses, when the sampler is traced, and enter the compiled loop as constant per-step tables. The
loop body is then one model call plus a few fused multiply-adds.

``model_fn(x, t) -> eps or v`` (as ``schedule.prediction_type`` says) takes ``x`` [B, ...] float32
and ``t`` int32 [B]. Wrap a sampler in ``jax.jit`` with ``model_fn`` closed over.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from spin_jax.diffusion.schedule import FINAL_SIGMAS_TYPES, TIMESTEP_SPACINGS, Schedule

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
        sigma_min, sigma_max = float(flipped[-1]), float(flipped[0])
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


SAMPLERS: dict[str, Callable[..., jax.Array]] = {"dpm_solver_pp": dpm_solver_pp, "ddim": ddim}
