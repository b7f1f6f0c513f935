"""Random-access record sources and what they share.

A source is a random-access record source (`len`, `__getitem__`) with a stable order: the same
files give the same index for the same record on every host and every run, which is what the
latent cache and the synthetic-sample store key on. Records are dicts:

    {"index": int, "text": str, "image": bytes}          # winners view, imagefolder
    {..., "image_l": bytes}                              # pairs view (image = winner)
    {..., "label": int}                                  # kto view (1 desirable, 0 not)

A record that cannot be read carries {"error": reason, "detail": str} instead of crashing; the
latent cache skips and counts it. `meta(i)` returns the record without image bytes (cheap: the
latent-cache path and sample generation never touch images).
"""

from __future__ import annotations

import abc
import hashlib
import json
from typing import Any

VIEWS = ("winners", "pairs", "kto")
SOURCE_KINDS = ("imagefolder", "pickapic", "tfds")


class Source(abc.ABC):
    """Base class of the record sources."""

    # Record fields that hold encoded images, in the order the latent cache stores them.
    image_fields: tuple[str, ...] = ("image",)
    view: str = "winners"

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def __getitem__(self, index: int) -> dict[str, Any]: ...

    @abc.abstractmethod
    def meta(self, index: int) -> dict[str, Any]:
        """The record without its image bytes."""

    @abc.abstractmethod
    def fingerprint(self) -> str:
        """A hash that changes when the records (or their order) change."""

    def text(self, index: int) -> str:
        return self.meta(index)["text"]

    def summary(self) -> dict[str, int]:
        """Counts of rows left out when the index was built (ties, invalid labels)."""
        return {}

    def _check_index(self, index: int) -> int:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"{type(self).__name__}: index {index} out of range [0, {len(self)})")
        return index


def hash_json(obj: Any) -> str:
    """sha256 of the canonical JSON of obj (sorted keys), hex, first 32 chars."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def shard_range(
    num_records: int, shard_index: int, shard_count: int, drop_remainder: bool = False
) -> tuple[int, int]:
    """[start, end) of the contiguous slice of `shard_index` out of `shard_count`.

    Contiguous and even: with drop_remainder every shard has
    num_records // shard_count records; otherwise the first `num_records % shard_count` shards
    have one more.
    """
    if shard_count <= 0 or not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index={shard_index} shard_count={shard_count}")
    per = num_records // shard_count
    start, end = per * shard_index, per * (shard_index + 1)
    rest = num_records % shard_count
    if rest and not drop_remainder:
        start += min(shard_index, rest)
        end += min(shard_index + 1, rest)
    return start, end


def open_source(
    kind: str,
    path: str,
    *,
    view: str = "winners",
    split: str = "train",
    caption_field: str = "text",
) -> Source:
    """Opens a source by kind: "imagefolder", "pickapic" (parquet folder) or "tfds".

    imagefolder ignores `view` and `split` except that only the winners view exists for it.
    """
    if view not in VIEWS:
        raise ValueError(f"data view {view!r}; expected one of {VIEWS}")
    if kind == "imagefolder":
        from spin_jax.data.imagefolder import ImageFolderSource

        if view != "winners":
            raise ValueError(
                f"imagefolder has only the 'winners' view (one image per caption), got {view!r}"
            )
        return ImageFolderSource(path, caption_field=caption_field)
    if kind == "pickapic":
        from spin_jax.data.pickapic import PickapicSource

        return PickapicSource(path, view=view, split=split)
    if kind == "tfds":
        from spin_jax.data.tfds_pickapic import TfdsSource

        return TfdsSource(path, view=view, split=split)
    raise ValueError(f"data source {kind!r}; expected one of {SOURCE_KINDS}")
