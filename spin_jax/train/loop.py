"""The round loop: one trainer for every objective of ``spin_jax.train.objectives``.

For each round k = 1..``iterations``:
  1. pick the reference: the checkpoint the objective's reference rule names (the base model,
     the end of round k-1, or one drawn from the saved ends of all earlier rounds);
  2. roll out what the objective needs from the reference (nothing, one sample per training
     example, or one per prompt of the round) into ``iteration_k/synthetic``;
  3. train ``train.steps`` optimizer steps against the frozen reference;
  4. checkpoint (the round's end every ``checkpoint.every_rounds`` rounds, and the last one;
     step checkpoints every ``checkpoint.every_steps`` steps within a round), grid, summary.

One compiled train step serves every round (beta and the reference are arguments). Resuming is
exact because nothing depends on history: batches and noise are functions of (seed, round,
step), references of (seed, round, saved rounds), and finished shards and checkpoints are found
on disk. Workdir layout:

  config.json  metrics.jsonl  tb/  latent_cache/
  iteration_k/synthetic/  iteration_k/checkpoints/<step>/  iteration_k/grid.png
  iteration_k/summary.json   (written last: the round is finished)
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from spin_jax import interrupt, parallel, platform, runlock
from spin_jax.data.latent_cache import sample_latents
from spin_jax.files import write_json
from spin_jax.models import lora
from spin_jax.train import batches, checkpoints, objectives, pso, rollout
from spin_jax.train import config as config_lib
from spin_jax.train import metrics as metrics_lib
from spin_jax.train.batches import Interrupted  # noqa: F401  (re-exported)
from spin_jax.train.checkpoints import CheckpointWriteError  # noqa: F401  (re-exported)
from spin_jax.train.optim import make_optimizer
from spin_jax.train.state import TrainState, state_sharding
from spin_jax.train.step import jit_train_step, make_train_step

say = metrics_lib.say
# Settings that may differ between a run and its restart (they change no output).
RESTART_FREE = ("overwrite", "checkpoint.grace_seconds")


class NonFiniteLossError(RuntimeError):
    pass


def barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def check_workdir(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Records the config in a new workdir; refuses one that holds a run with another config."""
    path = os.path.join(workdir, "config.json")
    current = {k: v for k, v in _flat(config.to_dict()).items() if k not in RESTART_FREE}
    if os.path.isfile(path):
        with open(path) as f:
            saved = {k: v for k, v in _flat(json.load(f)).items() if k not in RESTART_FREE}
        saved = json.loads(json.dumps(saved, default=str))
        current_j = json.loads(json.dumps(current, default=str))
        diff = sorted(k for k in set(saved) | set(current_j) if saved.get(k) != current_j.get(k))
        if diff and not config.overwrite:
            shown = ", ".join(f"{k}: {saved.get(k)!r} -> {current_j.get(k)!r}" for k in diff[:8])
            raise ValueError(
                f"{workdir} holds a run with another config ({shown}). Use another --workdir, "
                "or --config.overwrite=True to delete that run and start over."
            )
        if diff and metrics_lib.is_main():
            for name in os.listdir(workdir):
                if name not in ("latent_cache", runlock.LOCK_FILE):  # the cache is keyed: keep it
                    p = os.path.join(workdir, name)
                    shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
    if metrics_lib.is_main():
        os.makedirs(workdir, exist_ok=True)
        write_json(path, config.to_dict(), sort_keys=True)


