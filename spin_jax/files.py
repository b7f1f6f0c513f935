"""File writing shared by the trainer, the caches, model export, evaluation and benchmarks."""

from __future__ import annotations

import json
import os
import uuid
from typing import Any


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
