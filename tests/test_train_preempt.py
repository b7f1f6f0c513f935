"""launch/train.py under a scheduler: a grace period the checkpoint overruns, two trainers on one
workdir. Each run is a subprocess on a tiny pipeline; one uninterrupted run is the reference."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from spin_jax.train import checkpoints, loop
from spin_jax.train.config import base_config, validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 8
ENV = dict(
    os.environ,
    PYTHONPATH=ROOT,  # the child imports this checkout's spin_jax
    JAX_PLATFORMS="cpu",
    XLA_FLAGS="--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0",
)


@pytest.fixture(scope="module")
def model_dir(sd1_model_dir):
    return sd1_model_dir


@pytest.fixture(scope="module")
def folder(shapes_folder):
    return shapes_folder


def _cmd(workdir, model_dir, folder, *extra):
    return [
        sys.executable,
        os.path.join(ROOT, "launch", "train.py"),
        f"--config={os.path.join(ROOT, 'configs', 'sft.py')}",
        f"--workdir={workdir}",
        f"--config.model.path={model_dir}",
        f"--config.data.path={folder}",
        "--config.data.source=imagefolder",
        "--config.model.dtype=float32",
        "--config.model.attention_impl=",
        "--config.model.remat=False",
        "--config.data.resolution=16",
        f"--config.train.steps={STEPS}",
        "--config.train.batch_size=4",
        "--config.train.per_device_batch_size=0",
        "--config.train.accum_steps=1",
        "--config.train.warmup_steps=2",
        "--config.train.learning_rate=0.001",
        "--config.checkpoint.every_steps=2",
        "--config.log.every_steps=1",
        "--config.log.grid_prompts=()",  # no grid: nothing to sample
        *extra,
    ]


def _start(cmd):
    return subprocess.Popen(
        cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _train_steps(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.endswith("\n")]
    return [r["step"] for r in rows if "train/loss" in r]


def _wait_for(predicate, proc, timeout=300.0):
    end = time.time() + timeout
    while time.time() < end and proc.poll() is None:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"gave up waiting (exit status {proc.poll()})")


def _unet_leaves(workdir, model_dir):
    from spin_jax.models import load_pretrained

    like = load_pretrained(model_dir).params["unet"]
    return [np.asarray(x) for x in jax.tree.leaves(checkpoints.load_iteration_params(workdir, 1, like))]  # fmt: skip


def _assert_same_weights(a, b, model_dir):
    for x, y in zip(_unet_leaves(a, model_dir), _unet_leaves(b, model_dir), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def lone(model_dir, folder, tmp_path_factory):
    """The reference: the same command, uninterrupted and alone, in its own workdir."""
    workdir = str(tmp_path_factory.mktemp("lone") / "run")
    res = subprocess.run(_cmd(workdir, model_dir, folder), cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert _train_steps(workdir) == list(range(1, STEPS + 1))
    return workdir


def test_grace_seconds_validated_and_free_on_restart(tmp_path):
    c = base_config()
    c.model.path, c.data.path = "/m", "/d"
    assert c.checkpoint.grace_seconds == 25.0
    for bad in (-1.0, float("nan"), float("inf")):
        c.checkpoint.grace_seconds = bad
        with pytest.raises(ValueError, match=r"config\.checkpoint\.grace_seconds = .*>= 0"):
            validate(c)
    c.checkpoint.grace_seconds = 0.0  # no limit
    validate(c)
    # An operational setting: a restart may change it without "another config".
    loop.check_workdir(str(tmp_path), c)
    c.checkpoint.grace_seconds = 5.0
    loop.check_workdir(str(tmp_path), c)


def test_grace_period_too_short_for_the_checkpoint(model_dir, folder, lone, tmp_path):
    """SIGTERM with a grace period shorter than the step in flight and its checkpoint write: the
    run ends on its own, in time, with one line naming the newest intact checkpoint; the rerun
    resumes from it and ends as the uninterrupted run."""
    run = str(tmp_path / "run")
    cmd = _cmd(run, model_dir, folder, "--config.checkpoint.grace_seconds=0.05")
    proc = _start(cmd)
    _wait_for(lambda: checkpoints.steps(run, 1), proc)  # one intact checkpoint (step 2)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert time.time() - t0 < 20, err[-3000:]
    assert proc.returncode == 75, err[-3000:]
    assert "Traceback" not in err
    lines = [x for x in err.splitlines() if x.startswith("grace period")]
    assert len(lines) == 1, err[-3000:]
    assert not any(x.startswith("interrupted") for x in err.splitlines())
    saved = checkpoints.steps(run, 1)
    cut = int(lines[0].split("checkpoint of iteration 1 step ")[1].split(" ")[0])
    assert lines[0] == (
        f"grace period of 0.05 s ran out before the checkpoint of iteration 1 step {cut} was "
        f"written; the newest intact checkpoint is iteration 1 step {saved[-1]}; rerun the same "
        "command to resume"
    )
    assert cut not in saved and cut > saved[-1] >= 2
    assert not os.path.exists(os.path.join(run, ".lock"))  # released before the exit
    # What is left of the cut write is orbax's temporary folder, which nothing trusts.
    ckpt = checkpoints.checkpoint_dir(run, 1)
    assert all(n.isdigit() or ".orbax-checkpoint-tmp" in n for n in os.listdir(ckpt))

    rerun = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"(checkpoint: round 1 step {saved[-1]})" in rerun.stdout + rerun.stderr
    assert "stale lock" not in rerun.stderr
    assert _train_steps(run) == list(range(1, STEPS + 1))  # rows past the checkpoint dropped
    _assert_same_weights(run, lone, model_dir)


def test_second_trainer_on_a_busy_workdir(model_dir, folder, lone, tmp_path):
    """Two launch/train.py on one workdir: the second is refused at once naming the holder, the
    first finishes as a lone run and its workdir holds nothing of the second."""
    run = str(tmp_path / "run")
    lock = os.path.join(run, ".lock")

    def held():
        try:
            with open(lock) as f:
                return json.load(f)["pid"] == first.pid
        except (OSError, ValueError, KeyError):
            return False

    first = _start(_cmd(run, model_dir, folder))
    try:
        _wait_for(held, first)
        t0 = time.time()
        second = subprocess.run(_cmd(run, model_dir, folder), cwd=ROOT, env=ENV,
                                capture_output=True, text=True, timeout=300)  # fmt: skip
        took = time.time() - t0
        assert first.poll() is None, "the first run ended before the second was refused"
    finally:
        out, err = first.communicate(timeout=600)
    assert second.returncode == 1, second.stderr[-3000:]
    assert took < 60
    errors = [x for x in second.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in second.stderr, second.stderr[-3000:]
    assert f"is in use by another run: host {socket.gethostname()}, pid {first.pid}" in errors[0]
    assert lock in errors[0]

    assert first.returncode == 0, err[-3000:]
    assert not os.path.exists(lock)
    assert _train_steps(run) == list(range(1, STEPS + 1))  # no rows of the second
    assert sorted(os.listdir(run)) == sorted(os.listdir(lone))
    for sub in ("latent_cache", os.path.join("iteration_1", "checkpoints")):
        assert sorted(os.listdir(os.path.join(run, sub))) == sorted(
            os.listdir(os.path.join(lone, sub))
        )
    _assert_same_weights(run, lone, model_dir)