def make_step(config: ml_collections.ConfigDict, objective: objectives.Objective, sd: Any,
              lr_fn: Any, mesh: jax.sharding.Mesh, lora_scale: float | None = None):  # fmt: skip
    """The trainer's step: draw the cached latents from their VAE posteriors, then the
    objective's train step. ``(state, ref, text, batch, key, beta) -> (state, metrics)``.
    LoRA (``lora_scale`` set): the state's params and ``ref`` are adapters and the frozen base
    UNet comes in as the argument ``base`` (one copy, not a constant baked into the program)."""
    c = config
    cached = sorted(set(objective.cache_fields.values()))
    if objective.rollout == "online_pairs":  # online PSO: transitions, not noised latents
        return pso.make_online_step(
            c, sd, learning_rate_fn=lr_fn, mesh=mesh,
            wrap_apply=lambda base: lora.wrap_apply(sd.unet_apply, base, lora_scale),
        )  # fmt: skip
    timesteps = None
    if objective.timesteps == "distilled":  # offline PSO: the few-step model's timesteps
        timesteps = pso.distilled_timesteps(c, sd.schedule)
        how = "pso.timesteps" if c.pso.timesteps else f"pso.timestep_source {c.pso.timestep_source}"
        say(f"timesteps: {timesteps.tolist()} (distilled, {how})")

    def step(state, ref_params, text_params, batch, key, beta, base=None):
        unet_apply = (
            sd.unet_apply if base is None else lora.wrap_apply(sd.unet_apply, base, lora_scale)
        )
        train_step = make_train_step(
            objective.name,
            unet_apply=unet_apply,
            encode_text=sd.encode_prompt,
            schedule=sd.schedule,
            beta=beta if objective.needs_reference else None,
            share_noise=c.loss.share_noise,
            accum_steps=c.train.accum_steps,
            lambda_d=c.loss.kto_lambda_d,
            lambda_u=c.loss.kto_lambda_u,
            sft_weight=float(c.loss.sft_weight),
            learning_rate_fn=lr_fn,
            mesh=mesh,
            timesteps=timesteps,
            loss_options=objectives.loss_options(c),
        )
        k_post, k_step = jax.random.split(key)
        batch = dict(batch)
        for i, name in enumerate(cached):
            mean, logvar = batch.pop(f"{name}.mean"), batch.pop(f"{name}.logvar")
            batch[name] = sample_latents(mean, logvar, jax.random.fold_in(k_post, i),
                                         sd.scaling_factor)  # fmt: skip
        return train_step(state, ref_params, text_params, batch, k_step)

    return step


class _References:
    """UNet params of round ends (0 = the base), read from the checkpoints on first use and
    kept while they are the current reference.

    LoRA (``off`` = the base as an adapter): ``get`` gives adapters, as the train step takes
    them, and ``unet`` the merged UNet params the rollouts sample with."""

    def __init__(self, workdir: str, base: Any, off: Any = None, scale: float = 1.0):
        self.workdir, self.base, self.held = workdir, base, {}
        self.off, self.scale = off, scale

    def get(self, round_: int) -> Any:
        if round_ == 0:
            return self.base if self.off is None else self.off
        if round_ not in self.held:
            like = self.base
            if self.off is not None:  # the adapter's tree (a fixed base reference has none)
                like = (
                    self.off if lora.is_adapter(self.off) else lora.zeros(self.base, self._ranks())
                )
            self.held = {round_: checkpoints.load_iteration_params(self.workdir, round_, like)}
        return self.held[round_]

    def _ranks(self) -> dict[str, int]:
        return checkpoints.read_lora_info(self.workdir)["layers"]

    def unet(self, round_: int) -> Any:
        if self.off is None:  # full fine-tuning: the round's UNet itself
            return self.get(round_)
        if round_ == 0:
            return self.base
        return lora.merge_jit(self.base, self.get(round_), self.scale)


def _policy_unet(state: TrainState, refs: _References) -> Any:
    """The current policy's UNet params, whole on this process (LoRA: merged into the base)."""
    params = parallel.local_copy(state.params)
    return params if refs.off is None else lora.merge_jit(refs.base, params, refs.scale)


def _place_base(base: Any, mesh: jax.sharding.Mesh) -> Any:
    """The frozen base UNet of a LoRA run on the mesh: split over ``fsdp`` where it is > 1."""
    if jax.process_count() == 1:
        return jax.device_put(base, parallel.fsdp_param_sharding(mesh, base))
    return parallel.replicate(base, mesh)


