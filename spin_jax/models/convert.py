"""Weight conversion between PyTorch state dicts (diffusers/transformers names) and Flax params.

Flax module names mirror the PyTorch module paths: a numeric path part is joined to the one
before it (``down_blocks.0.resnets.1.conv1.weight`` lives at
``down_blocks_0/resnets_1/conv1/kernel``). Conversion is therefore a rename plus a transpose,
driven by the Flax parameter template, and the same code runs in both directions.
"""

from __future__ import annotations

import itertools
import mmap
import os
import re
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np

Params = dict[str, Any]

# Buffers that PyTorch models save but that are not parameters.
_IGNORED_SUFFIXES = ("position_ids", "num_batches_tracked")

# Legacy diffusers attention names (VAE mid-block in old checkpoints) -> current names.
_LEGACY_RENAMES = (
    (re.compile(r"\.query\.(weight|bias)$"), r".to_q.\1"),
    (re.compile(r"\.key\.(weight|bias)$"), r".to_k.\1"),
    (re.compile(r"\.value\.(weight|bias)$"), r".to_v.\1"),
    (re.compile(r"\.proj_attn\.(weight|bias)$"), r".to_out.0.\1"),
)


class WeightMismatchError(ValueError):
    """A checkpoint tensor does not fit the model: wrong name, missing, or wrong shape."""


def torch_key_to_path(key: str) -> tuple[tuple[str, ...], str]:
    """``a.0.b.weight`` -> ((``a_0``, ``b``), ``weight``)."""
    parts = key.split(".")
    leaf = parts[-1]
    path: list[str] = []
    for p in parts[:-1]:
        if p.isdigit() and path:
            path[-1] = f"{path[-1]}_{p}"
        else:
            path.append(p)
    return tuple(path), leaf


# PyTorch module names that end in "_<digit>" themselves (diffusers' TimestepEmbedding), which the
# reverse mapping must not split into a list index.
_LITERAL_NAMES = frozenset({"linear_1", "linear_2"})


def path_to_torch_key(path: tuple[str, ...], leaf: str) -> str:
    parts = []
    for p in path:
        m = None if p in _LITERAL_NAMES else re.fullmatch(r"(.*[A-Za-z])_(\d+)", p)
        parts.extend([m.group(1), m.group(2)] if m else [p])
    return ".".join([*parts, leaf])


def _get(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = tree
    for p in path:
        if not isinstance(node, Mapping) or p not in node:
            return None
        node = node[p]
    return node


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, (*prefix, k)))
        else:
            out[(*prefix, k)] = v
    return out


# How a stored tensor becomes a Flax leaf: "none", "linear" (transpose), "conv" (OIHW -> HWIO)
# or "conv1x1_linear" (a 1x1 conv stored where a linear layer is expected).
def _layout(leaf_name: str, ndim: int, stored: tuple[int, ...], expected: tuple[int, ...]) -> str:
    if leaf_name == "kernel":
        if ndim == 4 and len(expected) == 4:
            return "conv"
        if ndim == 4 and len(expected) == 2 and tuple(stored[2:]) == (1, 1):
            return "conv1x1_linear"
        if ndim == 2:
            return "linear"
    return "none"


def _apply_layout(layout: str, value: np.ndarray) -> np.ndarray:
    """The layout change as a NumPy view (nothing is copied)."""
    if layout == "conv":
        return value.transpose(2, 3, 1, 0)
    if layout == "conv1x1_linear":
        return value[:, :, 0, 0].T
    if layout == "linear":
        return value.T
    return value


def _to_flax(leaf_name: str, value: np.ndarray, expected_shape: tuple[int, ...]) -> np.ndarray:
    layout = _layout(leaf_name, value.ndim, tuple(value.shape), tuple(expected_shape))
    return _apply_layout(layout, value)


def _guess_layout(key: str, value: np.ndarray) -> str:
    """The layout a tensor most likely needs, from its name and rank alone (no model)."""
    if not key.endswith(".weight"):
        return "none"
    if value.ndim == 4:
        return "conv"
    if value.ndim == 2:
        module = key[: -len(".weight")].rsplit(".", 1)[-1]
        return "none" if module.endswith("embedding") else "linear"
    return "none"


