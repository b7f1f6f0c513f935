"""LoRA adapters on the UNet, as pure functions of a params tree (no change to the Flax modules).

An adapter is a pytree mirroring the UNet params down to each adapted layer:
``{"down_blocks_0": {... "to_q": {"lora_a": A, "lora_b": B}}}`` with A ``[..., in, r]`` in the
layer's kernel layout (Dense ``[in, r]``, Conv HWIO ``[kh, kw, in, r]``) and B ``[r, out]``.
The adapted kernel is ``kernel + scale * A @ B`` (``scale = alpha / r``), so a forward pass
with the merged params computes ``W x + scale * B A x`` as peft's LoRA layers do; a conv layer's
A is a conv with the layer's kernel and B a 1x1 conv, as in peft and kohya.

Initialisation follows peft's default (``init_lora_weights=True``): A as torch initialises a
Linear / Conv2d weight (kaiming-uniform with a = sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in))),
B zero, so an adapter starts at the base model exactly.

Files: ``save_diffusers`` writes ``pytorch_lora_weights.safetensors`` as diffusers'
``save_lora_weights`` does (``unet.<module>.lora_A.weight`` / ``lora_B.weight`` and the peft
config, alpha included, in the ``lora_adapter_metadata`` header field), which
``pipe.load_lora_weights(dir)`` loads. ``from_file`` reads that format, its older spellings
(``.lora.down/up``, ``.lora_linear_layer.down/up``, attention processors' ``to_q_lora``) and
kohya's (``lora_unet_<module with underscores>.lora_down/up.weight`` + ``.alpha``).
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spin_jax.models.convert import WeightMismatchError, path_to_torch_key

Adapter = dict[str, Any]
Path = tuple[str, ...]

WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# Shorthands accepted in ``targets``.
GROUPS = {
    "attn": DEFAULT_TARGETS,
    "ff": ("ff.net.0.proj", "ff.net.2"),
    "conv": ("conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv"),
    "proj": ("proj_in", "proj_out"),
}


# --- layers ------------------------------------------------------------------------------


def _kernels(unet_params: Mapping[str, Any], prefix: Path = ()) -> dict[Path, Any]:
    """Module path -> kernel of every Dense / Conv layer (2-D or 4-D ``kernel`` leaf)."""
    out = {}
    for k, v in unet_params.items():
        if isinstance(v, Mapping):
            out.update(_kernels(v, (*prefix, k)))
        elif k == "kernel" and np.ndim(v) in (2, 4):
            out[prefix] = v
    return out


def module_name(path: Path) -> str:
    """The diffusers module name of a Flax module path (``to_out_0`` -> ``to_out.0``)."""
    return path_to_torch_key(path, "weight")[: -len(".weight")]


def expand_targets(targets: str | Iterable[str]) -> tuple[str, ...]:
    """Target names with the shorthands of ``GROUPS`` expanded; a string is comma-separated."""
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    out: list[str] = []
    for t in targets:
        out.extend(GROUPS.get(t, (t,)))
    return tuple(dict.fromkeys(out))


def _matches(name: str, target: str) -> bool:
    # peft's rule for target_modules names: the whole module name or a dotted suffix of it.
    return name == target or name.endswith("." + target)


def targets_of(unet_params: Mapping[str, Any], targets: str | Iterable[str] = DEFAULT_TARGETS) -> list[Path]:  # fmt: skip
    """The module paths ``targets`` select, in the params' order. A target that selects no
    layer is a ValueError naming it (a typo must not train nothing)."""
    targets = expand_targets(targets)
    if not targets:
        raise ValueError("LoRA targets are empty: name at least one layer (e.g. to_q)")
    kernels = _kernels(unet_params)
    names = {p: module_name(p) for p in kernels}
    chosen = [p for p in kernels if any(_matches(names[p], t) for t in targets)]
    for t in targets:
        if not any(_matches(names[p], t) for p in kernels):
            some = sorted({n.rsplit(".", 1)[-1] for n in names.values()})[:20]
            raise ValueError(
                f"LoRA target {t!r} matches no Dense/Conv layer of the UNet (layer names end in "
                f"e.g. {', '.join(some)}; shorthands: {', '.join(GROUPS)})"
            )
    return chosen


def _check_rank(path: Path, kernel_shape: Sequence[int], rank: int) -> None:
    fan_in, out = int(np.prod(kernel_shape[:-1])), int(kernel_shape[-1])
    if rank > min(fan_in, out):
        raise ValueError(
            f"LoRA rank {rank} is larger than layer {module_name(path)} allows (kernel "
            f"{tuple(kernel_shape)}: {fan_in} inputs, {out} outputs); use rank <= {min(fan_in, out)}"
        )


def scale_of(rank: int, alpha: float | None = None) -> float:
    """``alpha / rank``; alpha None or 0 means alpha = rank (scale 1)."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    return float(alpha) / rank if alpha else 1.0


