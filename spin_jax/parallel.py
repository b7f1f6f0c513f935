"""Device mesh, shardings, multi-process start and global batches from per-process data.

Data parallelism is ``jax.jit`` over a mesh with axes ``("data", "fsdp")``: batches are split over
both axes (every device sees its own examples), parameters are replicated, or with ``fsdp > 1``
large parameters (and their optimizer state) are split over ``fsdp`` and gathered by XLA when used
(ZeRO-3 style). Axis types are ``Auto``: Explicit axes break Linen + optax steps.
"""

from __future__ import annotations

import atexit
import os
import re
import sys
import threading
import time
from collections.abc import Collection, Mapping
from typing import Any, NoReturn

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXES = ("data", "fsdp")
# Parameters smaller than this (elements) stay replicated under fsdp: gathering them costs more
# latency than the memory they would save.
FSDP_MIN_SIZE = 2**16


def make_mesh(data: int = -1, fsdp: int = 1, devices: list | None = None) -> Mesh:
    """A ``(data, fsdp)`` mesh over ``devices`` (default all); ``data=-1`` takes what is left,
    ``fsdp=-1`` all devices (parameters split over every device, whatever their number)."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if fsdp == -1:
        fsdp = n if data == -1 else max(1, n // max(1, data))
    if fsdp < 1 or n % fsdp:
        raise ValueError(f"make_mesh: fsdp={fsdp} must be >= 1 and divide the {n} devices")
    if data == -1:
        data = n // fsdp
    if data < 1 or data * fsdp != n:
        raise ValueError(f"make_mesh: data={data} x fsdp={fsdp} != {n} devices")
    return jax.make_mesh(
        (data, fsdp), DATA_AXES, axis_types=(AxisType.Auto, AxisType.Auto), devices=devices
    )


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways a batch is split: the product of the mesh's data axes."""
    return int(np.prod([mesh.shape[a] for a in DATA_AXES if a in mesh.shape]))


