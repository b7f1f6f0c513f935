# ruff: noqa: F811  (the fixtures imported from test_trainer are parameters here)
"""Two processes with jax.distributed (CPU, gloo) give the update of one process; launch/train.py
as two processes (SPIN, SePPO, DPO, online PSO) equals one; a dead or failing process stops the
other; launch/export.py and launch/evaluate.py under a multi-process launcher run on process 0."""

import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import test_train_step as T
from _multiprocess_worker import GLOBAL_BATCH, N_STEPS
from test_trainer import ROOT, _unet_leaves, folder, model_dir, parquet  # noqa: F401  (fixtures)

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
    from tiny_sd import make_tiny_sd

    from spin_jax.models import load_pretrained

    model_dir = make_tiny_sd(str(tmp_path / "model"), "sd1")
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


# ---------------------------------------------------------------------------------------------
# launch/train.py as two processes of one CPU device each (processes on one machine standing in
# for hosts; they share the workdir as hosts share a file system).

FLAGS = "--xla_backend_optimization_level=0"
TINY = [
    "--config.iterations=2", "--config.train.steps=4", "--config.train.batch_size=4",
    "--config.train.accum_steps=2", "--config.checkpoint.every_steps=2",
]  # fmt: skip


def _cmd(workdir, model_dir, data, config, extra=()):
    from test_loop import _train_cmd

    return _train_cmd(workdir, model_dir, data, config) + TINY + list(extra)


def _start_two(cmd, logs):
    """``cmd`` as processes 0 and 1 of a jax.distributed run; stderr to ``logs[i]``."""
    port = _free_port()
    procs = []
    for i in range(2):
        env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                   XLA_FLAGS=f"--xla_force_host_platform_device_count=1 {FLAGS}",
                   JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))  # fmt: skip
        env.pop("SPIN_JAX_HEARTBEAT_SECONDS", None)  # the default is what is tested
        with open(logs[i], "ab") as err:
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                          stderr=err))  # fmt: skip
    return procs


def _run_two(cmd, tmp_path, name):
    logs = [tmp_path / f"{name}{i}.err" for i in range(2)]
    procs = _start_two(cmd, logs)
    try:
        for p in procs:
            p.wait(timeout=600)
    finally:
        _kill(procs)
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log.read_text()[-4000:]


def _run_one(cmd):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count=2 {FLAGS}")  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


def _kill(procs):
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def _assert_same_unet(a, b, iteration, model_dir):
    from spin_jax.models import load_pretrained

    base = jax.tree.leaves(load_pretrained(model_dir).params["unet"])
    x, y = _unet_leaves(a, iteration, model_dir), _unet_leaves(b, iteration, model_dir)
    assert any(np.abs(u - np.asarray(v)).max() > 1e-4 for u, v in zip(x, base, strict=True))
    for u, v in zip(x, y, strict=True):
        np.testing.assert_allclose(u, v, atol=1e-5, rtol=0)


