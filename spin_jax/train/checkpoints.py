"""Checkpoints of a run: where they live, how they are written, found and read back.

Round k of a run keeps its checkpoints in ``<workdir>/iteration_k/checkpoints/<step>``, ``step``
counting the optimizer steps of that round (1..train.steps); the last step of a round is its
end. Each holds the UNet parameters, the optimizer state and a small JSON ``meta``. Everything
that reads a run's weights (the trainer's reference rule, evaluation, export) reads them here.

A LoRA run (``model.lora.rank > 0``) checkpoints its adapter and the adapter's optimizer state
only; ``<workdir>/lora.json`` records the adapted layers, their ranks and the scale, so readers
rebuild the adapter's tree without the config. ``load_iteration_params`` of a LoRA run returns
the merged UNet params, ``load_iteration_adapter`` the adapter itself.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from spin_jax.files import write_json
from spin_jax.train.state import TrainState


class CheckpointWriteError(OSError):
    pass


class CheckpointReadError(ValueError):
    """A finished checkpoint that does not read back (damaged or truncated files)."""


def round_dir(workdir: str, round_: int) -> str:
    return os.path.join(workdir, f"iteration_{round_}")


def checkpoint_dir(workdir: str, round_: int) -> str:
    return os.path.abspath(os.path.join(round_dir(workdir, round_), "checkpoints"))


def manager(workdir: str, round_: int, max_to_keep: int = 2) -> ocp.CheckpointManager:
    """An async CheckpointManager for round ``round_`` (one per round: a round's end is kept
    while its step checkpoints rotate)."""
    return ocp.CheckpointManager(
        checkpoint_dir(workdir, round_),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max(1, max_to_keep), enable_async_checkpointing=True
        ),
    )


def steps(workdir: str, round_: int) -> list[int]:
    """The finished checkpoint steps of round ``round_`` (orbax ignores partial writes)."""
    path = checkpoint_dir(workdir, round_)
    if not os.path.isdir(path):
        return []
    return sorted(
        int(n) for n in os.listdir(path) if n.isdigit() and os.path.isdir(os.path.join(path, n))
    )


def rounds_with_end(workdir: str, rounds: range, steps_per_round: int) -> list[int]:
    """The rounds among ``rounds`` whose end (step ``steps_per_round``) is checkpointed."""
    return [r for r in rounds if steps_per_round in steps(workdir, r)]


def latest(workdir: str, num_rounds: int) -> tuple[int, int] | None:
    """(round, step) of the newest checkpoint of the run, or None."""
    for r in range(num_rounds, 0, -1):
        found = steps(workdir, r)
        if found:
            return r, found[-1]
    return None


def move_aside(workdir: str, round_: int, step: int) -> str:
    """Renames an unreadable checkpoint out of orbax's sight (kept for inspection, not deleted);
    returns its new path."""
    path = os.path.join(checkpoint_dir(workdir, round_), str(step))
    dest = f"{path}.unreadable"
    n = 1
    while os.path.exists(dest):
        n += 1
        dest = f"{path}.unreadable{n}"
    os.replace(path, dest)
    return dest


def restore_latest(workdir: str, num_rounds: int, like: TrainState,
                   say: Any = print) -> tuple[TrainState, tuple[int, int] | None]:  # fmt: skip
    """The newest checkpoint that reads back, and its (round, step); (like, None) if none.

    A checkpoint that fails to restore (a disk error, a truncated file) is reported in one
    line and moved aside, and the next older one is tried."""
    while (found := latest(workdir, num_rounds)) is not None:
        r, s = found
        try:
            return restore_state(workdir, r, s, like), found
        except Exception as e:  # orbax/tensorstore raise many types for a damaged file
            if jax.process_count() > 1:
                raise  # every process must agree on what to resume from: stop instead
            moved = move_aside(workdir, r, s)
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            say(f"checkpoint {os.path.join(checkpoint_dir(workdir, r), str(s))} is unreadable "
                f"({type(e).__name__}: {first}); moved to {moved}; trying the previous one")  # fmt: skip
    return like, None


def save(mgr: ocp.CheckpointManager, step: int, state: TrainState, meta: dict) -> None:
    # Orbax writes into a temporary folder and renames it when complete, so a failed write
    # (disk full, ...) leaves the previous checkpoint as it was.
    try:
        mgr.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(state.params),
                opt_state=ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state}),
                meta=ocp.args.JsonSave(meta),
            ),
        )
    except OSError as e:
        mgr.wait_until_finished()  # let the previous (async) save complete
        raise CheckpointWriteError(
            f"writing checkpoint {step} to {mgr.directory} failed: {e}. The previous "
            f"checkpoint ({mgr.latest_step()}) is intact; free space and rerun the command "
            "to resume from it."
        ) from e


def read_meta(workdir: str, round_: int, step: int) -> dict:
    """The JSON ``meta`` saved with checkpoint (round_, step) ({} when it has none)."""
    with ocp.CheckpointManager(checkpoint_dir(workdir, round_)) as mgr:
        try:
            restored = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        except (KeyError, ValueError, FileNotFoundError):
            return {}
    return dict(restored["meta"] or {})


def restore_state(workdir: str, round_: int, step: int, like: TrainState) -> TrainState:
    """The whole train state saved at (round_, step), in ``like``'s layout."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    with ocp.CheckpointManager(checkpoint_dir(workdir, round_)) as mgr:
        restored = mgr.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract.params),
                opt_state=ocp.args.StandardRestore(
                    {"step": abstract.step, "opt_state": abstract.opt_state}
                ),
            ),
        )
    rest = restored["opt_state"]
    return like.replace(params=restored["params"], step=rest["step"], opt_state=rest["opt_state"])


