"""The trainer: SPIN-Diffusion self-play, and the SFT / DPO / KTO baselines, in one loop.

For each iteration k = 1..K (K = 1 for the baselines):
  1. generate  (SPIN) one synthetic latent per training example with the opponent theta_{k-1}
               into ``iteration_k/synthetic`` (shards, resumable);
  2. train     the policy, initialised from theta_{k-1}, against the frozen theta_{k-1}
               (the base model for the baselines), ``train.steps`` optimizer steps;
  3. save      step checkpoints on the way, the final one kept, an image grid, a summary;
  4. theta_k = the policy.

Resuming is exact because nothing depends on history: the examples, flips, caption dropout and
noise of step s are functions of (seed, k, s) only, and finished shards and checkpoints are
found on disk. Workdir layout:

  config.json  metrics.jsonl  tb/  latent_cache/
  iteration_k/synthetic/  iteration_k/checkpoints/<step>/  iteration_k/grid.png
  iteration_k/summary.json   (written last: the iteration is finished)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from spin_jax import parallel
from spin_jax.data import sources as data_sources
from spin_jax.data.latent_cache import open_latent_cache, params_fingerprint
from spin_jax.data.synthetic_store import SyntheticStore
from spin_jax.files import write_json
from spin_jax.train import config as config_lib
from spin_jax.train.optim import make_optimizer
from spin_jax.train.state import TrainState, state_sharding
from spin_jax.train.step import jit_train_step, make_train_step

log = logging.getLogger("spin_jax")

VIEWS = {"sft": "winners", "spin": "winners", "dpo": "pairs", "kto": "kto"}
# Latent-cache field -> batch field, per objective.
FIELDS = {
    "sft": {"image": "x0"},
    "spin": {"image": "x0_real"},
    "dpo": {"image": "x0_w", "image_l": "x0_l"},
    "kto": {"image": "x0"},
}
# Settings that may differ between a run and its restart.
RESTART_FREE = ("overwrite",)


class NonFiniteLossError(RuntimeError):
    pass


class CheckpointWriteError(OSError):
    pass


# ----------------------------------------------------------------------------------------------
# Small pieces.


class _Head(data_sources.Source):
    """The first ``n`` records of a source (``data.max_examples``)."""

    def __init__(self, source: data_sources.Source, n: int):
        self.source, self.n = source, min(n, len(source))
        self.image_fields, self.view = source.image_fields, source.view

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.source[self._check_index(index)]

    def meta(self, index: int) -> dict[str, Any]:
        return self.source.meta(self._check_index(index))

    def fingerprint(self) -> str:
        return data_sources.hash_json([self.source.fingerprint(), self.n])

    def summary(self) -> dict[str, int]:
        return self.source.summary()


def _is_main() -> bool:
    return jax.process_index() == 0


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
        if diff and _is_main():
            for name in os.listdir(workdir):
                if name != "latent_cache":  # keyed by its settings: safe to keep
                    p = os.path.join(workdir, name)
                    shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
    if _is_main():
        os.makedirs(workdir, exist_ok=True)
        write_json(path, config.to_dict(), sort_keys=True)


class MetricWriter:
    """JSON lines plus TensorBoard events, on process 0."""

    def __init__(self, workdir: str):
        self.enabled = _is_main()
        if not self.enabled:
            return
        self.path = os.path.join(workdir, "metrics.jsonl")
        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(os.path.join(workdir, "tb"))
        except ImportError:  # TensorBoard events are optional; the JSON lines are not.
            self.tb = None

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {
            k: (float(v) if np.ndim(v) == 0 else np.asarray(v).tolist()) for k, v in metrics.items()
        }
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": int(step), **clean}) + "\n")
        if self.tb is not None:
            for k, v in clean.items():
                if isinstance(v, float):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def close(self) -> None:
        if self.enabled and self.tb is not None:
            self.tb.close()


def save_grid(images: np.ndarray, path: str, cols: int | None = None) -> None:
    """Tiles images NHWC in [-1, 1] into one PNG."""
    from PIL import Image

    images = np.asarray(images, np.float32)
    n, h, w, _ = images.shape
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = -(-n // cols)
    grid = np.zeros((rows * h, cols * w, 3), np.uint8)
    pixels = np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = pixels[i]
    tmp = path + ".tmp.png"
    Image.fromarray(grid).save(tmp)
    os.replace(tmp, path)


def batch_rows(seed: int, iteration: int, step: int, batch: int, pool: np.ndarray) -> np.ndarray:
    """Example indices of a global batch: epochs of seeded permutations of ``pool``."""
    n = len(pool)
    pos = step * batch + np.arange(batch)
    epochs, offsets = pos // n, pos % n
    out = np.empty(batch, np.int64)
    for e in np.unique(epochs):
        perm = np.random.default_rng([seed, iteration, int(e)]).permutation(n)
        sel = epochs == e
        out[sel] = pool[perm[offsets[sel]]]
    return out


def kto_rows(seed: int, iteration: int, step: int, batch: int, labels: np.ndarray,
             pool: np.ndarray, ratio: float) -> np.ndarray:  # fmt: skip
    """KTO batches with a fixed fraction of desirable images (Diffusion-KTO's gamma)."""
    if ratio <= 0:
        return batch_rows(seed, iteration, step, batch, pool)
    good, bad = pool[labels[pool] == 1], pool[labels[pool] == 0]
    if not len(good) or not len(bad):
        raise ValueError("data.kto_desirable_ratio needs desirable and undesirable examples")
    n_good = int(round(ratio * batch))
    rows = np.concatenate([
        batch_rows(seed, iteration, step, n_good, good),
        batch_rows(seed + 1, iteration, step, batch - n_good, bad),
    ])  # fmt: skip
    return rows[np.random.default_rng([seed, iteration, step, 7]).permutation(batch)]


# ----------------------------------------------------------------------------------------------
# The trainer.


class Trainer:
    """Holds what every iteration shares: model, data, caches, mesh, compiled functions."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        from spin_jax.models import load_pretrained

        config_lib.validate(config)
        self.config, self.workdir = config, workdir
        self.mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
        parallel.check_batch_divisible(
            config.train.batch_size // config.train.accum_steps, self.mesh, what="micro-batch"
        )
        if not os.path.isdir(config.model.path):
            raise FileNotFoundError(
                f"config.model.path: model directory not found: {config.model.path}"
            )
        if not os.path.exists(config.data.path):
            raise FileNotFoundError(f"config.data.path: dataset not found: {config.data.path}")
        check_workdir(workdir, config)
        dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[config.model.dtype]
        self.sd = load_pretrained(
            config.model.path,
            dtype,
            attention_impl=config.model.attention_impl or None,
            remat=config.model.remat,
            allow_pickle=config.model.allow_pickle,
        )
        self.writer = MetricWriter(workdir)
        self.objective = config.objective
        # One optimizer and one compiled step for every iteration: beta is an argument of the
        # step, and TrainState.tx (static) is the same object, so iteration k>1 reuses the
        # executable of iteration 1 instead of compiling again.
        self.tx, self.lr_fn = make_optimizer(config.train)
        self._step_jit = None
        self._open_data()
        self._report()

    # Data ------------------------------------------------------------------------------------

    def _open_data(self) -> None:
        c = self.config
        source = data_sources.open_source(
            c.data.source, c.data.path, view=VIEWS[self.objective], split=c.data.split
        )
        if c.data.max_examples:
            source = _Head(source, int(c.data.max_examples))
        if len(source) == 0:
            raise ValueError(f"config.data.path: {c.data.path} holds no usable examples")
        self.source = source
        sd = self.sd
        cache_root = c.data.cache_dir or os.path.join(self.workdir, "latent_cache")
        self.cache = open_latent_cache(
            cache_root,
            source,
            resolution=c.data.resolution,
            vae_fingerprint=params_fingerprint(sd.params["vae"]),
            flip=c.data.random_flip,
            resize_filter=c.data.resize_filter,
        )
        if not self.cache.is_complete():
            encode = jax.jit(sd.vae_encode)
            vae = sd.params["vae"]
            self.cache.build(
                source,
                lambda images: encode(vae, jnp.asarray(images)),
                batch_size=c.data.encode_batch_size,
                process_index=jax.process_index(),
                process_count=jax.process_count(),
                progress=_is_main(),
            )
            _barrier("latent_cache")
        status = np.array([self.cache.status(i) is None for i in range(len(source))])
        self.pool = np.flatnonzero(status)
        self.data_summary = {"examples": len(source), "usable": len(self.pool),
                             **self.cache.summary(), **source.summary()}  # fmt: skip
        if not len(self.pool):
            raise ValueError(f"no example of {c.data.path} could be read: {self.data_summary}")
        self.captions = [source.text(i) for i in range(len(source))]
        self.labels = (
            np.array([source.meta(i)["label"] for i in range(len(source))], np.int32)
            if self.objective == "kto"
            else None
        )

    def _report(self) -> None:
        if not _is_main():
            return
        c = self.config
        dp = parallel.data_parallel_size(self.mesh)
        micro = c.train.batch_size // c.train.accum_steps
        lines = [
            f"spin_jax {self.objective}: {c.iterations} iteration(s) x {c.train.steps} steps",
            f"devices: {jax.device_count()} ({jax.devices()[0].platform}) on "
            f"{jax.process_count()} process(es); mesh {dict(self.mesh.shape)}",
            f"batch: global {c.train.batch_size} = {c.train.accum_steps} micro-batches of {micro} "
            f"({micro // dp} per device)",
            f"model: {c.model.path} ({c.model.dtype} compute, attention {c.model.attention_impl})",
            f"data: {c.data.source} {c.data.path}: {self.data_summary}",
        ]
        for line in lines:
            log.info(line)
            print(line, flush=True)

    def _local_rows(self, global_rows: np.ndarray) -> np.ndarray:
        return global_rows[parallel.process_batch_indices(len(global_rows), self.mesh)]

    def batch(
        self, iteration: int, step: int, store: SyntheticStore | None
    ) -> dict[str, np.ndarray]:
        """This process's part of global batch ``step`` of ``iteration`` (posterior moments,
        synthetic latents, token ids and the flip / dropout draws)."""
        c = self.config
        b = c.train.batch_size
        if self.objective == "kto":
            rows = kto_rows(c.seed, iteration, step, b, self.labels, self.pool,
                            c.data.kto_desirable_ratio)  # fmt: skip
        else:
            rows = batch_rows(c.seed, iteration, step, b, self.pool)
        draws = np.random.default_rng([c.seed, iteration, step, 1])
        flips = draws.integers(0, self.cache.versions, size=b)
        dropped = draws.random(b) < c.data.caption_dropout
        local = parallel.process_batch_indices(b, self.mesh)
        rows, flips, dropped = rows[local], flips[local], dropped[local]
        out: dict[str, np.ndarray] = {}
        for field, name in FIELDS[self.objective].items():
            mean, logvar = self.cache.read(rows, field=field)
            pick = np.arange(len(rows))
            out[f"{name}.mean"] = mean[pick, flips].astype(np.float32)
            out[f"{name}.logvar"] = logvar[pick, flips].astype(np.float32)
        if self.objective == "spin":
            out["x0_syn"] = store.read(rows).astype(np.float32)
        if self.objective == "kto":
            out["label"] = self.labels[rows]
        prompts = ["" if d else self.captions[r] for r, d in zip(rows, dropped, strict=True)]
        out["input_ids"] = self.sd.tokenize(prompts)
        return out

    # Generation -------------------------------------------------------------------------------

    def generate_synthetic(self, iteration: int, opponent: Any) -> SyntheticStore:
        from spin_jax.data.synthetic_store import generation_work

        c, sd = self.config, self.sd
        res = c.data.resolution // sd.vae_scale_factor
        settings = {
            "sampler": c.sample.sampler,
            "num_steps": c.sample.num_steps,
            "guidance_scale": c.sample.guidance_scale,
            "pixel_roundtrip": c.sample.pixel_roundtrip,
            "resolution": c.data.resolution,
        }
        store = SyntheticStore(
            os.path.join(self.workdir, f"iteration_{iteration}", "synthetic"),
            num_records=len(self.source),
            latent_shape=(res, res, sd.latent_channels),
            dataset_fingerprint=self.source.fingerprint(),
            model_fingerprint=params_fingerprint(opponent),
            sampler=settings,
            seed=c.seed,
            shard_size=4 * c.sample.batch_size,
        )
        work = list(generation_work(store, self.source, jax.process_index(), jax.process_count()))
        if work:
            params = dict(sd.params, unet=opponent)
            key = jax.random.fold_in(jax.random.key(c.seed), 1000 + iteration)
            bar = _progress(
                sum(len(i) for _, i, _ in work), f"iteration {iteration}: generate", "img"
            )
            t0, n = time.time(), 0
            per_call = max(c.sample.batch_size // jax.process_count(), 1)
            for shard, indices, prompts in work:
                chunks = []
                for start in range(0, len(indices), per_call):
                    ids = sd.tokenize(prompts[start : start + per_call])
                    chunks.append(
                        self._sample(params, ids, jax.random.fold_in(key, int(indices[start])))
                    )
                    n += len(ids)
                    bar.update(len(ids))
                store.write_shard(shard, np.concatenate(chunks))
            bar.close()
            self.writer.write(
                (iteration - 1) * c.train.steps,
                {"generate/images_per_s": n / max(time.time() - t0, 1e-9), "generate/images": n},
            )
        _barrier(f"generate_{iteration}")
        if not store.is_complete():
            raise RuntimeError(f"synthetic store {store.dir} is incomplete after generation")
        return store

    def _sample(self, params: Any, ids: np.ndarray, key: jax.Array) -> np.ndarray:
        from spin_jax.diffusion import generate

        c, sd = self.config, self.sd
        size = c.data.resolution
        if not c.sample.pixel_roundtrip:
            out = generate(sd, params, ids, key, num_steps=c.sample.num_steps,
                           guidance_scale=c.sample.guidance_scale, height=size, width=size,
                           decode=False, sampler=c.sample.sampler, mesh=_local_mesh())  # fmt: skip
            return np.asarray(out, np.float32)
        # The papers' pipeline: decode, store as 8-bit pixels, encode again, sample the posterior.
        images = generate(sd, params, ids, key, num_steps=c.sample.num_steps,
                          guidance_scale=c.sample.guidance_scale, height=size, width=size,
                          decode=True, sampler=c.sample.sampler, mesh=_local_mesh())  # fmt: skip
        images = np.round((np.clip(np.asarray(images), -1, 1) + 1) * 127.5) / 127.5 - 1
        mean, logvar = jax.jit(sd.vae_encode)(params["vae"], jnp.asarray(images, jnp.float32))
        noise = jax.random.normal(jax.random.fold_in(key, 1), mean.shape)
        return np.asarray((mean + jnp.exp(0.5 * logvar) * noise) * sd.scaling_factor, np.float32)

    def grid(self, iteration: int, unet_params: Any) -> None:
        from spin_jax.diffusion import generate

        c, sd = self.config, self.sd
        prompts = list(c.log.grid_prompts)
        if not prompts or not _is_main():
            return
        images = generate(sd, dict(sd.params, unet=unet_params), sd.tokenize(prompts),
                          jax.random.key(c.log.grid_seed), num_steps=c.sample.num_steps,
                          guidance_scale=c.sample.guidance_scale, height=c.data.resolution,
                          width=c.data.resolution, decode=True, sampler=c.sample.sampler,
                          mesh=_local_mesh())  # fmt: skip
        path = os.path.join(self.workdir, f"iteration_{iteration}", "grid.png")
        save_grid(np.asarray(images), path)

    # Training ---------------------------------------------------------------------------------

    def _step_fn(self):
        c, sd = self.config, self.sd
        scaling = sd.scaling_factor

        def step(state, ref_params, text_params, batch, key, beta):
            train_step = make_train_step(
                self.objective,
                unet_apply=sd.unet_apply,
                encode_text=sd.encode_text,
                schedule=sd.schedule,
                beta=None if self.objective == "sft" else beta,
                share_noise=c.loss.share_noise,
                accum_steps=c.train.accum_steps,
                lambda_d=c.loss.kto_lambda_d,
                lambda_u=c.loss.kto_lambda_u,
                learning_rate_fn=self.lr_fn,
                mesh=self.mesh,
            )
            # Draw the real latents from their cached VAE posteriors, then the objective's step.
            k_post, k_step = jax.random.split(key)
            batch = dict(batch)
            for i, name in enumerate(sorted({n for n in FIELDS[self.objective].values()})):
                mean, logvar = batch.pop(f"{name}.mean"), batch.pop(f"{name}.logvar")
                noise = jax.random.normal(jax.random.fold_in(k_post, i), mean.shape)
                logvar = jnp.clip(logvar, -30.0, 20.0)
                batch[name] = (mean + jnp.exp(0.5 * logvar) * noise) * scaling
            return train_step(state, ref_params, text_params, batch, k_step)

        return step

    def train(self, iteration: int, ref_params: Any, store: SyntheticStore | None) -> Any:
        c, sd = self.config, self.sd
        beta = config_lib.beta_for_iteration(c, iteration - 1)
        state = TrainState.create(ref_params, self.tx, mesh=self.mesh)
        ckpt_dir = os.path.abspath(
            os.path.join(self.workdir, f"iteration_{iteration}", "checkpoints")
        )
        manager = ocp.CheckpointManager(
            ckpt_dir,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max(1, c.checkpoint.max_to_keep), enable_async_checkpointing=True
            ),
        )
        start = manager.latest_step()
        if start is not None:
            state = _restore(manager, start, state)
            log.info("iteration %d: resumed from step %d", iteration, start)
        start = int(state.step)
        if self._step_jit is None:
            # The output state keeps the input's layout, so step 2 onwards (and every later
            # iteration) calls the executable compiled for step 1.
            self._step_jit = jit_train_step(self._step_fn(), state_sharding(state))
        beta_arg = parallel.replicate(np.float32(beta), self.mesh)
        ref = parallel.replicate(ref_params, self.mesh)
        text = parallel.replicate(sd.params["text_encoder"], self.mesh)
        base_key = jax.random.fold_in(jax.random.key(c.seed), iteration)
        bar = _progress(c.train.steps, f"iteration {iteration}: train", "step", initial=start)
        t0, t_last, last = time.time(), time.time(), {}
        global_offset = (iteration - 1) * c.train.steps
        for step in range(start, c.train.steps):
            batch = parallel.global_batch_from_local(self.batch(iteration, step, store), self.mesh)
            key = parallel.replicate(jax.random.fold_in(base_key, step), self.mesh)
            state, metrics = self._step_jit(state, ref, text, batch, key, beta_arg)
            done = step + 1
            if done % c.log.every_steps == 0 or done == c.train.steps:
                metrics = jax.device_get(metrics)
                if not bool(metrics["is_finite"]):
                    manager.wait_until_finished()
                    latest = manager.latest_step()
                    raise NonFiniteLossError(
                        f"iteration {iteration}, step {done}: non-finite loss or gradient "
                        f"(loss={float(metrics['loss'])}, grad_norm={float(metrics['grad_norm'])}); "
                        f"the update was not applied. Last good checkpoint: "
                        f"{os.path.join(ckpt_dir, str(latest)) if latest is not None else 'none'}. "
                        "Lower train.learning_rate or train.beta and restart."
                    )
                now = time.time()
                n_steps = done - (last.get("step", start))
                metrics = {f"train/{k}": v for k, v in metrics.items() if k != "is_finite"}
                metrics["train/beta"] = beta
                metrics["train/pairs_per_s" if self.objective in ("spin", "dpo") else
                        "train/images_per_s"] = n_steps * c.train.batch_size / max(now - t_last, 1e-9)  # fmt: skip
                self.writer.write(global_offset + done, metrics)
                t_last, last = now, {"step": done, **metrics}
                bar.set_postfix(loss=f"{metrics['train/loss']:.4f}")
            bar.update(1)
            if done % c.checkpoint.every_steps == 0 or done == c.train.steps:
                _save(manager, done, state, {"iteration": iteration, "step": done, "beta": beta,
                                             "objective": self.objective,
                                             "data": {"seed": c.seed, "next_step": done}})  # fmt: skip
        bar.close()
        manager.wait_until_finished()
        manager.close()
        self.last_metrics = {k: float(v) for k, v in last.items() if np.ndim(v) == 0}
        self.train_seconds = time.time() - t0
        return state.params

    # The loop ---------------------------------------------------------------------------------

    def run(self) -> list[dict[str, Any]]:
        c = self.config
        opponent = self.sd.params["unet"]
        summaries = []
        for iteration in range(1, c.iterations + 1):
            it_dir = os.path.join(self.workdir, f"iteration_{iteration}")
            summary_path = os.path.join(it_dir, "summary.json")
            if os.path.isfile(summary_path):
                with open(summary_path) as f:
                    summaries.append(json.load(f))
                if self.objective == "spin":
                    opponent = load_iteration_params(self.workdir, iteration, opponent)
                log.info("iteration %d: finished earlier, skipped", iteration)
                continue
            os.makedirs(it_dir, exist_ok=True)
            t0 = time.time()
            store = (
                self.generate_synthetic(iteration, opponent) if self.objective == "spin" else None
            )
            t_gen = time.time() - t0
            ref = opponent if self.objective == "spin" else self.sd.params["unet"]
            policy = self.train(iteration, ref, store)
            self.grid(iteration, policy)
            summary = {
                "iteration": iteration,
                "objective": self.objective,
                "beta": config_lib.beta_for_iteration(c, iteration - 1),
                "steps": c.train.steps,
                "generate_seconds": round(t_gen, 2),
                "train_seconds": round(self.train_seconds, 2),
                **{k.removeprefix("train/"): v for k, v in self.last_metrics.items()},
            }
            if _is_main():
                write_json(summary_path, summary, sort_keys=True)
            _barrier(f"iteration_{iteration}")
            line = (
                f"iteration {iteration}: loss {summary.get('loss', float('nan')):.4f} "
                f"accuracy {summary.get('implicit_acc', float('nan')):.3f} "
                f"generate {t_gen:.0f}s train {self.train_seconds:.0f}s"
            )
            log.info(line)
            if _is_main():
                print(line, flush=True)
            summaries.append(summary)
            if self.objective == "spin":
                opponent = policy
        self.writer.close()
        if c.get("toy_eval") and c.toy_eval.get("enabled") and _is_main():
            # The demo's table: the toy world's judge on the base and every iteration.
            from spin_jax.toy.demo import demo_report

            demo_report(self.workdir, c)
        return summaries


def run(config: ml_collections.ConfigDict, workdir: str) -> list[dict[str, Any]]:
    """Runs (or resumes) the training job of ``config`` in ``workdir``."""
    return Trainer(config, workdir).run()


# ----------------------------------------------------------------------------------------------
# Checkpoints.


def _save(manager: ocp.CheckpointManager, step: int, state: TrainState, meta: dict) -> None:
    # Orbax writes into a temporary folder and renames it when complete, so a failed write
    # (disk full, ...) leaves the previous checkpoint as it was.
    try:
        manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(state.params),
                opt_state=ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state}),
                meta=ocp.args.JsonSave(meta),
            ),
        )
    except OSError as e:
        manager.wait_until_finished()  # let the previous (async) save complete
        raise CheckpointWriteError(
            f"writing checkpoint {step} to {manager.directory} failed: {e}. The previous "
            f"checkpoint ({manager.latest_step()}) is intact; free space and rerun the command "
            "to resume from it."
        ) from e


def _restore(manager: ocp.CheckpointManager, step: int, like: TrainState) -> TrainState:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract.params),
            opt_state=ocp.args.StandardRestore(
                {"step": abstract.step, "opt_state": abstract.opt_state}
            ),
        ),
    )
    rest = restored["opt_state"]
    return like.replace(params=restored["params"], step=rest["step"], opt_state=rest["opt_state"])


def load_iteration_params(workdir: str, iteration: int, like: Any, step: int | None = None) -> Any:
    """The UNet params of ``iteration`` at checkpoint ``step`` (default: its last checkpoint)."""
    ckpt_dir = os.path.abspath(os.path.join(workdir, f"iteration_{iteration}", "checkpoints"))
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"no checkpoints for iteration {iteration} in {workdir}")
    with ocp.CheckpointManager(ckpt_dir) as manager:
        steps = manager.all_steps()
        if not steps:
            raise FileNotFoundError(f"no finished checkpoint in {ckpt_dir}")
        if step is None:
            step = max(steps)
        elif step not in steps:
            raise FileNotFoundError(
                f"no checkpoint of step {step} in {ckpt_dir} (have {sorted(steps)}); "
                "keep more with checkpoint.max_to_keep"
            )
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        restored = manager.restore(
            step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract))
        )
    # Host arrays: the caller places them (a restored array is committed to one device).
    return jax.device_get(restored["params"])


# ----------------------------------------------------------------------------------------------
# Multi-process helpers.


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _local_mesh():
    return jax.sharding.Mesh(np.array(jax.local_devices()), ("data",))


def _progress(total: int, desc: str, unit: str, initial: int = 0):
    import sys

    from tqdm import tqdm

    # In a log file (no terminal) a bar line every 30 s instead of ten a second.
    interval = 0.1 if sys.stderr.isatty() else 30.0
    return tqdm(total=total, desc=desc, unit=unit, initial=initial, disable=not _is_main(),
                dynamic_ncols=True, mininterval=interval)  # fmt: skip
