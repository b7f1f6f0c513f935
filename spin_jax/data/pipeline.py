"""The grain input pipeline: source -> per-process slice -> shuffle -> decode/crop/flip -> batch.

    pipe = make_pipeline(source, batch_size=8, resolution=512, seed=0, tokenize=sd.tokenize)
    batch = next(pipe)   # {"index", "text", "tokens", "image" float32 NHWC [-1, 1], ...}
    state = pipe.get_state()          # JSON-able; state_to_json(state) for the checkpoint
    pipe.set_state(state)             # continues at the same record

Batches (per process; numpy):
- "index" int64 [B], example indices into the source; "text" object [B] (after caption
  dropout); "tokens" int32 [B, L] when a `tokenize` callable is given.
- pixel path: "image" float32 [B, res, res, 3] in [-1, 1] ("image_l" for the pairs view).
- latent path (a LatentCache is given): "image_mean", "image_logvar" float32 [B, h, w, c], the
  VAE moments of the image or its mirror image (chosen at random when flip is on); no image is
  decoded. Sample with latent_cache.sample_latents.
- "label" int32 [B] for the kto view; "syn_latent" float32 [B, h, w, c] when a SyntheticStore is
  given (same example index, hence the same prompt).

Order and determinism: each process takes its contiguous slice of the records (grain's
ShardByJaxProcess by default; the remainder is dropped so that every process has as many), the
slice is shuffled with a seed that changes every epoch, and every random choice (crop offset,
flip, caption dropout) comes from a generator seeded by `seed` and the record's position. The
same seed gives the same batches for any number of threads or worker processes (a saved state
is restored into a pipeline with the same worker_count: grain's state records the workers).

Bad records (missing file, corrupt or truncated image, unsupported mode, too small, empty
caption) are skipped in the main process, counted in `summary()` (saved with the state) and the
first few of each kind are logged with their index and cause. Bad settings, an incomplete cache
or store, or one built for another dataset are errors before any record is read.

Worker processes (`worker_count > 0`) need absl flags parsed in the parent (run under
`absl.app.run`); everything handed to them must pickle (sources and stores do).
"""

from __future__ import annotations

import collections
import dataclasses
import json
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np
from absl import logging

from spin_jax.data import transforms
from spin_jax.data.latent_cache import LatentCache
from spin_jax.data.sources import Source, shard_range
from spin_jax.data.synthetic_store import SyntheticStore

Tokenize = Callable[[list[str]], Any]


