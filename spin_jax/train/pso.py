"""PSO (Pairwise Sample Optimization, Miao et al. ICLR 2025) glue: distilled timesteps, online
pairs, transition log-probabilities and the online train step.

Offline PSO is a row of ``objectives`` like Diffusion-DPO; what differs is where ``t`` comes
from: ``distilled_timesteps`` gives the few-step model's own timesteps, and the train step draws
``t`` uniformly from them (``step.draw_inputs(..., timesteps=...)``).

Online PSO (objective ``pso_online``, rollout kind ``online_pairs``): each round
  1. draws ``pso.pairs_per_round`` training prompts (a function of (seed, round));
  2. samples two independent trajectories per prompt with the *current* policy's few-step
     sampler (``generate(..., return_states=True)``: jitted, split over the local devices),
     decodes the finals and scores them with ``reward_fn(images, prompts) -> scores`` (the
     launcher builds it: PickScore by default); the higher score is the target, the other the
     reference; ties are dropped;
  3. writes the pairs as resumable shards (``iteration_k/pairs/``: trajectories [P, 2, S + 1,
     h, w, C], target first, and scores [P, 2]), two ``SyntheticStore``s, so a killed run
     redoes only unfinished shards;
  4. trains ``train.steps`` steps over the round's stochastic transitions ``x_n -> x_{n-1}``
     (every step but the sampler's last, deterministic one), in a seeded permutation per round
     (one epoch when ``train.steps = kept pairs x (N - 1) / train.batch_size``), with
     ``losses.pso_online`` on log-densities from ``samplers.TRANSITION_LOG_PROBS`` of the policy
     and of the frozen reference (the base model) on the stored states.
No classifier-free guidance batch: few-step models sample with guidance 0 (LCM UNets take the
guidance scale as an embedding, which the log-probabilities use too).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from spin_jax import parallel, platform
from spin_jax.data import sources as data_sources
from spin_jax.data.synthetic_store import SyntheticStore
from spin_jax.diffusion import samplers
from spin_jax.train import batches, objectives
from spin_jax.train import metrics as metrics_lib
from spin_jax.train import step as step_lib
from spin_jax.train.batches import Interrupted
from spin_jax.train.state import TrainState

FEW_STEP = ("euler", "euler_ancestral", "lcm")
RewardFn = Callable[[np.ndarray, list[str]], np.ndarray]


def sampler_name(config: ml_collections.ConfigDict, schedule: Any) -> str:
    """``sample.sampler``, with ``auto`` (or empty) = the one diffusers' pipeline uses with the
    model folder's scheduler."""
    name = config.sample.sampler
    return samplers.default_sampler(schedule) if name in ("auto", "", None) else name


def custom_timesteps(config: ml_collections.ConfigDict) -> tuple[int, ...] | None:
    ts = tuple(int(t) for t in (config.sample.get("timesteps") or ()))
    return ts or None


def _no_few_step(config, schedule, sampler: str, what: str) -> ValueError:
    return ValueError(
        f"{what}, but config.model.path = {config.model.path!r} has a "
        f"{schedule.class_name or 'scheduler without _class_name'} (sampler {sampler!r}, "
        f"config.sample.sampler = {config.sample.sampler!r}), not a few-step one ({FEW_STEP}). "
        "Set the timesteps with --config.pso.timesteps='(999, 749, 499, 249)', or "
        "--config.pso.timestep_source=grid for arange(N, 0, -1) * (T // N) - 1, or name the "
        "model's sampler with --config.sample.sampler=lcm (or euler_ancestral)"
    )