def _canonical_key(key: str) -> str | None:
    """The current diffusers name of a stored tensor; None for buffers that are not params."""
    if key.endswith(_IGNORED_SUFFIXES):
        return None
    for pattern, repl in _LEGACY_RENAMES:
        key = pattern.sub(repl, key)
    return key


def prepare(
    state_dict: Mapping[str, np.ndarray],
    dtype: Any = np.float32,
    arena: np.ndarray | None = None,
) -> dict[str, tuple[str, np.ndarray]]:
    """Converts every float tensor before the model's parameter template is known, guessing
    its layout from its name and rank (:func:`_guess_layout`): ``{key: (layout, array)}``.

    This lets the one copy of a load run while the networks are still being traced;
    :func:`torch_to_flax` with ``prepared=`` then checks every tensor against the template
    and reuses the prepared array where the guess was right (re-copying only where not).
    """
    views, layouts = {}, {}
    for key, value in state_dict.items():
        if not isinstance(value, np.ndarray) or np.dtype(value.dtype).kind in "iub":
            continue
        layouts[key] = _guess_layout(key, value)
        views[key] = _apply_layout(layouts[key], value)
    return {k: (layouts[k], v) for k, v in materialize(views, dtype, arena).items()}


def _to_torch(leaf_name: str, value: np.ndarray) -> np.ndarray:
    if leaf_name == "kernel":
        if value.ndim == 4:
            value = value.transpose(3, 2, 0, 1)
        elif value.ndim == 2:
            value = value.T
    return value