def _round_means(path: str, first: int, last: int) -> dict[str, float]:
    """Means over metrics.jsonl rows of steps first..last of the train/ scalars."""
    sums: dict[str, list[float]] = {}
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                row = json.loads(line)
                if first <= row.get("step", -1) <= last and "train/loss" in row:
                    for k, v in row.items():
                        if k.startswith("train/") and isinstance(v, int | float):
                            sums.setdefault(k.removeprefix("train/"), []).append(float(v))
    return {k: float(np.mean(v)) for k, v in sums.items()}


def _stop_requested(guard: Any) -> bool:
    """Whether to stop now: this process's signal, agreed on by every process (a signal that
    reached one host stops them all at the same step)."""
    flag = bool(guard is not None and guard.requested)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        votes = multihost_utils.process_allgather(np.array([flag], np.float32))
        flag = bool(np.any(np.asarray(votes) > 0.5))
    return flag


def run(config: ml_collections.ConfigDict, workdir: str, guard: Any = None,
        reward_fn: pso.RewardFn | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """Runs (or resumes) the training job of ``config`` in ``workdir``; returns the rounds'
    summaries. Takes the workdir's lock (process 0) for the whole run.

    ``reward_fn(images NHWC in [-1, 1], prompts) -> scores``: the reward model that labels
    online PSO's pairs (the launcher builds it; ``train/`` never imports ``eval/``).

    ``guard`` (an ``interrupt.Guard``): when it reports a SIGTERM / SIGINT the run writes a
    checkpoint of the step it is at (or keeps the finished rollout / cache shards) and raises
    ``Interrupted`` saying where it stopped; the same command resumes. If that takes longer
    than ``checkpoint.grace_seconds`` after the signal, the guard ends the process with one
    line saying what was cut short and which checkpoint is the newest intact one (exit 75)."""
    config_lib.validate(config)
    with runlock.acquire(workdir, what="workdir", enabled=metrics_lib.is_main()):
        return _run(config, workdir, guard, reward_fn)


def _grace(guard: Any, config: ml_collections.ConfigDict, workdir: str):
    """Arms ``guard``'s grace period from the config; returns ``note(doing)``, which records
    what the run is heading for, for the line printed if the grace period runs out."""
    doing = ["the work in progress stopped"]

    def note(what: str) -> None:
        doing[0] = what

    if not isinstance(guard, interrupt.Guard):
        return note
    guard.grace_seconds = float(config.checkpoint.get("grace_seconds", 0.0))

    def line() -> str:
        found = checkpoints.latest(workdir, int(config.iterations))
        newest = "none" if found is None else f"iteration {found[0]} step {found[1]}"
        return (f"grace period of {guard.grace_seconds:g} s ran out before {doing[0]}; the "
                f"newest intact checkpoint is {newest}; rerun the same command to resume")  # fmt: skip

    guard.describe = line
    return note


def _run(config: ml_collections.ConfigDict, workdir: str, guard: Any,
         reward_fn: pso.RewardFn | None = None) -> list[dict[str, Any]]:  # fmt: skip
    from spin_jax.models import load_pretrained

    c = config
    note = _grace(guard, config, workdir)
    objective = objectives.get(c.objective)
    mesh = parallel.make_mesh(c.mesh.data, c.mesh.fsdp)
    accum, accum_why = config_lib.accumulation(c, parallel.data_parallel_size(mesh))
    c = ml_collections.ConfigDict(c.to_dict())  # what this machine runs; config.json keeps config
    c.train.accum_steps = accum
    parallel.check_batch_divisible(c.train.batch_size // accum, mesh, what="micro-batch")
    online = objective.rollout == "online_pairs"
    if online:
        n_dev = parallel.data_parallel_size(mesh)
        if int(c.pso.pairs_per_round) % n_dev:
            raise ValueError(f"config.pso.pairs_per_round = {c.pso.pairs_per_round}: must be "
                             f"divisible by the {n_dev} data-parallel devices")  # fmt: skip
        if reward_fn is None:
            raise ValueError("config.objective = pso_online needs a reward model: loop.run(..., "
                             "reward_fn=...); launch/train.py builds it from config.pso.reward "
                             "and config.pso.scorers")  # fmt: skip
    if not os.path.exists(c.model.path):
        raise FileNotFoundError(f"config.model.path: model not found: {c.model.path}")
    if not os.path.exists(c.data.path):
        raise FileNotFoundError(f"config.data.path: dataset not found: {c.data.path}")
    check_workdir(workdir, config)
    dtype_why = "as set"
    if c.model.dtype == "auto":
        c.model.dtype = platform.default_compute_dtype()
        dtype_why = f"auto on {jax.devices()[0].platform}"
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[c.model.dtype]
    sd = load_pretrained(c.model.path, dtype, attention_impl=c.model.attention_impl or None,
                         remat=c.model.remat, allow_pickle=c.model.allow_pickle,
                         components=c.model.components or None)  # fmt: skip
    # local: this process's flag, between units each process does on its own; stop: every
    # process's verdict, where they all are in step (a collective with several processes).
    local = (lambda: bool(guard.requested)) if guard is not None else None
    stop = (lambda: _stop_requested(guard)) if guard is not None else None
    if objective.timesteps == "distilled":
        pso.distilled_timesteps(c, sd.schedule)  # a model without few-step timesteps: fail now
    if online:
        pso.online_tables(c, sd.schedule)  # a sampler it can train, before any work
        pso.check_guidance(c, sd)
        data = pso.open_prompts(c, objective)
    else:
        note("the latent cache build stopped (its finished shards are kept)")
        data = batches.open_data(c, objective, workdir, sd, barrier, local, stop)
    writer = metrics_lib.MetricWriter(workdir)
    _report(c, objective, mesh, data, accum_why, f"{c.model.dtype} compute, {dtype_why}", sd)

    n_rounds, steps = int(c.iterations), int(c.train.steps)
    # A continuous objective is one fine-tune over all rounds: its schedule spans them all.
    total = n_rounds * steps if objective.continuous else steps
    tx, lr_fn = make_optimizer(dict(c.train.to_dict(), total_steps=total))
    base = sd.params["unet"]
    adapter = lora.from_config(c.model.lora, base, jax.random.fold_in(jax.random.key(c.seed), 7))
    scale = None if adapter is None else adapter[1]
    refs = _References(workdir, base)
    if adapter is not None:  # LoRA: the state holds the adapter; the reference is one too
        adapter = adapter[0]
        # The base as an adapter: none at all for a fixed base reference (no merge), zeros for
        # the other rules, whose later references are adapters (one compiled step for all).
        off = {} if objective.reference == "base" else jax.tree.map(jnp.zeros_like, adapter)
        refs = _References(workdir, base, off, scale)
        if metrics_lib.is_main():
            checkpoints.write_lora_info(workdir, adapter, scale)
        say(f"LoRA: {len(lora.describe(adapter))} layers, rank {c.model.lora.rank}, scale "
            f"{scale:g}, {sum(x.size for x in jax.tree.leaves(adapter)):,} trained parameters")  # fmt: skip
    state = TrainState.create(base if adapter is None else adapter, tx, mesh=mesh)
    # The output state keeps the input's layout, so every step of every round calls the
    # executable compiled for the first one.
    step_jit = jit_train_step(
        make_step(c, objective, sd, lr_fn, mesh, scale), state_sharding(state)
    )
    if adapter is not None:
        step_jit = functools.partial(step_jit, base=_place_base(base, mesh))
    text = parallel.replicate(sd.text_params(sd.params), mesh)

    first_round, first_step, prior = 1, 0, {}
    state, found = checkpoints.restore_latest(workdir, n_rounds, state, say)
    if found is not None:
        r, s = found
        done = s == steps and os.path.isfile(_summary_path(workdir, r))
        first_round, first_step = (r + 1, 0) if done else (r, s)
        if not done:  # the round's times so far, from the attempts before (summary.json)
            prior = checkpoints.read_meta(workdir, r, s).get("seconds", {})
        writer.resume_at((r - 1) * steps + s)
        say(f"resuming at round {first_round} step {first_step} (checkpoint: round {r} step {s})")
    summaries = []
    for k in range(1, first_round):
        with open(_summary_path(workdir, k)) as f:
            summaries.append(json.load(f))

    placed_ref: dict[int, Any] = {}
    for k in range(first_round, n_rounds + 1):
        start = first_step if k == first_round else 0
        t0 = time.time()
        saved = checkpoints.rounds_with_end(workdir, range(1, k), steps)
        ref_round = objectives.pick_reference(objective, k, saved, seed=c.seed,
                                              choice=c.seppo.reference)  # fmt: skip
        if not objective.continuous and start == 0 and k > 1:
            state = TrainState.create(state.params, tx, mesh=mesh)  # a fresh optimizer
        ro = None
        note(f"the rollout of iteration {k} stopped (its finished shards are kept)")
        if online:
            ro = pso.roll_out_pairs(
                config=c, sd=sd, policy=lambda st=state: _policy_unet(st, refs), round_=k,
                round_dir=checkpoints.round_dir(workdir, k), data=data, reward_fn=reward_fn,
                barrier=barrier, stop=local, agree=stop,
            )  # fmt: skip
            scores = ro.scores.read(ro.kept).astype(np.float64)
            epochs = steps * c.train.batch_size / ro.num_transitions
            say(f"round {k}: {len(ro.kept)} of {c.pso.pairs_per_round} pairs kept (ties dropped), "
                f"{ro.num_transitions} transitions: {steps} steps x {c.train.batch_size} = "
                f"{epochs:.2f} epochs")  # fmt: skip
            writer.write((k - 1) * steps, {"rollout/pairs_kept": len(ro.kept),
                                           "rollout/score_target": float(scores[:, 0].mean()),
                                           "rollout/score_reference": float(scores[:, 1].mean())})  # fmt: skip
        elif objective.rollout != "none":
            rows = batches.round_rows(c, objective, data, k)
            ro = rollout.roll_out(
                objective.rollout, config=c, sd=sd, reference=refs.unet(ref_round),
                reference_name=_ref_name(ref_round), round_=k,
                round_dir=checkpoints.round_dir(workdir, k), source=data.source,
                captions=data.captions, rows=rows, barrier=barrier, stop=local, agree=stop,
            )  # fmt: skip
            if ro.images:
                writer.write((k - 1) * steps, {"rollout/images_per_s": ro.images / max(ro.seconds, 1e-9),
                                               "rollout/images": ro.images})  # fmt: skip
        # An interrupted round's times add up over its attempts (up to its last checkpoint).
        before = prior if k == first_round else {}
        t_rollout = time.time() - t0 + float(before.get("rollout", 0.0))
        if ref_round is not None and ref_round not in placed_ref:
            placed_ref = {ref_round: parallel.replicate(refs.get(ref_round), mesh)}
        ref = placed_ref.get(ref_round)
        beta = config_lib.beta_for_iteration(c, k - 1)
        state, last, means, t_train = _train_round(c, workdir, objective, data, sd, mesh, writer, step_jit,
                                            state, ref, text, ro, k, start, beta, ref_round,
                                            stop, (t_rollout, float(before.get("train", 0.0))), note)  # fmt: skip
        note(f"the grid and summary of iteration {k} were written")
        summary = _finish_round(c, objective, sd, workdir, state, k, ref_round, beta, last,
                                means, t_rollout, t_train, refs)  # fmt: skip
        summaries.append(summary)
        if online and not c.pso.keep_trajectories and metrics_lib.is_main():
            pso.drop_trajectories(checkpoints.round_dir(workdir, k))
    writer.close()
    return summaries


def _summary_path(workdir: str, round_: int) -> str:
    return os.path.join(checkpoints.round_dir(workdir, round_), "summary.json")


def _ref_name(ref_round: int | None) -> str:
    return "none" if ref_round is None else ("base" if ref_round == 0 else f"round {ref_round}")


def _train_round(c, workdir, objective, data, sd, mesh, writer, step_jit, state, ref, text, ro,
                 k, start, beta, ref_round, stop=None, seconds=(0.0, 0.0), note=None):  # fmt: skip
    """``seconds``: (the round's rollout time, its train time in earlier attempts); both are
    kept in the checkpoints' meta so a resumed round's summary counts every attempt.
    ``note(doing)``: told which checkpoint the step in flight heads for (``_grace``)."""
    t_rollout, t_before = seconds
    steps = int(c.train.steps)
    n_rounds = int(c.iterations)
    end_saved = k % max(1, int(c.checkpoint.every_rounds)) == 0 or k == n_rounds
    mgr = checkpoints.manager(workdir, k, c.checkpoint.max_to_keep)
    beta_arg = parallel.replicate(np.float32(beta), mesh)
    offset = (k - 1) * steps
    bar = metrics_lib.progress(steps, f"round {k}: train", "step", initial=start)
    t0 = t_last = time.time()
    last: dict[str, Any] = {}
    logged: list[dict[str, float]] = []  # this attempt's logged rows, for the round's means
    last_step = start
    for s in range(start, steps):
        if note is not None:
            note(f"the checkpoint of iteration {k} step {s + 1} was written")
        if isinstance(ro, pso.OnlinePairs):
            local = ro.read_batch(c, k, s, mesh, sd.tokenize, data.captions,
                                  time_ids=sd.family.pooled)  # fmt: skip
        else:
            local = batches.read_batch(c, objective, data, k, s, mesh, sd.tokenize, ro,
                                       time_ids=sd.family.pooled)  # fmt: skip
        batch = parallel.global_batch_from_local(local, mesh)
        stream, pos = batches.position(objective, k, s, steps)
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(c.seed), stream), pos)
        state, metrics = step_jit(state, ref, text, batch, parallel.replicate(key, mesh), beta_arg)
        done = s + 1
        if done % c.log.every_steps == 0 or done == steps:
            metrics = jax.device_get(metrics)
            if not bool(metrics["is_finite"]):
                mgr.wait_until_finished()
                latest = mgr.latest_step()
                raise NonFiniteLossError(
                    f"round {k}, step {done}: non-finite loss or gradient "
                    f"(loss={float(metrics['loss'])}, grad_norm={float(metrics['grad_norm'])}); "
                    f"the update was not applied. Last good checkpoint: "
                    f"{os.path.join(str(mgr.directory), str(latest)) if latest is not None else 'none'}. "
                    "Lower train.learning_rate or train.beta and restart."
                )  # fmt: skip
            now = time.time()
            metrics = {f"train/{m}": v for m, v in metrics.items() if m != "is_finite"}
            metrics["train/beta"] = beta
            rate = (done - last_step) * c.train.batch_size / max(now - t_last, 1e-9)
            metrics[f"train/{objective.rate_unit}_per_s"] = rate
            writer.write(offset + done, metrics)
            t_last, last_step = now, done
            last = {m: float(v) for m, v in metrics.items() if np.ndim(v) == 0}
            logged.append(last)
            bar.set_postfix(loss=f"{metrics['train/loss']:.4f}")
        bar.update(1)
        halt = done < steps and stop is not None and stop()
        if (
            done % c.checkpoint.every_steps == 0
            and done < steps
            or done == steps
            and end_saved
            or halt
        ):
            meta = {"iteration": k, "step": done, "global_step": offset + done, "beta": beta,
                    "objective": objective.name, "reference": _ref_name(ref_round),
                    "metrics": last, "seconds": {"rollout": t_rollout,
                                                 "train": t_before + time.time() - t0}}  # fmt: skip
            checkpoints.save(mgr, done, state, meta)
        if halt:
            mgr.wait_until_finished()
            mgr.close()
            bar.close()
            raise Interrupted(f"at iteration {k} step {done}; checkpoint written")
    bar.close()
    mgr.wait_until_finished()
    mgr.close()
    if start == 0:  # every row of the round is in memory: no need to read metrics.jsonl
        means = {m.removeprefix("train/"): float(np.mean([r[m] for r in logged if m in r]))
                 for m in (logged[-1] if logged else {})}  # fmt: skip
    else:
        means = _round_means(writer.path, offset + 1, offset + steps) if writer.enabled else {}
    return state, last, means, t_before + time.time() - t0


