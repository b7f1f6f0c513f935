"""The DDPM noise schedule read from a diffusers scheduler config, forward noising and targets.

``Schedule`` holds the training noise levels (``alphas_cumprod``, float32 numpy, computed in
float32 the way diffusers' PyTorch schedulers compute them) and every scheduler option the
samplers read, as plain Python values. It is immutable, compares by value
(``schedule_from_config(c) == schedule_from_config(c)``) and hashes by value, and it is a JAX
pytree without leaves: it can be closed over, passed as a static argument or passed as a
regular argument of a jitted function, and the samplers build their per-step tables from it on
the host at trace time.

Options that only one diffusers scheduler class has (``timestep_spacing``, ``set_alpha_to_one``,
``clip_sample``) are ``None`` when the config does not set them: diffusers then uses the default
of the class the config is loaded into (``DPMSolverMultistepScheduler.from_config`` and
``DDIMScheduler.from_config`` differ), and so do the samplers. ``class_name`` is the config's
``_class_name``; a class outside diffusers' DDPM family (flow matching, ...) is an error.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
INTERPOLATION_TYPES = ("linear", "log_linear")
TIMESTEP_TYPES = ("discrete", "continuous")
# diffusers' scheduler classes that read the DDPM beta schedule this module builds. Any of them
# may name a model's scheduler; the sampler diffusers' pipeline would then use is
# ``samplers.default_sampler``'s business.
DDPM_FAMILY = (
    "DDPMScheduler",
    "DDIMScheduler",
    "PNDMScheduler",
    "LMSDiscreteScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "DPMSolverSDEScheduler",
    "DEISMultistepScheduler",
    "UniPCMultistepScheduler",
    "SASolverScheduler",
    "LCMScheduler",
    "TCDScheduler",
    "DDIMParallelScheduler",
    "DDPMParallelScheduler",
)
# Classes whose beta schedule defaults are Stable Diffusion's rather than DDPM's.
_SD_BETA_DEFAULTS = {"LCMScheduler", "TCDScheduler"}
# diffusers' DPMSolverMultistepScheduler maps these solver types of other classes to midpoint.
_SOLVER_TYPES = {"midpoint": "midpoint", "heun": "heun", "logrho": "midpoint", "bh1": "midpoint",
                 "bh2": "midpoint"}  # fmt: skip
# ... and DEIS's algorithm to dpmsolver++.
_ALGORITHMS = {"dpmsolver++": "dpmsolver++", "deis": "dpmsolver++"}

# Options of other diffusers schedulers that the samplers here cannot follow unless they hold the
# value that switches them off.
_MUST_BE = {
    "thresholding": (False,),
    "variance_type": (None, "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log"),
    "use_exponential_sigmas": (False,),
    "use_beta_sigmas": (False,),
    "use_lu_lambdas": (False,),
    "use_flow_sigmas": (False,),
    "use_dynamic_shifting": (False,),
    "invert_sigmas": (False,),
    "shift_terminal": (None,),
    "rho": (7.0,),
}
# Options that steer only another scheduler's own update rule (PNDM's PRK steps, UniPC's
# corrector, ...) or take effect only with an option _MUST_BE keeps off: no effect here.
_IGNORED = {
    "skip_prk_steps",
    "dynamic_thresholding_ratio",
    "sample_max_value",
    "predict_x0",
    "solver_p",
    "disable_corrector",
    "flow_shift",
    "time_shift_type",
    "base_shift",
    "max_shift",
    "base_image_seq_len",
    "max_image_seq_len",
}


@dataclasses.dataclass(frozen=True, eq=False)
class Schedule:
    """A discrete DDPM noise schedule plus the sampler options of a diffusers scheduler config.

    ``alphas_cumprod``: float32 [num_train_timesteps], read-only. Equality and hash are by value.
    DPM-Solver++ options default to ``DPMSolverMultistepScheduler``'s defaults.
    """

    alphas_cumprod: np.ndarray
    prediction_type: str = "epsilon"
    beta_schedule: str = "linear"
    timestep_spacing: str | None = None
    steps_offset: int = 0
    set_alpha_to_one: bool | None = None
    clip_sample: bool | None = None
    clip_sample_range: float = 1.0
    rescale_betas_zero_snr: bool = False
    solver_order: int = 2
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    use_karras_sigmas: bool = False
    final_sigmas_type: str = "zero"
    lambda_min_clipped: float = -math.inf
    # Euler (EulerDiscreteScheduler) and LCM (LCMScheduler) options.
    interpolation_type: str = "linear"
    timestep_type: str = "discrete"
    sigma_min: float | None = None
    sigma_max: float | None = None
    original_inference_steps: int = 50
    timestep_scaling: float = 10.0
    # The config's ``_class_name`` (None when it has none): picks ``samplers.default_sampler``.
    class_name: str | None = None

    def __post_init__(self):
        ac = np.array(self.alphas_cumprod, dtype=np.float32).reshape(-1)
        ac.setflags(write=False)
        object.__setattr__(self, "alphas_cumprod", ac)
        object.__setattr__(self, "_key", (ac.tobytes(), *self._options()))
        object.__setattr__(self, "_hash", hash(self._key))

    def _options(self) -> tuple:
        return tuple(
            getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "alphas_cumprod"
        )

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Schedule) and self._key == other._key

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        opts = ", ".join(
            f"{f.name}={getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)
            if f.name != "alphas_cumprod"
        )
        return f"Schedule(num_train_timesteps={self.num_train_timesteps}, {opts})"


# A pytree with no leaves: the whole Schedule is static metadata under jit.
jax.tree_util.register_static(Schedule)


def _linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """``torch.linspace(start, end, n, dtype=float32)``: float32 steps from both ends."""
    start32, end32 = np.float32(start), np.float32(end)
    if n == 1:
        return np.array([start32], np.float32)
    step = (end32 - start32) / np.float32(n - 1)
    # torch evaluates start + step * i as one fused multiply-add: exact product, one rounding.
    i = np.arange(n, dtype=np.float64)
    lo = (np.float64(start32) + np.float64(step) * i).astype(np.float32)
    hi = (np.float64(end32) - np.float64(step) * (n - 1 - i)).astype(np.float32)
    return np.where(np.arange(n) < n // 2, lo, hi)


def cumprod_f32(x: np.ndarray) -> np.ndarray:
    """``torch.cumprod`` of float32 on the CPU: accumulates in float64, rounds each output."""
    return np.cumprod(np.asarray(x, np.float64)).astype(np.float32)


def _cosine_betas(n: int, max_beta: float = 0.999) -> np.ndarray:
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return np.array(betas, dtype=np.float32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shifts and scales sqrt(alpha_bar) so the last step has zero SNR (Lin et al. 2023, alg. 1)."""
    sqrt_ab = np.sqrt(cumprod_f32(np.float32(1) - betas))
    first, last = sqrt_ab[0].copy(), sqrt_ab[-1].copy()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    ab = sqrt_ab**2
    alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
    return (np.float32(1) - alphas).astype(np.float32)


