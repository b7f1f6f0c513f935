"""VAE posterior moments of the real images, computed once and reused across iterations and runs.

Layout: `root/<key hash>/manifest.json` plus, per shard k of `shard_size` consecutive records,
`{k:05d}.{field}.mean.npy`, `{k:05d}.{field}.logvar.npy` (shape [n, V, h, w, c], V = 2 when
flips are on: version 0 the image, version 1 the flipped image, encoded separately) and
`{k:05d}.status.npy` (int8 [n]: 0 ok, else 1 + index into transforms.SKIP_REASONS). The status
file is written last and marks the shard finished; every file is written to a temporary name and
renamed, so a killed build resumes with the unfinished shards only.

The key is everything that changes the numbers: the dataset fingerprint (files, order, view),
resolution, the VAE weights' fingerprint, flips, resize filter, JPEG draft, min_size and the
storage dtype. Invalidation: the cache folder is named by the key's hash, so any change of a key
part opens a fresh folder that is rebuilt (old folders are left for the user to delete); a
manifest whose key differs from the folder's expected key is refused with an error.

Moments are stored unscaled (what the VAE encoder returns), float16 by default: the SD VAE
latents span about +-40 with a posterior std near 1e-3..1e-1, float16 keeps 3 significant
digits, far below the diffusion noise added on top. Images are always center-cropped (a random
crop cannot be cached). Records that fail to decode are stored as zeros with their skip reason.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from spin_jax.data import transforms
from spin_jax.data.sources import Source, hash_json
from spin_jax.files import LruCache, write_json, write_npy

FORMAT = 1
MANIFEST = "manifest.json"


def params_fingerprint(params: Any) -> str:
    """sha256 over a pytree's leaf paths, shapes, dtypes and bytes (hex, first 32 chars)."""
    import hashlib

    import jax

    h = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    for path, leaf in sorted(leaves, key=lambda pl: jax.tree_util.keystr(pl[0])):
        arr = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{arr.dtype}|{arr.shape}|".encode())
        h.update(arr.tobytes())
    return h.hexdigest()[:32]


def sample_latents(mean: Any, logvar: Any, rng: Any, scaling_factor: float) -> Any:
    """Scaled latents `(mean + exp(logvar / 2) * eps) * scaling_factor`.

    `rng` is a numpy Generator (NumPy arrays out) or a JAX PRNG key (JAX arrays out, jittable).
    logvar is clipped to [-30, 20] as diffusers' DiagonalGaussianDistribution does.
    """
    if isinstance(rng, np.random.Generator):
        mean = np.asarray(mean, np.float32)
        std = np.exp(0.5 * np.clip(np.asarray(logvar, np.float32), -30.0, 20.0))
        eps = rng.standard_normal(mean.shape, dtype=np.float32)
        return (mean + std * eps) * np.float32(scaling_factor)
    import jax
    import jax.numpy as jnp

    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.exp(0.5 * jnp.clip(jnp.asarray(logvar, jnp.float32), -30.0, 20.0))
    eps = jax.random.normal(rng, mean.shape, jnp.float32)
    return (mean + std * eps) * scaling_factor


