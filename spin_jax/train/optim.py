"""Optimizer and learning-rate schedule from a config (ml_collections ConfigDict or dict).

Fields read (defaults in brackets):
  optimizer ["adamw"]: "adamw" | "adam" | "sgd"
  learning_rate: the peak learning rate (required, > 0)
  b1 [0.9], b2 [0.999], eps [1e-8]: Adam moments
  weight_decay [1e-2]: decoupled weight decay (adamw only; torch.optim.AdamW's form)
  momentum [0.0]: sgd only
  lr_schedule ["constant"]: "constant" | "linear" | "cosine", after a linear warmup
  warmup_steps [0]: steps of linear warmup from 0 to the peak
  total_steps [falls back to ``steps``]: where linear/cosine decay reach the end value
  end_lr_ratio [0.0]: end value of linear/cosine decay as a fraction of the peak
  grad_clip_norm [1.0]: global-norm clipping; 0 or None turns it off

Gradient accumulation lives in the train step (``accum_steps``, one lax.scan over micro-batches),
not here, so the optimizer sees one averaged gradient per step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import optax

OPTIMIZERS = ("adamw", "adam", "sgd")
LR_SCHEDULES = ("constant", "linear", "cosine")


def _get(config: Any, name: str, default: Any = None, *, keep_none: bool = False) -> Any:
    if isinstance(config, Mapping) or hasattr(config, "get"):
        value = config.get(name, default)
    else:
        value = getattr(config, name, default)
    return default if value is None and not keep_none else value


def make_lr_schedule(config: Any) -> optax.Schedule:
    """Linear warmup from 0, then constant, linear or cosine decay to ``end_lr_ratio * peak``.

    As in Hugging Face's ``get_*_schedule_with_warmup``, the step-0 learning rate is 0 when
    ``warmup_steps > 0``.
    """
    peak = _get(config, "learning_rate")
    if peak is None or not float(peak) > 0:
        raise ValueError(f"optimizer config: learning_rate must be > 0, got {peak!r}")
    peak = float(peak)
    kind = _get(config, "lr_schedule", "constant")
    if kind not in LR_SCHEDULES:
        raise ValueError(f"optimizer config: lr_schedule {kind!r} not in {LR_SCHEDULES}")
    warmup = int(_get(config, "warmup_steps", 0))
    if warmup < 0:
        raise ValueError(f"optimizer config: warmup_steps must be >= 0, got {warmup}")
    end = float(_get(config, "end_lr_ratio", 0.0))
    total = _get(config, "total_steps", _get(config, "steps"))
    if kind != "constant":
        if total is None or int(total) <= warmup:
            raise ValueError(
                f"optimizer config: lr_schedule {kind!r} needs total_steps (or steps) > "
                f"warmup_steps={warmup}, got {total!r}"
            )
        total = int(total)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        scale = jnp.minimum(1.0, step / warmup) if warmup > 0 else jnp.ones((), jnp.float32)
        if kind != "constant":
            frac = jnp.clip((step - warmup) / (total - warmup), 0.0, 1.0)
            if kind == "linear":
                decay = 1.0 - (1.0 - end) * frac
            else:
                decay = end + (1.0 - end) * 0.5 * (1.0 + jnp.cos(math.pi * frac))
            scale = scale * decay
        return peak * scale

    return schedule


def make_optimizer(config: Any) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``(tx, lr_schedule)``: clipping (if on) chained before the optimizer with the schedule."""
    name = _get(config, "optimizer", "adamw")
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer config: optimizer {name!r} not in {OPTIMIZERS}")
    schedule = make_lr_schedule(config)
    b1, b2 = float(_get(config, "b1", 0.9)), float(_get(config, "b2", 0.999))
    eps = float(_get(config, "eps", 1e-8))
    if name == "adamw":
        opt = optax.adamw(
            schedule, b1=b1, b2=b2, eps=eps, weight_decay=float(_get(config, "weight_decay", 1e-2))
        )
    elif name == "adam":
        opt = optax.adam(schedule, b1=b1, b2=b2, eps=eps)
    else:
        momentum = float(_get(config, "momentum", 0.0))
        opt = optax.sgd(schedule, momentum=momentum or None)
    clip = _get(config, "grad_clip_norm", 1.0, keep_none=True)
    if clip and float(clip) > 0:
        opt = optax.chain(optax.clip_by_global_norm(float(clip)), opt)
    return opt, schedule