def make_betas(
    num_train_timesteps: int = 1000,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
    beta_schedule: str = "linear",
    trained_betas: Any = None,
    rescale_betas_zero_snr: bool = False,
) -> np.ndarray:
    """float32 betas exactly as diffusers' DDPM-family schedulers build them."""
    if trained_betas is not None:
        betas = np.asarray(trained_betas, dtype=np.float32).reshape(-1)
    elif beta_schedule == "linear":
        betas = _linspace_f32(beta_start, beta_end, num_train_timesteps)
    elif beta_schedule == "scaled_linear":
        betas = _linspace_f32(beta_start**0.5, beta_end**0.5, num_train_timesteps) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        betas = _cosine_betas(num_train_timesteps)
    else:
        raise ValueError(f"beta_schedule={beta_schedule!r} is not one of {BETA_SCHEDULES}")
    if rescale_betas_zero_snr:
        betas = _rescale_zero_terminal_snr(betas)
    return betas.astype(np.float32)


def _bad(source: str, key: str, value: Any, why: str) -> ValueError:
    return ValueError(f"{source}: {key}={value!r} {why}")


def _get(cfg: dict, key: str, default: Any, kind: type | tuple, source: str) -> Any:
    value = cfg.get(key, default)
    if value is None and default is None:
        return None
    if kind is bool:
        if not isinstance(value, bool):
            raise _bad(source, key, value, "must be true or false")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
            raise _bad(source, key, value, "must be an integer")
        return int(value)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _bad(source, key, value, "must be a number")
        return float(value)
    if isinstance(kind, tuple):
        if value not in kind:
            raise _bad(source, key, value, f"is not supported (one of {list(kind)})")
        return value
    raise AssertionError(kind)


_HANDLED = {
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "prediction_type",
    "timestep_spacing",
    "steps_offset",
    "set_alpha_to_one",
    "clip_sample",
    "clip_sample_range",
    "rescale_betas_zero_snr",
    "solver_order",
    "solver_type",
    "algorithm_type",
    "lower_order_final",
    "euler_at_final",
    "use_karras_sigmas",
    "final_sigmas_type",
    "lambda_min_clipped",
    "interpolation_type",
    "timestep_type",
    "sigma_min",
    "sigma_max",
    "original_inference_steps",
    "timestep_scaling",
}