def test_dpo_on_two_processes_equals_one(model_dir, parquet, tmp_path):
    """configs/dpo.py on Pick-a-Pic pairs: two processes end with one process's weights."""
    # The latent cache is built by the one-process run and shared: spin_jax/train/batches.py asks
    # each process on its own whether the cache is complete, and a process that finds it finished
    # by a faster peer skips the build's collectives (the two then fail out of step).
    extra = ["--config.iterations=1", "--config.data.source=pickapic",
             "--config.train.per_device_batch_size=0",
             f"--config.data.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    two, one = str(tmp_path / "two"), str(tmp_path / "one")
    _run_one(_cmd(one, model_dir, parquet, "configs/dpo.py", extra))
    _run_two(_cmd(two, model_dir, parquet, "configs/dpo.py", extra), tmp_path, "dpo")
    _assert_same_unet(one, two, 1, model_dir)


def test_killed_process_stops_the_other_and_the_rerun_resumes(model_dir, folder, tmp_path):
    """configs/spin.py on two processes; process 1 SIGKILLed mid-iteration 1: process 0 stops
    within a minute with one line naming process 1 (not JAX's coordination-service abort), and
    the same two commands rerun end with the weights of an uninterrupted run."""
    killed, full = str(tmp_path / "killed"), str(tmp_path / "full")
    cache = [f"--config.data.cache_dir={tmp_path / 'cache'}"]  # shared: see the DPO test
    _run_one(_cmd(full, model_dir, folder, "configs/spin.py", cache))
    cmd = _cmd(killed, model_dir, folder, "configs/spin.py", cache)
    logs = [tmp_path / f"kill{i}.err" for i in range(2)]
    procs = _start_two(cmd, logs)
    try:
        target = os.path.join(killed, "iteration_1", "checkpoints", "2")
        deadline = time.monotonic() + 400
        while not os.path.exists(target) and time.monotonic() < deadline:
            assert all(p.poll() is None for p in procs), logs[0].read_text()[-3000:]
            time.sleep(0.1)
        assert os.path.exists(target), "iteration 1 never reached its first checkpoint"
        before = logs[0].stat().st_size
        procs[1].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        try:
            procs[0].wait(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail("process 0 still runs 2 minutes after process 1 was killed")
        took = time.monotonic() - killed_at
        print(f"process 0 stopped {took:.1f} s after the kill")
    finally:
        _kill(procs)
    after = logs[0].read_bytes()[before:].decode(errors="replace")
    assert procs[0].returncode == 1, after
    assert "error: process 1 of 2 stopped responding" in after, after
    assert took < 60, f"process 0 took {took:.0f} s to stop: {after}"
    assert len(after.splitlines()) <= 10, after
    assert not os.path.isfile(os.path.join(killed, "iteration_1", "summary.json"))

    _run_two(cmd, tmp_path, "rerun")
    _assert_same_unet(full, killed, 2, model_dir)


_FAILING = """
import sys, time
from spin_jax import parallel
parallel.init_distributed(f"127.0.0.1:{sys.argv[2]}", 2, int(sys.argv[1]))
from jax.experimental import multihost_utils
import numpy as np
try:
    for i in range(200):
        multihost_utils.process_allgather(np.ones(2))
        if i == 0:
            print("connected", flush=True)
        if i == 5 and sys.argv[1] == sys.argv[3]:
            raise FileNotFoundError("config.data.path: /nowhere does not exist")
        time.sleep(0.05)
except FileNotFoundError as e:
    parallel.exit_on_error(e)
"""


@pytest.mark.parametrize("failing", [1, 0])  # 0: the coordinator, which holds the store
def test_error_on_one_process_stops_the_other_with_its_message(tmp_path, failing):
    port = str(_free_port())
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
               XLA_FLAGS="--xla_force_host_platform_device_count=1")  # fmt: skip
    procs = [subprocess.Popen([sys.executable, "-c", _FAILING, str(i), port, str(failing)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for i in range(2)]  # fmt: skip
    try:
        errs = [p.communicate(timeout=120)[1] for p in procs]
    finally:
        _kill(procs)
    assert [p.returncode for p in procs] == [1, 1], errs
    other = 1 - failing
    assert errs[failing].strip().splitlines()[-1] == (
        "error: config.data.path: /nowhere does not exist"
    )
    assert errs[other].strip().splitlines() == [
        f"error: process {failing} of 2 failed (config.data.path: /nowhere does not exist); "
        "stopping"
    ]


def test_killed_coordinator_stops_the_other(tmp_path):
    """SIGKILL of process 0 (it hosts JAX's coordination service): process 1 stops at once, but
    with JAX's own abort (SIGABRT and its multi-line message: jax 0.10's client calls a C++ fatal
    error handler on the lost service, which cannot be replaced from Python; README)."""
    port = str(_free_port())
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
               XLA_FLAGS="--xla_force_host_platform_device_count=1")  # fmt: skip
    procs = [subprocess.Popen([sys.executable, "-c", _FAILING, str(i), port, "-1"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]  # fmt: skip
    try:
        for line in procs[1].stdout:  # gloo says its own words on stdout first
            if line.strip() == "connected":
                break
        assert procs[1].poll() is None, procs[1].communicate()[1]
        procs[0].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        try:
            err = procs[1].communicate(timeout=60)[1]
        except subprocess.TimeoutExpired:
            pytest.fail("process 1 still runs a minute after process 0 was killed")
    finally:
        _kill(procs)
    assert procs[1].returncode != 0 and time.monotonic() - killed_at < 60, err


def test_heartbeat_seconds(monkeypatch):
    from spin_jax import parallel

    monkeypatch.delenv(parallel.HEARTBEAT_ENV, raising=False)
    assert parallel.heartbeat_seconds() == 30.0
    monkeypatch.setenv(parallel.HEARTBEAT_ENV, "7.5")
    assert parallel.heartbeat_seconds() == 7.5
    monkeypatch.setenv(parallel.HEARTBEAT_ENV, "soon")
    with pytest.raises(ValueError, match="SPIN_JAX_HEARTBEAT_SECONDS='soon'"):
        parallel.heartbeat_seconds()


def test_online_pso_on_two_processes_equals_one(parquet, tmp_path):  # noqa: F811
    """configs/pso.py:online (tiny SDXL-Turbo, tiny PickScore): each process samples and scores
    its own shards of a round's pairs, both train on all of them; two processes of one device
    end with the weights of one process with two devices."""
    from test_pso_resume import _cmd as pso_cmd
    from tiny_sd import WORDS, make_tiny_sdxl

    from spin_jax.eval.tiny import write_tiny_scorers
    from spin_jax.models import load_pretrained
    from spin_jax.train import checkpoints

    model = make_tiny_sdxl(str(tmp_path / "turbo"), "turbo")
    scorer = write_tiny_scorers(str(tmp_path / "scorers"), words=WORDS)["pickscore"]["model"]
    two, one = str(tmp_path / "two"), str(tmp_path / "one")
    _run_one(pso_cmd(one, model, parquet, scorer))
    _run_two(pso_cmd(two, model, parquet, scorer), tmp_path, "pso")
    for run in (one, two):
        assert os.path.isfile(os.path.join(run, "iteration_2", "summary.json"))
    base = load_pretrained(model).params["unet"]
    a = jax.tree.leaves(checkpoints.load_iteration_params(one, 2, base))
    b = jax.tree.leaves(checkpoints.load_iteration_params(two, 2, base))
    assert any(np.abs(np.asarray(x) - np.asarray(y)).max() > 1e-4
               for x, y in zip(a, jax.tree.leaves(base), strict=True))  # fmt: skip
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# launch/export.py and launch/evaluate.py started by a multi-process launcher: process 0 does the
# whole job alone, the others write nothing.


def _as_process(i, cmd):
    """``cmd`` as process ``i`` of 2 of a launcher (None: a plain command), one CPU device."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1")  # fmt: skip
    if i is not None:
        env.update(JAX_COORDINATOR_ADDRESS="127.0.0.1:1", JAX_NUM_PROCESSES="2",
                   JAX_PROCESS_ID=str(i))  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _files(folder):
    out = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


def test_export_and_evaluate_started_as_two_processes(tmp_path):
    """Process 1 exits 0 at once with one line and writes nothing; process 0 (no coordinator
    needed: jax.distributed is not started) writes what one process writes."""
    import json

    import orbax.checkpoint as ocp
    from tiny_sd import WORDS, make_tiny_sd

    from spin_jax.eval.tiny import write_tiny_scorers
    from spin_jax.models import load_pretrained

    sd_dir = make_tiny_sd(str(tmp_path / "sd"), "sd1")
    run = tmp_path / "run"  # a finished one-iteration run: the base UNet, perturbed
    unet = jax.tree.map(lambda x: np.asarray(x) * 1.05, load_pretrained(sd_dir).params["unet"])
    with ocp.CheckpointManager(str(run / "iteration_1" / "checkpoints")) as m:
        m.save(3, args=ocp.args.Composite(params=ocp.args.StandardSave(unet)))
        m.wait_until_finished()
    (run / "config.json").write_text(json.dumps({"model": {"path": sd_dir}, "iterations": 1}))
    (run / "iteration_1" / "summary.json").write_text("{}")

    export = lambda out: [sys.executable, "launch/export.py", f"--workdir={run}",  # noqa: E731
                          "--iteration=1", f"--out={out}"]  # fmt: skip
    one, two = tmp_path / "export_one", tmp_path / "export_two"
    single = _as_process(None, export(one))
    assert single.returncode == 0, single.stderr[-3000:]
    p1 = _as_process(1, export(two))
    assert p1.returncode == 0 and not two.exists(), p1.stderr[-3000:]
    assert p1.stderr.strip() == (
        "launch/export.py: process 1 of 2 does nothing; the export runs on process 0 alone"
    )
    p0 = _as_process(0, export(two))
    assert p0.returncode == 0, p0.stderr[-3000:]
    assert "started as 2 processes; the export runs on this one (process 0) alone" in p0.stderr
    assert _files(one) == _files(two) and "unet/diffusion_pytorch_model.safetensors" in _files(one)

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue dog on the left\na photo of a square\n")
    pick = write_tiny_scorers(str(tmp_path / "scorers"), WORDS)["pickscore"]
    evaluate = lambda w: [  # noqa: E731
        sys.executable, "launch/evaluate.py", "--config=configs/eval.py", f"--workdir={w}",
        f"--config.models=base={sd_dir},tuned={run}@1", "--config.prompts.source=text",
        f"--config.prompts.path={prompts}", "--config.sample.num_steps=2",
        "--config.sample.height=16", "--config.sample.width=16", "--config.sample.batch_size=2",
        "--config.scorers.metrics=pickscore", "--config.scorers.weights_dir=",
        f"--config.scorers.pickscore.model={pick['model']}",
        f"--config.scorers.pickscore.tokenizer={pick['tokenizer']}",
        "--config.report.resamples=50", "--config.report.grid_image_size=0",
    ]  # fmt: skip
    one, two = tmp_path / "eval_one", tmp_path / "eval_two"
    single = _as_process(None, evaluate(one))
    assert single.returncode == 0, single.stderr[-3000:]
    p1 = _as_process(1, evaluate(two))
    assert p1.returncode == 0 and not two.exists(), p1.stderr[-3000:]
    assert p1.stderr.strip() == (
        "launch/evaluate.py: process 1 of 2 does nothing; the evaluation runs on process 0 alone"
    )
    p0 = _as_process(0, evaluate(two))
    assert p0.returncode == 0, p0.stderr[-3000:]
    a, b = _files(one), _files(two)
    assert sorted(a) == sorted(b) and "report.json" in a
    for name in a:  # the same images, scores and report (but for the workdir's name)
        if name.endswith(".png"):
            assert a[name] == b[name], name
        elif name.startswith("scores/"):
            assert json.loads(a[name])["scores"] == json.loads(b[name])["scores"], name
    report = [
        json.loads(x["report.json"].replace(str(w).encode(), b"")) for x, w in ((a, one), (b, two))
    ]
    assert report[0] == report[1]


def test_launch_position(monkeypatch):
    from spin_jax import parallel

    for name in ("JAX_PROCESS_ID", "JAX_NUM_PROCESSES", "SLURM_PROCID", "SLURM_NTASKS",
                 "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    assert parallel.launch_position() == (0, 1)
    monkeypatch.setenv("SLURM_NTASKS", "1")  # one task of an allocation: a single process
    assert parallel.launch_position() == (0, 1)
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "3")
    assert parallel.launch_position() == (3, 4)
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")  # JAX's variables first, as init_distributed
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    assert parallel.launch_position() == (1, 2)
    monkeypatch.setenv("JAX_PROCESS_ID", "2")
    with pytest.raises(ValueError, match=r"JAX_PROCESS_ID=2 not in \[0, JAX_NUM_PROCESSES=2\)"):
        parallel.launch_position()
