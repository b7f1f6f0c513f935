"""Two processes with jax.distributed (CPU, gloo) give the update of one process."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
import test_train_step as T
from _multiprocess_worker import GLOBAL_BATCH, N_STEPS

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_multiprocess_worker.py")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
    port = _free_port()
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    outs = [tmp_path / f"p{i}.npz" for i in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, WORKER, str(i), "2", str(port), str(outs[i])],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    try:
        # The same global batch and steps in this one process (8 devices),
        # computed while the workers run.
        state, metrics, _ = T.run_steps(
            "spin", T.MESH8, T.make_batch("spin", GLOBAL_BATCH), n_steps=N_STEPS
        )
        want = {
            "/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(state.params))[0]
        }
        logs = []
        for p in procs:
            try:
                logs.append(p.communicate(timeout=240)[0])
            except subprocess.TimeoutExpired:
                pytest.fail("two-process run timed out")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-4000:]

    results = [dict(np.load(o)) for o in outs]
    # Each process loaded a different half of the batch.
    assert set(results[0]["rows"]).isdisjoint(results[1]["rows"])
    for got in results:
        np.testing.assert_allclose(got["loss"], metrics[-1]["loss"], rtol=1e-5)
        for name, value in want.items():
            # Tolerance as in test_train_step: 1e-5 against an Adam step of 3e-3 per step.
            np.testing.assert_allclose(got[name], value, atol=1e-5, err_msg=name)
