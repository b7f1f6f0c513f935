"""What a run tells its user: metrics (JSON lines + TensorBoard), progress bars, grids, the
start-up report. Only process 0 writes or prints."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import jax
import numpy as np


def is_main() -> bool:
    return jax.process_index() == 0


def say(line: str) -> None:
    """One line on process 0's stdout (and the log)."""
    import logging

    logging.getLogger("spin_jax").info(line)
    if is_main():
        print(line, flush=True)


class MetricWriter:
    """``metrics.jsonl`` plus TensorBoard events, on process 0.

    ``resume_at(step)`` drops rows past ``step`` (written by an attempt that died before its
    next checkpoint), so a resumed run has exactly one row per step.
    """

    def __init__(self, workdir: str):
        self.enabled = is_main()
        self.tb = None
        if not self.enabled:
            return
        self.path = os.path.join(workdir, "metrics.jsonl")
        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(os.path.join(workdir, "tb"))
        except ImportError:  # TensorBoard events are optional; the JSON lines are not.
            self.tb = None

    def resume_at(self, step: int) -> None:
        if not self.enabled or not os.path.isfile(self.path):
            return
        with open(self.path) as f:
            lines = f.readlines()
        keep = []
        for line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
            if int(row.get("step", 0)) <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
        if len(keep) != len(lines):
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(keep)
            os.replace(tmp, self.path)

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
        if self.tb is not None:
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


def progress(total: int, desc: str, unit: str, initial: int = 0):
    from tqdm import tqdm

    # In a log file (no terminal) a bar line every 30 s instead of ten a second.
    interval = 0.1 if sys.stderr.isatty() else 30.0
    return tqdm(total=total, desc=desc, unit=unit, initial=initial, disable=not is_main(),
                dynamic_ncols=True, mininterval=interval)  # fmt: skip
