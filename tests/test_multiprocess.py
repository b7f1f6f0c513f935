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


def test_whole_run_on_two_processes(tmp_path):
    """launch/train.py (configs/seppo.py: rollouts on every process, references read back,
    grids and summaries on process 0) as two processes of one CPU device each, then the same
    command as one process with two devices: both finish every round with the same weights."""
    import test_trainer as TT
    from test_loop import _train_cmd

    from spin_jax.models import load_pretrained

    model_dir = TT.make_tiny_sd(str(tmp_path / "model"), "sd1")
    from spin_jax.toy.shapes import write_imagefolder

    folder = str(tmp_path / "shapes")
    write_imagefolder(folder, "clean", 16, seed=0, size=16)
    base = dict(os.environ, JAX_PLATFORMS="cpu")
    two, one = str(tmp_path / "two"), str(tmp_path / "one")
    extra = ["--config.iterations=2", "--config.train.steps=2"]
    port = _free_port()
    procs = []
    for i in range(2):
        env = dict(base, XLA_FLAGS="--xla_force_host_platform_device_count=1",
                   JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                   JAX_PROCESS_ID=str(i))  # fmt: skip
        cmd = _train_cmd(two, model_dir, folder, "configs/seppo.py") + extra
        procs.append(subprocess.Popen(cmd, cwd=TT.ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))  # fmt: skip
    env = dict(base, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    cmd = _train_cmd(one, model_dir, folder, "configs/seppo.py") + extra
    single = subprocess.run(cmd, cwd=TT.ROOT, env=env, capture_output=True, text=True)
    try:
        logs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert single.returncode == 0, single.stderr[-3000:]
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-4000:]
    for k in (1, 2):
        for run in (one, two):
            assert os.path.isfile(os.path.join(run, f"iteration_{k}", "summary.json"))
            assert os.path.isfile(os.path.join(run, f"iteration_{k}", "grid.png"))
    like = load_pretrained(model_dir).params["unet"]
    a = jax.tree.leaves(TT.checkpoints.load_iteration_params(one, 2, like))
    b = jax.tree.leaves(TT.checkpoints.load_iteration_params(two, 2, like))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