def schedule_from_config(config: dict, source: str = "scheduler/scheduler_config.json") -> Schedule:
    """Reads a diffusers scheduler config (any DDPM-family class: PNDM, DDIM, DPMSolver, Euler, ...).

    Keys missing from ``config`` (or listed in its ``_use_default_values``, as diffusers writes
    into a loaded scheduler's config) take diffusers' defaults. Unknown keys, and options the
    samplers cannot follow (``thresholding: true``, ``variance_type: learned``,
    ``prediction_type: sample``, ...) raise a ValueError naming ``source``, the key and the value.
    """
    if not isinstance(config, dict):
        raise ValueError(f"{source}: a scheduler config must be a JSON object, got {type(config)}")
    class_name = config.get("_class_name")
    if class_name is not None and class_name not in DDPM_FAMILY:
        raise _bad(source, "_class_name", class_name,
                   "is not a diffusers DDPM-family scheduler spin_jax can sample with "
                   f"(one of {list(DDPM_FAMILY)})")  # fmt: skip
    defaulted = set(config.get("_use_default_values") or ())
    cfg = {k: v for k, v in config.items() if not k.startswith("_") and k not in defaulted}
    for key, value in cfg.items():
        if key in _MUST_BE:
            if value not in _MUST_BE[key]:
                raise _bad(source, key, value, f"is not supported by spin_jax's samplers "
                           f"(supported: {list(_MUST_BE[key])})")  # fmt: skip
        elif key not in _HANDLED and key not in _IGNORED:
            raise _bad(source, key, value, "is an unknown scheduler option")

    n = _get(cfg, "num_train_timesteps", 1000, int, source)
    if n < 2:
        raise _bad(source, "num_train_timesteps", n, "must be >= 2")
    sd_betas = class_name in _SD_BETA_DEFAULTS
    beta_schedule = _get(
        cfg, "beta_schedule", "scaled_linear" if sd_betas else "linear", BETA_SCHEDULES, source
    )
    trained = cfg.get("trained_betas")
    if trained is not None:
        try:
            trained = np.asarray(trained, dtype=np.float32).reshape(-1)
        except (TypeError, ValueError):
            raise _bad(source, "trained_betas", trained, "must be a list of numbers") from None
        if trained.shape[0] != n:
            raise _bad(source, "trained_betas", f"<{trained.shape[0]} values>",
                       f"must have num_train_timesteps={n} values")  # fmt: skip
        if not np.all((trained > 0) & (trained < 1)):
            raise _bad(source, "trained_betas", "<list>", "must lie in (0, 1)")
    prediction_type = cfg.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise _bad(source, "prediction_type", prediction_type,
                   f"is not supported (one of {list(PREDICTION_TYPES)})")  # fmt: skip
    rescale = _get(cfg, "rescale_betas_zero_snr", False, bool, source)
    betas = make_betas(
        n,
        _get(cfg, "beta_start", 0.00085 if sd_betas else 0.0001, float, source),
        _get(cfg, "beta_end", 0.012 if sd_betas else 0.02, float, source),
        beta_schedule,
        trained,
        rescale,
    )
    alphas_cumprod = cumprod_f32(np.float32(1) - betas)

    spacing = cfg.get("timestep_spacing")
    if spacing is not None and spacing not in TIMESTEP_SPACINGS:
        raise _bad(source, "timestep_spacing", spacing,
                   f"is not supported (one of {list(TIMESTEP_SPACINGS)})")  # fmt: skip
    solver_type = cfg.get("solver_type", "midpoint")
    if solver_type not in _SOLVER_TYPES:
        raise _bad(source, "solver_type", solver_type,
                   f"is not supported (one of {list(_SOLVER_TYPES)})")  # fmt: skip
    algorithm = cfg.get("algorithm_type", "dpmsolver++")
    if algorithm not in _ALGORITHMS:
        raise _bad(source, "algorithm_type", algorithm,
                   "is not supported: spin_jax's DPM-Solver is the deterministic dpmsolver++")  # fmt: skip
    order = _get(cfg, "solver_order", 2, int, source)
    if order not in (1, 2, 3):
        raise _bad(source, "solver_order", order, "is not supported (1, 2 or 3)")
    clip_range = _get(cfg, "clip_sample_range", 1.0, float, source)
    if clip_range <= 0:
        raise _bad(source, "clip_sample_range", clip_range, "must be > 0")
    sigma_min = _get(cfg, "sigma_min", None, float, source)
    sigma_max = _get(cfg, "sigma_max", None, float, source)
    for key, value in (("sigma_min", sigma_min), ("sigma_max", sigma_max)):
        if value is not None and not value > 0:
            raise _bad(source, key, value, "must be > 0")
    original_steps = _get(cfg, "original_inference_steps", 50, int, source)
    if not 1 <= original_steps <= n:
        raise _bad(source, "original_inference_steps", original_steps,
                   f"must be in [1, num_train_timesteps={n}]")  # fmt: skip
    timestep_scaling = _get(cfg, "timestep_scaling", 10.0, float, source)
    if not timestep_scaling > 0:
        raise _bad(source, "timestep_scaling", timestep_scaling, "must be > 0")
    return Schedule(
        alphas_cumprod=alphas_cumprod,
        prediction_type=prediction_type,
        beta_schedule=beta_schedule,
        timestep_spacing=spacing,
        steps_offset=_get(cfg, "steps_offset", 0, int, source),
        set_alpha_to_one=_get(cfg, "set_alpha_to_one", None, bool, source),
        clip_sample=_get(cfg, "clip_sample", None, bool, source),
        clip_sample_range=clip_range,
        rescale_betas_zero_snr=rescale,
        solver_order=order,
        solver_type=_SOLVER_TYPES[solver_type],
        lower_order_final=_get(cfg, "lower_order_final", True, bool, source),
        euler_at_final=_get(cfg, "euler_at_final", False, bool, source),
        use_karras_sigmas=_get(cfg, "use_karras_sigmas", False, bool, source),
        final_sigmas_type=_get(cfg, "final_sigmas_type", "zero", FINAL_SIGMAS_TYPES, source),
        lambda_min_clipped=_get(cfg, "lambda_min_clipped", -math.inf, float, source),
        interpolation_type=_get(cfg, "interpolation_type", "linear", INTERPOLATION_TYPES, source),
        timestep_type=_get(cfg, "timestep_type", "discrete", TIMESTEP_TYPES, source),
        sigma_min=sigma_min,
        sigma_max=sigma_max,
        original_inference_steps=original_steps,
        timestep_scaling=timestep_scaling,
        class_name=class_name,
    )