def init(key: jax.Array, unet_params: Mapping[str, Any], rank: int,
         targets: str | Iterable[str] = DEFAULT_TARGETS) -> Adapter:  # fmt: skip
    """A fresh adapter of ``rank`` on the ``targets`` layers: A as peft initialises it, B zero."""
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be an int >= 1, got {rank!r}")
    kernels = _kernels(unet_params)
    layers = {}
    for i, path in enumerate(targets_of(unet_params, targets)):
        shape = tuple(np.shape(kernels[path]))
        _check_rank(path, shape, rank)
        bound = 1.0 / math.sqrt(int(np.prod(shape[:-1])))
        a = jax.random.uniform(jax.random.fold_in(key, i), (*shape[:-1], rank), jnp.float32,
                               -bound, bound)  # fmt: skip
        layers[path] = (a, jnp.zeros((rank, shape[-1]), jnp.float32))
    return from_layers(layers)


def zeros(unet_params: Mapping[str, Any], ranks: Mapping[str, int]) -> Adapter:
    """An all-zero adapter with the layers and ranks of ``describe`` (a template, and the
    base model itself as an adapter: ``merge`` of it is the base exactly)."""
    kernels = {module_name(p): (p, np.shape(k)) for p, k in _kernels(unet_params).items()}
    layers = {}
    for name, r in ranks.items():
        if name not in kernels:
            raise ValueError(f"LoRA layer {name} is not a Dense/Conv layer of this UNet")
        path, shape = kernels[name]
        layers[path] = (jnp.zeros((*shape[:-1], r), jnp.float32), jnp.zeros((r, shape[-1]), jnp.float32))  # fmt: skip
    return from_layers(layers)


def from_layers(layers: Mapping[Path, tuple[Any, Any]]) -> Adapter:
    """The adapter tree of ``{module path: (A, B)}`` (the inverse of ``layers_of``)."""
    out: Adapter = {}
    for path, (a, b) in layers.items():
        node = out
        for p in path:
            node = node.setdefault(p, {})
        node["lora_a"], node["lora_b"] = a, b
    return out


def layers_of(adapter: Mapping[str, Any], prefix: Path = ()) -> dict[Path, tuple[Any, Any]]:
    """Module path -> (A, B) of every adapted layer."""
    out = {}
    for k, v in adapter.items():
        if not isinstance(v, Mapping):
            raise ValueError(f"LoRA adapter: unexpected leaf {'/'.join((*prefix, k))}")
        if "lora_a" in v:
            out[(*prefix, k)] = (v["lora_a"], v["lora_b"])
        else:
            out.update(layers_of(v, (*prefix, k)))
    return out


def is_adapter(tree: Any) -> bool:
    """Whether ``tree`` holds LoRA layers (as opposed to a UNet params tree)."""
    if not isinstance(tree, Mapping):
        return False
    return "lora_a" in tree or any(is_adapter(v) for v in tree.values())


def describe(adapter: Mapping[str, Any]) -> dict[str, int]:
    """Module name -> rank of every adapted layer (JSON-able; ``zeros`` rebuilds the tree)."""
    return {module_name(p): int(np.shape(b)[0]) for p, (_, b) in layers_of(adapter).items()}


# --- applying -----------------------------------------------------------------------------


def delta(a: jax.Array, b: jax.Array) -> jax.Array:
    """``A @ B`` in the kernel's layout: ``[..., in, r] x [r, out] -> [..., in, out]``."""
    return jnp.tensordot(a, b, axes=1)


def merge(base: Mapping[str, Any], adapter: Mapping[str, Any], scale: float) -> dict[str, Any]:
    """``base`` with ``kernel + scale * A @ B`` on every adapted layer; the other leaves are the
    base's own arrays (nothing copied). Differentiable in the adapter; an empty adapter gives
    ``base`` itself."""
    layers = layers_of(adapter)
    if not layers:
        return base  # type: ignore[return-value]
    kernels = _kernels(base)
    for path, (a, b) in layers.items():
        if path not in kernels:
            raise ValueError(f"LoRA layer {module_name(path)} is not a layer of the UNet params")
        shape = (*np.shape(a)[:-1], np.shape(b)[-1])
        if shape != tuple(np.shape(kernels[path])):
            raise ValueError(
                f"LoRA layer {module_name(path)}: A @ B has shape {shape} but the kernel is "
                f"{tuple(np.shape(kernels[path]))}"
            )

    def rebuild(tree, prefix):
        out = {}
        for k, v in tree.items():
            if isinstance(v, Mapping):
                out[k] = rebuild(v, (*prefix, k))
            elif k == "kernel" and prefix in layers:
                a, b = layers[prefix]
                out[k] = v + (scale * delta(a, b)).astype(v.dtype)
            else:
                out[k] = v
        return out

    return rebuild(base, ())