# Host-side copy tuning: leaves are copied by a few threads (NumPy releases the GIL while it
# copies), a transposed leaf in tiles so reads and writes stay cache-friendly.
# Measured on 2 vCPUs: the copy into warm memory gains nothing from a second thread, but the
# first touch of fresh pages does (1.0-2.3 s instead of 3.8-9.0 s for the SD 1.5 UNet), so
# every machine copies with at least two; larger ones with up to four.
_COPY_THREADS = max(2, min(4, (os.cpu_count() or 1) // 4))
_ALIGN = 64  # bytes; XLA's CPU client aliases (does not copy) host buffers aligned like this


def allocate(nbytes: int) -> np.ndarray:
    """``nbytes`` uninitialised bytes starting on an ``_ALIGN`` boundary.

    Large buffers are anonymous memory mappings of ordinary pages, faulted in by the copy that
    fills them (several threads, without the GIL). Measured on the project's VMs, for 3.4 GB:
    huge pages (``MADV_HUGEPAGE``, as NumPy advises for large arrays) cost 0.7-10 s, the kernel
    compacting memory to find them, ordinary pages 1.0-2.0 s with two threads; faulting in up
    front (``MAP_POPULATE``) held the GIL and ``MADV_POPULATE_WRITE`` the process's memory-map
    lock, stalling the thread that traces the networks meanwhile.
    """
    if nbytes >= (64 << 20) and hasattr(mmap, "MAP_ANONYMOUS"):
        try:
            mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            return np.frombuffer(mm, np.uint8)  # page-aligned, writable, freed with its views
        except (OSError, ValueError):
            pass
    raw = np.empty(nbytes + _ALIGN, np.uint8)
    start = -raw.ctypes.data % _ALIGN
    return raw[start : start + nbytes]


_STAGING = threading.local()  # per copying thread: a reused (so already faulted-in) buffer


def _staged_cast(src: np.ndarray, dtype: np.dtype) -> np.ndarray | None:
    """``src`` cast to ``dtype`` through a reused contiguous buffer, as the same (permuted)
    view: a contiguous cast is several times faster than a strided one. None when ``src`` is
    not a permutation of a contiguous array."""
    order = tuple(int(i) for i in np.argsort([-abs(st) for st in src.strides], kind="stable"))
    base = src.transpose(order)
    if not base.flags.c_contiguous:
        return None
    nbytes = base.size * dtype.itemsize
    buf = getattr(_STAGING, "buf", None)
    if buf is None or buf.nbytes < nbytes:
        buf = _STAGING.buf = np.empty(nbytes, np.uint8)
    stage = buf[:nbytes].view(dtype).reshape(base.shape)
    np.copyto(stage, base, casting="unsafe")
    return stage.transpose(np.argsort(order))


_TILE = 256  # rows and columns of one tile of a 2-byte transposed copy


def _copy_into(dst: np.ndarray, src: np.ndarray) -> None:
    """``dst[...] = src`` (casting), in blocks when ``src`` is a transposed view, so strided
    reads and writes stay in cache: 4-byte items along ``dst``'s last axis (each block reads
    contiguous rows of the stored tensor), 2-byte items in ``_TILE``-square tiles of the two largest
    axes. Measured on 2 vCPUs, SD-sized kernels, ms per MB: float32 2.5 in blocks, 2.3 in
    tiles (but the SD 1.5 load 8% slower), 3.6 in one copy; bfloat16 6.7 / 3.3 / 4.0."""
    if src.flags.c_contiguous or dst.ndim < 2 or dst.size < (1 << 16):
        np.copyto(dst, src, casting="unsafe")
        return
    if src.dtype != dst.dtype:
        staged = _staged_cast(src, dst.dtype)
        src = src if staged is None else staged
    if dst.itemsize >= 4:
        n, block = dst.shape[-1], 16 if dst.ndim > 2 else 8  # measured best on x86
        for j in range(0, n, block):
            np.copyto(dst[..., j : j + block], src[..., j : j + block], casting="unsafe")
        return
    axes = [int(ax) for ax in np.argsort(dst.shape)[-2:] if dst.shape[ax] > _TILE]
    for starts in itertools.product(*(range(0, dst.shape[ax], _TILE) for ax in axes)):
        tile = [slice(None)] * dst.ndim
        for ax, start in zip(axes, starts, strict=True):
            tile[ax] = slice(start, start + _TILE)
        np.copyto(dst[tuple(tile)], src[tuple(tile)], casting="unsafe")


def _padded(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


def arena_bytes(arrays: Any, dtype: Any = np.float32) -> int:
    """Bytes :func:`materialize` needs at most for the float arrays among ``arrays`` in
    ``dtype`` (integer buffers such as ``position_ids`` are never parameters)."""
    itemsize = np.dtype(dtype).itemsize
    return sum(
        _padded(int(np.prod(a.shape, dtype=np.int64)) * itemsize)
        for a in arrays
        if np.dtype(a.dtype).kind not in "iub"
    )


def materialize(
    leaves: Mapping[tuple[str, ...], np.ndarray],
    dtype: Any = np.float32,
    arena: np.ndarray | None = None,
) -> dict[tuple[str, ...], np.ndarray]:
    """Copies every (possibly lazy, transposed, other-dtype) array into one aligned host buffer
    in ``dtype``, C-contiguous, one leaf per 64-byte-aligned slice, with a few threads.
    ``arena``: a buffer from :func:`allocate` to use (a new one if None or too small).

    The result is what a device transfer wants: on a CPU backend ``jax.device_put`` aliases
    these slices instead of copying them, elsewhere each is one host-to-device copy.
    """
    dtype = np.dtype(dtype)
    offsets, total = {}, 0
    for path, value in leaves.items():
        offsets[path] = total
        nbytes = int(np.prod(value.shape, dtype=np.int64)) * dtype.itemsize
        total += _padded(nbytes)
    if arena is None or arena.nbytes < total:
        arena = allocate(max(total, 1))
    out = {}
    for path, value in leaves.items():
        nbytes = int(np.prod(value.shape, dtype=np.int64)) * dtype.itemsize
        start = offsets[path]
        out[path] = arena[start : start + nbytes].view(dtype).reshape(value.shape)
    jobs = sorted(leaves, key=lambda p: -out[p].size)  # big ones first: threads finish together
    if _COPY_THREADS > 1 and len(jobs) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(_COPY_THREADS) as pool:
            for f in [pool.submit(_copy_into, out[p], leaves[p]) for p in jobs]:
                f.result()
    else:
        for p in jobs:
            _copy_into(out[p], leaves[p])
    return out


def torch_to_flax(
    state_dict: Mapping[str, np.ndarray],
    template: Mapping[str, Any],
    *,
    source: str = "checkpoint",
    dtype: Any = np.float32,
    arena: np.ndarray | None = None,
    prepared: Mapping[str, tuple[str, np.ndarray]] | None = None,
) -> Params:
    """Converts a PyTorch-named state dict into a Flax params tree shaped like ``template``.

    ``template`` is a params tree (arrays or ``jax.ShapeDtypeStruct``), usually from
    ``jax.eval_shape(module.init, ...)``. Every template leaf must be filled exactly once and
    every tensor must land somewhere; otherwise a ``WeightMismatchError`` names the tensors.

    All in NumPy: renames and transposes are views, and one pass copies (and casts to
    ``dtype``) every tensor into a single aligned host buffer (:func:`materialize`). The
    state dict's arrays may be lazy views of memory-mapped files in any float dtype.
    ``prepared``: the result of :func:`prepare` on the same state dict (same ``dtype``), whose
    arrays are used where their layout is the one the template asks for.
    """
    flat_template = _flatten(template)
    filled: dict[tuple[str, ...], np.ndarray] = {}
    unexpected = []
    reused: dict[tuple[str, ...], np.ndarray] = {}
    for stored_key, value in state_dict.items():
        key = _canonical_key(stored_key)
        if key is None:
            continue
        path, leaf = torch_key_to_path(key)
        node = _get(template, path)
        if not isinstance(node, Mapping):
            unexpected.append(key)
            continue
        if leaf == "bias":
            names = ["bias"]
        elif leaf == "weight":
            names = [n for n in ("kernel", "scale", "embedding") if n in node]
        else:
            names = [leaf] if leaf in node else []
        if len(names) != 1:
            unexpected.append(key)
            continue
        flax_path = (*path, names[0])
        expected = tuple(flat_template[flax_path].shape)
        value = value if isinstance(value, np.ndarray) else np.asarray(value)
        actual = tuple(value.shape)
        layout = _layout(names[0], value.ndim, actual, expected)
        view = _apply_layout(layout, value)
        if tuple(view.shape) != expected:
            raise WeightMismatchError(
                f"{source}: tensor '{key}' has shape {actual} but the model expects "
                f"{tuple(_to_torch(names[0], np.empty(expected)).shape)} "
                f"(Flax '{'/'.join(flax_path)}' {expected})"
            )
        done = prepared.get(stored_key) if prepared is not None else None
        if done is not None and done[1].dtype == np.dtype(dtype):
            guessed, array = done
            if guessed == layout:
                reused[flax_path] = array
                continue
            if guessed == "conv" and layout == "conv1x1_linear":
                reused[flax_path] = array.reshape(expected)  # HWIO (1, 1, I, O) is (I, O)
                continue
        filled[flax_path] = view
    missing = [
        path_to_torch_key(p[:-1], "weight" if p[-1] in ("kernel", "scale", "embedding") else p[-1])
        for p in flat_template
        if p not in filled and p not in reused
    ]
    if unexpected or missing:
        msg = [f"{source}: weights do not match the model configuration."]
        if missing:
            msg.append(f"missing tensors ({len(missing)}): {', '.join(sorted(missing)[:10])}")
        if unexpected:
            msg.append(
                f"unexpected tensors ({len(unexpected)}): {', '.join(sorted(unexpected)[:10])}"
            )
        raise WeightMismatchError("\n  ".join(msg))
    out: Params = {}
    if filled:  # (a prepared load's arena is taken: the few re-copied leaves get their own)
        leaves = {**materialize(filled, dtype, None if prepared else arena), **reused}
    else:
        leaves = reused
    for path in flat_template:  # the template's order, whatever the file's
        value = leaves[path]
        node = out
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = value
    return out


def flax_to_torch(params: Mapping[str, Any], dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """Inverse of :func:`torch_to_flax`: a state dict with diffusers/transformers names."""
    out = {}
    for path, value in _flatten(params).items():
        leaf = "weight" if path[-1] in ("kernel", "scale", "embedding") else path[-1]
        key = path_to_torch_key(path[:-1], leaf)
        out[key] = np.array(_to_torch(path[-1], np.asarray(value, dtype=dtype)), order="C")
    return out