def _batch_axes(mesh: Mesh) -> tuple[str, ...]:
    return tuple(a for a in DATA_AXES if a in mesh.shape)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every data axis of the mesh; other axes whole."""
    return NamedSharding(mesh, P(_batch_axes(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


_wrap_key_data = jax.jit(jax.random.wrap_key_data, static_argnames="impl")


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Global arrays replicated over ``mesh`` from host values (NumPy, Python scalars, local
    jax arrays, typed PRNG keys). Every process must pass the same values; works with many
    processes, where ``jax.device_put`` refuses shardings with other processes' devices."""
    sharding = replicated(mesh)

    def put(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return jax.device_put(x, sharding)  # already global: reshard
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = put(jax.random.key_data(x))
            return _wrap_key_data(data, impl=jax.random.key_impl(x))
        return jax.make_array_from_process_local_data(sharding, np.asarray(x))

    return jax.tree.map(put, tree)


def local_copy(tree: Any) -> Any:
    """Each leaf as something this process holds whole: the array itself when all its devices
    are local, one local shard of a replicated global array (no transfer between hosts), or,
    for a global array split across processes (fsdp), a host copy gathered by a collective
    (every process must call this then)."""

    def one(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return x
        if x.is_fully_replicated:
            return x.addressable_shards[0].data
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(one, tree)


def local_mesh() -> Mesh:
    """This process's devices on one ``data`` axis (sampling needs no other process)."""
    return Mesh(np.array(jax.local_devices()), ("data",))


def check_batch_divisible(batch_size: int, mesh: Mesh, what: str = "global batch") -> None:
    """ValueError unless ``batch_size`` splits evenly over the data-parallel devices."""
    n = data_parallel_size(mesh)
    if batch_size % n:
        raise ValueError(
            f"{what} of {batch_size} is not divisible by the data-parallel size {n} "
            f"(mesh {dict(mesh.shape)}); choose a batch size that is a multiple of {n}"
        )


def _fsdp_spec(shape: tuple[int, ...], fsdp: int, min_size: int) -> P:
    if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    # Largest axis that splits evenly; ties go to the last such axis (output features).
    best = None
    for i, d in enumerate(shape):
        if d % fsdp == 0 and (best is None or d >= shape[best]):
            best = i
    if best is None:
        return P()
    spec = [None] * len(shape)
    spec[best] = "fsdp"
    return P(*spec)


def fsdp_param_sharding(mesh: Mesh, params: Any, min_size: int = FSDP_MIN_SIZE) -> Any:
    """NamedShardings for a pytree of arrays (or ShapeDtypeStructs): each leaf of at least
    ``min_size`` elements is split over ``fsdp`` along its largest evenly divisible axis, the rest
    replicated. Applies to optimizer states and whole TrainStates alike (the rule reads shapes)."""
    fsdp = mesh.shape["fsdp"] if "fsdp" in mesh.shape else 1
    return jax.tree.map(
        lambda x: NamedSharding(mesh, _fsdp_spec(tuple(np.shape(x)), fsdp, min_size)), params
    )


def _local_batch_devices(mesh: Mesh) -> int:
    local = {d.id for d in jax.local_devices()}
    return sum(1 for d in mesh.devices.flat if d.id in local)


def global_batch_from_local(local_batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Global batch-sharded arrays from this process's slice of every field.

    Every process passes equally sized local batches (its share of the global batch, in process
    order); the global batch is ``local size * process count``. With one process this is a plain
    sharded ``device_put``.
    """
    sizes = {k: np.shape(v)[0] if np.ndim(v) else None for k, v in local_batch.items()}
    if None in sizes.values() or len(set(sizes.values())) != 1:
        raise ValueError(
            f"global_batch_from_local: fields need one leading batch size, got {sizes}"
        )
    local_size = next(iter(sizes.values()))
    n_local = _local_batch_devices(mesh)
    if n_local == 0:
        raise ValueError(
            f"global_batch_from_local: process {jax.process_index()} has no mesh device"
        )
    check_batch_divisible(local_size * jax.process_count(), mesh)
    if local_size % n_local:
        raise ValueError(
            f"local batch of {local_size} on process {jax.process_index()} is not divisible by its "
            f"{n_local} local devices of the mesh {dict(mesh.shape)}"
        )
    sharding = batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in local_batch.items()
    }


def process_batch_indices(global_batch_size: int, mesh: Mesh) -> np.ndarray:
    """The rows of a global batch this process loads for ``global_batch_from_local``, in order."""
    check_batch_divisible(global_batch_size, mesh)
    index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch_size,))
    blocks = sorted({idx[0].indices(global_batch_size)[:2] for idx in index_map.values()})
    return np.concatenate([np.arange(start, stop) for start, stop in blocks])


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: list[int] | None = None,
) -> bool:
    """Start ``jax.distributed`` when this is a multi-process run; True if it is one.

    Multi-process when arguments say so, or the environment does: ``JAX_COORDINATOR_ADDRESS`` with
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``, or a Slurm / Open MPI launch of more than one
    task (then JAX detects everything itself). Must run before any other JAX computation.
    Calling it again is harmless.

    A multi-process run also starts a watchdog (see :func:`exit_on_error`): when a process stops
    beating for ``SPIN_JAX_HEARTBEAT_SECONDS`` (default 30) or reports an error, every other
    process prints one line ``error: process <i> of <n> ...; stopping`` and exits with status 1,
    instead of waiting in a collective for JAX's coordination service to abort it.
    """
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    if coordinator_address or num_processes is not None or process_id is not None:
        missing = [
            name
            for name, v in (
                ("coordinator_address", coordinator_address),
                ("num_processes", num_processes),
                ("process_id", process_id),
            )
            if v is None
        ]
        if missing:
            raise ValueError(
                f"init_distributed: {missing} missing; give all of coordinator_address, "
                "num_processes and process_id (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, "
                "JAX_PROCESS_ID)"
            )
        if num_processes == 1:
            return False
        if not 0 <= process_id < num_processes:
            raise ValueError(
                f"init_distributed: process_id {process_id} not in [0, {num_processes})"
            )
        _initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            local_device_ids=local_device_ids,
        )
        return True
    cluster_size = max(_env_int("SLURM_NTASKS") or 1, _env_int("OMPI_COMM_WORLD_SIZE") or 1)
    if cluster_size > 1:
        _initialize(local_device_ids=local_device_ids)
        return True
    return False


def launch_position() -> tuple[int, int]:
    """``(index, count)`` of this process in a multi-process launch as its environment says
    (``JAX_PROCESS_ID`` / ``JAX_NUM_PROCESSES``, else Slurm's ``SLURM_PROCID`` / ``SLURM_NTASKS``,
    else Open MPI's), without starting ``jax.distributed``; ``(0, 1)`` for a single process."""
    for index, count in (
        ("JAX_PROCESS_ID", "JAX_NUM_PROCESSES"),
        ("SLURM_PROCID", "SLURM_NTASKS"),
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
    ):
        n = _env_int(count)
        if n is not None and n > 1:
            i = _env_int(index) or 0
            if not 0 <= i < n:
                raise ValueError(f"environment variable {index}={i} not in [0, {count}={n})")
            return i, n
    return 0, 1


def single_process(command: str, job: str) -> bool:
    """For a command that runs as one process (export, evaluation) but was started by a
    multi-process launcher: True on process 0, which runs ``job`` alone on its own devices
    (``jax.distributed`` is not started), False on the others, which write nothing. Each says
    so in one line on stderr; True as well for a single process (silently)."""
    index, count = launch_position()
    if count == 1:
        return True
    if index:
        print(f"{command}: process {index} of {count} does nothing; {job} runs on process 0 "
              "alone", file=sys.stderr, flush=True)  # fmt: skip
        return False
    print(f"{command}: started as {count} processes; {job} runs on this one (process 0) alone, "
          "on its own devices", file=sys.stderr, flush=True)  # fmt: skip
    return True


# ---------------------------------------------------------------------------------------------
# Bounded failure of multi-process runs.
#
# When one process dies, the others notice only in a collective: gloo (CPU) fails it at once, NCCL
# may hang in it; JAX's coordination service declares the dead task after its heartbeat timeout
# and then aborts every survivor from C++ with a screenful of log lines and a stack trace (its
# abort callback cannot be a Python function). So each process runs a watchdog thread of its own
# over the service's key-value store: it bumps a beat counter, watches the others' counters and
# status keys, and on a silent or failed peer writes one line and leaves with os._exit(1). JAX's
# own heartbeat timeout is kept at least twice ours so that the watchdog speaks first.
# Not so for process 0, which hosts the service: when it dies, the others' clients see the
# service's socket close within milliseconds and abort from C++ (jax 0.10 has no option against
# it; a Python missed_heartbeat_callback dies with std::bad_cast, and a watchdog thread blocked in
# a key-value get wins the race only sometimes), so that case keeps JAX's message (README).

HEARTBEAT_ENV = "SPIN_JAX_HEARTBEAT_SECONDS"
DEFAULT_HEARTBEAT_SECONDS = 30.0
_KV = "spin_jax/watchdog"
# Runtime errors from a collective whose peer went away (gloo: "UNKNOWN: Gloo AllGather failed:
# ... Connection closed by peer"): the cause is the peer, which the watchdog names.
_RUNTIME_STATUS = re.compile(
    r"^(UNKNOWN|INTERNAL|UNAVAILABLE|DEADLINE_EXCEEDED|ABORTED|CANCELLED|FAILED_PRECONDITION): "
)
_watchdog: _Watchdog | None = None


def heartbeat_seconds() -> float:
    """Seconds of silence after which a peer process counts as dead: ``SPIN_JAX_HEARTBEAT_SECONDS``
    (default 30)."""
    value = os.environ.get(HEARTBEAT_ENV)
    if value in (None, ""):
        return DEFAULT_HEARTBEAT_SECONDS
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"environment variable {HEARTBEAT_ENV}={value!r} is not a positive number")
    return seconds


def _initialize(**kwargs: Any) -> None:
    timeout = heartbeat_seconds()
    # JAX's timeout also bounds how long finished processes wait at exit for the last one (its
    # shutdown barrier): keep its default of 100 s unless ours asks for more.
    jax.distributed.initialize(heartbeat_timeout_seconds=int(max(100, 2 * timeout)), **kwargs)
    from jax._src import distributed

    global _watchdog
    _watchdog = _Watchdog(
        distributed.global_state.client,
        jax.process_index(),
        jax.process_count(),
        timeout,
        distributed.global_state.coordinator_address,
    )
    _watchdog.start()
    atexit.register(_watchdog.finish)  # runs before JAX's own shutdown (atexit is LIFO)
    previous = sys.excepthook

    def excepthook(kind, value, tb):
        # An uncaught error: a collective that failed with its peer waits for the watchdog to
        # name that peer (and exit); any other error keeps its traceback and stops the others.
        wd = _watchdog
        if wd is not None and not wd.finishing.is_set() and _peer_may_be_gone(value):
            wd.wait_for_verdict()
        previous(kind, value, tb)
        if wd is not None and not wd.finishing.is_set():
            wd.stop(f"process {wd.index} of {wd.count} failed ({_one_line(value, 300)})", line="")

    sys.excepthook = excepthook


def _peer_may_be_gone(error: BaseException | str) -> bool:
    return isinstance(error, jax.errors.JaxRuntimeError) or bool(_RUNTIME_STATUS.match(str(error)))


def _one_line(text: str, limit: int = 400) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Watchdog:
    """Beats for this process and watches the others (module comment above)."""

    def __init__(self, client: Any, index: int, count: int, timeout: float, address: str | None):
        self.client, self.index, self.count = client, index, count
        self.timeout, self.address = timeout, address
        self.interval = min(2.0, max(0.2, timeout / 10))
        self.finishing = threading.Event()
        self.lock = threading.Lock()  # one reporter: the watchdog or the main thread
        self.thread = threading.Thread(target=self._run, name="spin_jax-watchdog", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _key(self, kind: str, i: int) -> str:
        return f"{_KV}/{kind}/{i}"

    def _entries(self) -> dict[str, str]:
        return dict(self.client.key_value_dir_get(f"{_KV}/"))

    def _run(self) -> None:
        beat, unreachable, done = 0, None, set()
        peers = [j for j in range(self.count) if j != self.index]
        seen = {j: (None, time.monotonic()) for j in peers}  # last beat value and when it changed
        while jax.distributed.is_initialized():  # a program may shut it down itself
            beat += 1
            now = time.monotonic()
            try:
                self.client.key_value_set(self._key("beat", self.index), str(beat), True)
                entries = self._entries()
                unreachable = None
            except Exception as e:  # noqa: BLE001 - the service's errors come in many kinds
                unreachable = unreachable or now
                if now - unreachable > self.timeout and not self.finishing.is_set():
                    self.stop(
                        f"process 0 of {self.count} stopped responding (its coordination service "
                        f"at {self.address} unreachable for {self.timeout:g} s: {_one_line(e, 120)})",
                        tell=False,
                    )
                time.sleep(self.interval)
                continue
            for j in peers:
                status = entries.get(self._key("status", j), "")
                if status.startswith("failed:"):
                    self.stop(status.removeprefix("failed:"), tell=False, gone={j})
                if status == "done":
                    done.add(j)
                value = entries.get(self._key("beat", j))
                if value != seen[j][0]:
                    seen[j] = (value, now)
                elif j not in done and now - seen[j][1] > self.timeout:
                    self.stop(
                        f"process {j} of {self.count} stopped responding "
                        f"(no heartbeat for {self.timeout:g} s)",
                        gone={j},
                    )
            if self.finishing.is_set() and len(done) == len(peers):
                return
            time.sleep(self.interval)

    def stop(
        self, reason: str, tell: bool = True, line: str | None = None, gone: Collection[int] = ()
    ) -> NoReturn:
        """Writes ``line`` (default ``error: <reason>; stopping``; "" writes nothing) and exits 1.

        ``tell``: the reason is posted for the other processes (else only "stopped"). Process 0
        holds the key-value store: it first waits a few beats for the others but ``gone`` to post
        a status (they would abort from C++ once the store is gone)."""
        if not self.lock.acquire(blocking=False):
            while True:  # the other reporter is already on its way out
                time.sleep(60)
        if line is None:
            line = f"error: {reason}; stopping"
        if line:
            print(line, file=sys.stderr, flush=True)
        try:
            status = "failed:" + reason if tell else "stopped"
            self.client.key_value_set(self._key("status", self.index), status, True)
            others = [j for j in range(1, self.count) if j not in gone] if self.index == 0 else []
            deadline = time.monotonic() + 3 * self.interval + 2
            while others and time.monotonic() < deadline:
                time.sleep(self.interval / 2)
                entries = self._entries()
                others = [j for j in others if self._key("status", j) not in entries]
        except Exception:  # noqa: BLE001, S110 - leaving anyway
            pass
        sys.stdout.flush()
        os._exit(1)

    def wait_for_verdict(self) -> None:
        """Gives the watchdog a heartbeat timeout to find a dead peer (it then exits the process)."""
        time.sleep(self.timeout + 4 * self.interval + 2)

    def finish(self) -> None:
        """At a normal exit: the others stop watching this process."""
        self.finishing.set()
        if not jax.distributed.is_initialized():
            return
        try:
            self.client.key_value_set(self._key("status", self.index), "done", True)
        except Exception:  # noqa: BLE001, S110 - the service may be gone already
            pass


def exit_on_error(error: BaseException | str) -> NoReturn:
    """Ends a command that failed with ``error``: ``error: <error>`` on stderr and exit status 1.

    In a multi-process run the other processes are told (they print ``error: process <i> of <n>
    failed (<error>); stopping`` and exit 1) and this process leaves at once, without JAX's
    shutdown barrier, which the others would never reach. A runtime error of a collective is
    first held back for up to a heartbeat timeout: when a peer died, the watchdog names it
    instead.
    """
    wd = _watchdog
    if wd is None or wd.finishing.is_set():
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(1)
    if _peer_may_be_gone(error):
        wd.wait_for_verdict()
    wd.stop(
        f"process {wd.index} of {wd.count} failed ({_one_line(error, 300)})",
        line=f"error: {_one_line(error, 2000)}",
    )