merge_jit = jax.jit(merge, static_argnums=2)  # merge(base, adapter, scale) as one program


def wrap_apply(unet_apply: Any, base: Any, scale: float) -> Any:
    """``unet_apply`` taking an adapter where it took UNet params: ``f(adapter, x, t, c, ...)
    = unet_apply(merge(base, adapter, scale), x, t, c, ...)`` (extra arguments pass through)."""

    def apply(adapter, *args, **kwargs):
        return unet_apply(merge(base, adapter, scale), *args, **kwargs)

    return apply


# --- files --------------------------------------------------------------------------------


def _to_torch_a(a: np.ndarray) -> np.ndarray:
    return a.T if a.ndim == 2 else a.transpose(3, 2, 0, 1)  # [r, in] / [r, in, kh, kw]


def _to_torch_b(b: np.ndarray, conv: bool) -> np.ndarray:
    return b.T[:, :, None, None] if conv else b.T  # [out, r, 1, 1] / [out, r]


def to_diffusers(adapter: Mapping[str, Any], scale: float) -> tuple[dict[str, np.ndarray], dict]:
    """``(tensors, peft_config)`` as diffusers' ``save_lora_weights`` writes them for a UNet:
    ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` and the LoraConfig fields that give
    every layer ``scale`` (the most common rank as ``r``, others in ``rank_pattern`` /
    ``alpha_pattern``)."""
    layers = layers_of(jax.device_get(adapter))
    if not layers:
        raise ValueError("LoRA adapter is empty: nothing to write")
    tensors, ranks = {}, {}
    for path, (a, b) in layers.items():
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        name = module_name(path)
        tensors[f"unet.{name}.lora_A.weight"] = np.ascontiguousarray(_to_torch_a(a))
        tensors[f"unet.{name}.lora_B.weight"] = np.ascontiguousarray(_to_torch_b(b, a.ndim == 4))
        ranks[name] = int(b.shape[0])
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    others = {n: k for n, k in ranks.items() if k != r}
    config = {
        "r": r,
        "lora_alpha": float(scale * r),
        "target_modules": sorted(ranks),
        "rank_pattern": others,
        "alpha_pattern": {n: float(scale * k) for n, k in others.items()},
        "lora_dropout": 0.0,
        "bias": "none",
        "use_dora": False,
        "use_rslora": False,
        "init_lora_weights": True,
    }
    return tensors, config


def save_diffusers(out_dir: str, adapter: Mapping[str, Any], scale: float) -> str:
    """Writes ``out_dir/pytorch_lora_weights.safetensors`` (``pipe.load_lora_weights(out_dir)``
    loads it, scale included); returns the file's path."""
    from safetensors.numpy import save_file

    tensors, config = to_diffusers(adapter, scale)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, WEIGHT_NAME)
    meta = {"unet." + k: v for k, v in config.items()}
    tmp = path + ".tmp"
    save_file(
        tensors, tmp, metadata={"format": "pt", METADATA_KEY: json.dumps(meta, sort_keys=True)}
    )
    os.replace(tmp, path)
    return path


def read_metadata(path: str) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file ({} if none)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            raise ValueError(f"cannot read safetensors file {path}: bad header") from None
    meta = header.get("__metadata__") or {}
    return meta if isinstance(meta, dict) else {}


def lora_file(path: str) -> str:
    """The LoRA weights file of ``path``: the file itself, or in a folder
    ``pytorch_lora_weights.safetensors`` or its only ``.safetensors`` file."""
    if os.path.isfile(path):
        if not path.endswith(".safetensors"):
            raise ValueError(f"LoRA file {path}: only .safetensors files are read (no pickles)")
        return path
    if not os.path.isdir(path):
        raise FileNotFoundError(f"LoRA file or folder not found: {path}")
    if os.path.isfile(os.path.join(path, WEIGHT_NAME)):
        return os.path.join(path, WEIGHT_NAME)
    found = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    if len(found) != 1:
        raise FileNotFoundError(
            f"LoRA folder {path}: no {WEIGHT_NAME} and {len(found)} other .safetensors files "
            f"({', '.join(found[:5])}); name the file"
        )
    return os.path.join(path, found[0])


