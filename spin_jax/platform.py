"""What this machine can run: the attention implementation per layer and the compute dtype.

:func:`choose_attention` is a pure function of the request, the platform and the layer's shape,
so the rule is tested for every machine without one. :func:`describe_machine` reads the local
device once; :func:`resolve_attention` applies the rule to it (the attention layers call it at
trace time), and :func:`record_attention` collects the choices made while a model is traced, for
:func:`attention_report`.

The rule ("auto"): cuDNN flash attention (``jax.nn.dot_product_attention(...,
implementation="cudnn")``) where the platform is an NVIDIA GPU of compute capability 8.0 or newer
(cuDNN's fused flash kernels start at Ampere), the compute dtype is bfloat16 or float16 and the
head dim is a multiple of 8 and at most 128 (256 from Hopper, compute capability 9.0, on); XLA
everywhere else (CPU, TPU, ROCm, float32, other shapes, explicit masks). An explicit ``"cudnn"``
keeps the per-layer head-dim fallback (the VAE's single 512-wide head runs on XLA) but is refused
with a ValueError naming ``model.attention_impl`` on a machine or dtype cuDNN cannot run at all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

# Accepted values of every ``attention_impl`` argument ("" is an unset config string).
IMPLEMENTATIONS = (None, "", "auto", "xla", "cudnn")
FIELD = "model.attention_impl"

_NVIDIA_KIND = re.compile(r"nvidia|tesla|geforce|quadro|titan|rtx|jetson", re.IGNORECASE)
_OTHER_GPU_KIND = re.compile(r"amd|radeon|instinct|\bmi\d|gfx|intel|arc", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Machine:
    """The local accelerator as JAX sees it (device 0 of the default backend)."""

    platform: str  # "cpu" | "gpu" | "tpu" | ...
    device_kind: str  # "cpu", "NVIDIA H100 80GB HBM3", "TPU v5 lite", ...
    compute_capability: str | None = None  # CUDA "9.0"; None elsewhere
    platform_version: str = ""  # the backend's version string ("cuda 12080", "rocm 60300", ...)
    device_count: int = 1

    @property
    def is_nvidia(self) -> bool:
        return is_nvidia_gpu(self.platform, self.device_kind, self.platform_version)

    def __str__(self) -> str:
        cc = f", compute capability {self.compute_capability}" if self.compute_capability else ""
        n = f"{self.device_count} x " if self.device_count > 1 else ""
        return f"{self.platform}: {n}{self.device_kind}{cc}"


@functools.cache
def describe_machine() -> Machine:
    """The local machine (cached: devices do not change within a process)."""
    import jax

    dev = jax.devices()[0]
    cc = getattr(dev, "compute_capability", None)
    try:
        version = str(dev.client.platform_version)
    except Exception:  # noqa: BLE001 (a backend without the attribute)
        version = ""
    return Machine(
        platform=str(dev.platform),
        device_kind=str(getattr(dev, "device_kind", dev.platform)),
        compute_capability=None if cc in (None, "") else str(cc),
        platform_version=version,
        device_count=jax.device_count(),
    )


def is_nvidia_gpu(platform: str, device_kind: str, platform_version: str = "") -> bool:
    """True for a CUDA GPU: platform "gpu"/"cuda" and a CUDA backend or an NVIDIA device name."""
    if str(platform).lower() not in ("gpu", "cuda"):
        return False
    version = str(platform_version).lower()
    if "rocm" in version or "hip" in version:
        return False
    if "cuda" in version:
        return True
    kind = str(device_kind)
    return bool(_NVIDIA_KIND.search(kind)) and not _OTHER_GPU_KIND.search(kind)


def _capability(cc: Any) -> tuple[int, int] | None:
    if cc is None:
        return None
    m = re.fullmatch(r"\s*(\d+)(?:\.(\d+))?\s*", str(cc))
    return (int(m.group(1)), int(m.group(2) or 0)) if m else None


def default_compute_dtype(platform: str | None = None) -> str:
    """ "bfloat16" on GPUs and TPUs, "float32" on CPUs (``platform`` default: this machine)."""
    platform = describe_machine().platform if platform is None else platform
    return "bfloat16" if str(platform).lower() in ("gpu", "cuda", "rocm", "tpu") else "float32"


def scan_unroll(length: int, platform: str | None = None) -> int:
    """How many iterations of a ``lax.scan`` of ``length`` to unroll: all of them on a CPU, none
    elsewhere (``platform`` default: this machine).

    XLA:CPU runs a UNet's backward pass inside a while loop several times slower than the same
    ops outside one (bench/RESULTS.md: the demo's step with 2 micro-batches, 3.7-3.9 s scanned
    against 0.77 s unrolled); on GPUs and TPUs the loop costs nothing and unrolling would only
    multiply compile time and code size.
    """
    platform = describe_machine().platform if platform is None else platform
    return max(1, int(length)) if str(platform).lower() == "cpu" else 1


def _dtype_name(dtype: Any) -> str:
    try:
        return np.dtype(dtype).name
    except TypeError:
        return str(getattr(dtype, "__name__", dtype))


def check_attention_impl(impl: Any, *, field: str = FIELD) -> str:
    """``impl`` normalised to "auto" | "xla" | "cudnn"; anything else is a ValueError."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(
            f"{field}={impl!r} is not an attention implementation; use 'auto', 'xla' or 'cudnn'"
        )
    return "xla" if impl in (None, "") else impl