# ----------------------------------------------------------------------------------------------
# Forward process and prediction targets (training). t: int [B]; x: [B, ...].


def _coef(values: jax.Array, x: jax.Array) -> jax.Array:
    """[B] -> [B, 1, ..., 1] in x's dtype, so it broadcasts over an NHWC batch."""
    return values.reshape(values.shape + (1,) * (x.ndim - values.ndim)).astype(x.dtype)


def alpha_sigma(schedule: Schedule, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)) in float32 for integer timesteps ``t``."""
    ac = jnp.asarray(schedule.alphas_cumprod)[jnp.asarray(t, jnp.int32)]
    return jnp.sqrt(ac), jnp.sqrt(1.0 - ac)


def snr(schedule: Schedule, t: jax.Array) -> jax.Array:
    """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t), float32."""
    ac = jnp.asarray(schedule.alphas_cumprod)[jnp.asarray(t, jnp.int32)]
    return ac / (1.0 - ac)


def add_noise(schedule: Schedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise (diffusers' ``add_noise``)."""
    a, s = alpha_sigma(schedule, t)
    return _coef(a, x0) * x0 + _coef(s, x0) * noise


def target(schedule: Schedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """What the model is trained to predict: ``noise`` (epsilon) or v = a noise - s x0."""
    if schedule.prediction_type == "epsilon":
        return noise
    a, s = alpha_sigma(schedule, t)
    return _coef(a, x0) * noise - _coef(s, x0) * x0


def pred_to_x0(schedule: Schedule, pred: jax.Array, x_t: jax.Array, t: jax.Array) -> jax.Array:
    """The clean sample implied by a model prediction at x_t."""
    a, s = alpha_sigma(schedule, t)
    a, s = _coef(a, x_t), _coef(s, x_t)
    if schedule.prediction_type == "epsilon":
        return (x_t - s * pred) / a
    return a * x_t - s * pred


def pred_to_eps(schedule: Schedule, pred: jax.Array, x_t: jax.Array, t: jax.Array) -> jax.Array:
    """The noise implied by a model prediction at x_t."""
    if schedule.prediction_type == "epsilon":
        return pred
    a, s = alpha_sigma(schedule, t)
    return _coef(a, x_t) * pred + _coef(s, x_t) * x_t
