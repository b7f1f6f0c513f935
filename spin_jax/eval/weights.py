"""Reading scorer weights (safetensors, no torch) and converting pickled checkpoints once.

The scorers' weights are published as pickled PyTorch checkpoints (``ImageReward.pt``,
``HPS_v2_compressed.pt``, ``sac+logos+ava1-l14-linearMSE.pth``, ``pytorch_model.bin``).
Unpickling can run arbitrary code, so the scorers read safetensors only;
:func:`convert_pickle` (``launch/convert_scorer.py``) turns a trusted pickle into a safetensors
file once, with torch, on explicit opt-in.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from spin_jax.models import weights as _weights
from spin_jax.models.weights import PICKLE_EXTS, read_json  # noqa: F401 (re-exported)


def _pickle_error(path: str) -> ValueError:
    return ValueError(
        f"{path} is a pickled PyTorch checkpoint; the scorers read safetensors only. Convert it "
        f"once with: python launch/convert_scorer.py --input {path} "
        f"--output {os.path.splitext(path)[0]}.safetensors --allow_pickle"
    )


def weight_files(path: str, stem: str = "model") -> list[str]:
    """The safetensors file(s) at ``path`` (a file, or a folder with ``{stem}.safetensors`` or
    its sharded index); pickles get a ValueError that says how to convert them."""
    return _weights.weight_files(path, stem, pickle_error=_pickle_error)


def read_tensors(path: str, stem: str = "model") -> dict[str, np.ndarray]:
    """All tensors at ``path`` (see :func:`weight_files`) as float32 NumPy arrays."""
    return _weights.read_tensors(weight_files(path, stem))


def _unwrap(obj: object, path: str) -> Mapping:
    # Training checkpoints nest the weights ({"state_dict": ...}, {"model": ...}).
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            return _unwrap(obj[key], path)
    if not isinstance(obj, Mapping):
        raise ValueError(
            f"{path}: expected a state dict (a mapping of names to tensors), got "
            f"{type(obj).__name__}"
        )
    return obj


def convert_pickle(input_path: str, output_path: str, *, allow_pickle: bool = False) -> dict:
    """Pickled PyTorch checkpoint -> safetensors (float16/float32 kept, bfloat16 -> float32).

    Needs torch and ``allow_pickle=True`` (unpickling runs code from the file: trusted files
    only). Reads with ``weights_only=True`` first and falls back to a full unpickle only when
    that fails (old checkpoints holding argparse objects). Nested ``state_dict``/``model``
    entries are unwrapped and a ``module.`` prefix on every key is removed; non-tensor entries
    are dropped and listed. Returns ``{"tensors": n, "dropped": [...], "output": path}``.
    """
    if not allow_pickle:
        raise ValueError(
            f"{input_path}: converting a pickled checkpoint unpickles it, which can run code from "
            "the file. Pass --allow_pickle (allow_pickle=True) if you trust it."
        )
    if not os.path.isfile(input_path):
        raise FileNotFoundError(f"checkpoint not found: {input_path}")
    try:
        import torch
    except ImportError:
        raise ImportError(
            "converting a pickled checkpoint needs torch (pip install torch)"
        ) from None
    from safetensors.numpy import save_file

    try:
        obj = torch.load(input_path, map_location="cpu", weights_only=True)
    except Exception:  # non-tensor payloads need the full unpickler
        obj = torch.load(input_path, map_location="cpu", weights_only=False)
    state = _unwrap(obj, input_path)
    if state and all(str(k).startswith("module.") for k in state):
        state = {str(k).removeprefix("module."): v for k, v in state.items()}
    tensors, dropped = {}, []
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            dropped.append(str(key))
            continue
        value = value.detach().cpu()
        if value.dtype not in (torch.float16, torch.float32, torch.int64, torch.int32, torch.bool):
            value = value.float()
        tensors[str(key)] = np.array(value.numpy(), order="C")  # keeps 0-d tensors 0-d
    if not tensors:
        raise ValueError(f"{input_path}: no tensors found")
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    tmp = output_path + ".tmp"
    save_file(tensors, tmp, metadata={"format": "pt", "source": os.path.basename(input_path)})
    os.replace(tmp, output_path)
    return {"tensors": len(tensors), "dropped": dropped, "output": output_path}