def cudnn_unavailable(
    *,
    platform: str,
    device_kind: str,
    compute_capability: Any,
    dtype: Any,
    platform_version: str = "",
) -> str | None:
    """Why cuDNN flash attention cannot run at all here (None if it can)."""
    if not is_nvidia_gpu(platform, device_kind, platform_version):
        where = f"{platform} ({device_kind})" if device_kind != platform else str(platform)
        return f"cuDNN flash attention needs an NVIDIA GPU; this machine is {where}"
    cap = _capability(compute_capability)
    if cap is not None and cap < (8, 0):
        return (
            f"cuDNN flash attention needs compute capability 8.0 (Ampere) or newer; "
            f"{device_kind} has {compute_capability}"
        )
    name = _dtype_name(dtype)
    if name not in ("bfloat16", "float16"):
        return f"cuDNN flash attention needs bfloat16 or float16 compute, got {name}"
    return None


def choose_attention(
    impl: Any,
    *,
    platform: str,
    device_kind: str,
    compute_capability: Any = None,
    dtype: Any,
    head_dim: int,
    platform_version: str = "",
    masked: bool = False,
    field: str = FIELD,
) -> tuple[str, str]:
    """(implementation, reason) for one attention layer; implementation is "xla" or "cudnn".

    ``impl``: None/"" /"xla" (always XLA), "auto" (the module rule), "cudnn" (cuDNN where the
    head dim allows, XLA for the other layers; a ValueError naming ``field`` where cuDNN cannot
    run at all). ``masked``: the layer passes an explicit mask (auto keeps those on XLA).
    """
    impl = check_attention_impl(impl, field=field)
    if impl == "xla":
        return "xla", "requested"
    why_not = cudnn_unavailable(
        platform=platform,
        device_kind=device_kind,
        compute_capability=compute_capability,
        dtype=dtype,
        platform_version=platform_version,
    )
    if why_not is not None:
        if impl == "cudnn":
            raise ValueError(
                f"{field}='cudnn' cannot run here: {why_not}. "
                f"Set {field}='auto' (cuDNN where it can run, XLA elsewhere) or 'xla'."
            )
        return "xla", why_not.replace("cuDNN flash attention needs", "cuDNN needs")
    cap = _capability(compute_capability)
    max_dim = 256 if cap is not None and cap >= (9, 0) else 128
    if head_dim % 8 or head_dim > max_dim:
        return "xla", f"head dim {head_dim} is not a multiple of 8 up to {max_dim}"
    if masked and impl == "auto":
        return "xla", "explicit attention mask"
    return "cudnn", f"head dim {head_dim}, {_dtype_name(dtype)}"


# ---------------------------------------------------------------------------------------------
# The local machine, and a record of the choices made while tracing.


@dataclasses.dataclass(frozen=True)
class AttentionChoice:
    requested: str  # "auto" | "xla" | "cudnn"
    implementation: str  # "xla" | "cudnn"
    reason: str
    head_dim: int
    dtype: str


_RECORDS = threading.local()  # per thread: the open record_attention logs


def _open_logs() -> list[list[AttentionChoice]]:
    if not hasattr(_RECORDS, "logs"):
        _RECORDS.logs = []
    return _RECORDS.logs


@contextlib.contextmanager
def record_attention() -> Iterator[list[AttentionChoice]]:
    """Collects one :class:`AttentionChoice` per attention call this thread traces inside
    the block."""
    log: list[AttentionChoice] = []
    _open_logs().append(log)
    try:
        yield log
    finally:
        _open_logs().remove(log)


def resolve_attention(impl: Any, *, dtype: Any, head_dim: int, masked: bool = False) -> str:
    """The implementation for one layer on this machine ("xla" | "cudnn"), recorded if asked."""
    requested = check_attention_impl(impl)
    if requested == "xla":
        chosen, reason = "xla", "requested"
    else:
        m = describe_machine()
        chosen, reason = choose_attention(
            requested,
            platform=m.platform,
            device_kind=m.device_kind,
            compute_capability=m.compute_capability,
            platform_version=m.platform_version,
            dtype=dtype,
            head_dim=int(head_dim),
            masked=masked,
        )
    for log in _open_logs():
        log.append(AttentionChoice(requested, chosen, reason, int(head_dim), _dtype_name(dtype)))
    return chosen


def summarize_attention(choices: list[AttentionChoice], machine: Machine | None = None) -> str:
    """One line: "attention: auto -> xla for 16 layers (cpu)" or, mixed,
    "attention: auto -> cudnn for 32 layers (head dims 40, 80, 160), xla for 2 layers (head dim
    512 is not a multiple of 8 up to 256) (gpu: NVIDIA H100 ..., compute capability 9.0)"."""
    machine = describe_machine() if machine is None else machine
    where = machine.platform if machine.platform == "cpu" else str(machine)
    if not choices:
        return f"attention: no attention layers traced ({where})"
    requested = sorted({c.requested for c in choices})
    parts = []
    for impl in ("cudnn", "xla"):
        mine = [c for c in choices if c.implementation == impl]
        if not mine:
            continue
        n = f"{len(mine)} layer{'s' if len(mine) != 1 else ''}"
        if impl == "cudnn":
            dims = sorted({c.head_dim for c in mine})
            parts.append(f"cudnn for {n} (head dims {', '.join(map(str, dims))})")
        else:
            reasons = sorted({c.reason for c in mine} - {"requested"})
            parts.append(f"xla for {n}" + (f" ({'; '.join(reasons)})" if reasons else ""))
    return f"attention: {'/'.join(requested)} -> {', '.join(parts)} ({where})"
