"""Noise schedule, forward noising and prediction targets, samplers and text-to-image generation."""

from spin_jax.diffusion import samplers
from spin_jax.diffusion.generate import generate
from spin_jax.diffusion.samplers import ddim, dpm_solver_pp
from spin_jax.diffusion.schedule import (
    Schedule,
    add_noise,
    alpha_sigma,
    pred_to_eps,
    pred_to_x0,
    schedule_from_config,
    snr,
    target,
)

__all__ = [
    "Schedule",
    "add_noise",
    "alpha_sigma",
    "ddim",
    "dpm_solver_pp",
    "generate",
    "pred_to_eps",
    "pred_to_x0",
    "samplers",
    "schedule_from_config",
    "snr",
    "target",
]
