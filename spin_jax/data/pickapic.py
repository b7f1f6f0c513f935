"""Pick-a-Pic v2 read from its published parquet shards in a local folder.

Each parquet row is one comparison: `caption`, two encoded images `jpg_0`, `jpg_1` and the
preference `label_0`, `label_1` (1/0: image 0 preferred, 0/1: image 1, 0.5/0.5: tie); other
columns are ignored. Views over the non-tie rows, in file-name then row order:

- `winners` (SFT, SPIN): one record per pair, the preferred image.
- `pairs` (DPO): `image` = preferred, `image_l` = the other.
- `kto`: two records per pair, index 2j the preferred image (label 1), 2j + 1 the other (label 0).

Ties are dropped and counted; rows whose labels are missing or not one of the three patterns are
dropped and counted too (`summary()`, and a log line when the source opens).

Random access reads one column of one parquet row group and keeps the last few in memory, so
sequential passes (building the latent cache or the TFDS dataset) are fast. Shuffled training
straight from parquet is fast only if the row groups are small; otherwise build the TFDS
(array_record) dataset or the latent cache first (a warning says so).
"""

from __future__ import annotations

import collections
import glob
import os
import threading
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from absl import logging

from spin_jax.data.sources import VIEWS, Source, hash_json
from spin_jax.files import LruCache

REQUIRED_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")
LARGE_ROW_GROUP = 256

_PARQUET_READ = threading.Lock()