_OLD_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_SUFFIXES = (
    (".lora_A.weight", "a"),
    (".lora_B.weight", "b"),
    (".lora_A.default.weight", "a"),
    (".lora_B.default.weight", "b"),
    (".lora.down.weight", "a"),
    (".lora.up.weight", "b"),
    (".lora_linear_layer.down.weight", "a"),
    (".lora_linear_layer.up.weight", "b"),
    (".lora_down.weight", "a"),
    (".lora_up.weight", "b"),
    (".alpha", "alpha"),
)


def _split_key(key: str) -> tuple[str, str] | None:
    """(module key as stored, part) of a LoRA tensor name; None if it is not one."""
    m = _OLD_PROCESSOR.search(key)
    if m:
        proj = m.group(1) + (".0" if m.group(1) == "to_out" else "")
        return key[: m.start()] + "." + proj, "a" if m.group(2) == "down" else "b"
    for suffix, part in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], part
    return None


def _pattern_value(pattern: Mapping[str, Any], name: str) -> Any:
    # peft matches rank_pattern / alpha_pattern keys as regexes against a suffix of the name.
    for k, v in pattern.items():
        if re.match(rf"(.*\.)?({k})$", name):
            return v
    return None


def from_state_dict(tensors: Mapping[str, np.ndarray], unet_params: Mapping[str, Any], *,
                    peft_config: Mapping[str, Any] | None = None,
                    source: str = "LoRA file") -> tuple[Adapter, float]:  # fmt: skip
    """``(adapter, scale)`` of a diffusers / peft / kohya LoRA state dict for ``unet_params``.

    Per-layer scales (kohya ``alpha`` tensors, peft ``alpha_pattern``) are folded into B, so
    ``merge(base, adapter, scale)`` with the one returned scale (the most common) is exact.
    Names that match no UNet layer, shapes that disagree and parts without their pair are a
    ``WeightMismatchError`` that lists them.
    """
    kernels = _kernels(unet_params)
    by_name = {module_name(p): p for p in kernels}
    by_kohya = {"lora_unet_" + n.replace(".", "_"): n for n in by_name}
    peft_config = dict(peft_config or {})
    if peft_config.get("use_dora"):
        raise ValueError(f"{source}: DoRA adapters (use_dora) are not supported")
    parts: dict[str, dict[str, tuple[str, np.ndarray]]] = {}
    unmatched = []
    for key, value in tensors.items():
        split = _split_key(key)
        name = None
        if split is not None:
            stored, part = split
            if stored.startswith("lora_unet_"):
                name = by_kohya.get(stored)
            else:
                name = stored.removeprefix("unet.")
                name = name if name in by_name else None
        if name is None:
            unmatched.append(key)
            continue
        parts.setdefault(name, {})[part] = (key, np.asarray(value))
    incomplete = [f"{n} (has only {', '.join(sorted(p))})" for n, p in parts.items()
                  if "a" not in p or "b" not in p]  # fmt: skip
    if unmatched or incomplete:
        msg = [f"{source}: LoRA tensors do not match this UNet."]
        if unmatched:
            msg.append(
                f"names matching no UNet layer ({len(unmatched)}): {', '.join(sorted(unmatched)[:12])}"
            )
        if incomplete:
            msg.append(
                f"layers without both A and B ({len(incomplete)}): {', '.join(incomplete[:12])}"
            )
        raise WeightMismatchError("\n  ".join(msg))
    if not parts:
        raise WeightMismatchError(f"{source}: no LoRA tensors found")
    layers, scales = {}, {}
    for name, p in parts.items():
        path = by_name[name]
        kshape = tuple(np.shape(kernels[path]))
        (ka, a_t), (kb, b_t) = p["a"], p["b"]
        a_t, b_t = a_t.astype(np.float32), b_t.astype(np.float32)
        r = int(a_t.shape[0]) if a_t.ndim else 0
        fan_shape = kshape[:-1]  # [in] or [kh, kw, in]
        if len(kshape) == 2 and a_t.ndim == 4 and a_t.shape[2:] == (1, 1):
            a_t = a_t[:, :, 0, 0]
        if len(kshape) == 4 and a_t.ndim == 2 and kshape[:2] == (1, 1):
            a_t = a_t[:, :, None, None]
        if b_t.ndim == 4 and b_t.shape[2:] == (1, 1):
            b_t = b_t[:, :, 0, 0]
        want_a = (r, fan_shape[-1], *fan_shape[:-1]) if len(kshape) == 4 else (r, kshape[0])
        if tuple(a_t.shape) != want_a:
            raise WeightMismatchError(
                f"{source}: tensor '{ka}' has shape {tuple(p['a'][1].shape)} but layer {name} "
                f"(kernel {kshape}) needs {want_a} for rank {r}"
            )
        if tuple(b_t.shape) != (kshape[-1], r):
            raise WeightMismatchError(
                f"{source}: tensor '{kb}' has shape {tuple(p['b'][1].shape)} but layer {name} "
                f"(kernel {kshape}) needs {(kshape[-1], r)} for rank {r}"
            )
        a = a_t.T if a_t.ndim == 2 else a_t.transpose(2, 3, 1, 0)
        alpha = None
        if "alpha" in p:
            alpha = float(np.asarray(p["alpha"][1]).reshape(-1)[0])
        elif peft_config:
            alpha = _pattern_value(peft_config.get("alpha_pattern") or {}, name)
            if alpha is None:
                alpha = float(peft_config.get("lora_alpha", r))
        if peft_config.get("use_rslora"):
            scales[path] = float(alpha if alpha is not None else r) / math.sqrt(r)
        else:
            scales[path] = float(alpha) / r if alpha is not None else 1.0
        layers[path] = (a, b_t.T)
    scale = collections.Counter(scales.values()).most_common(1)[0][0]
    layers = {p: (a, (b * (scales[p] / scale)).astype(np.float32)) for p, (a, b) in layers.items()}
    return from_layers(layers), float(scale)


