"""Online PSO killed (SIGKILL) in the middle of a round's sampling resumes to the same weights as
an uninterrupted run (two simulated devices, the launcher, a tiny random PickScore)."""

import os
import subprocess
import sys

import numpy as np
import pytest
from test_trainer import ROOT, kill_when, parquet  # noqa: F401  (fixture)
from tiny_sd import WORDS, make_tiny_sdxl

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _cmd(workdir, model, data, scorer):
    return [
        sys.executable, "launch/train.py", "--config=configs/pso.py:online",
        f"--workdir={workdir}", f"--config.model.path={model}", f"--config.data.path={data}",
        f"--config.pso.scorers.pickscore.model={scorer}", "--config.model.dtype=float32",
        "--config.model.attention_impl=", "--config.model.remat=False",
        "--config.model.lora.rank=2", "--config.data.resolution=16",
        "--config.data.max_examples=0", "--config.iterations=2", "--config.pso.pairs_per_round=4",
        "--config.sample.batch_size=4", "--config.train.batch_size=4",
        "--config.train.per_device_batch_size=0", "--config.train.steps=3",
        "--config.train.learning_rate=0.001", "--config.checkpoint.every_rounds=1",
        "--config.log.every_steps=1", "--config.log.grid_prompts=()",
    ]  # fmt: skip


def test_sigkill_mid_rollout_resumes_to_the_same_weights(parquet, tmp_path):  # noqa: F811
    from spin_jax.eval.tiny import write_tiny_scorers
    from spin_jax.models import load_pretrained
    from spin_jax.train import checkpoints

    model = make_tiny_sdxl(str(tmp_path / "turbo"), "turbo")
    scorer = write_tiny_scorers(str(tmp_path / "scorers"), words=WORDS)["pickscore"]["model"]
    flags = "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0"
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    done = subprocess.run(_cmd(full, model, parquet, scorer), cwd=ROOT, env=env,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    # Killed once round 2's first shard of pairs is written (2 pairs per shard, 2 shards).
    first = os.path.join(killed, "iteration_2", "pairs", "trajectories", "shard_00000.index.npy")
    kill_when(_cmd(killed, model, parquet, scorer), env, first)
    assert not os.path.isfile(os.path.join(killed, "iteration_2", "summary.json"))
    again = subprocess.run(_cmd(killed, model, parquet, scorer), cwd=ROOT, env=env,
                           capture_output=True, text=True)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    base = load_pretrained(model).params["unet"]
    import jax

    a = jax.tree.leaves(checkpoints.load_iteration_params(full, 2, base))
    b = jax.tree.leaves(checkpoints.load_iteration_params(killed, 2, base))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
