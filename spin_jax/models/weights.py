"""Finding and reading weight files with safetensors + NumPy (no torch at run time).

Shared by the Stable Diffusion loader and the evaluation scorers. Pickled checkpoints
(.bin/.pt/.pth/.ckpt) are refused unless the caller opts in, because unpickling runs code.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import mmap
import os
import sys
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


# safetensors dtype names -> NumPy dtypes (bfloat16 from ml_dtypes, a dependency of jax).
def _numpy_dtypes() -> dict[str, np.dtype]:
    import ml_dtypes

    return {
        "F64": np.dtype(np.float64),
        "F32": np.dtype(np.float32),
        "F16": np.dtype(np.float16),
        "BF16": np.dtype(ml_dtypes.bfloat16),
        "I64": np.dtype(np.int64),
        "I32": np.dtype(np.int32),
        "I16": np.dtype(np.int16),
        "I8": np.dtype(np.int8),
        "U8": np.dtype(np.uint8),
        "BOOL": np.dtype(np.bool_),
    }


_MADV_POPULATE_READ = 22  # Linux >= 5.14


@functools.cache
def _madvise():
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


def prefault(buf: np.ndarray, chunk: int = 64 << 20) -> None:
    """Reads every page of the page-aligned, memory-mapped ``buf`` in now (read-ahead, and
    every page mapped at once rather than faulted one by one by the copy), without holding the
    GIL, unlike ``MAP_POPULATE``, which Python's ``mmap`` runs under it, stalling a load's
    other thread for as long: ``madvise(MADV_POPULATE_READ)`` through ctypes (which releases
    the GIL), ``chunk`` bytes per call so that other threads' mmaps are not held up long
    behind the process's memory-map lock; where the kernel lacks it, nothing (pages then
    fault in on first use)."""
    fn = _madvise() if sys.platform.startswith("linux") else None
    address, n = buf.ctypes.data, buf.nbytes
    if fn is None or not n or fn(address, min(n, chunk), _MADV_POPULATE_READ) != 0:
        return
    for start in range(chunk, n, chunk):
        fn(address + start, min(chunk, n - start), _MADV_POPULATE_READ)


def _map(fileno: int, populate: bool):
    mm = mmap.mmap(fileno, 0, access=mmap.ACCESS_READ)
    if populate:  # read ahead and map every page now, so that first uses do not fault one by one
        prefault(np.frombuffer(mm, np.uint8))
    return mm


def map_safetensors(path: str, *, populate: bool = True) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as a read-only NumPy view of the memory-mapped file,
    in the file's dtype: nothing is copied. ``populate`` reads the file in and maps its pages
    at once (:func:`prefault`), which is faster than faulting them in one by one when
    every tensor is used; without it nothing is read until a view is used.

    The header is parsed here (8-byte little-endian length, JSON of name -> dtype, shape,
    data offsets); a truncated or foreign file is a ValueError naming it.
    """
    dtypes = _numpy_dtypes()
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n <= 0 or 8 + n > size:
                raise ValueError("not a safetensors file (bad header length)")
            header = json.loads(f.read(n))
            mm = _map(f.fileno(), populate) if size > 8 + n else b""
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read safetensors file {path}: {e}") from None
    data = np.frombuffer(mm, np.uint8)[8 + n :] if len(mm) else np.zeros(0, np.uint8)
    out: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = dtypes[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(
                f"cannot read safetensors file {path}: tensor {name!r} has an unsupported "
                f"entry {info!r}"
            ) from None
        count = int(np.prod(shape, dtype=np.int64))
        if end - begin != count * dtype.itemsize or end > data.size or begin < 0:
            raise ValueError(
                f"cannot read safetensors file {path}: tensor {name!r} ({info['dtype']} "
                f"{list(shape)}) does not fit its data offsets [{begin}, {end}] "
                f"(file truncated?)"
            )
        out[name] = data[begin:end].view(dtype.newbyteorder("<")).reshape(shape)
    return out


def read_tensors(files: list[str], dtype: object = np.float32) -> dict[str, np.ndarray]:
    """Every tensor of ``files`` (pickles only if listed: needs torch).

    ``dtype``: float tensors are returned in this dtype (float32 files as zero-copy read-only
    views of the memory-mapped file, others cast); None keeps every tensor in the file's dtype,
    still as lazy views, for a converter that casts while it copies.
    """
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
        tensors = map_safetensors(path)
        if dtype is not None:
            want = np.dtype(dtype)
            tensors = {
                k: v if v.dtype == want or v.dtype.kind in "iub" else v.astype(want)
                for k, v in tensors.items()
            }
        out.update(tensors)
    return out
