"""Weight conversion between PyTorch state dicts (diffusers/transformers names) and Flax params.

Flax module names mirror the PyTorch module paths: a numeric path part is joined to the one
before it (``down_blocks.0.resnets.1.conv1.weight`` lives at
``down_blocks_0/resnets_1/conv1/kernel``). Conversion is therefore a rename plus a transpose,
driven by the Flax parameter template, and the same code runs in both directions.
"""

from __future__ import annotations

import re
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


def _to_flax(leaf_name: str, value: np.ndarray, expected_shape: tuple[int, ...]) -> np.ndarray:
    if leaf_name == "kernel":
        if value.ndim == 4 and len(expected_shape) == 4:  # conv OIHW -> HWIO
            value = value.transpose(2, 3, 1, 0)
        elif value.ndim == 4 and len(expected_shape) == 2 and value.shape[2:] == (1, 1):
            value = value[:, :, 0, 0].T  # 1x1 conv stored where a linear layer is expected
        elif value.ndim == 2:
            value = value.T
    return value


def _to_torch(leaf_name: str, value: np.ndarray) -> np.ndarray:
    if leaf_name == "kernel":
        if value.ndim == 4:
            value = value.transpose(3, 2, 0, 1)
        elif value.ndim == 2:
            value = value.T
    return value


def torch_to_flax(
    state_dict: Mapping[str, np.ndarray],
    template: Mapping[str, Any],
    *,
    source: str = "checkpoint",
    dtype: Any = np.float32,
) -> Params:
    """Converts a PyTorch-named state dict into a Flax params tree shaped like ``template``.

    ``template`` is a params tree (arrays or ``jax.ShapeDtypeStruct``), usually from
    ``jax.eval_shape(module.init, ...)``. Every template leaf must be filled exactly once and
    every tensor must land somewhere; otherwise a ``WeightMismatchError`` names the tensors.
    """
    flat_template = _flatten(template)
    filled: dict[tuple[str, ...], np.ndarray] = {}
    unexpected = []
    for key, value in state_dict.items():
        if key.endswith(_IGNORED_SUFFIXES):
            continue
        for pattern, repl in _LEGACY_RENAMES:
            key = pattern.sub(repl, key)
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
        value = np.asarray(value)
        actual = tuple(value.shape)
        value = _to_flax(names[0], value, expected)
        if tuple(value.shape) != expected:
            raise WeightMismatchError(
                f"{source}: tensor '{key}' has shape {actual} but the model expects "
                f"{tuple(_to_torch(names[0], np.empty(expected)).shape)} "
                f"(Flax '{'/'.join(flax_path)}' {expected})"
            )
        filled[flax_path] = value.astype(dtype)
    missing = [
        path_to_torch_key(p[:-1], "weight" if p[-1] in ("kernel", "scale", "embedding") else p[-1])
        for p in flat_template
        if p not in filled
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
    for path, value in filled.items():
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
