"""The loss family: SFT, SPIN-Diffusion, Diffusion-DPO, Diffusion-KTO, SePPO and PSO.

Every loss is a pure function of per-sample error arrays (shape ``[B]``, the mean squared error
of a model's prediction against the diffusion target, see ``per_sample_error``) plus scalars, and
returns ``(scalar loss, metrics dict)``. Reference/opponent errors never carry a gradient.
Formulas: ``ALGORITHMS.md``. Conventions shared by the pairwise losses (SPIN, DPO, SePPO):

    d_w    = e_theta(w) - e_ref(w)        d_l = e_theta(l) - e_ref(l)
    inside = -(beta / 2) * (d_w - d_l)    L   = mean(-log sigmoid(inside))

``inside`` is the implicit reward margin; the implicit accuracy is the fraction of pairs with
``inside > 0``. Means are over the array given: under ``jax.jit`` with sharded inputs that is the
global batch. Inside ``shard_map``/``pmap`` pass ``axis_name`` to average over the mapped axis too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Metrics = dict[str, jax.Array]


def per_sample_error(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Mean over all non-batch axes of the squared error, in float32: ``[B, ...] -> [B]``."""
    if pred.shape != target.shape:
        raise ValueError(
            f"per_sample_error: pred shape {pred.shape} != target shape {target.shape}"
        )
    diff = pred.astype(jnp.float32) - target.astype(jnp.float32)
    return jnp.mean(jnp.square(diff), axis=tuple(range(1, diff.ndim)))


def check_beta(beta, name: str) -> None:
    """ValueError unless ``beta`` is a positive number (a traced beta cannot be checked)."""
    if isinstance(beta, jax.core.Tracer):
        return
    value = np.asarray(beta)
    if value.ndim != 0 or not np.issubdtype(value.dtype, np.number):
        raise ValueError(f"losses.{name}: beta must be a positive scalar, got {beta!r}")
    if not float(value) > 0:
        raise ValueError(f"losses.{name}: beta must be > 0, got {beta!r}")


def _check_same_shape(name: str, **arrays: jax.Array) -> None:
    shapes = {k: jnp.shape(v) for k, v in arrays.items()}
    first = next(iter(shapes.values()))
    if len(first) != 1 or any(s != first for s in shapes.values()):
        raise ValueError(
            f"losses.{name}: expected per-sample errors of one shape [B], got {shapes}"
        )


def _mean(x: jax.Array, axis_name: str | None) -> jax.Array:
    m = jnp.mean(x.astype(jnp.float32))
    return m if axis_name is None else jax.lax.pmean(m, axis_name)


def _masked_mean(x: jax.Array, mask: jax.Array, axis_name: str | None) -> jax.Array:
    # Mean over the selected entries; 0 where none is selected.
    total = jnp.sum(jnp.where(mask, x, 0.0))
    count = jnp.sum(mask.astype(jnp.float32))
    if axis_name is not None:
        total, count = jax.lax.psum((total, count), axis_name)
    return total / jnp.maximum(count, 1.0)


def sft(err_policy: jax.Array, *, axis_name: str | None = None) -> tuple[jax.Array, Metrics]:
    """Supervised fine-tuning: the mean of the policy's per-sample errors on real data."""
    _check_same_shape("sft", err_policy=err_policy)
    loss = _mean(err_policy, axis_name)
    return loss, {"loss": loss, "err_policy": loss}


def _pairwise(
    name: str,
    err_policy_w: jax.Array,
    err_policy_l: jax.Array,
    err_ref_w: jax.Array,
    err_ref_l: jax.Array,
    beta,
    sign_l: jax.Array | float,
    suffix: tuple[str, str],
    axis_name: str | None,
) -> tuple[jax.Array, Metrics]:
    check_beta(beta, name)
    _check_same_shape(
        name,
        err_policy_w=err_policy_w,
        err_policy_l=err_policy_l,
        err_ref_w=err_ref_w,
        err_ref_l=err_ref_l,
    )
    err_ref_w = jax.lax.stop_gradient(err_ref_w).astype(jnp.float32)
    err_ref_l = jax.lax.stop_gradient(err_ref_l).astype(jnp.float32)
    d_w = err_policy_w.astype(jnp.float32) - err_ref_w
    d_l = err_policy_l.astype(jnp.float32) - err_ref_l
    reward_w = -0.5 * beta * d_w
    reward_l = -0.5 * beta * d_l
    inside = reward_w - sign_l * reward_l
    # -log sigmoid(u) via log_sigmoid: finite for any |u| (beta = 1e6 included).
    loss = _mean(-jax.nn.log_sigmoid(inside), axis_name)
    w, lo = suffix
    metrics = {
        "loss": loss,
        "implicit_acc": _mean((inside > 0).astype(jnp.float32), axis_name),
        "reward_margin": _mean(inside, axis_name),
        f"reward_{w}": _mean(reward_w, axis_name),
        f"reward_{lo}": _mean(reward_l, axis_name),
        f"err_policy_{w}": _mean(err_policy_w, axis_name),
        f"err_policy_{lo}": _mean(err_policy_l, axis_name),
        f"err_ref_{w}": _mean(err_ref_w, axis_name),
        f"err_ref_{lo}": _mean(err_ref_l, axis_name),
    }
    return loss, metrics