def find_parquet_files(path: str, split: str | None) -> list[str]:
    """Sorted parquet files under `path` (recursively) whose name starts with `{split}-`."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"pickapic: folder {path} does not exist")
    pattern = f"{split}-*.parquet" if split else "*.parquet"
    files = sorted(glob.glob(os.path.join(path, "**", pattern), recursive=True))
    if not files:
        raise FileNotFoundError(
            f"pickapic: no parquet files matching {pattern!r} under {path} "
            "(Pick-a-Pic v2 shards are named like data/train-00000-of-00645.parquet)"
        )
    return files


def _labels(column: pa.ChunkedArray) -> np.ndarray:
    return np.asarray(column.cast(pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)


class PickapicSource(Source):
    """Pick-a-Pic v2 records from local parquet shards; see the module docstring."""

    def __init__(
        self,
        path: str,
        *,
        view: str = "winners",
        split: str | None = "train",
        row_group_cache: int = 4,
    ):
        if view not in VIEWS:
            raise ValueError(f"pickapic view {view!r}; expected one of {VIEWS}")
        self.path = os.path.abspath(path)
        self.view = view
        self.split = split
        self.image_fields = ("image", "image_l") if view == "pairs" else ("image",)
        self._files = find_parquet_files(self.path, split)
        self._row_group_cache = row_group_cache

        # Check every file's columns before reading any data.
        metas = []
        for f in self._files:
            try:
                pf = pq.ParquetFile(f)
            except Exception as e:  # noqa: BLE001 - pyarrow raises several types here.
                raise ValueError(f"pickapic: {f} is not a readable parquet file ({e})") from None
            missing = [c for c in REQUIRED_COLUMNS if c not in pf.schema_arrow.names]
            if missing:
                raise ValueError(
                    f"pickapic: {f} lacks column(s) {missing}; Pick-a-Pic v2 shards have "
                    f"{list(REQUIRED_COLUMNS)}"
                )
            metas.append(pf.metadata)

        # Per file: cumulative row offsets of its row groups.
        self._rg_offsets = []
        max_rg = 0
        for md in metas:
            sizes = [md.row_group(g).num_rows for g in range(md.num_row_groups)]
            self._rg_offsets.append(np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))
            max_rg = max([max_rg] + sizes)

        file_ids, rows, winners, captions = [], [], [], []
        counts = collections.Counter()
        for fid, f in enumerate(self._files):
            table = pq.read_table(f, columns=["caption", "label_0", "label_1"])
            l0, l1 = _labels(table["label_0"]), _labels(table["label_1"])
            with np.errstate(invalid="ignore"):
                valid = np.isfinite(l0) & np.isfinite(l1) & (np.abs(l0 + l1 - 1.0) < 1e-6)
                valid &= np.isin(l0, [0.0, 0.5, 1.0])
            tie = valid & (l0 == 0.5)
            keep = valid & ~tie
            counts["rows"] += len(l0)
            counts["ties"] += int(tie.sum())
            counts["invalid_label"] += int((~valid).sum())
            idx = np.nonzero(keep)[0]
            file_ids.append(np.full(len(idx), fid, np.int32))
            rows.append(idx.astype(np.int64))
            winners.append(np.where(l0[idx] == 1.0, 0, 1).astype(np.int8))
            captions.append(table["caption"].combine_chunks().cast(pa.large_string()).take(idx))
        self._file_id = np.concatenate(file_ids)
        self._row = np.concatenate(rows)
        self._winner = np.concatenate(winners)
        self._captions = pa.concat_arrays(captions) if captions else pa.array([], pa.large_string())
        counts["pairs"] = len(self._row)
        self._counts = dict(counts)
        if counts["invalid_label"]:
            logging.warning(
                "pickapic: dropped %d rows with missing or invalid labels (of %d)",
                counts["invalid_label"],
                counts["rows"],
            )
        if counts["pairs"] == 0:
            raise ValueError(
                f"pickapic: no non-tie pairs in {len(self._files)} file(s) under {self.path}"
            )
        if max_rg > LARGE_ROW_GROUP:
            logging.warning(
                "pickapic: row groups of up to %d rows; random access reads a whole row group "
                "column, so shuffled training from parquet is slow. Build the TFDS dataset or "
                "the latent cache (launch/prepare_data.py) for training.",
                max_rg,
            )
        self._groups = LruCache(self._row_group_cache)
        self._handles = LruCache(len(self._files))

    def __len__(self) -> int:
        n = len(self._row)
        return 2 * n if self.view == "kto" else n

    def __repr__(self) -> str:
        return f"PickapicSource({self.path!r}, view={self.view!r}, split={self.split!r}, n={len(self)})"

    def summary(self) -> dict[str, int]:
        return dict(self._counts)

    def _pair(self, index: int) -> tuple[int, int]:
        """(pair number, 0 for the preferred image / 1 for the other)."""
        index = self._check_index(index)
        return (index // 2, index % 2) if self.view == "kto" else (index, 0)

    def meta(self, index: int) -> dict[str, Any]:
        j, which = self._pair(index)
        caption = self._captions[j].as_py()
        record = {"index": int(index), "text": caption if caption is not None else ""}
        if self.view == "kto":
            record["label"] = 1 - which
        return record

    def _column(self, fid: int, group: int, column: str) -> pa.Array:
        return self._groups.get((fid, group, column), self._read_column)

    def _read_column(self, key: tuple[int, int, str]) -> pa.Array:
        fid, group, column = key
        handle = self._handles.get(fid, lambda f: pq.ParquetFile(self._files[f]))
        # A ParquetFile is not safe to read from several threads at once (the latent cache's
        # loader threads crashed in read_row_group); image decoding stays parallel.
        with _PARQUET_READ:
            return handle.read_row_group(group, columns=[column]).column(0).combine_chunks()

    def _read_image(self, j: int, column: str) -> tuple[bytes | None, str | None]:
        fid, row = int(self._file_id[j]), int(self._row[j])
        offsets = self._rg_offsets[fid]
        group = int(np.searchsorted(offsets, row, side="right") - 1)
        try:
            value = self._column(fid, group, column)[row - int(offsets[group])].as_py()
        except Exception as e:  # noqa: BLE001 - a damaged shard must not stop the run.
            return None, f"{self._files[fid]} row {row} {column}: {type(e).__name__}: {e}"
        if value is None:
            return None, f"{self._files[fid]} row {row}: {column} is null"
        return value, None

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.meta(index)
        j, which = self._pair(index)
        w = int(self._winner[j])
        columns = {"image": f"jpg_{w if which == 0 else 1 - w}"}
        if self.view == "pairs":
            columns["image_l"] = f"jpg_{1 - w}"
        for field, column in columns.items():
            value, problem = self._read_image(j, column)
            record[field] = value
            if problem is not None:
                record["error"] = "missing_image"
                record["detail"] = problem
        return record

    def fingerprint(self) -> str:
        files = [
            (os.path.relpath(f, self.path), os.path.getsize(f), int(o[-1]))
            for f, o in zip(self._files, self._rg_offsets, strict=True)
        ]
        return hash_json(
            {"kind": "pickapic", "view": self.view, "split": self.split, "files": files}
        )
