"""The training data of a run and its batches.

``open_data`` opens the source in the objective's view and its latent cache (built on first
use); ``read_batch`` returns this process's part of global batch (round, step). A batch is a
pure function of (seed, round, step) and of what is on disk, which is what makes resume exact:
the examples, flips and caption dropout of a step never depend on history.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from spin_jax import parallel
from spin_jax.data import sources as data_sources
from spin_jax.data.latent_cache import LatentCache, open_latent_cache, params_fingerprint
from spin_jax.train.objectives import Objective


class Head(data_sources.Source):
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


class Interrupted(Exception):
    """A stop was requested (SIGTERM / SIGINT); the message says where the run stopped."""


@dataclasses.dataclass
class Data:
    source: data_sources.Source
    cache: LatentCache
    pool: np.ndarray  # usable example indices
    captions: list[str]
    labels: np.ndarray | None  # KTO: 1 desirable, 0 undesirable
    summary: dict[str, Any]


def open_data(config: ml_collections.ConfigDict, objective: Objective, workdir: str,
              sd: Any, barrier: Callable[[str], None],
              stop: Callable[[], bool] | None = None,
              agree: Callable[[], bool] | None = None) -> Data:  # fmt: skip
    """``stop()`` (this process's flag) is checked between cache shards; when it turns True the
    build ends early (finished shards kept) and, once ``agree()`` (every process's verdict, a
    collective all of them reach) says so, ``Interrupted`` is raised."""
    c = config
    source = data_sources.open_source(c.data.source, c.data.path, view=objective.view,
                                      split=c.data.split)  # fmt: skip
    if c.data.max_examples:
        source = Head(source, int(c.data.max_examples))
    if len(source) == 0:
        raise ValueError(f"config.data.path: {c.data.path} holds no usable examples")
    cache = open_latent_cache(
        c.data.cache_dir or os.path.join(workdir, "latent_cache"),
        source,
        resolution=c.data.resolution,
        vae_fingerprint=params_fingerprint(sd.params["vae"]),
        flip=c.data.random_flip,
        resize_filter=c.data.resize_filter,
        empty_caption=c.data.empty_caption,
    )
    need = not cache.is_complete()
    if jax.process_count() > 1:
        # Every process decides together: one that looked after another finished the shared
        # cache would skip the build's collectives and fall out of step with the others.
        from jax.experimental import multihost_utils

        votes = multihost_utils.process_allgather(np.array([need], np.float32))
        need = bool(np.any(np.asarray(votes) > 0.5))
    if need:
        encode = jax.jit(sd.vae_encode)
        vae = sd.params["vae"]
        cache.build(
            source,
            lambda images: encode(vae, jnp.asarray(images)),
            batch_size=c.data.encode_batch_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            progress=jax.process_index() == 0,
            stop=stop,
        )
        if agree is not None and agree():
            raise Interrupted("while building the latent cache; its finished shards are kept")
        barrier("latent_cache")
    pool = np.flatnonzero([cache.status(i) is None for i in range(len(source))])
    summary = {"examples": len(source), "usable": len(pool), **cache.summary(),
               **source.summary()}  # fmt: skip
    if not len(pool):
        raise ValueError(f"no example of {c.data.path} could be read: {summary}")
    labels = None
    if "label" in objective.batch_fields:
        labels = np.array([source.meta(i)["label"] for i in range(len(source))], np.int32)
    captions = [source.text(i) for i in range(len(source))]
    return Data(source, cache, pool, captions, labels, summary)


def batch_rows(seed: int, stream: int, step: int, batch: int, pool: np.ndarray) -> np.ndarray:
    """Example indices of a global batch: epochs of seeded permutations of ``pool``."""
    n = len(pool)
    pos = step * batch + np.arange(batch)
    epochs, offsets = pos // n, pos % n
    out = np.empty(batch, np.int64)
    for e in np.unique(epochs):
        perm = np.random.default_rng([seed, stream, int(e)]).permutation(n)
        sel = epochs == e
        out[sel] = pool[perm[offsets[sel]]]
    return out


def kto_rows(seed: int, stream: int, step: int, batch: int, labels: np.ndarray,
             pool: np.ndarray, ratio: float) -> np.ndarray:  # fmt: skip
    """KTO batches with a fixed fraction of desirable images (Diffusion-KTO's gamma)."""
    if ratio <= 0:
        return batch_rows(seed, stream, step, batch, pool)
    good, bad = pool[labels[pool] == 1], pool[labels[pool] == 0]
    if not len(good) or not len(bad):
        raise ValueError("data.kto_desirable_ratio needs desirable and undesirable examples")
    n_good = int(round(ratio * batch))
    rows = np.concatenate([
        batch_rows(seed, stream, step, n_good, good),
        batch_rows(seed + 1, stream, step, batch - n_good, bad),
    ])  # fmt: skip
    return rows[np.random.default_rng([seed, stream, step, 7]).permutation(batch)]


def position(objective: Objective, round_: int, step: int, steps_per_round: int) -> tuple[int, int]:
    """(stream, step) that seed a batch: per round for objectives that restart every round, one
    stream over the whole run for continuous ones."""
    if objective.continuous:
        return 0, (round_ - 1) * steps_per_round + step
    return round_, step


def global_rows(config: ml_collections.ConfigDict, objective: Objective, data: Data,
                round_: int, step: int) -> np.ndarray:  # fmt: skip
    """The example indices of global batch ``step`` of round ``round_`` (every process agrees)."""
    stream, s = position(objective, round_, step, config.train.steps)
    b = config.train.batch_size
    if data.labels is not None:
        return kto_rows(config.seed, stream, s, b, data.labels, data.pool,
                        config.data.kto_desirable_ratio)  # fmt: skip
    return batch_rows(config.seed, stream, s, b, data.pool)


def round_rows(config: ml_collections.ConfigDict, objective: Objective, data: Data,
               round_: int) -> np.ndarray:  # fmt: skip
    """The distinct examples round ``round_`` trains on, sorted (its rollout's prompts)."""
    rows = [global_rows(config, objective, data, round_, s) for s in range(config.train.steps)]
    return np.unique(np.concatenate(rows))


def read_batch(config: ml_collections.ConfigDict, objective: Objective, data: Data,
               round_: int, step: int, mesh: jax.sharding.Mesh, tokenize: Callable,
               rollout: Any = None, *, time_ids: bool = False) -> dict[str, np.ndarray]:  # fmt: skip
    """This process's part of global batch ``step`` of round ``round_``: posterior moments of
    the cached latents (drawn on device by the step), rolled-out latents, labels, token ids
    and, with ``time_ids`` (SDXL), the micro-conditioning of each example (``data.sdxl_time_ids``:
    "fixed" = (res, res, 0, 0, res, res), as Diffusion-DPO's SDXL script; "true" = the image's
    original size and the crop of the drawn version, from the latent cache, as diffusers' SDXL
    examples). Pairs get one row, the winner's ("image"): the step conditions the winner and the
    loser on the same row."""
    c = config
    b = c.train.batch_size
    rows = global_rows(c, objective, data, round_, step)
    stream, s = position(objective, round_, step, c.train.steps)
    draws = np.random.default_rng([c.seed, stream, s, 1])
    flips = draws.integers(0, data.cache.versions, size=b)
    dropped = draws.random(b) < c.data.caption_dropout
    local = parallel.process_batch_indices(b, mesh)
    rows, flips, dropped = rows[local], flips[local], dropped[local]
    out: dict[str, np.ndarray] = {}
    pick = np.arange(len(rows))
    for field, name in objective.cache_fields.items():
        mean, logvar = data.cache.read(rows, field=field)
        out[f"{name}.mean"] = mean[pick, flips].astype(np.float32)
        out[f"{name}.logvar"] = logvar[pick, flips].astype(np.float32)
    if objective.rollout != "none":
        out["x0_l"] = rollout.read(rows).astype(np.float32)
    if data.labels is not None:
        out["label"] = data.labels[rows]
    prompts = ["" if d else data.captions[r] for r, d in zip(rows, dropped, strict=True)]
    out["input_ids"] = tokenize(prompts)
    if time_ids and c.data.sdxl_time_ids == "true":
        out["time_ids"] = data.cache.time_ids(rows, flips, field="image")
    elif time_ids:
        res = float(c.data.resolution)
        row = np.asarray([res, res, 0.0, 0.0, res, res], np.float32)
        out["time_ids"] = np.broadcast_to(row, (len(rows), 6)).copy()
    return out