@dataclasses.dataclass(frozen=True)
class _LoadRecord:
    """Index -> processed record (or a skip marker); runs in grain threads/workers."""

    source: Source
    resolution: int
    crop: str
    flip: bool
    caption_dropout: float
    min_size: int
    resize_filter: str
    draft: bool
    latents: LatentCache | None
    synthetic: SyntheticStore | None

    def __call__(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        index = int(index)
        try:
            record = self._pixels(index, rng) if self.latents is None else self._moments(index, rng)
        except transforms.ImageError as e:
            return {"index": index, "skip": e.reason, "detail": e.detail}
        if "skip" in record:
            return record
        if self.caption_dropout > 0 and rng.random() < self.caption_dropout:
            record["text"] = ""
        if self.synthetic is not None:
            record["syn_latent"] = self.synthetic.get(index)
        return record

    def _pixels(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        raw = self.source[index]
        if "error" in raw:
            return {"index": index, "skip": raw["error"], "detail": raw.get("detail", "")}
        if not raw["text"].strip():
            return {"index": index, "skip": "empty_caption", "detail": "empty caption"}
        record = {"index": index, "text": raw["text"]}
        if "label" in raw:
            record["label"] = raw["label"]
        for field in self.source.image_fields:
            arr, converted = transforms.load_image(
                raw[field],
                self.resolution,
                min_size=self.min_size,
                crop=self.crop,
                rng=rng,
                resize_filter=self.resize_filter,
                draft=self.draft,
            )
            if self.flip and rng.random() < 0.5:
                arr = transforms.hflip(arr)
            record[field] = arr
            record["_converted"] = record.get("_converted", 0) + int(converted)
        return record

    def _moments(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        meta = self.source.meta(index)
        reason = self.latents.status(index)
        if reason is not None:
            return {"index": index, "skip": reason, "detail": "recorded by the latent cache"}
        if not meta["text"].strip():
            return {"index": index, "skip": "empty_caption", "detail": "empty caption"}
        record = dict(meta)
        for field in self.source.image_fields:
            mean, logvar = self.latents.moments(index, field)
            version = int(rng.integers(0, 2)) if self.flip else 0
            record[f"{field}_mean"], record[f"{field}_logvar"] = mean[version], logvar[version]
        return record


def collate(
    records: Sequence[dict[str, Any]], tokenize: Tokenize | None = None
) -> dict[str, np.ndarray]:
    """Stacks records; uint8 images -> float32 [-1, 1]; float16 -> float32; tokenizes text."""
    texts = [r["text"] for r in records]
    batch = {
        "index": np.array([r["index"] for r in records], np.int64),
        "text": np.array(texts, dtype=object),
    }
    for key in records[0]:
        if key in batch:
            continue
        arr = np.stack([r[key] for r in records])
        if arr.dtype == np.uint8:
            arr = transforms.to_float(arr)
        elif np.issubdtype(arr.dtype, np.floating):
            arr = arr.astype(np.float32)
        elif np.issubdtype(arr.dtype, np.integer):
            arr = arr.astype(np.int32)
        batch[key] = arr
    if tokenize is not None:
        tokens = np.asarray(tokenize(texts))
        if tokens.ndim != 2 or tokens.shape[0] != len(texts):
            raise ValueError(
                f"tokenize returned shape {tokens.shape} for {len(texts)} captions; expected [B, L]"
            )
        batch["tokens"] = tokens.astype(np.int32)
    return batch


class DataPipeline:
    """Iterator of batches with a checkpointable state and a count of skipped records."""

    def __init__(
        self,
        dataset: grain.IterDataset,
        *,
        batch_size: int,
        tokenize: Tokenize | None,
        drop_remainder: bool,
        log_skips: int,
    ):
        self._dataset = dataset
        self._iter = iter(dataset)
        self.batch_size = batch_size
        self._tokenize = tokenize
        self._drop_remainder = drop_remainder
        self._log_skips = log_skips
        self._skipped: collections.Counter = collections.Counter()
        self._records = 0
        self._batches = 0
        self._converted = 0
        self._state = self._iter.get_state()

    def __iter__(self) -> DataPipeline:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        records = []
        while len(records) < self.batch_size:
            try:
                record = next(self._iter)
            except StopIteration:
                break
            if "skip" in record:
                self._count_skip(record)
                continue
            self._converted += record.pop("_converted", 0)
            records.append(record)
        self._state = self._iter.get_state()
        if not records or (self._drop_remainder and len(records) < self.batch_size):
            raise StopIteration
        self._records += len(records)
        self._batches += 1
        return collate(records, self._tokenize)

    def _count_skip(self, record: dict[str, Any]) -> None:
        reason = record["skip"]
        self._skipped[reason] += 1
        if self._skipped[reason] <= self._log_skips:
            logging.warning(
                "data: skipped record %d (%s): %s", record["index"], reason, record["detail"]
            )
            if self._skipped[reason] == self._log_skips:
                logging.warning("data: further %r records are counted in summary() only", reason)

    def summary(self) -> dict[str, Any]:
        """Records used, batches, images converted to RGB, skipped records by reason."""
        return {
            "records": self._records,
            "batches": self._batches,
            "converted_to_rgb": self._converted,
            "skipped": dict(self._skipped),
            "skipped_total": sum(self._skipped.values()),
        }

    def get_state(self) -> dict[str, Any]:
        """State after the last batch returned (JSON-able; see state_to_json)."""
        return {
            "grain": self._state,
            "records": self._records,
            "batches": self._batches,
            "converted_to_rgb": self._converted,
            "skipped": dict(self._skipped),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self._iter.set_state(state["grain"])
        self._state = state["grain"]
        self._records = int(state["records"])
        self._batches = int(state["batches"])
        self._converted = int(state.get("converted_to_rgb", 0))
        self._skipped = collections.Counter({k: int(v) for k, v in state["skipped"].items()})

    def close(self) -> None:
        close = getattr(self._iter, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> DataPipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"pipeline state: {type(obj).__name__} is not JSON-able")


def state_to_json(state: dict[str, Any]) -> str:
    """Iterator state -> JSON text for the training checkpoint."""
    return json.dumps(state, default=_json_default, sort_keys=True)


def state_from_json(text: str) -> dict[str, Any]:
    return json.loads(text)


def make_pipeline(
    source: Source,
    *,
    batch_size: int,
    resolution: int,
    seed: int,
    tokenize: Tokenize | None = None,
    crop: str = "center",
    flip: bool = True,
    caption_dropout: float = 0.0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_options: grain.sharding.ShardOptions | None = None,
    worker_count: int = 0,
    num_threads: int = 4,
    worker_buffer_size: int = 16,
    latent_cache: LatentCache | None = None,
    synthetic: SyntheticStore | None = None,
    min_size: int | None = None,
    resize_filter: str = "bicubic",
    draft: bool = True,
    drop_remainder: bool = True,
    log_skips: int = 10,
) -> DataPipeline:
    """Builds this process's batch iterator; see the module docstring.

    batch_size is per process. num_epochs=None repeats forever (training is step based; with a
    finite number, processes can run out at different batches when records are skipped).
    shard_options defaults to grain.sharding.ShardByJaxProcess(drop_remainder=True).
    """
    if batch_size <= 0 or resolution <= 0:
        raise ValueError(f"batch_size={batch_size} and resolution={resolution} must be positive")
    if not 0.0 <= caption_dropout <= 1.0:
        raise ValueError(f"caption_dropout={caption_dropout} must be in [0, 1]")
    if crop not in ("center", "random"):
        raise ValueError(f"crop={crop!r}; expected 'center' or 'random'")
    if resize_filter not in transforms.RESIZE_FILTERS:
        raise ValueError(
            f"resize_filter={resize_filter!r}; expected one of {list(transforms.RESIZE_FILTERS)}"
        )
    if num_epochs is not None and num_epochs <= 0:
        raise ValueError(f"num_epochs={num_epochs} must be positive or None")
    min_size = resolution // 2 if min_size is None else int(min_size)
    if latent_cache is not None or synthetic is not None:
        fingerprint = source.fingerprint()
    if latent_cache is not None:
        _check_cache(
            latent_cache,
            source,
            fingerprint,
            resolution,
            crop,
            flip,
            resize_filter,
            draft,
            min_size,
        )
    if synthetic is not None:
        if synthetic.num_records != len(source) or synthetic.manifest["dataset"] != fingerprint:
            raise ValueError(
                f"synthetic store {synthetic.dir} was generated for another dataset "
                f"({synthetic.num_records} records) than {source!r}"
            )
        missing = synthetic.missing_indices()
        if len(missing):
            raise ValueError(
                f"synthetic store {synthetic.dir} is incomplete: {len(missing)} of "
                f"{synthetic.num_records} examples not generated (first {missing[:5].tolist()})"
            )

    if shard_options is None:
        shard_options = grain.sharding.ShardByJaxProcess(drop_remainder=True)
    start, end = shard_range(
        len(source),
        shard_options.shard_index,
        shard_options.shard_count,
        shard_options.drop_remainder,
    )
    if end <= start:
        raise ValueError(
            f"process {shard_options.shard_index} of {shard_options.shard_count} gets no records "
            f"from {source!r}"
        )
    load = _LoadRecord(
        source=source,
        resolution=resolution,
        crop=crop,
        flip=flip,
        caption_dropout=caption_dropout,
        min_size=min_size,
        resize_filter=resize_filter,
        draft=draft,
        latents=latent_cache,
        synthetic=synthetic,
    )
    ds = grain.MapDataset.range(start, end).seed(seed)
    if shuffle:
        ds = ds.shuffle()
    ds = ds.repeat(num_epochs).random_map(load)
    read = grain.ReadOptions(
        num_threads=num_threads, prefetch_buffer_size=max(num_threads, 2 * batch_size)
    )
    it_ds = ds.to_iter_dataset(read)
    if worker_count > 0:
        it_ds = it_ds.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=worker_count, per_worker_buffer_size=worker_buffer_size
            )
        )
    return DataPipeline(
        it_ds,
        batch_size=batch_size,
        tokenize=tokenize,
        drop_remainder=drop_remainder,
        log_skips=log_skips,
    )


def _check_cache(
    cache: LatentCache,
    source: Source,
    fingerprint: str,
    resolution: int,
    crop: str,
    flip: bool,
    resize_filter: str,
    draft: bool,
    min_size: int,
) -> None:
    key = cache.key
    wanted = {
        "dataset": fingerprint,
        "num_records": len(source),
        "fields": list(source.image_fields),
        "resolution": resolution,
        "resize_filter": resize_filter,
        "draft": draft,
        "min_size": min_size,
    }
    wrong = {k: (key.get(k), v) for k, v in wanted.items() if key.get(k) != v}
    if wrong:
        detail = "; ".join(f"{k}: cache {a!r}, pipeline {b!r}" for k, (a, b) in wrong.items())
        raise ValueError(f"latent cache {cache.dir} does not match the pipeline ({detail})")
    if crop != "center":
        raise ValueError("the latent cache holds center crops; use crop='center' with it")
    if flip and not key["flip"]:
        raise ValueError(
            f"latent cache {cache.dir} has no flipped versions; build it with flip=True"
        )
    missing = cache.missing_shards()
    if missing:
        raise ValueError(
            f"latent cache {cache.dir} is incomplete: {len(missing)} of {cache.num_shards} shards "
            "missing; run launch/prepare_data.py"
        )
