"""VAE posterior moments of the real images, computed once and reused across iterations and runs.

Layout: `root/<key hash>/manifest.json` plus, per shard k of `shard_size` consecutive records,
`{k:05d}.{field}.mean.npy`, `{k:05d}.{field}.logvar.npy` (shape [n, V, h, w, c], V = 2 when
flips are on: version 0 the image, version 1 the flipped image, encoded separately),
`{k:05d}.{field}.size.npy` (int32 [n, 2]: each image's original (height, width), before any JPEG
draft reduction; zeros for skipped records) and `{k:05d}.status.npy` (int8 [n]: 0 ok, else 1 + index into transforms.SKIP_REASONS). The status
file is written last and marks the shard finished; every file is written to a temporary name and
renamed, so a killed build resumes with the unfinished shards only.

The key is everything that changes the numbers: the dataset fingerprint (files, order, view),
resolution, the VAE weights' fingerprint, flips, resize filter, JPEG draft, min_size and the
storage dtype. Invalidation: the cache folder is named by the key's hash, so any change of a key
part opens a fresh folder that is rebuilt (old folders are left for the user to delete); a
manifest whose key differs from the folder's expected key is refused with an error.

The sizes give SDXL's micro-conditioning (`time_ids`): the center crop follows from the original
size and the resolution (`transforms.center_crop_top_left`). Format 2 added them; a format-1
cache has another key, so it is rebuilt in a fresh folder rather than reused.

Moments are stored unscaled (what the VAE encoder returns), float16 by default: the SD VAE
latents span about +-40 with a posterior std near 1e-3..1e-1, float16 keeps 3 significant
digits, far below the diffusion noise added on top. Images are always center-cropped (a random
crop cannot be cached). Records that fail to decode are stored as zeros with their skip reason.

Skipped records are listed, not only counted: each shard writes `{k:05d}.skipped.jsonl` (before
its status file) and a complete cache has `skipped.jsonl`, one line per skipped record
`{"index": i, "file": path or null, "reason": ..., "detail": ...}` in index order, of which the
first few are printed when the cache is built (`print_skipped`).

Empty captions (`empty_caption`, an argument of `open_latent_cache`, default "skip"): a record
whose caption is empty or blank is skipped and counted as `empty_caption` ("skip", what the
imagefolder documentation promises), or trained as an unconditional example
("unconditional", counted as `empty_caption_unconditional` in `summary()`). Its image is
encoded either way, so the setting is not part of the key: changing it needs no rebuild.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from spin_jax.data import transforms
from spin_jax.data.sources import Source, hash_json
from spin_jax.files import LruCache, write_json, write_npy

FORMAT = 2  # 2: per-image original sizes (`{field}.size.npy`)
MANIFEST = "manifest.json"
SKIPPED = "skipped.jsonl"
EMPTY_CAPTION = ("skip", "unconditional")


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

    def __init__(
        self,
        root: str,
        key: Mapping[str, Any],
        *,
        shard_size: int = 256,
        source: Source | None = None,
        empty_caption: str = "skip",
    ):
        if empty_caption not in EMPTY_CAPTION:
            raise ValueError(
                f"empty_caption={empty_caption!r}; expected one of {list(EMPTY_CAPTION)}"
            )
        self.source = source  # its captions decide empty_caption (None: no caption is empty)
        self.empty_caption = empty_caption
        self._empty: np.ndarray | None = None
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

    def _skipped_path(self, shard: int) -> str:
        return os.path.join(self.dir, f"{shard:05d}.skipped.jsonl")

    @property
    def skipped_path(self) -> str:
        """`skipped.jsonl` of the cache (written when the cache is complete)."""
        return os.path.join(self.dir, SKIPPED)

    def empty_captions(self) -> np.ndarray:
        """Indices of the records whose caption is empty or blank (sorted)."""
        if self._empty is None:
            if self.source is None:
                self._empty = np.zeros((0,), np.int64)
            else:
                self._empty = np.array(
                    [
                        i
                        for i in range(len(self.source))
                        if not str(self.source.meta(i).get("text") or "").strip()
                    ],
                    np.int64,
                )
        return self._empty

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
        stop: Callable[[], bool] | None = None,
    ) -> dict[str, int]:
        """Encodes the unfinished shards of this process; returns counts of this call.

        encode_fn(images float32 NHWC [-1, 1], batch_size fixed) -> (mean, logvar) NHWC. The last
        batch of a shard is padded by repeating an image, so a jitted encode compiles once.
        ``stop()`` (e.g. ``lambda: guard.requested`` of spin_jax.interrupt.Guard) is asked after
        each finished shard: True ends the build there (``"interrupted": 1`` in the counts;
        finished shards are kept). When the cache is complete, `skipped.jsonl` is written and,
        with ``progress``, its first records are printed.
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
                    if stop is not None and stop():
                        counts["interrupted"] = 1
                        current = None
                        break
                current = k
                records.append(record)
                if bar is not None:
                    bar.update(1)
            if current is not None:
                self._write_shard(current, records, encode_fn, batch_size, counts)
            if counts["interrupted"]:
                pool.shutdown(wait=True, cancel_futures=True)
            else:
                counts.pop("interrupted", None)
        if bar is not None:
            bar.close()
        if not counts.get("interrupted") and self.is_complete():
            skipped = self.write_skipped(source)
            if progress and shards:
                print_skipped(self, skipped)
        return dict(counts)

    def skipped_records(self, source: Source | None = None) -> list[dict[str, Any]]:
        """Every skipped record of the finished shards (and the empty captions, under
        ``empty_caption="skip"``), in index order: {"index", "file", "reason", "detail"}."""
        out = []
        for k in range(self.num_shards):
            path = self._skipped_path(k)
            if self.shard_done(k) and os.path.isfile(path):
                with open(path, encoding="utf-8") as f:
                    out.extend(json.loads(line) for line in f if line.strip())
        if self.empty_caption == "skip":
            known = {r["index"] for r in out}
            source = source if source is not None else self.source
            for i in self.empty_captions():
                if int(i) not in known:
                    out.append(
                        {
                            "index": int(i),
                            "file": _file_of(source, int(i)),
                            "reason": "empty_caption",
                            "detail": "the caption is empty",
                        }
                    )
        return sorted(out, key=lambda r: r["index"])

    def write_skipped(self, source: Source | None = None) -> list[dict[str, Any]]:
        """Writes `skipped.jsonl` (see `skipped_records`); returns its records."""
        import uuid

        records = self.skipped_records(source)
        tmp = f"{self.skipped_path}.tmp.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        os.replace(tmp, self.skipped_path)
        return records

    def _load(self, source: Source, index: int) -> tuple[int, Any]:
        """(0, ({field: uint8 [V, res, res, 3]}, {field: (height, width)})) or (status code,
        skip record)."""
        record = source[index]
        if "error" in record:
            return 1 + transforms.SKIP_REASONS.index(record["error"]), _skip_record(
                source, index, record["error"], record.get("detail", "")
            )
        images, sizes = {}, {}
        for field in self.fields:
            try:
                arr, _, sizes[field] = transforms.load_image_with_size(
                    record[field],
                    self.key["resolution"],
                    min_size=self.key["min_size"],
                    resize_filter=self.key["resize_filter"],
                    draft=self.key["draft"],
                )
            except transforms.ImageError as e:
                detail = e.detail if field == "image" else f"{field}: {e.detail}"
                return 1 + transforms.SKIP_REASONS.index(e.reason), _skip_record(
                    source, index, e.reason, detail
                )
            images[field] = (
                np.stack([arr, transforms.hflip(arr)]) if self.versions == 2 else arr[None]
            )
        return 0, (images, sizes)

    def _write_shard(self, shard: int, records: list, encode_fn, batch_size: int, counts) -> None:
        n = len(records)
        if n != len(self.shard_indices(shard)):
            raise RuntimeError(f"latent cache shard {shard}: got {n} records")
        status = np.array([s for s, _ in records], np.int8)
        ok = np.nonzero(status == 0)[0]
        dtype = np.dtype(self.key["dtype"])
        for field in self.fields:
            if len(ok):
                images = np.concatenate([records[i][1][0][field] for i in ok])  # [len(ok) * V]
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
            sizes = np.zeros((n, 2), np.int32)
            for i in ok:
                sizes[i] = records[i][1][1][field]
            write_npy(self._path(shard, f"{field}.size"), sizes)
        skipped = [info for code, info in records if code != 0]
        path = self._skipped_path(shard)
        if skipped or os.path.exists(path):
            tmp = f"{path}.tmp.{os.getpid()}"
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in skipped)
            os.replace(tmp, path)
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
            arrays[f"{field}_size"] = np.load(self._path(shard, f"{field}.size"))
        return arrays

    def status(self, index: int) -> str | None:
        """None if the record is usable, else its skip reason (``empty_caption`` included)."""
        code = int(
            self._arrays(int(index) // self.shard_size)["status"][int(index) % self.shard_size]
        )
        if code:
            return transforms.SKIP_REASONS[code - 1]
        if self.empty_caption == "skip" and len(self.empty_captions()):
            empty = self.empty_captions()
            pos = int(np.searchsorted(empty, int(index)))
            if pos < len(empty) and empty[pos] == int(index):
                return "empty_caption"
        return None

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

    def sizes(self, indices: Iterable[int], field: str = "image") -> np.ndarray:
        """Original (height, width) of each image, int32 [n, 2] (zeros for skipped records)."""
        out = []
        for i in indices:
            if not 0 <= int(i) < self.num_records:
                raise IndexError(f"latent cache: index {i} out of range [0, {self.num_records})")
            shard, row = divmod(int(i), self.shard_size)
            out.append(self._arrays(shard)[f"{field}_size"][row])
        return np.asarray(out, np.int32).reshape(-1, 2)

    def time_ids(
        self, indices: Iterable[int], versions: Iterable[int] | None = None, field: str = "image"
    ) -> np.ndarray:
        """SDXL micro-conditioning of cached images, float32 [n, 6]: (orig_h, orig_w, crop_top,
        crop_left, res, res) with the crop of version ``versions[i]`` (0 the image, 1 its flip;
        None: version 0), as `transforms.sdxl_time_ids`. A skipped record has no size: ValueError."""
        indices = [int(i) for i in indices]
        versions = [0] * len(indices) if versions is None else [int(v) for v in versions]
        if len(versions) != len(indices):
            raise ValueError(f"time_ids: {len(indices)} indices but {len(versions)} versions")
        res = int(self.key["resolution"])
        rows = []
        for i, v, size in zip(indices, versions, self.sizes(indices, field), strict=True):
            if not 0 <= v < self.versions:
                raise ValueError(f"latent cache {self.dir}: version {v} of {self.versions}")
            if size.min() < 1:
                raise ValueError(
                    f"latent cache {self.dir}: record {i} ({field}) was skipped "
                    f"({self.status(i)}), it has no size"
                )
            rows.append(transforms.sdxl_time_ids(tuple(size), res, flipped=v == 1))
        return np.asarray(rows, np.float32).reshape(-1, 6)

    def summary(self) -> dict[str, int]:
        """Counts over the finished shards: ok and each skip reason (``empty_caption`` for
        empty captions skipped; ``empty_caption_unconditional`` for those kept, also in ok)."""
        counts = collections.Counter()
        empty = self.empty_captions()
        for k in range(self.num_shards):
            if self.shard_done(k):
                status = np.load(self._path(k, "status"))
                for code, c in zip(*np.unique(status, return_counts=True), strict=True):
                    counts["ok" if code == 0 else transforms.SKIP_REASONS[code - 1]] += int(c)
                idx = self.shard_indices(k)
                mine = empty[(empty >= idx[0]) & (empty <= idx[-1])] if len(idx) else empty[:0]
                n_empty = int(np.sum(status[mine - idx[0]] == 0)) if len(mine) else 0
                if n_empty and self.empty_caption == "skip":
                    counts["ok"] -= n_empty
                    counts["empty_caption"] += n_empty
                elif n_empty:
                    counts["empty_caption_unconditional"] += n_empty
        return {k: v for k, v in counts.items() if v or k == "ok"}


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
    empty_caption: str = "skip",
) -> LatentCache:
    """The cache for these settings under `root` (created empty if new).

    ``empty_caption``: "skip" (default: records with an empty caption are skipped and counted)
    or "unconditional" (they are trained as unconditional examples); see the module doc.
    """
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
    cache = LatentCache(
        root, key, shard_size=shard_size, source=source, empty_caption=empty_caption
    )
    if cache.is_complete() and not os.path.isfile(cache.skipped_path):
        try:
            cache.write_skipped(source)
        except OSError:
            pass  # a read-only cache stays usable; the report is a convenience
    return cache


def _file_of(source: Source | None, index: int) -> str | None:
    file_path = getattr(source, "file_path", None)
    if file_path is None:
        return None
    try:
        return str(file_path(index))
    except Exception:  # noqa: BLE001 - the report must not fail the build
        return None


def _skip_record(source: Source, index: int, reason: str, detail: str) -> dict[str, Any]:
    return {
        "index": int(index),
        "file": _file_of(source, index),
        "reason": reason,
        "detail": str(detail),
    }


def print_skipped(cache: LatentCache, records: list[dict[str, Any]], limit: int = 4) -> None:
    """One line naming `skipped.jsonl` and the counts, then the first ``limit`` records
    (at most 5 lines in all)."""
    if not records:
        return
    counts = collections.Counter(r["reason"] for r in records)
    what = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
    print(
        f"latent cache: {len(records)} records skipped ({what}); all listed in "
        f"{cache.skipped_path}",
        file=sys.stdout,
        flush=True,
    )
    for r in records[:limit]:
        where = r["file"] or f"record {r['index']}"
        detail = f" ({r['detail']})" if r.get("detail") else ""
        print(f"  #{r['index']} {where}: {r['reason']}{detail}"[:300], flush=True)


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