def _finish_round(c, objective, sd, workdir, state, k, ref_round, beta, last, means,
                  t_rollout, t_train, refs=None) -> dict[str, Any]:  # fmt: skip
    steps = int(c.train.steps)
    every = max(1, int(c.log.grid_every_rounds))
    if (k % every == 0 or k == int(c.iterations)) and c.log.grid_prompts:
        unet = parallel.local_copy(state.params)
        if refs is not None and refs.off is not None:  # LoRA: the adapter merged into the base
            unet = lora.merge_jit(refs.base, unet, refs.scale)
        _grid(c, sd, unet, checkpoints.round_dir(workdir, k))
    summary = {
        "iteration": k,
        "objective": objective.name,
        "beta": beta,
        "steps": steps,
        "reference": _ref_name(ref_round),
        "checkpointed": steps in checkpoints.steps(workdir, k),
        "generate_seconds": round(t_rollout, 2),
        "train_seconds": round(t_train, 2),
        **{m.removeprefix("train/"): v for m, v in last.items()},
        **{f"round_mean/{m}": v for m, v in means.items()},
    }
    if objective.name == "seppo" and "anchor_loser_frac" in means:
        summary["reference_loser_frac"] = means["anchor_loser_frac"]
    if metrics_lib.is_main():
        write_json(_summary_path(workdir, k), summary, sort_keys=True)
    barrier(f"round_{k}")
    say(f"round {k}: loss {summary.get('loss', float('nan')):.4f} "
        f"accuracy {summary.get('implicit_acc', float('nan')):.3f} reference {summary['reference']} "
        f"rollout {t_rollout:.0f}s train {t_train:.0f}s")  # fmt: skip
    return summary