LORA_FILE = "lora.json"


def write_lora_info(workdir: str, adapter: Any, scale: float) -> None:
    """Records a LoRA run's layers, ranks and scale in ``<workdir>/lora.json``."""
    from spin_jax.models import lora

    info = {"scale": float(scale), "layers": lora.describe(adapter)}
    write_json(os.path.join(workdir, LORA_FILE), info, sort_keys=True)


def read_lora_info(workdir: str) -> dict | None:
    """``{"scale", "layers": {module: rank}}`` of a LoRA run; None for a full fine-tune."""
    path = os.path.join(workdir, LORA_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def load_iteration_adapter(workdir: str, iteration: int, unet_like: Any,
                           step: int | None = None) -> tuple[Any, float]:  # fmt: skip
    """``(adapter, scale)`` of round ``iteration`` of a LoRA run (host arrays); ``unet_like``:
    the base UNet params (or their shapes), from which the adapter's tree is rebuilt."""
    from spin_jax.models import lora

    info = read_lora_info(workdir)
    if info is None:
        raise ValueError(f"{workdir} is not a LoRA run (no {LORA_FILE})")
    like = lora.zeros(unet_like, info["layers"])
    return _load_params(workdir, iteration, like, step), float(info["scale"])


def load_iteration_params(workdir: str, iteration: int, like: Any, step: int | None = None) -> Any:
    """The UNet params of round ``iteration`` at checkpoint ``step`` (default: its last one),
    as host arrays (the caller places them). ``like``: the UNet params (or their shapes); of a
    LoRA run, the base UNet params, which come back with the round's adapter merged; an adapter
    tree as ``like`` reads the adapter itself."""
    from spin_jax.models import lora

    info = read_lora_info(workdir)
    if info is not None and not lora.is_adapter(like):
        adapter, scale = load_iteration_adapter(workdir, iteration, like, step)
        return jax.device_get(lora.merge_jit(like, adapter, scale))
    return _load_params(workdir, iteration, like, step)


def _load_params(workdir: str, iteration: int, like: Any, step: int | None) -> Any:
    path = checkpoint_dir(workdir, iteration)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoints for iteration {iteration} in {workdir}")
    with ocp.CheckpointManager(path) as mgr:
        found = mgr.all_steps()
        if not found:
            raise FileNotFoundError(f"no finished checkpoint in {path}")
        if step is None:
            step = max(found)
        elif step not in found:
            raise FileNotFoundError(
                f"no checkpoint of step {step} in {path} (have {sorted(found)}); "
                "keep more with checkpoint.max_to_keep"
            )
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        try:
            restored = mgr.restore(
                step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract))
            )
        except Exception as e:  # orbax/tensorstore raise many types for a damaged file
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            raise CheckpointReadError(
                f"checkpoint {os.path.join(path, str(step))} is unreadable "
                f"({type(e).__name__}: {first})"
            ) from None
    return jax.device_get(restored["params"])
