"""Finding and reading weight files with safetensors + NumPy (no torch at run time).

Shared by the Stable Diffusion loader and the evaluation scorers. Pickled checkpoints
(.bin/.pt/.pth/.ckpt) are refused unless the caller opts in, because unpickling runs code.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import numpy as np

PICKLE_EXTS = (".bin", ".pt", ".pth", ".ckpt")


def _default_pickle_error(path: str) -> ValueError:
    return ValueError(
        f"{path} is a pickled checkpoint; unpickling runs arbitrary code, so it is refused. "
        "Convert it to safetensors, or pass allow_pickle=True if you trust it."
    )


def read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"missing file: {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def weight_files(
    path: str,
    stem: str = "model",
    *,
    allow_pickle: bool = False,
    pickle_error: Callable[[str], Exception] = _default_pickle_error,
) -> list[str]:
    """The weight file(s) at ``path``: a file, or a folder with ``{stem}.safetensors`` or the
    shards of its index (or, with ``allow_pickle``, a pickled checkpoint)."""
    if os.path.isfile(path):
        if path.endswith(PICKLE_EXTS) and not allow_pickle:
            raise pickle_error(path)
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"weights not found: {path}")
    single = os.path.join(path, f"{stem}.safetensors")
    if os.path.isfile(single):
        return [single]
    index = single + ".index.json"
    if os.path.isfile(index):
        shards = sorted(set(read_json(index)["weight_map"].values()))
        files = [os.path.join(path, s) for s in shards]
        for f in files:
            if not os.path.isfile(f):
                raise FileNotFoundError(f"missing weight shard {f} listed in {index}")
        return files
    pickles = sorted(
        n for n in os.listdir(path) if n.endswith(PICKLE_EXTS) and not n.startswith("optimizer")
    )
    if pickles and allow_pickle:
        return [os.path.join(path, pickles[0])]
    if pickles:
        raise pickle_error(os.path.join(path, pickles[0]))
    raise FileNotFoundError(f"no weights in {path}: expected {stem}.safetensors")


def read_tensors(files: list[str]) -> dict[str, np.ndarray]:
    """Every tensor of ``files`` as float32 NumPy arrays (pickles only if listed: needs torch)."""
    from safetensors import safe_open

    out: dict[str, np.ndarray] = {}
    for path in files:
        if path.endswith(PICKLE_EXTS):
            try:
                import torch
            except ImportError:
                raise ImportError(f"reading the pickled checkpoint {path} needs torch") from None
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state)
            out.update({k: v.float().numpy() for k, v in state.items() if hasattr(v, "numpy")})
            continue
        try:
            with safe_open(path, framework="flax") as f:  # flax reads bfloat16 too
                for k in f.keys():
                    out[k] = np.asarray(f.get_tensor(k), dtype=np.float32)
        except Exception as e:  # a truncated or foreign file
            raise ValueError(f"cannot read safetensors file {path}: {e}") from None
    return out