def spin(
    err_policy_real: jax.Array,
    err_policy_syn: jax.Array,
    err_ref_real: jax.Array,
    err_ref_syn: jax.Array,
    beta,
    *,
    axis_name: str | None = None,
) -> tuple[jax.Array, Metrics]:
    """SPIN-Diffusion (approximate objective): real data wins over the opponent's own samples.

    ``L = mean -log sigmoid(-(beta/2) * ((e_theta(real) - e_k(real)) - (e_theta(syn) - e_k(syn))))``
    with ``e_k`` the frozen opponent. ``log 2`` when the policy equals the opponent.
    """
    loss, metrics = _pairwise(
        "spin",
        err_policy_real,
        err_policy_syn,
        err_ref_real,
        err_ref_syn,
        beta,
        1.0,
        ("real", "syn"),
        axis_name,
    )
    return loss, metrics


def dpo(
    err_policy_w: jax.Array,
    err_policy_l: jax.Array,
    err_ref_w: jax.Array,
    err_ref_l: jax.Array,
    beta,
    *,
    axis_name: str | None = None,
) -> tuple[jax.Array, Metrics]:
    """Diffusion-DPO on (winner, loser) pairs against a frozen reference model."""
    loss, metrics = _pairwise(
        "dpo", err_policy_w, err_policy_l, err_ref_w, err_ref_l, beta, 1.0, ("w", "l"), axis_name
    )
    return loss, metrics


def seppo(
    err_policy_w: jax.Array,
    err_policy_l: jax.Array,
    err_ref_w: jax.Array,
    err_ref_l: jax.Array,
    beta,
    *,
    axis_name: str | None = None,
) -> tuple[jax.Array, Metrics]:
    """SePPO: winners only; ``l`` is a sample of an earlier checkpoint (the reference).

    The anchor sign ``s = sign(e_ref(w) - e_theta(w))`` (no gradient) says whether the policy
    already beats the reference on the winner; if so (s = +1) the reference sample is treated as
    a loser (the SPIN-Diffusion term), otherwise (s = -1) as a second winner:
    ``inside = -(beta/2) * (d_w - s * d_l)``. Ties count as s = +1 (choice), so at theta = ref
    the loss is SPIN-Diffusion's ``log 2``.
    """
    anchor = jax.lax.stop_gradient(err_ref_w - err_policy_w)
    sign_l = jnp.where(anchor >= 0, 1.0, -1.0)
    loss, metrics = _pairwise(
        "seppo",
        err_policy_w,
        err_policy_l,
        err_ref_w,
        err_ref_l,
        beta,
        sign_l,
        ("w", "l"),
        axis_name,
    )
    metrics["anchor_loser_frac"] = _mean((sign_l > 0).astype(jnp.float32), axis_name)
    return loss, metrics


