"""Files shared by the trainer, the caches, model export, evaluation and the benchmarks: atomic
writes, and a small cache of opened files."""

from __future__ import annotations

import collections
import json
import os
import threading
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np


def write_json(path: str, obj: Any, *, sort_keys: bool = False) -> None:
    """Writes ``obj`` as indented JSON through a temporary file renamed over ``path``, so a
    reader, or a run killed mid-write, sees the old file or the new one, never half of one.
    Values JSON cannot hold (NumPy scalars, paths) are written as their ``str``."""
    tmp = f"{path}.tmp.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=sort_keys, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_npy(path: str, array: np.ndarray) -> None:
    """``np.save`` through a temporary file renamed over ``path`` (as ``write_json``)."""
    tmp = f"{path}.tmp.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class LruCache:
    """The ``limit`` most recently used values opened by key (shards of a store as memory maps,
    which each hold a file descriptor; parquet row groups), shared by threads. A pickled copy
    (in a data worker) starts empty: open files stay in the process that opened them."""

    def __init__(self, limit: int = 32):
        self.limit = limit
        self._reset()

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._open: collections.OrderedDict = collections.OrderedDict()

    def get(self, key: Any, load: Callable[[Any], Any]) -> Any:
        """The value of ``key``, opened by ``load(key)`` unless it is open already."""
        with self._lock:
            if key in self._open:
                self._open.move_to_end(key)
                return self._open[key]
        value = load(key)
        with self._lock:
            self._open[key] = value
            while len(self._open) > self.limit:
                self._open.popitem(last=False)
        return value

    def __getstate__(self) -> dict[str, Any]:
        return {"limit": self.limit}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.limit = state["limit"]
        self._reset()
