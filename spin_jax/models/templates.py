"""Parameter templates kept on disk between processes.

A template is what tracing a network's ``init`` abstractly yields: every parameter's path, shape
and dtype, and the attention implementation each layer chose (:mod:`spin_jax.platform`). A load
needs one per network to check the weights against; tracing SD 1.5's three networks for them
takes 2-4 s of every fresh process (most of a load besides the one copy of the weights), and the
answer only changes with the network, the machine and the code.

So the first load traces and writes ``<cache>/templates/<key>.json``; later loads read it. The
key hashes everything the trace depends on: the module's class and its ``repr`` (every field:
the config, the compute dtype, the requested attention, remat), the machine (platform, device
kind, compute capability, backend version), the jax and flax versions and the source of
``spin_jax.models``, ``spin_jax.platform`` and the files defining the module and the tracing
function. A module whose ``repr`` is not stable (it holds a
function or an object) is never cached. An unreadable entry is traced again and rewritten.

``<cache>`` is ``$SPIN_JAX_CACHE_DIR``, else ``$XDG_CACHE_HOME/spin_jax``, else
``~/.cache/spin_jax``; ``SPIN_JAX_CACHE_DIR=none`` turns the cache off. Writing is best effort:
a read-only cache directory only costs the trace.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from spin_jax import platform
from spin_jax.files import write_json

VERSION = 1  # of the entry format
ENV = "SPIN_JAX_CACHE_DIR"


def cache_dir() -> str | None:
    """Where templates are kept, or None when the cache is off."""
    root = os.environ.get(ENV, "")
    if root.lower() == "none":
        return None
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "spin_jax")
    return os.path.join(root, "templates")


def traced(
    module: Any, shapes_of: Callable[..., Any], *args: Any
) -> tuple[Any, list[platform.AttentionChoice]]:
    """``shapes_of(module, *args)`` (a tree of ``jax.ShapeDtypeStruct``) and the attention
    choices recorded while tracing it, read from the cache when an entry for them exists."""
    path = _entry_path(module, shapes_of, args)
    if path is not None:
        cached = _read(path)
        if cached is not None:
            return cached
    with platform.record_attention() as log:
        shapes = shapes_of(module, *args)
    if path is not None:
        _write(path, shapes, log)
    return shapes, list(log)


def _entry_path(module: Any, shapes_of: Callable, args: tuple) -> str | None:
    root = cache_dir()
    if root is None or not _plain(module, top=True) or not _plain(args):
        return None
    sources = tuple(
        sorted({inspect.getfile(type(module)), inspect.getfile(inspect.unwrap(shapes_of))})
    )
    m = platform.describe_machine()
    key = json.dumps(
        [
            VERSION,
            f"{type(module).__module__}.{type(module).__qualname__}",
            f"{shapes_of.__module__}.{shapes_of.__qualname__}",
            repr(module),
            repr(args),
            [m.platform, m.device_kind, m.compute_capability, m.platform_version],
            jax.__version__,
            _flax_version(),
            _code_digest(sources),
        ]
    )
    return os.path.join(root, hashlib.sha256(key.encode()).hexdigest()[:32] + ".json")


def _plain(value: Any, top: bool = False) -> bool:
    """Whether ``value`` is data whose ``repr`` says all of it: None, numbers, strings, dtypes
    and containers or dataclasses (a module's fields) of them; not functions or objects."""
    if value is None or isinstance(value, (str, int, float, bool, np.dtype)):
        return True
    if isinstance(value, (tuple, list)):
        return all(map(_plain, value))
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        skip = ("parent", "name") if top else ()  # a Flax module's place in a tree, not data
        return all(
            _plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.name not in skip
        )
    return isinstance(value, type) and value.__module__.startswith(("numpy", "jax"))  # jnp.float32


@functools.cache
def _flax_version() -> str:
    import flax

    return flax.__version__


@functools.cache
def _code_digest(sources: tuple[str, ...]) -> str:
    """A hash of the code that builds and traces the networks: ``spin_jax.models``,
    ``spin_jax.platform`` and ``sources`` (the module's and the tracing function's files)."""
    here = os.path.dirname(os.path.abspath(__file__))
    files = {os.path.join(here, f) for f in os.listdir(here) if f.endswith(".py")}
    files |= {os.path.abspath(platform.__file__), *map(os.path.abspath, sources)}
    h = hashlib.sha256()
    for f in sorted(files):
        with open(f, "rb") as fh:
            h.update(f.encode() + b"\0" + fh.read())
    return h.hexdigest()


def _write(path: str, shapes: Any, log: list[platform.AttentionChoice]) -> None:
    leaves = []
    for keys, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        if not all(isinstance(k, jax.tree_util.DictKey) for k in keys):
            return  # not a tree of dicts: not cached
        leaves.append([[str(k.key) for k in keys], list(leaf.shape), str(leaf.dtype)])
    attention = [list(dataclasses.astuple(c)) for c in log]
    entry = {"version": VERSION, "params": leaves, "attention": attention}
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_json(path, entry)
    except OSError:
        pass


def _read(path: str) -> tuple[Any, list[platform.AttentionChoice]] | None:
    try:
        with open(path) as f:
            entry = json.load(f)
        if entry["version"] != VERSION:
            return None
        shapes: dict = {}
        for keys, shape, dtype in entry["params"]:
            node = shapes
            for k in keys[:-1]:
                node = node.setdefault(k, {})
            node[keys[-1]] = jax.ShapeDtypeStruct(tuple(int(s) for s in shape), dtype)
        log = [platform.AttentionChoice(*c) for c in entry["attention"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return shapes, log