def kto(
    err_policy: jax.Array,
    err_ref: jax.Array,
    desirable: jax.Array,
    beta,
    *,
    axis_name: str | None = None,
    lambda_d: float = 1.0,
    lambda_u: float = 1.0,
    z0: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
    """Diffusion-KTO on unpaired samples labelled desirable (1/True) or undesirable (0/False).

    ``g = e_ref - e_theta``; ``z0 = max(0, stop_gradient(mean g))`` over the global batch (the
    whole array under jit; also averaged over ``axis_name`` when given), or ``z0`` as given (a
    train step that accumulates micro-batches computes it over all of them first);
    ``L = mean lambda_y * (1 - sigmoid(s * beta * (g - z0)))`` with s = +1 / -1.
    """
    check_beta(beta, "kto")
    _check_same_shape("kto", err_policy=err_policy, err_ref=err_ref, desirable=desirable)
    desirable = jnp.asarray(desirable).astype(bool)
    err_policy = err_policy.astype(jnp.float32)
    err_ref = jax.lax.stop_gradient(err_ref).astype(jnp.float32)
    g = err_ref - err_policy
    if z0 is None:
        z0 = jnp.maximum(0.0, _mean(g, axis_name))
    z0 = jax.lax.stop_gradient(jnp.asarray(z0, jnp.float32))
    sign = jnp.where(desirable, 1.0, -1.0)
    lam = jnp.where(desirable, lambda_d, lambda_u)
    u = sign * beta * (g - z0)
    # 1 - sigmoid(u) == sigmoid(-u), which stays accurate when sigmoid(u) rounds to 1.
    loss = _mean(lam * jax.nn.sigmoid(-u), axis_name)
    undesirable = jnp.logical_not(desirable)
    metrics = {
        "loss": loss,
        "implicit_acc": _mean((u > 0).astype(jnp.float32), axis_name),
        "z0": z0,
        "reward": _mean(g, axis_name),
        "reward_desirable": _masked_mean(g, desirable, axis_name),
        "reward_undesirable": _masked_mean(g, undesirable, axis_name),
        "err_policy": _mean(err_policy, axis_name),
        "err_ref": _mean(err_ref, axis_name),
        "desirable_frac": _mean(desirable.astype(jnp.float32), axis_name),
    }
    return loss, metrics


def pso(
    err_policy_w: jax.Array,
    err_policy_l: jax.Array,
    err_ref_w: jax.Array,
    err_ref_l: jax.Array,
    beta,
    *,
    reference_weight: float = 1.0,
    axis_name: str | None = None,
) -> tuple[jax.Array, Metrics]:
    """Offline PSO: Diffusion-DPO's loss on (target ``w``, reference image ``l``) pairs noised
    at the distilled timesteps, with the reference image's term weighted by
    ``reference_weight``: ``inside = -(beta/2) * (d_w - reference_weight * d_l)``. With weight
    1 (the default) it is ``dpo`` exactly."""
    loss, metrics = _pairwise(
        "pso", err_policy_w, err_policy_l, err_ref_w, err_ref_l, beta,
        float(reference_weight), ("w", "l"), axis_name,
    )  # fmt: skip
    return loss, metrics


def pso_online(
    logp_w: jax.Array,
    logp_w_ref: jax.Array,
    logp_l: jax.Array,
    logp_l_ref: jax.Array,
    beta,
    clip: float = 0.1,
    *,
    axis_name: str | None = None,
) -> tuple[jax.Array, Metrics]:
    """Online PSO on transition log-probabilities of a target (``w``) and a reference (``l``)
    trajectory, ``[B]`` each (one entry per pair and transition ``x_n -> x_{n-1}``).

    ``r = clip(exp(logp - logp_ref), 1 - clip, 1 + clip)`` per trajectory (no gradient outside
    the clip range), ``L = mean -log sigmoid(beta * (log r_w - log r_l))``: ``log 2`` when the
    policy equals the reference. The clip is taken on the log-ratio, ``[log(1 - clip),
    log(1 + clip)]``, which is the same value without overflowing ``exp``.
    """
    check_beta(beta, "pso_online")
    if not 0.0 < float(clip) < 1.0:
        raise ValueError(f"losses.pso_online: clip must be in (0, 1), got {clip!r}")
    _check_same_shape("pso_online", logp_w=logp_w, logp_w_ref=logp_w_ref, logp_l=logp_l,
                      logp_l_ref=logp_l_ref)  # fmt: skip
    lo, hi = float(np.log1p(-clip)), float(np.log1p(clip))
    log_r_w = logp_w.astype(jnp.float32) - jax.lax.stop_gradient(logp_w_ref).astype(jnp.float32)
    log_r_l = logp_l.astype(jnp.float32) - jax.lax.stop_gradient(logp_l_ref).astype(jnp.float32)
    clipped_w, clipped_l = jnp.clip(log_r_w, lo, hi), jnp.clip(log_r_l, lo, hi)
    inside = beta * (clipped_w - clipped_l)
    loss = _mean(-jax.nn.log_sigmoid(inside), axis_name)

    def outside(x):
        return ((x < lo) | (x > hi)).astype(jnp.float32)

    metrics = {
        "loss": loss,
        "implicit_acc": _mean((inside > 0).astype(jnp.float32), axis_name),
        "reward_margin": _mean(inside, axis_name),
        "log_ratio_w": _mean(log_r_w, axis_name),
        "log_ratio_l": _mean(log_r_l, axis_name),
        "clip_frac_w": _mean(outside(log_r_w), axis_name),
        "clip_frac_l": _mean(outside(log_r_l), axis_name),
        "logp_w": _mean(logp_w, axis_name),
        "logp_l": _mean(logp_l, axis_name),
    }
    return loss, metrics