def distilled_timesteps(config: ml_collections.ConfigDict, schedule: Any) -> np.ndarray:
    """The timesteps offline PSO trains at (int64, descending, distinct): ``pso.timesteps`` if
    set; else ``pso.timestep_source``: ``grid`` = ``arange(N, 0, -1) * (T // N) - 1``, or
    ``sampler`` = those the model's few-step sampler visits in ``N = pso.num_steps`` steps
    (``sample.timesteps`` if set, as DMD2's [999, 749, 499, 249]). A model folder without a
    few-step scheduler and no ``pso.timesteps``: a ValueError saying how to set them."""
    p = config.pso
    T = int(schedule.num_train_timesteps)
    if p.timesteps:
        ts = np.asarray(p.timesteps)
        if (
            ts.ndim != 1
            or not np.all(ts == np.round(ts))
            or ts.min() < 0
            or ts.max() >= T
            or len(set(ts.tolist())) != len(ts)
        ):
            raise ValueError(
                f"config.pso.timesteps = {tuple(p.timesteps)!r}: must be distinct integers in "
                f"[0, {T})"
            )
        return np.sort(ts.astype(np.int64))[::-1].copy()
    n = int(p.num_steps)
    if p.timestep_source == "grid":
        if not 1 <= n <= T:
            raise ValueError(f"config.pso.num_steps = {n}: must be in [1, {T}]")
        return (np.arange(n, 0, -1) * (T // n) - 1).astype(np.int64)
    sampler = sampler_name(config, schedule)
    if sampler not in FEW_STEP:
        raise _no_few_step(config, schedule, sampler,
                           "PSO trains at a few-step model's distilled timesteps")  # fmt: skip
    custom = custom_timesteps(config)
    if sampler == "lcm":
        ts = samplers.lcm_timesteps(schedule, n, custom)
    elif sampler == "euler_ancestral":
        ts, _ = samplers.euler_ancestral_timesteps(schedule, n, custom)
    else:
        ts, _ = samplers.euler_timesteps(schedule, n, custom)
    # Euler timesteps are float (integers for trailing / leading spacing): the nearest one.
    ts = np.clip(np.rint(np.asarray(ts, np.float64)), 0, T - 1).astype(np.int64)
    return np.array(list(dict.fromkeys(ts.tolist())), np.int64)


# ----------------------------------------------------------------------------------------------
# Online PSO: the sampler's tables and transitions.


def online_tables(
    config: ml_collections.ConfigDict, schedule: Any
) -> tuple[str, dict[str, np.ndarray], int]:
    """(sampler, its per-step tables, number of stochastic steps) of online PSO's rollouts:
    ``pso.num_steps`` steps of a stochastic few-step sampler (Euler ancestral or LCM). The
    stochastic steps are the first ones; the last step is deterministic and not trained."""
    sampler = sampler_name(config, schedule)
    if sampler not in samplers.TRANSITION_LOG_PROBS:
        if sampler not in FEW_STEP:
            raise _no_few_step(config, schedule, sampler,
                               "online PSO samples with a few-step model's sampler")  # fmt: skip
        raise ValueError(
            f"online PSO trains on stochastic transitions: sampler {sampler!r} is deterministic; "
            f"use one of {sorted(samplers.TRANSITION_LOG_PROBS)} (config.sample.sampler)"
        )
    n, custom = int(config.pso.num_steps), custom_timesteps(config)
    if sampler == "lcm":
        tables = samplers.lcm_tables(schedule, n, custom)
        noisy = tables["std"] > 0
    else:
        tables = samplers.euler_ancestral_tables(schedule, n, custom)
        tables.pop("init_noise_sigma")
        noisy = np.nan_to_num(tables["sigma_up"]) > 0
    n_stoch = int(noisy.sum())
    if n_stoch == 0 or not np.all(noisy[:n_stoch]):
        raise ValueError(
            f"online PSO: {sampler} with config.pso.num_steps = {n} has no stochastic "
            "transition to train (one-step sampling): use pso.num_steps >= 2"
        )
    return sampler, tables, n_stoch


def round_prompts(seed: int, round_: int, pool: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` training examples whose prompts round ``round_`` samples (seeded by (seed,
    round); without repeats when the pool is large enough)."""
    rng = np.random.default_rng([seed, round_, 31])
    return np.asarray(pool)[rng.choice(len(pool), n, replace=n > len(pool))]


def open_prompts(config: ml_collections.ConfigDict, objective: objectives.Objective) -> Any:
    """``batches.Data`` of the training prompts alone (online PSO reads no images, so no latent
    cache is built)."""
    c = config
    source = data_sources.open_source(c.data.source, c.data.path, view=objective.view,
                                      split=c.data.split)  # fmt: skip
    if c.data.max_examples:
        source = batches.Head(source, int(c.data.max_examples))
    captions = [source.text(i) for i in range(len(source))]
    pool = np.flatnonzero([bool(t.strip()) for t in captions])
    if not len(pool):
        raise ValueError(f"config.data.path: {c.data.path} holds no example with a caption")
    summary = {"examples": len(source), "prompts": len(pool)}
    return batches.Data(source, None, pool, captions, None, summary)


@dataclasses.dataclass
class OnlinePairs:
    """A round's labelled pairs on disk and the transitions the round trains on."""

    trajectories: SyntheticStore  # [P, 2, S + 1, h, w, C]: target, reference
    scores: SyntheticStore  # [P, 2]: the target's and the reference's score
    prompts: np.ndarray  # [P] example index of each pair's prompt
    kept: np.ndarray  # pairs without a tie
    num_stochastic: int
    images: int  # generated by this process in this attempt
    seconds: float

    @property
    def num_transitions(self) -> int:
        return len(self.kept) * self.num_stochastic

    def read_batch(self, config: ml_collections.ConfigDict, round_: int, step: int,
                   mesh: jax.sharding.Mesh, tokenize: Callable, captions: list[str],
                   *, time_ids: bool = False) -> dict[str, np.ndarray]:  # fmt: skip
        """This process's part of global batch ``step``: transitions of a seeded permutation of
        the round's (pair, step) transitions, epoch after epoch."""
        b = config.train.batch_size
        ids = batches.batch_rows(config.seed, 5000 + round_, step, b,
                                 np.arange(self.num_transitions))  # fmt: skip
        ids = ids[parallel.process_batch_indices(b, mesh)]
        pairs, steps = self.kept[ids // self.num_stochastic], ids % self.num_stochastic
        traj = np.stack([self.trajectories.get(p) for p in pairs]).astype(np.float32)
        rows = np.arange(len(pairs))
        out = {
            "x_w": traj[rows, 0, steps],
            "x_w_next": traj[rows, 0, steps + 1],
            "x_l": traj[rows, 1, steps],
            "x_l_next": traj[rows, 1, steps + 1],
            "step": steps.astype(np.int32),
            "input_ids": tokenize([captions[int(e)] for e in self.prompts[pairs]]),
        }
        if time_ids:  # as generate's micro-conditioning: (H, W, 0, 0, H, W)
            res = float(config.data.resolution)
            row = np.asarray([res, res, 0.0, 0.0, res, res], np.float32)
            out["time_ids"] = np.broadcast_to(row, (len(pairs), 6)).copy()
        return out


def roll_out_pairs(
    *,
    config: ml_collections.ConfigDict,
    sd: Any,
    policy: Callable[[], Any],
    round_: int,
    round_dir: str,
    data: Any,
    reward_fn: RewardFn | None,
    barrier: Callable[[str], None],
    stop: Callable[[], bool] | None = None,
    agree: Callable[[], bool] | None = None,
) -> OnlinePairs:
    """Samples, scores and stores round ``round_``'s pairs (unfinished shards only) with the
    UNet params ``policy()`` returns (called only when there is something to sample)."""
    from spin_jax.diffusion import generate

    c = config
    n_pairs = int(c.pso.pairs_per_round)
    sampler, tables, n_stoch = online_tables(c, sd.schedule)
    check_guidance(c, sd)
    n_states = len(tables["t"]) + 1
    prompts = round_prompts(c.seed, round_, data.pool, n_pairs)
    res = c.data.resolution // sd.vae_scale_factor
    common = dict(
        num_records=n_pairs,
        dataset_fingerprint=data_sources.hash_json([data.source.fingerprint(), prompts.tolist()]),
        # The policy at the start of the round is a function of the run's config and seed: a
        # label, so a round resumed from a mid-round checkpoint still finds its pairs.
        model_fingerprint=f"policy at the start of round {round_}",
        sampler={
            "sampler": sampler,
            "num_steps": int(c.pso.num_steps),
            "timesteps": list(custom_timesteps(c) or ()),
            "guidance_scale": float(c.sample.guidance_scale),
            "resolution": int(c.data.resolution),
            "reward": c.pso.reward,
        },  # fmt: skip
        seed=c.seed,
        config={"round": round_, "kind": "online_pairs"},
        shard_size=max(1, int(c.sample.batch_size) // 2),
        dtype="float32",
    )
    pairs_dir = os.path.join(round_dir, "pairs")
    traj = SyntheticStore(os.path.join(pairs_dir, "trajectories"),
                          latent_shape=(2, n_states, res, res, sd.latent_channels), **common)  # fmt: skip
    scores = SyntheticStore(os.path.join(pairs_dir, "scores"), latent_shape=(2,), **common)
    work = traj.pending_shards(jax.process_index(), jax.process_count())
    t0, n = time.time(), 0
    if work:
        if reward_fn is None:
            raise ValueError("online PSO needs a reward model: loop.run(..., reward_fn=...)")
        params = dict(sd.params, unet=policy())
        key = jax.random.fold_in(jax.random.key(c.seed), 2000 + round_)
        bar = metrics_lib.progress(2 * sum(len(traj.shard_indices(k)) for k in work),
                                   f"round {round_}: sample pairs", "img")  # fmt: skip
        for shard in work:
            if stop is not None and stop():
                break
            slots = traj.shard_indices(shard)
            texts = [data.captions[int(prompts[i])] for i in slots]
            both = texts + texts
            # Two independent trajectories per prompt: examples 2i and 2i + 1 of the round.
            examples = np.concatenate([2 * slots, 2 * slots + 1]).astype(np.int32)
            images, states = generate(
                sd, params, sd.tokenize(both), key, num_steps=int(c.pso.num_steps),
                guidance_scale=c.sample.guidance_scale, height=c.data.resolution,
                width=c.data.resolution, decode=True, sampler=sampler,
                timesteps=custom_timesteps(c), mesh=parallel.local_mesh(),
                example_ids=examples, return_states=True,
            )  # fmt: skip
            s = np.asarray(reward_fn(np.asarray(images, np.float32), both), np.float64)
            if s.shape != (len(both),) or not np.all(np.isfinite(s)):
                raise ValueError(f"online PSO: reward_fn returned {s.shape} scores (finite "
                                 f"ones expected) for {len(both)} images")  # fmt: skip
            k = len(slots)
            states = np.asarray(states, np.float32).reshape((2, k) + states.shape[1:])
            states = np.swapaxes(states, 0, 1)  # [k, 2, S + 1, ...]
            first_wins = s[:k] >= s[k:]
            order = np.where(first_wins[:, None], [0, 1], [1, 0])
            scores.write_shard(shard, np.stack([s[:k], s[k:]], 1)[np.arange(k)[:, None], order])
            traj.write_shard(shard, states[np.arange(k)[:, None], order])  # last: shard done
            n += 2 * k
            bar.update(2 * k)
        bar.close()
    if agree is not None and agree():
        raise Interrupted(f"while sampling the pairs of round {round_}; finished shards are kept")
    barrier(f"pairs_{round_}")
    if not traj.is_complete():
        raise RuntimeError(f"online PSO pairs {traj.dir} are incomplete after the rollout")
    sc = scores.read(range(n_pairs)).astype(np.float64)
    kept = np.flatnonzero(sc[:, 0] != sc[:, 1])  # ties dropped
    if not len(kept):
        raise RuntimeError(f"round {round_}: every pair of {traj.dir} is a tie; nothing to train")
    return OnlinePairs(traj, scores, prompts, kept, n_stoch, n, time.time() - t0)


def drop_trajectories(round_dir: str) -> None:
    """Deletes a finished round's stored trajectories (``pso.keep_trajectories`` False)."""
    folder = os.path.join(round_dir, "pairs", "trajectories")
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if name.startswith("shard_"):
                os.remove(os.path.join(folder, name))


def check_guidance(config: ml_collections.ConfigDict, sd: Any) -> None:
    if float(config.sample.guidance_scale) > 1.0 and not sd.guidance_embedding_dim:
        raise ValueError(
            f"config.sample.guidance_scale = {config.sample.guidance_scale}: online PSO trains "
            "the sampler's transitions without a classifier-free guidance batch; few-step "
            "models sample with guidance 0 (set it <= 1)"
        )


# ----------------------------------------------------------------------------------------------
# Online PSO: the train step.


def make_online_step(
    config: ml_collections.ConfigDict,
    sd: Any,
    *,
    learning_rate_fn: optax.Schedule | None = None,
    mesh: jax.sharding.Mesh | None = None,
    wrap_apply: Callable[[Any], Callable] | None = None,
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """``step(state, ref_params, text_params, batch, key, beta, base=None) -> (state, metrics)``
    (``loop.make_step``'s signature; ``key`` is unused: the transitions carry their noise).

    For each transition of the batch, the policy's and the reference's UNet outputs at the
    stored state ``x_n`` give the sampler's Gaussian (``samplers.*_transition``); the
    log-density of the stored ``x_{n-1}`` under it, averaged over latent elements, enters
    ``losses.pso_online``. ``wrap_apply(base)``: the UNet apply of a LoRA run (adapters in,
    the frozen ``base`` closed over)."""
    c = config
    sampler, tables, _ = online_tables(c, sd.schedule)
    log_prob = samplers.TRANSITION_LOG_PROBS[sampler]
    schedule = sd.schedule
    row = objectives.get("pso_online")
    options = objectives.loss_options(c)
    accum = int(c.train.accum_steps)
    guidance = float(c.sample.guidance_scale)

    def cond_of(text_params, mb):
        ctx, pooled = sd.encode_prompt(text_params, mb["input_ids"])
        cond = {"context": ctx}
        if pooled is not None:
            cond["added_cond"] = {"text_embeds": pooled, "time_ids": mb["time_ids"]}
        if sd.guidance_embedding_dim:
            from spin_jax.models.unet import guidance_scale_embedding

            cond["timestep_cond"] = guidance_scale_embedding(
                jnp.full((ctx.shape[0],), guidance - 1.0), sd.guidance_embedding_dim
            )
        return jax.lax.stop_gradient(jax.tree.map(lambda v: jnp.concatenate([v, v]), cond))

    def log_probs(apply, params, mb, cond):
        x = jnp.concatenate([mb["x_w"], mb["x_l"]]).astype(jnp.float32)
        x_next = jnp.concatenate([mb["x_w_next"], mb["x_l_next"]]).astype(jnp.float32)
        idx = jnp.concatenate([mb["step"], mb["step"]])
        per = {k: jnp.asarray(v)[idx].reshape((-1,) + (1,) * (x.ndim - 1))
               for k, v in tables.items()}  # fmt: skip
        t = jnp.asarray(tables["t"])[idx]
        x_in = x / per["scale"] if sampler == "euler_ancestral" else x
        out = apply(params, x_in, t, cond["context"], cond.get("added_cond"),
                    cond.get("timestep_cond"))  # fmt: skip
        return log_prob(schedule, per, x, x_next, out.astype(jnp.float32))

    def micro(apply, params, ref_params, text_params, mb, beta):
        cond = cond_of(text_params, mb)
        ref = jax.lax.stop_gradient(log_probs(apply, jax.lax.stop_gradient(ref_params), mb, cond))

        def objective_loss(p):
            return row.loss(log_probs(apply, p, mb, cond), ref, mb, beta, options)

        (loss, metrics), grads = jax.value_and_grad(objective_loss, has_aux=True)(params)
        return loss, metrics, grads

    def step(state, ref_params, text_params, batch, key, beta, base=None):
        del key
        missing = [f for f in (*row.batch_fields, "input_ids") if f not in batch]
        if missing:
            raise ValueError(f"pso_online batch lacks {missing}; has {sorted(batch)}")
        apply = sd.unet_apply if base is None else wrap_apply(base)
        b = batch["step"].shape[0]
        if b % accum:
            raise ValueError(f"batch of {b} is not divisible by accum_steps={accum}")
        if mesh is not None:
            parallel.check_batch_divisible(b // accum, mesh, what="micro-batch")
        if accum == 1:
            loss, metrics, grads = micro(apply, state.params, ref_params, text_params, batch, beta)
        else:
            stacked = jax.tree.map(
                lambda x: jnp.swapaxes(x.reshape((b // accum, accum) + x.shape[1:]), 0, 1), batch
            )
            loss, metrics, grads = step_lib.accumulate(
                lambda mb: micro(apply, state.params, ref_params, text_params, mb, beta),
                state.params, stacked, platform.scan_unroll(accum),
            )  # fmt: skip
        grad_norm = optax.tree.norm(grads)
        is_finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new_state = state.apply_gradients(grads)
        new_state = jax.tree.map(lambda n, o: jnp.where(is_finite, n, o), new_state, state)
        metrics = dict(metrics, loss=loss, grad_norm=grad_norm, is_finite=is_finite,
                       param_norm=optax.tree.norm(state.params))  # fmt: skip
        if learning_rate_fn is not None:
            metrics["lr"] = jnp.asarray(learning_rate_fn(state.step), jnp.float32)
        return new_state, metrics

    return step


def reward_from_scorer(scorer: Callable[[list[str], np.ndarray], np.ndarray]) -> RewardFn:
    """``reward_fn(images, prompts)`` of an ``eval.scorers.Scorer`` (which takes uint8 images):
    images NHWC in [-1, 1] rounded to 8 bits, as a saved image would be."""

    def reward_fn(images: np.ndarray, prompts: list[str]) -> np.ndarray:
        pixels = np.round((np.clip(np.asarray(images), -1, 1) + 1) * 127.5).astype(np.uint8)
        return np.asarray(scorer(list(prompts), pixels), np.float64)

    return reward_fn


def scorer_config(config: ml_collections.ConfigDict) -> Mapping[str, Any]:
    """The reward model's files section (``pso.scorers.<pso.reward>``)."""
    return config.pso.scorers[config.pso.reward].to_dict()
