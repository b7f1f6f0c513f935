"""One train step per objective: noise, policy + reference errors, loss, averaged grads, update.

``make_train_step`` returns a pure function

    train_step(state, ref_params, text_params, batch, key) -> (state, metrics)

to be jitted with the state donated (``jit_train_step``). Under a mesh the batch comes in split
over the data axes and the parameters replicated (or fsdp-sharded); XLA inserts the gradient
all-reduce, so the same function runs on one device, many, or many hosts.

Batches (latents already scaled, NHWC; ``input_ids`` int32 [B, L] or ``context`` [B, L, D]) hold
the fields ``objectives.OBJECTIVES[name].batch_fields`` lists: ``x0`` (SFT), ``x0`` and ``label``
(KTO: 1 desirable, 0 undesirable), ``x0_w`` and ``x0_l`` for every pairwise objective (SPIN:
real image, opponent's sample). Noising and targets are ``spin_jax.diffusion.schedule``'s.

Randomness comes from ``key`` only: ``t ~ U{0..T-1}`` per example (one t per pair), Gaussian noise
per image; within a pair the noise is shared for DPO always, for SPIN/SePPO iff ``share_noise``.
Noise and t are drawn for the whole global batch before it is cut into micro-batches, so
``accum_steps = k`` computes the same update as one batch k times larger (up to float summation
order), KTO included: its reference point z0 is a mean over the whole global batch, so with
``k > 1`` a gradient-free pass over the k micro-batches computes it first.

Non-finite loss or gradients: the update is skipped and the returned state equals the input
state (step not advanced); ``metrics["is_finite"]`` is False so the trainer can stop or refuse to
save.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from spin_jax import losses, parallel, platform
from spin_jax.diffusion import schedule as noising
from spin_jax.diffusion.schedule import PREDICTION_TYPES
from spin_jax.train import objectives
from spin_jax.train.state import TrainState

UnetApply = Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]
EncodeText = Callable[[Any, jax.Array], jax.Array]


def _check_schedule(schedule: Any) -> int:
    for field in ("alphas_cumprod", "prediction_type"):
        if not hasattr(schedule, field):
            raise ValueError(f"make_train_step: schedule {type(schedule).__name__} has no {field}")
    if schedule.prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"make_train_step: schedule.prediction_type {schedule.prediction_type!r} not in "
            f"{PREDICTION_TYPES}"
        )
    n = int(jnp.asarray(schedule.alphas_cumprod).shape[0])
    if int(getattr(schedule, "num_train_timesteps", n)) != n:
        raise ValueError(
            f"make_train_step: schedule.num_train_timesteps={schedule.num_train_timesteps} but "
            f"alphas_cumprod has {n} entries"
        )
    return n


def draw_inputs(
    objective: str,
    batch: Mapping[str, jax.Array],
    key: jax.Array,
    num_train_timesteps: int,
    *,
    share_noise: bool = True,
    timesteps: Any = None,
) -> dict[str, jax.Array]:
    """The batch's fields plus per-example randomness for the whole global batch.

    ``t`` int32 [B] (one per pair): uniform over ``0..T-1``, or over the given ``timesteps``
    (PSO: a distilled model's few-step timesteps); ``noise_a`` for the first latent field and,
    for pairwise objectives, ``noise_b`` for the second: the same array for DPO, and for
    SPIN/SePPO when ``share_noise``.
    """
    row = objectives.get(objective)
    fields = row.batch_fields
    k_t, k_a, k_b = jax.random.split(key, 3)
    shape = batch[fields[0]].shape
    b = shape[0]

    def normal(k):
        # Drawn as [B, n] and reshaped: the same distribution, and XLA compiles the partitionable
        # threefry for a rank-2 shape several times faster than for a rank-4 one.
        return jax.random.normal(k, (b, math.prod(shape[1:])), jnp.float32).reshape(shape)

    if timesteps is None:
        out = {"t": jax.random.randint(k_t, (b,), 0, num_train_timesteps, dtype=jnp.int32)}
    else:
        table = jnp.asarray(timesteps, jnp.int32)
        out = {"t": table[jax.random.randint(k_t, (b,), 0, table.shape[0], dtype=jnp.int32)]}
    out["noise_a"] = normal(k_a)
    if row.pairwise:
        same = row.always_share_noise or share_noise
        out["noise_b"] = out["noise_a"] if same else normal(k_b)
    for f in ("context", "input_ids", "pooled", "time_ids"):
        if f in batch:
            out[f] = batch[f]
    for f in fields:
        out[f] = batch[f]
    return out


def make_train_step(
    objective: str,
    *,
    unet_apply: UnetApply,
    schedule: Any,
    encode_text: EncodeText | None = None,
    beta: float | None = None,
    share_noise: bool = True,
    accum_steps: int = 1,
    unroll: int | None = None,
    lambda_d: float = 1.0,
    lambda_u: float = 1.0,
    sft_weight: float = 0.0,
    learning_rate_fn: optax.Schedule | None = None,
    mesh: jax.sharding.Mesh | None = None,
    timesteps: Any = None,
    loss_options: Mapping[str, Any] | None = None,
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """The train step for ``objective``, a row of ``objectives.OBJECTIVES``.

    ``unet_apply(params, x_t, t, context) -> prediction`` (NHWC; the model applies its own compute
    dtype), ``encode_text(text_params, input_ids) -> context`` (frozen; not needed when batches
    carry ``context``). SDXL: ``encode_text`` returns ``(context, pooled)`` (``sd.encode_prompt``;
    or batches carry ``pooled``), batches carry ``time_ids`` [B, 6], and ``unet_apply`` takes a
    fifth argument, ``added_cond`` (``{"text_embeds", "time_ids"}``). ``beta`` is required by every objective with a reference.
    ``sft_weight`` adds that multiple of the policy's error on the preferred images to a
    pairwise loss. ``learning_rate_fn`` (the optimizer's schedule) only feeds ``metrics["lr"]``.
    ``mesh``, if given, lets the step check divisibility and place each micro-batch across all
    data-parallel devices. ``timesteps`` (ints in ``[0, T)``): draw ``t`` from these only
    (offline PSO's distilled timesteps). ``loss_options``: more static options of the loss call
    (``objectives.loss_options``, e.g. PSO's weights). ``unroll``: micro-batches unrolled in the
    accumulation loop (default ``platform.scan_unroll``: all on a CPU, a rolled loop elsewhere).
    """
    row = objectives.get(objective)
    if timesteps is not None:
        timesteps = np.asarray(timesteps).reshape(-1)
        n_t = int(jnp.asarray(schedule.alphas_cumprod).shape[0])
        if not len(timesteps) or timesteps.min() < 0 or timesteps.max() >= n_t:
            raise ValueError(f"make_train_step: timesteps {timesteps.tolist()} must be a "
                             f"non-empty set of integers in [0, {n_t})")  # fmt: skip
        timesteps = tuple(int(t) for t in timesteps)
    needs_ref = row.needs_reference
    if needs_ref:
        if beta is None:
            raise ValueError(f"make_train_step: objective {objective!r} needs beta")
        losses.check_beta(beta, objective)
    if not isinstance(accum_steps, int) or accum_steps < 1:
        raise ValueError(f"make_train_step: accum_steps must be an int >= 1, got {accum_steps!r}")
    unroll = platform.scan_unroll(accum_steps) if unroll is None else int(unroll)
    num_t = _check_schedule(schedule)
    fields = row.batch_fields
    pairwise = row.pairwise
    options = {"lambda_d": lambda_d, "lambda_u": lambda_u, "sft_weight": sft_weight,
               **(loss_options or {})}  # fmt: skip

    def model_inputs(text_params, mb):
        if "context" in mb:
            ctx, pooled = mb["context"], mb.get("pooled")
        else:
            out = encode_text(text_params, mb["input_ids"])
            ctx, pooled = out if isinstance(out, tuple) else (out, None)
        # SDXL: the pooled text embedding and the micro-conditioning time ids.
        cond = {"context": ctx}
        if pooled is not None:
            cond["added_cond"] = {"text_embeds": pooled, "time_ids": mb["time_ids"]}
        cond = jax.lax.stop_gradient(cond)
        t = mb["t"]
        if pairwise:
            # Winner and loser go through each model as one batch of 2B.
            x0 = jnp.concatenate([mb[fields[0]], mb[fields[1]]]).astype(jnp.float32)
            noise = jnp.concatenate([mb["noise_a"], mb["noise_b"]])
            t = jnp.concatenate([t, t])
            cond = jax.tree.map(lambda c: jnp.concatenate([c, c]), cond)
        else:
            x0, noise = mb[fields[0]].astype(jnp.float32), mb["noise_a"]
        x_t = noising.add_noise(schedule, x0, noise, t)
        return x_t, t, cond, noising.target(schedule, x0, noise, t)

    def apply(params, x_t, t, cond):
        if "added_cond" in cond:
            return unet_apply(params, x_t, t, cond["context"], cond["added_cond"])
        return unet_apply(params, x_t, t, cond["context"])

    def ref_error(ref_params, x_t, t, cond, target):
        pred_ref = apply(jax.lax.stop_gradient(ref_params), x_t, t, cond)
        return jax.lax.stop_gradient(losses.per_sample_error(pred_ref, target))

    def kto_reward(params, ref_params, text_params, mb):
        # Mean implicit reward g = e_ref - e_theta of one micro-batch, without gradients.
        x_t, t, cond, target = model_inputs(text_params, mb)
        err = losses.per_sample_error(apply(params, x_t, t, cond), target)
        return jnp.mean(ref_error(ref_params, x_t, t, cond, target) - err)

    def micro_step(params, ref_params, text_params, mb, z0=None):
        x_t, t, cond, target = model_inputs(text_params, mb)
        err_ref = ref_error(ref_params, x_t, t, cond, target) if needs_ref else None
        opts = dict(options, z0=z0)

        def objective_loss(p):
            err = losses.per_sample_error(apply(p, x_t, t, cond), target)
            return row.loss(err, err_ref, mb, beta, opts)

        (loss, metrics), grads = jax.value_and_grad(objective_loss, has_aux=True)(params)
        return loss, metrics, grads

    def check(ref_params, text_params, batch):
        missing = [f for f in fields if f not in batch]
        if "context" not in batch and "input_ids" not in batch:
            missing.append("input_ids (or context)")
        if missing:
            raise ValueError(f"{objective} batch lacks {missing}; has {sorted(batch)}")
        if "context" not in batch and encode_text is None:
            raise ValueError(
                f"{objective} batch has input_ids but make_train_step got no encode_text"
            )
        if needs_ref and ref_params is None:
            raise ValueError(f"{objective} train step needs ref_params, got None")
        sizes = {k: (v.shape[0] if v.ndim else None) for k, v in batch.items()}
        if len(set(sizes.values())) != 1 or None in sizes.values():
            raise ValueError(f"{objective} batch fields need one leading batch size, got {sizes}")
        if pairwise and batch[fields[0]].shape != batch[fields[1]].shape:
            raise ValueError(
                f"{objective} batch: {fields[0]} {batch[fields[0]].shape} != "
                f"{fields[1]} {batch[fields[1]].shape}"
            )
        b = next(iter(sizes.values()))
        if b % accum_steps:
            raise ValueError(f"batch of {b} is not divisible by accum_steps={accum_steps}")
        if mesh is not None:
            parallel.check_batch_divisible(b // accum_steps, mesh, what="micro-batch")

    def train_step(state: TrainState, ref_params, text_params, batch, key):
        check(ref_params, text_params, batch)
        inputs = draw_inputs(objective, batch, key, num_t, share_noise=share_noise,
                             timesteps=timesteps)  # fmt: skip
        if accum_steps == 1:
            loss, metrics, grads = micro_step(state.params, ref_params, text_params, inputs)
        else:
            # Micro-batch j takes rows j, j+k, j+2k, ...: each one stays spread over every device
            # that holds a contiguous block of the global batch, so no data moves between devices.
            def split(x):
                x = x.reshape((x.shape[0] // accum_steps, accum_steps) + x.shape[1:])
                x = jnp.swapaxes(x, 0, 1)
                if mesh is not None:
                    axes = tuple(a for a in parallel.DATA_AXES if a in mesh.shape)
                    x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, axes)))
                return x

            stacked = jax.tree.map(split, inputs)
            z0 = None
            if row.name == "kto":
                # z0 is a statistic of the whole global batch (ALGORITHMS.md), not of one
                # micro-batch: a gradient-free pass over all of them first (one more forward of
                # each model per step, only for KTO with accumulation).
                def reward(_, mb):
                    return None, kto_reward(state.params, ref_params, text_params, mb)

                _, rewards = jax.lax.scan(reward, None, stacked, unroll=unroll)
                z0 = jnp.maximum(0.0, jnp.mean(rewards))

            loss, metrics, grads = accumulate(
                lambda mb: micro_step(state.params, ref_params, text_params, mb, z0),
                state.params, stacked, unroll,
            )  # fmt: skip

        grad_norm = optax.tree.norm(grads)
        is_finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new_state = state.apply_gradients(grads)
        # Skip a non-finite update: keep every leaf of the old state (step included).
        new_state = jax.tree.map(lambda n, o: jnp.where(is_finite, n, o), new_state, state)
        metrics = dict(metrics)
        metrics["loss"] = loss
        metrics["grad_norm"] = grad_norm
        metrics["is_finite"] = is_finite
        metrics["param_norm"] = optax.tree.norm(state.params)
        if learning_rate_fn is not None:
            metrics["lr"] = jnp.asarray(learning_rate_fn(state.step), jnp.float32)
        return new_state, metrics

    return train_step


def accumulate(
    micro: Callable[[Any], tuple[jax.Array, dict[str, jax.Array], Any]],
    params: Any,
    stacked: Any,
    unroll: int = 1,
) -> tuple[jax.Array, dict[str, jax.Array], Any]:
    """Gradient accumulation: ``micro(mb) -> (loss, metrics, grads)`` over the leading axis of
    ``stacked`` (one entry per micro-batch) in one ``lax.scan``; mean loss, metrics and grads.
    ``unroll``: ``platform.scan_unroll`` (XLA:CPU runs the backward pass slowly inside a loop)."""

    def body(grad_sum, mb):
        loss, metrics, grads = micro(mb)
        return jax.tree.map(jnp.add, grad_sum, grads), (loss, metrics)

    zeros = jax.tree.map(jnp.zeros_like, params)
    grad_sum, (loss, metrics) = jax.lax.scan(body, zeros, stacked, unroll=unroll)
    n = jax.tree.leaves(loss)[0].shape[0]
    grads = jax.tree.map(lambda g: g / n, grad_sum)
    return jnp.mean(loss), jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics), grads


def jit_train_step(
    train_step: Callable[..., tuple[TrainState, dict[str, jax.Array]]],
    state_sharding: Any = None,
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """``jax.jit`` with the state donated; ``state_sharding`` (e.g. from
    ``parallel.fsdp_param_sharding``) pins the output state's layout to the input's."""
    out_shardings = None if state_sharding is None else (state_sharding, None)
    return jax.jit(train_step, donate_argnums=(0,), out_shardings=out_shardings)