def from_file(path: str, unet_params: Mapping[str, Any]) -> tuple[Adapter, float]:
    """``(adapter, scale)`` of a LoRA file (or folder) in the diffusers, peft or kohya format.

    The alpha of a diffusers file comes from its ``lora_adapter_metadata`` (as
    ``load_lora_weights`` reads it) or its ``.alpha`` tensors; without either, scale 1.
    """
    from spin_jax.models.weights import map_safetensors

    file = lora_file(path)
    tensors = map_safetensors(file)
    raw = read_metadata(file).get(METADATA_KEY)
    config = None
    if raw:
        try:
            meta = json.loads(raw)
        except ValueError:
            raise ValueError(f"LoRA file {file}: {METADATA_KEY} is not JSON") from None
        config = {k.removeprefix("unet."): v for k, v in meta.items() if k.startswith("unet.")}
        other = sorted({k.split(".", 1)[0] for k in meta if not k.startswith("unet.")})
        if other and not config:
            raise WeightMismatchError(f"LoRA file {file}: adapters for {other}, none for the unet")
    return from_state_dict(tensors, unet_params, peft_config=config, source=file)


def from_config(cfg: Any, unet_params: Mapping[str, Any], key: jax.Array) -> tuple[Adapter, float] | None:  # fmt: skip
    """``(adapter, scale)`` a run starts from, for a ``model.lora`` config (rank, alpha, targets,
    init_from); None when ``rank`` is 0 (full fine-tuning). With ``init_from`` the file's layers,
    ranks and scale are used; ``rank`` must be the file's and ``alpha`` 0 or the file's."""
    get = cfg.get if hasattr(cfg, "get") else lambda k, d=None: getattr(cfg, k, d)
    rank = int(get("rank", 0) or 0)
    if rank == 0:
        return None
    if float(get("dropout", 0.0) or 0.0) != 0.0:
        raise ValueError(
            f"config.model.lora.dropout = {get('dropout')!r}: LoRA dropout is not supported "
            "(adapters are applied as a weight merge); use 0"
        )
    alpha = float(get("alpha", 0.0) or 0.0)
    init_from = get("init_from", "") or ""
    if not init_from:
        return init(key, unet_params, rank, get("targets", DEFAULT_TARGETS)), scale_of(rank, alpha)
    adapter, scale = from_file(init_from, unet_params)
    ranks = describe(adapter)
    common = collections.Counter(ranks.values()).most_common(1)[0][0]
    if common != rank:
        raise ValueError(
            f"config.model.lora.rank = {rank} but model.lora.init_from {init_from} has rank {common}"
        )
    if alpha and abs(alpha / rank - scale) > 1e-6 * scale:
        raise ValueError(
            f"config.model.lora.alpha = {alpha} but model.lora.init_from {init_from} has alpha "
            f"{scale * rank:g} (scale {scale:g}); use 0 to take the file's"
        )
    return adapter, scale
