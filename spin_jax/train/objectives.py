"""The one table of objectives: everything the trainer needs to know about a method.

A row says which loss the train step calls, what a batch holds, which data view feeds it,
which model is the reference in each round, and which samples a round rolls out before it
trains. Adding a method is one row here and its loss in ``spin_jax.losses``.

Reference rules (``pick_reference``): which checkpoint is the frozen reference of round k.
  none       no reference (SFT)
  base       the base model, every round (DPO, KTO)
  previous   the end of round k-1, the base for k = 1 (SPIN-Diffusion's opponent)
  seppo      ``config.seppo.reference``: ``uniform`` over {base, saved ends of rounds < k},
             ``base``, or ``latest`` (SePPO and its ablation)

Rollout kinds (``spin_jax.train.rollout``): what the reference samples before round k trains.
  none            nothing: the batch comes from the dataset alone
  dataset         one sample per training example (SPIN-Diffusion: the whole dataset)
  round_prompts   one sample per prompt the round's steps will read (SePPO)
  online_pairs    two trajectories per prompt of ``pso.pairs_per_round`` drawn ones, sampled by
                  the current policy and labelled by a reward model (online PSO,
                  ``spin_jax.train.pso``); the round trains on their transitions

Timesteps (``Objective.timesteps``): ``uniform`` over 0..T-1, or ``distilled``: the few-step
model's own timesteps (``spin_jax.train.pso.distilled_timesteps``; PSO).

Pairwise objectives read (``x0_w``, ``x0_l``); a rolled-out sample is always ``x0_l``.
``continuous``: the optimizer state, learning-rate schedule and data order carry over from
round to round (one long run cut into rounds); otherwise every round restarts the optimizer
from the last round's weights and has ``train.steps`` steps of its own (SPIN's iterations).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spin_jax import losses

# loss_call(err_policy, err_ref, micro_batch, beta, options) -> (loss, metrics). Pairwise errors
# are [2n]: the winners' then the losers'.
LossCall = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class Objective:
    name: str
    loss: LossCall
    view: str  # data source view: winners | pairs | kto
    cache_fields: Mapping[str, str]  # latent-cache field -> batch field
    batch_fields: tuple[str, ...]  # what the train step reads (latents first, then labels)
    reference: str  # none | base | previous | seppo
    rollout: str  # none | dataset | round_prompts
    continuous: bool = False
    always_share_noise: bool = False  # DPO: one noise per pair regardless of loss.share_noise
    rate_unit: str = "images"  # metric train/<unit>_per_s
    timesteps: str = "uniform"  # uniform | distilled

    @property
    def pairwise(self) -> bool:
        return self.batch_fields == PAIR

    @property
    def needs_reference(self) -> bool:
        return self.reference != "none"


PAIR = ("x0_w", "x0_l")
# Online PSO: a transition x_n -> x_{n-1} of the target (w) and the reference (l) trajectory of
# one prompt, and the sampler step n it is.
TRANSITIONS = ("x_w", "x_w_next", "x_l", "x_l_next", "step")


def _sft(err, err_ref, mb, beta, options):
    del err_ref, mb, beta, options
    return losses.sft(err)


def _pairwise(loss_fn):
    def call(err, err_ref, mb, beta, options):
        del mb
        n = err.shape[0] // 2
        loss, metrics = loss_fn(err[:n], err[n:], err_ref[:n], err_ref[n:], beta)
        weight = options.get("sft_weight", 0.0)
        if weight:
            # An SFT term on the preferred images (loss.sft_weight): keeps their likelihood from
            # falling with the loser's, the known failure of DPO-style losses.
            sft = jnp.mean(err[:n])
            metrics = dict(metrics, sft_term=sft)
            loss = loss + weight * sft
        return loss, metrics

    return call


def _pso(err, err_ref, mb, beta, options):
    # Offline PSO: DPO's loss with the reference image's term weighted (pso.reference_weight)
    # plus pso.prior_weight x the policy's error on the reference images (the released
    # personalization script's 0.1 and 0.5; 1 and 0 by default: Diffusion-DPO's loss).
    del mb
    n = err.shape[0] // 2
    loss, metrics = losses.pso(err[:n], err[n:], err_ref[:n], err_ref[n:], beta,
                               reference_weight=options.get("pso_reference_weight", 1.0))  # fmt: skip
    prior = options.get("pso_prior_weight", 0.0)
    if prior:
        term = jnp.mean(err[n:])
        metrics = dict(metrics, prior_term=term)
        loss = loss + prior * term
    weight = options.get("sft_weight", 0.0)
    if weight:
        sft = jnp.mean(err[:n])
        metrics = dict(metrics, sft_term=sft)
        loss = loss + weight * sft
    return loss, metrics


def _pso_online(logp, logp_ref, mb, beta, options):
    # logp, logp_ref: [2n] transition log-densities, the targets' then the references'.
    del mb
    n = logp.shape[0] // 2
    return losses.pso_online(logp[:n], logp_ref[:n], logp[n:], logp_ref[n:], beta,
                             options.get("pso_clip", 0.1))  # fmt: skip


def _kto(err, err_ref, mb, beta, options):
    return losses.kto(err, err_ref, mb["label"] > 0.5, beta, lambda_d=options["lambda_d"],
                      lambda_u=options["lambda_u"], z0=options.get("z0"))  # fmt: skip


OBJECTIVES: dict[str, Objective] = {
    o.name: o
    for o in (
        Objective("sft", _sft, "winners", {"image": "x0"}, ("x0",), "none", "none"),
        Objective("spin", _pairwise(losses.spin), "winners", {"image": "x0_w"}, PAIR,
                  "previous", "dataset", rate_unit="pairs"),
        Objective("dpo", _pairwise(losses.dpo), "pairs", {"image": "x0_w", "image_l": "x0_l"},
                  PAIR, "base", "none", always_share_noise=True, rate_unit="pairs"),
        Objective("kto", _kto, "kto", {"image": "x0"}, ("x0", "label"), "base", "none"),
        Objective("seppo", _pairwise(losses.seppo), "winners", {"image": "x0_w"}, PAIR,
                  "seppo", "round_prompts", continuous=True, rate_unit="pairs"),
        Objective("pso", _pso, "pairs", {"image": "x0_w", "image_l": "x0_l"}, PAIR, "base",
                  "none", always_share_noise=True, rate_unit="pairs", timesteps="distilled"),
        Objective("pso_online", _pso_online, "winners", {}, TRANSITIONS, "base",
                  "online_pairs", continuous=True, rate_unit="transitions"),
    )
}  # fmt: skip

REFERENCE_CHOICES = ("uniform", "base", "latest")  # seppo.reference


def get(name: str) -> Objective:
    """The row of ``name``; a ValueError names the known objectives."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; known: {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]


