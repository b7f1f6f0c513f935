"""Per-iteration store of the opponent's synthetic latents, keyed by example index.

Layout of one iteration's folder:

    manifest.json                 model fingerprint, sampler settings, seed, config, dataset, shapes
    shard_{k:05d}.latents.npy     [n, h, w, c] for example indices k*S .. k*S + n - 1
    shard_{k:05d}.index.npy       int64 [n], those indices; written last, marks the shard finished

Shards are fixed blocks of consecutive example indices (S = shard_size), the same whatever the
number of processes: process p generates the unfinished shards k with k % process_count == p, so
a run restarted on another number of hosts still reuses every finished shard. Each file is
written under a temporary name and renamed; a shard whose index file exists is never generated
again. Opening a folder whose manifest differs from the current settings (another model, sampler,
seed, config or dataset) is an error, never a mix. Multi-host runs need the folder on a shared
file system (as the checkpoints do): the trainer's slice of examples is not the generator's.

What is stored is what the trainer trains on: the sampler's final latents in the diffusion
model's (scaled) latent space, float16 by default.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from spin_jax.data.latent_cache import _diff
from spin_jax.data.sources import Source
from spin_jax.files import LruCache, write_json, write_npy

FORMAT = 1
MANIFEST = "manifest.json"


def canonical(obj: Any) -> Any:
    """JSON-normal form of settings (ConfigDicts, tuples and NumPy scalars made plain)."""

    def default(o):
        if hasattr(o, "to_dict"):
            return o.to_dict()
        if isinstance(o, np.generic | np.ndarray):
            return o.tolist()
        raise TypeError(
            f"synthetic store: setting of type {type(o).__name__} ({o!r}) is not JSON-able"
        )

    return json.loads(json.dumps(obj, sort_keys=True, default=default))


class SyntheticStore:
    """One iteration's synthetic latents; see the module docstring."""

    def __init__(
        self,
        directory: str,
        *,
        num_records: int,
        latent_shape: tuple[int, ...],
        dataset_fingerprint: str,
        model_fingerprint: str,
        sampler: Mapping[str, Any],
        seed: int,
        config: Mapping[str, Any] | None = None,
        shard_size: int = 256,
        dtype: str = "float16",
    ):
        if dtype not in ("float16", "float32"):
            raise ValueError(f"synthetic store dtype {dtype!r}; expected 'float16' or 'float32'")
        manifest = canonical(
            {
                "format": FORMAT,
                "num_records": int(num_records),
                "latent_shape": list(latent_shape),
                "shard_size": int(shard_size),
                "dtype": dtype,
                "dataset": dataset_fingerprint,
                "model": model_fingerprint,
                "sampler": dict(sampler),
                "seed": int(seed),
                "config": config if config is not None else {},
            }
        )
        self.dir = os.path.abspath(directory)
        path = os.path.join(self.dir, MANIFEST)
        if os.path.isfile(path):
            with open(path) as f:
                stored = json.load(f)
            if stored != manifest:
                raise ValueError(
                    f"synthetic store {path} holds samples made with other settings "
                    f"({_diff(stored, manifest)}); use a new folder or delete this one"
                )
        else:
            os.makedirs(self.dir, exist_ok=True)
            write_json(path, manifest, sort_keys=True)
        self._set_manifest(manifest)

    @classmethod
    def open(cls, directory: str) -> SyntheticStore:
        """Opens an existing store for reading, trusting its manifest."""
        path = os.path.join(os.path.abspath(directory), MANIFEST)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"synthetic store: {path} not found")
        with open(path) as f:
            manifest = json.load(f)
        store = cls.__new__(cls)
        store.dir = os.path.abspath(directory)
        store._set_manifest(manifest)
        return store

    def _set_manifest(self, manifest: dict[str, Any]) -> None:
        self.manifest = manifest
        self.num_records = manifest["num_records"]
        self.latent_shape = tuple(manifest["latent_shape"])
        self.shard_size = manifest["shard_size"]
        self.dtype = np.dtype(manifest["dtype"])
        self.num_shards = -(-self.num_records // self.shard_size)
        self._shards = LruCache()

    def __repr__(self) -> str:
        return f"SyntheticStore({self.dir!r}, n={self.num_records}, shards={self.num_shards})"

    def _path(self, shard: int, part: str) -> str:
        return os.path.join(self.dir, f"shard_{shard:05d}.{part}.npy")

    def shard_indices(self, shard: int) -> np.ndarray:
        if not 0 <= shard < self.num_shards:
            raise IndexError(f"synthetic store: shard {shard} out of range [0, {self.num_shards})")
        return np.arange(
            shard * self.shard_size, min((shard + 1) * self.shard_size, self.num_records)
        )

    def shard_done(self, shard: int) -> bool:
        return os.path.isfile(self._path(shard, "index"))

    def pending_shards(self, process_index: int = 0, process_count: int = 1) -> list[int]:
        """Unfinished shards this process generates (round robin over processes)."""
        return [
            k
            for k in range(process_index, self.num_shards, process_count)
            if not self.shard_done(k)
        ]

    def missing_indices(self) -> np.ndarray:
        """Example indices whose shard is not finished yet (all processes)."""
        missing = [self.shard_indices(k) for k in range(self.num_shards) if not self.shard_done(k)]
        return np.concatenate(missing) if missing else np.zeros((0,), np.int64)

    def is_complete(self) -> bool:
        return all(self.shard_done(k) for k in range(self.num_shards))

    def write_shard(self, shard: int, latents: Any) -> None:
        """Writes the latents of `shard` (rows in the order of shard_indices(shard))."""
        indices = self.shard_indices(shard)
        latents = np.asarray(latents)
        expected = (len(indices), *self.latent_shape)
        if latents.shape != expected:
            raise ValueError(
                f"synthetic store shard {shard}: latents {latents.shape}, expected {expected}"
            )
        if not np.all(np.isfinite(latents)):
            raise ValueError(f"synthetic store shard {shard}: latents contain NaN or inf")
        write_npy(self._path(shard, "latents"), latents.astype(self.dtype))
        write_npy(self._path(shard, "index"), indices.astype(np.int64))  # last: done

    def _latents(self, shard: int) -> np.ndarray:
        return self._shards.get(shard, self._open_shard)

    def _open_shard(self, shard: int) -> np.ndarray:
        if not self.shard_done(shard):
            raise FileNotFoundError(
                f"synthetic store {self.dir}: shard {shard} is not generated yet"
            )
        index = np.load(self._path(shard, "index"))
        if not np.array_equal(index, self.shard_indices(shard)):
            raise ValueError(
                f"synthetic store {self._path(shard, 'index')}: unexpected example indices"
            )
        latents = np.load(self._path(shard, "latents"), mmap_mode="r")
        if latents.shape != (len(index), *self.latent_shape):
            raise ValueError(
                f"synthetic store {self._path(shard, 'latents')}: shape {latents.shape}"
            )
        return latents

    def get(self, index: int) -> np.ndarray:
        """The latent [h, w, c] of one example (stored dtype)."""
        index = int(index)
        if not 0 <= index < self.num_records:
            raise IndexError(f"synthetic store: index {index} out of range [0, {self.num_records})")
        return np.array(self._latents(index // self.shard_size)[index % self.shard_size])

    def read(self, indices: Iterable[int]) -> np.ndarray:
        """Stacked latents [n, h, w, c] for a batch of example indices."""
        return np.stack([self.get(i) for i in indices])


def generation_work(
    store: SyntheticStore, source: Source, process_index: int = 0, process_count: int = 1
) -> Iterator[tuple[int, np.ndarray, list[str]]]:
    """(shard, example indices, prompts) for each shard this process still has to generate."""
    if len(source) != store.num_records:
        raise ValueError(
            f"synthetic store {store.dir} is for {store.num_records} examples, the source has {len(source)}"
        )
    for shard in store.pending_shards(process_index, process_count):
        indices = store.shard_indices(shard)
        yield shard, indices, [source.text(int(i)) for i in indices]
