"""TrainState: the one pytree a training run carries (step, parameters, optimizer state)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct


def _as_float32(x: Any) -> jax.Array:
    x = jnp.asarray(x)
    return x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x


@struct.dataclass
class TrainState:
    """``step`` counts applied optimizer updates; ``tx`` is static (not part of the pytree).

    Parameters are float32 master weights; the model's compute dtype is the model's business.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    tx: optax.GradientTransformation = struct.field(pytree_node=False)

    @classmethod
    def create(
        cls, params: Any, tx: optax.GradientTransformation, *, mesh: jax.sharding.Mesh | None = None
    ) -> TrainState:
        """A fresh state. With ``mesh`` the state is built under jit directly in its sharded
        layout: replicated, or split over the mesh's ``fsdp`` axis when that is larger than 1
        (see ``parallel.fsdp_param_sharding``), so a large model never sits whole on one device."""

        def build(p):
            p = jax.tree.map(_as_float32, p)
            return cls(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p), tx=tx)

        if mesh is None:
            return build(params)
        from spin_jax import parallel

        shardings = parallel.fsdp_param_sharding(mesh, jax.eval_shape(build, params))
        return jax.jit(build, out_shardings=shardings)(params)

    def apply_gradients(self, grads: Any) -> TrainState:
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        params = optax.apply_updates(self.params, updates)
        return self.replace(step=self.step + 1, params=params, opt_state=opt_state)


def state_sharding(state: TrainState) -> Any:
    """The sharding of every leaf of a (placed) state, for ``jit_train_step``'s output."""
    return jax.tree.map(lambda x: x.sharding, state)