def pick_reference(
    objective: Objective, round_: int, saved_rounds: list[int], *, seed: int, choice: str = ""
) -> int | None:
    """The round whose final weights are round ``round_``'s reference (0 = the base model).

    ``saved_rounds``: the earlier rounds whose end was checkpointed. A pure function of its
    arguments, so a resumed run draws the same references.
    """
    rule = objective.reference
    if rule == "none":
        return None
    if rule == "base":
        return 0
    if rule == "previous":
        return round_ - 1
    pool = [0] + sorted(r for r in saved_rounds if 0 < r < round_)
    if rule == "seppo":
        if choice == "base":
            return 0
        if choice == "latest":
            return pool[-1]
        if choice == "uniform":
            return int(np.random.default_rng([seed, round_, 17]).choice(pool))
        raise ValueError(f"config.seppo.reference = {choice!r}: must be one of {REFERENCE_CHOICES}")
    raise ValueError(f"objective {objective.name}: unknown reference rule {rule!r}")


def loss_options(config: Any) -> dict[str, Any]:
    """The loss call's static options from the config."""
    return {
        "lambda_d": float(config.loss.kto_lambda_d),
        "lambda_u": float(config.loss.kto_lambda_u),
        "sft_weight": float(config.loss.get("sft_weight", 0.0)),
        "pso_reference_weight": float(config.get("pso", {}).get("reference_weight", 1.0)),
        "pso_prior_weight": float(config.get("pso", {}).get("prior_weight", 0.0)),
        "pso_clip": float(config.get("pso", {}).get("clip", 0.1)),
    }
