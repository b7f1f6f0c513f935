"""Temporary alias of the round loop's names (being removed)."""

from spin_jax.train.checkpoints import CheckpointWriteError, load_iteration_params  # noqa: F401
from spin_jax.train.loop import NonFiniteLossError, run  # noqa: F401
from spin_jax.train.metrics import save_grid  # noqa: F401