def cache_key(
    source: Source,
    *,
    resolution: int,
    vae_fingerprint: str,
    flip: bool = True,
    resize_filter: str = "bicubic",
    draft: bool = True,
    min_size: int | None = None,
    dtype: str = "float16",
) -> dict[str, Any]:
    """Every setting the cached numbers depend on."""
    if dtype not in ("float16", "float32"):
        raise ValueError(f"latent cache dtype {dtype!r}; expected 'float16' or 'float32'")
    if resize_filter not in transforms.RESIZE_FILTERS:
        raise ValueError(
            f"resize_filter={resize_filter!r}; expected one of {list(transforms.RESIZE_FILTERS)}"
        )
    return {
        "format": FORMAT,
        "dataset": source.fingerprint(),
        "num_records": len(source),
        "fields": list(source.image_fields),
        "resolution": int(resolution),
        "vae": str(vae_fingerprint),
        "crop": "center",
        "flip": bool(flip),
        "resize_filter": resize_filter,
        "draft": bool(draft),
        "min_size": int(resolution // 2 if min_size is None else min_size),
        "dtype": dtype,
    }


class LatentCache:
    """A keyed folder of VAE moments; build() fills it, read()/moments() serve the pipeline."""

    def __init__(self, root: str, key: Mapping[str, Any], *, shard_size: int = 256):
        self.key = json.loads(json.dumps(dict(key), sort_keys=True))
        self.dir = os.path.join(os.path.abspath(root), hash_json(self.key))
        self.num_records = int(self.key["num_records"])
        self.fields = tuple(self.key["fields"])
        self.versions = 2 if self.key["flip"] else 1
        manifest_path = os.path.join(self.dir, MANIFEST)
        if os.path.isfile(manifest_path):
            with open(manifest_path) as f:
                manifest = json.load(f)
            if manifest.get("key") != self.key:
                raise ValueError(
                    f"latent cache {manifest_path} was built for other settings "
                    f"({_diff(manifest.get('key'), self.key)}); delete the folder to rebuild it"
                )
            self.shard_size = int(manifest["shard_size"])
        else:
            self.shard_size = int(shard_size)
            os.makedirs(self.dir, exist_ok=True)
            write_json(
                manifest_path,
                {
                    "key": self.key,
                    "shard_size": self.shard_size,
                    "reasons": list(transforms.SKIP_REASONS),
                },
                sort_keys=True,
            )
        self.num_shards = -(-self.num_records // self.shard_size)
        self._shards = LruCache()

    def __repr__(self) -> str:
        return f"LatentCache({self.dir!r}, n={self.num_records}, shards={self.num_shards})"

    # Layout ---------------------------------------------------------------------------------

    def _path(self, shard: int, name: str) -> str:
        return os.path.join(self.dir, f"{shard:05d}.{name}.npy")

    def shard_indices(self, shard: int) -> np.ndarray:
        return np.arange(
            shard * self.shard_size, min((shard + 1) * self.shard_size, self.num_records)
        )

    def shard_done(self, shard: int) -> bool:
        return os.path.isfile(self._path(shard, "status"))

    def missing_shards(self) -> list[int]:
        return [k for k in range(self.num_shards) if not self.shard_done(k)]

    def is_complete(self) -> bool:
        return not self.missing_shards()

    def pending_shards(self, process_index: int = 0, process_count: int = 1) -> list[int]:
        """Unfinished shards this process builds (round robin over processes)."""
        return [k for k in self.missing_shards() if k % process_count == process_index]

    # Build ----------------------------------------------------------------------------------

    def build(
        self,
        source: Source,
        encode_fn: Callable[[np.ndarray], tuple[Any, Any]],
        *,
        batch_size: int = 16,
        num_threads: int = 4,
        process_index: int = 0,
        process_count: int = 1,
        progress: bool = True,
    ) -> dict[str, int]:
        """Encodes the unfinished shards of this process; returns counts of this call.

        encode_fn(images float32 NHWC [-1, 1], batch_size fixed) -> (mean, logvar) NHWC. The last
        batch of a shard is padded by repeating an image, so a jitted encode compiles once.
        """
        if len(source) != self.num_records or list(source.image_fields) != list(self.fields):
            raise ValueError(
                f"latent cache {self.dir}: source has {len(source)} records with fields "
                f"{source.image_fields}, the cache expects {self.num_records} with {self.fields}"
            )
        shards = self.pending_shards(process_index, process_count)
        counts = collections.Counter(
            shards_done_before=self.num_shards - len(self.missing_shards())
        )
        total = sum(len(self.shard_indices(k)) for k in shards)
        bar = None
        if progress and total:
            from tqdm import tqdm

            bar = tqdm(total=total, desc="latent cache", unit="img")
        items = ((k, int(i)) for k in shards for i in self.shard_indices(k))
        with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
            loaded = _ordered_map(
                pool,
                lambda ki: (ki[0], self._load(source, ki[1])),
                items,
                window=4 * batch_size + 8,
            )
            current, records = None, []
            for k, record in loaded:
                if current is not None and k != current:
                    self._write_shard(current, records, encode_fn, batch_size, counts)
                    records = []
                current = k
                records.append(record)
                if bar is not None:
                    bar.update(1)
            if current is not None:
                self._write_shard(current, records, encode_fn, batch_size, counts)
        if bar is not None:
            bar.close()
        return dict(counts)

    def _load(self, source: Source, index: int) -> tuple[int, dict[str, np.ndarray] | None]:
        """(status code, {field: uint8 [V, res, res, 3]} or None)."""
        record = source[index]
        if "error" in record:
            return 1 + transforms.SKIP_REASONS.index(record["error"]), None
        images = {}
        for field in self.fields:
            try:
                arr, _ = transforms.load_image(
                    record[field],
                    self.key["resolution"],
                    min_size=self.key["min_size"],
                    resize_filter=self.key["resize_filter"],
                    draft=self.key["draft"],
                )
            except transforms.ImageError as e:
                return 1 + transforms.SKIP_REASONS.index(e.reason), None
            images[field] = (
                np.stack([arr, transforms.hflip(arr)]) if self.versions == 2 else arr[None]
            )
        return 0, images

    def _write_shard(self, shard: int, records: list, encode_fn, batch_size: int, counts) -> None:
        n = len(records)
        if n != len(self.shard_indices(shard)):
            raise RuntimeError(f"latent cache shard {shard}: got {n} records")
        status = np.array([s for s, _ in records], np.int8)
        ok = np.nonzero(status == 0)[0]
        dtype = np.dtype(self.key["dtype"])
        for field in self.fields:
            if len(ok):
                images = np.concatenate([records[i][1][field] for i in ok])  # [len(ok) * V, ...]
                mean, logvar = _encode_padded(encode_fn, images, batch_size)
                shape = (len(ok), self.versions) + mean.shape[1:]
                mean, logvar = mean.reshape(shape), logvar.reshape(shape)
                full_shape = (n, self.versions) + mean.shape[2:]
            else:
                full_shape = (n, self.versions) + self._latent_shape(encode_fn, batch_size)
            out_mean = np.zeros(full_shape, dtype)
            out_logvar = np.zeros(full_shape, dtype)
            if len(ok):
                out_mean[ok], out_logvar[ok] = mean, logvar
            write_npy(self._path(shard, f"{field}.mean"), out_mean)
            write_npy(self._path(shard, f"{field}.logvar"), out_logvar)
        write_npy(self._path(shard, "status"), status)  # last: marks the shard done
        counts["shards_built"] += 1
        counts["records"] += n
        counts["ok"] += len(ok)
        for code in status[status > 0]:
            counts[transforms.SKIP_REASONS[code - 1]] += 1

    def _latent_shape(self, encode_fn, batch_size: int) -> tuple[int, ...]:
        """Latent [h, w, c] for a shard without one valid image: encode a blank batch."""
        res = self.key["resolution"]
        mean, _ = encode_fn(np.zeros((batch_size, res, res, 3), np.float32))
        return tuple(np.shape(mean)[1:])

    # Read -----------------------------------------------------------------------------------

    def _arrays(self, shard: int) -> dict[str, np.ndarray]:
        return self._shards.get(shard, self._open_shard)

    def _open_shard(self, shard: int) -> dict[str, np.ndarray]:
        if not self.shard_done(shard):
            raise FileNotFoundError(f"latent cache {self.dir}: shard {shard} is not built")
        arrays = {"status": np.load(self._path(shard, "status"))}
        for field in self.fields:
            for part in ("mean", "logvar"):
                arrays[f"{field}_{part}"] = np.load(
                    self._path(shard, f"{field}.{part}"), mmap_mode="r"
                )
        return arrays

    def status(self, index: int) -> str | None:
        """None if the record was encoded, else its skip reason."""
        code = int(
            self._arrays(int(index) // self.shard_size)["status"][int(index) % self.shard_size]
        )
        return None if code == 0 else transforms.SKIP_REASONS[code - 1]

    def moments(self, index: int, field: str = "image") -> tuple[np.ndarray, np.ndarray]:
        """(mean, logvar), each [V, h, w, c] in the stored dtype."""
        if not 0 <= int(index) < self.num_records:
            raise IndexError(f"latent cache: index {index} out of range [0, {self.num_records})")
        arrays = self._arrays(int(index) // self.shard_size)
        row = int(index) % self.shard_size
        return np.array(arrays[f"{field}_mean"][row]), np.array(arrays[f"{field}_logvar"][row])

    def read(self, indices: Iterable[int], field: str = "image") -> tuple[np.ndarray, np.ndarray]:
        """Stacked (mean, logvar) [n, V, h, w, c] for a batch of example indices."""
        pairs = [self.moments(i, field) for i in indices]
        return np.stack([m for m, _ in pairs]), np.stack([lv for _, lv in pairs])

    def summary(self) -> dict[str, int]:
        """Counts over the finished shards: ok and each skip reason."""
        counts = collections.Counter()
        for k in range(self.num_shards):
            if self.shard_done(k):
                for code, c in zip(
                    *np.unique(np.load(self._path(k, "status")), return_counts=True), strict=True
                ):
                    counts["ok" if code == 0 else transforms.SKIP_REASONS[code - 1]] += int(c)
        return dict(counts)


def open_latent_cache(
    root: str,
    source: Source,
    *,
    resolution: int,
    vae_fingerprint: str,
    flip: bool = True,
    resize_filter: str = "bicubic",
    draft: bool = True,
    min_size: int | None = None,
    dtype: str = "float16",
    shard_size: int = 256,
) -> LatentCache:
    """The cache for these settings under `root` (created empty if new)."""
    key = cache_key(
        source,
        resolution=resolution,
        vae_fingerprint=vae_fingerprint,
        flip=flip,
        resize_filter=resize_filter,
        draft=draft,
        min_size=min_size,
        dtype=dtype,
    )
    return LatentCache(root, key, shard_size=shard_size)


def _encode_padded(
    encode_fn, images_u8: np.ndarray, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    means, logvars = [], []
    for start in range(0, len(images_u8), batch_size):
        chunk = images_u8[start : start + batch_size]
        n = len(chunk)
        if n < batch_size:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - n, axis=0)])
        mean, logvar = encode_fn(transforms.to_float(chunk))
        means.append(np.asarray(mean, np.float32)[:n])
        logvars.append(np.asarray(logvar, np.float32)[:n])
    return np.concatenate(means), np.concatenate(logvars)


def _ordered_map(pool, fn, items: Iterable, window: int) -> Iterator:
    """pool.map with at most `window` tasks in flight, results in order."""
    pending: collections.deque = collections.deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _diff(old: Any, new: Any, prefix: str = "") -> str:
    """A short description of where two JSON values differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        parts = []
        for k in sorted(set(old) | set(new)):
            if old.get(k) != new.get(k):
                parts.append(_diff(old.get(k), new.get(k), f"{prefix}{k}."))
        return "; ".join(parts)
    return f"{prefix.rstrip('.') or 'value'}: stored {old!r}, now {new!r}"
