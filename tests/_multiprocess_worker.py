"""One process of the two-process data-parallel check (run by tests/test_multiprocess.py).

Usage: python tests/_multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT OUT.npz
Each process starts jax.distributed on 127.0.0.1:PORT, loads only its own rows of the global
batch, runs the same two SPIN steps as tests/test_train_step.run_steps and writes the new params.
"""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from spin_jax import parallel  # noqa: E402

GLOBAL_BATCH = 16
N_STEPS = 2


def main(process_id: int, num_processes: int, port: int, out: str) -> None:
    assert parallel.init_distributed(f"127.0.0.1:{port}", num_processes, process_id)
    # Only now may JAX compute: the test module builds meshes and arrays at import.
    import test_train_step as T

    from spin_jax.train.state import TrainState

    mesh = parallel.make_mesh()
    assert jax.process_count() == num_processes and mesh.size == jax.device_count()
    full = T.make_batch("spin", GLOBAL_BATCH)
    rows = parallel.process_batch_indices(GLOBAL_BATCH, mesh)
    assert len(rows) == GLOBAL_BATCH // num_processes
    batch = parallel.global_batch_from_local({k: v[rows] for k, v in full.items()}, mesh)
    params = T.init_params(0)
    ref = parallel.replicate(jax.tree.map(lambda p: p + 0.01, params), mesh)
    text = parallel.replicate(T.TEXT_PARAMS, mesh)
    state = TrainState.create(parallel.replicate(params, mesh), T.TX, mesh=mesh)
    fn = T.get_step("spin", mesh)
    for i in range(N_STEPS):
        key = parallel.replicate(jax.random.key(100 + i), mesh)
        state, metrics = fn(state, ref, text, batch, key)
    assert bool(metrics["is_finite"].addressable_data(0))
    flat = {
        "/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf.addressable_data(0))
        for path, leaf in jax.tree_util.tree_flatten_with_path(state.params)[0]
    }
    flat["loss"] = np.asarray(metrics["loss"].addressable_data(0))
    flat["rows"] = rows
    np.savez(out, **flat)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