def _grid(c, sd, unet_params, round_dir: str) -> None:
    from spin_jax.diffusion import generate

    if not metrics_lib.is_main():
        return
    prompts = list(c.log.grid_prompts)
    images = generate(sd, dict(sd.params, unet=unet_params), sd.tokenize(prompts),
                      jax.random.key(c.log.grid_seed), num_steps=c.sample.num_steps,
                      guidance_scale=c.sample.guidance_scale, height=c.data.resolution,
                      width=c.data.resolution, decode=True, sampler=pso.sampler_name(c, sd.schedule),
                      timesteps=pso.custom_timesteps(c), mesh=parallel.local_mesh())  # fmt: skip
    metrics_lib.save_grid(np.asarray(images), os.path.join(round_dir, "grid.png"))


def _report(c, objective, mesh, data, accum_why, dtype_why, sd) -> None:
    dp = parallel.data_parallel_size(mesh)
    micro = c.train.batch_size // c.train.accum_steps
    for line in (
        f"spin_jax {objective.name}: {c.iterations} round(s) x {c.train.steps} steps "
        f"(reference: {objective.reference}, rollout: {objective.rollout})",
        f"devices: {jax.device_count()} ({jax.devices()[0].platform}) on "
        f"{jax.process_count()} process(es); mesh {dict(mesh.shape)}",
        f"batch: global {c.train.batch_size} = {c.train.accum_steps} micro-batches of {micro} "
        f"({micro // dp} per device): {accum_why}",
        f"model: {c.model.path} ({dtype_why})",
        sd.attention_summary,
        f"data: {c.data.source} {c.data.path}: {data.summary}",
    ):
        say(line)
