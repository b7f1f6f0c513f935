"""The trainer end to end on a tiny pipeline and tiny datasets: SPIN, SFT, DPO, KTO, resume, export."""

import io
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from spin_jax.train import checkpoints, loop
from spin_jax.train.config import base_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def model_dir(sd1_model_dir):
    return sd1_model_dir


@pytest.fixture(scope="module")
def folder(shapes_folder):
    return shapes_folder


@pytest.fixture(scope="module")
def parquet(tmp_path_factory):
    """Pick-a-Pic-style shards: 12 comparisons, two of them ties."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from spin_jax.toy.shapes import generate

    images, records = generate("clean", 24, seed=1, size=16)

    def png(a):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        return buf.getvalue()

    rows = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": [], "label_1": []}
    for i in range(12):
        rows["caption"].append(records[2 * i]["text"])
        rows["jpg_0"].append(png(images[2 * i]))
        rows["jpg_1"].append(png(images[2 * i + 1]))
        label = 0.5 if i in (3, 7) else float(i % 2)
        rows["label_0"].append(label)
        rows["label_1"].append(1.0 - label)
    path = tmp_path_factory.mktemp("pickapic")
    pq.write_table(pa.table(rows), str(path / "train-00000.parquet"))
    return str(path)


def tiny_config(objective, model_dir, data_path, source="imagefolder"):
    c = base_config()
    c.objective = objective
    c.iterations = 2 if objective == "spin" else 1
    c.model.path = model_dir
    c.data.source = source
    c.data.path = data_path
    c.data.resolution = 16
    c.data.encode_batch_size = 8
    c.train.steps = 3
    c.train.batch_size = 8
    c.train.warmup_steps = 1
    c.train.learning_rate = 1e-3
    c.train.beta = 50.0
    c.train.betas = (50.0, 100.0) if objective == "spin" else ()
    c.sample.num_steps = 2
    c.sample.batch_size = 8
    c.checkpoint.every_steps = 2
    c.log.every_steps = 1
    c.log.grid_prompts = ("a red circle on the left", "a blue square")
    return c


def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _unet_leaves(workdir, iteration, model_dir):
    from spin_jax.models import load_pretrained

    like = load_pretrained(model_dir).params["unet"]
    params = checkpoints.load_iteration_params(workdir, iteration, like)
    return [np.asarray(x) for x in jax.tree.leaves(params)]


def test_spin_two_iterations_and_export(model_dir, folder, tmp_path, monkeypatch):
    workdir = str(tmp_path / "run")
    traces = []
    make = loop.make_train_step
    monkeypatch.setattr(loop, "make_train_step", lambda *a, **k: traces.append(1) or make(*a, **k))
    summaries = loop.run(tiny_config("spin", model_dir, folder), workdir)
    assert [s["iteration"] for s in summaries] == [1, 2]
    assert [s["beta"] for s in summaries] == [50.0, 100.0]
    # Both iterations, with their different betas, ran the train step traced (and so compiled)
    # once: make_train_step runs while the step is traced.
    assert len(traces) == 1
    for k in (1, 2):
        it = os.path.join(workdir, f"iteration_{k}")
        assert os.path.isfile(os.path.join(it, "grid.png"))
        assert os.path.isfile(os.path.join(it, "summary.json"))
        assert os.path.isfile(os.path.join(it, "synthetic", "manifest.json"))
    metrics = _read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    train = [m for m in metrics if "train/loss" in m]
    assert len(train) == 6 and all(np.isfinite(m["train/loss"]) for m in train)
    # Iteration 1 starts at theta = opponent: the SPIN loss is log 2 on its first step.
    assert abs(train[0]["train/loss"] - np.log(2)) < 1e-5
    assert {"train/implicit_acc", "train/lr", "train/grad_norm", "train/pairs_per_s"} <= set(
        train[0]
    )
    # Iteration 2's opponent is iteration 1's policy: its synthetic samples differ.
    from spin_jax.data.synthetic_store import SyntheticStore

    s1 = SyntheticStore.open(os.path.join(workdir, "iteration_1", "synthetic")).read(range(4))
    store2 = SyntheticStore.open(os.path.join(workdir, "iteration_2", "synthetic"))
    assert not np.allclose(s1, store2.read(range(4)))
    # ... made by iteration 1's UNet itself (not the base's: the store is keyed by its weights).
    from spin_jax.data.latent_cache import params_fingerprint
    from spin_jax.models import load_pretrained

    base = load_pretrained(model_dir).params["unet"]
    it1 = checkpoints.load_iteration_params(workdir, 1, base)
    assert store2.manifest["model"] == params_fingerprint(it1) != params_fingerprint(base)
    # A finished run restarted does nothing more and returns the same summaries.
    again = loop.run(tiny_config("spin", model_dir, folder), workdir)
    assert again == summaries
    # Export loads in diffusers with the trained UNet.
    out = str(tmp_path / "export")
    subprocess.run(
        [
            sys.executable,
            "launch/export.py",
            f"--workdir={workdir}",
            "--iteration=2",
            f"--out={out}",
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(os.path.join(out, "unet"))
    from spin_jax.models import load_pretrained

    ours = checkpoints.load_iteration_params(workdir, 2, load_pretrained(model_dir).params["unet"])
    np.testing.assert_array_equal(
        unet.conv_in.weight.detach().permute(2, 3, 1, 0).numpy(),
        np.asarray(ours["conv_in"]["kernel"]),
    )
    base = load_pretrained(model_dir).params["unet"]["conv_in"]["kernel"]
    assert not np.allclose(np.asarray(base), np.asarray(ours["conv_in"]["kernel"]))
    _export_refusals(workdir, model_dir, out, tmp_path)


def _export_refusals(workdir, model_dir, out, tmp_path):
    """export.py: --iteration must exist, --out must be empty (or --overwrite) and never the
    run's model or workdir; a damaged checkpoint is named in one error."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "export_cli", os.path.join(ROOT, "launch", "export.py")
    )
    export_cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(export_cli)
    for it in (-1, 3):
        with pytest.raises(ValueError, match=f"--iteration={it}"):
            export_cli.export(workdir, it, str(tmp_path / "x"))
    with pytest.raises(ValueError, match="not empty.*--overwrite"):
        export_cli.export(workdir, 2, out)
    with pytest.raises(ValueError, match="base model"):
        export_cli.export(workdir, 2, model_dir, overwrite=True)
    with pytest.raises(ValueError, match="workdir"):
        export_cli.export(workdir, 2, os.path.join(workdir, "exported"), overwrite=True)
    assert export_cli.export(workdir, 2, out, overwrite=True) == out
    # Truncate one array file of iteration 1's last checkpoint: the error names the checkpoint.
    step_dir = os.path.join(
        checkpoints.checkpoint_dir(workdir, 1), str(max(checkpoints.steps(workdir, 1)))
    )
    files = [os.path.join(d, f) for d, _, fs in os.walk(step_dir) for f in fs
             if os.path.getsize(os.path.join(d, f)) > 1000]  # fmt: skip
    for f in files:
        with open(f, "r+b") as fh:
            fh.truncate(100)
    with pytest.raises(ValueError, match=f"checkpoint {step_dir} is unreadable"):
        export_cli.export(workdir, 1, str(tmp_path / "broken"))


@pytest.mark.parametrize("objective", ["sft", "dpo", "kto"])
def test_baselines_run(objective, model_dir, folder, parquet, tmp_path):
    data, source = (folder, "imagefolder") if objective == "sft" else (parquet, "pickapic")
    c = tiny_config(objective, model_dir, data, source)
    if objective == "kto":
        c.data.kto_desirable_ratio = 0.5
    (summary,) = loop.run(c, str(tmp_path / objective))
    assert summary["objective"] == objective and np.isfinite(summary["loss"])
    assert os.path.isfile(str(tmp_path / objective / "iteration_1" / "grid.png"))
    assert not os.path.exists(str(tmp_path / objective / "iteration_1" / "synthetic"))


def test_workdir_with_other_config_is_refused(model_dir, folder, tmp_path):
    workdir = str(tmp_path / "run")
    c = tiny_config("sft", model_dir, folder)
    c.train.steps = 2
    loop.run(c, workdir)
    c.train.learning_rate = 5e-4
    with pytest.raises(ValueError, match="another config.*learning_rate"):
        loop.run(c, workdir)
    c.overwrite = True
    loop.run(c, workdir)
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["train"]["learning_rate"] == 5e-4


def test_bad_inputs(model_dir, folder, tmp_path):
    c = tiny_config("sft", model_dir, folder)
    c.model.path = str(tmp_path / "missing_model")
    with pytest.raises(FileNotFoundError, match="model.path"):
        loop.run(c, str(tmp_path / "a"))
    c = tiny_config("sft", model_dir, str(tmp_path / "missing_data"))
    with pytest.raises(FileNotFoundError, match="data.path"):
        loop.run(c, str(tmp_path / "b"))
    c = tiny_config("sft", model_dir, folder)
    c.train.batch_size = 6  # 8 devices
    with pytest.raises(ValueError, match="divisible"):
        loop.run(c, str(tmp_path / "c"))
    c = tiny_config("spin", model_dir, folder)
    c.train.beta = -1.0
    with pytest.raises(ValueError, match="beta"):
        loop.run(c, str(tmp_path / "d"))


def test_non_finite_loss_stops_and_keeps_last_checkpoint(model_dir, folder, tmp_path):
    workdir = str(tmp_path / "nan")
    c = tiny_config("sft", model_dir, folder)
    c.train.steps = 6
    c.train.warmup_steps = 0
    c.train.grad_clip_norm = 0.0
    c.train.lr_schedule = "constant"
    c.train.learning_rate = 1e30  # the first update overflows the weights
    c.checkpoint.every_steps = 1
    with pytest.raises(loop.NonFiniteLossError, match="non-finite.*Last good checkpoint"):
        loop.run(c, workdir)
    leaves = _unet_leaves_steps(workdir)
    assert leaves and all(np.all(np.isfinite(x)) for x in leaves)


def test_disk_full_keeps_previous_checkpoint(model_dir, folder, tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    workdir = str(tmp_path / "full_disk")
    c = tiny_config("sft", model_dir, folder)
    c.train.steps = 4
    save = ocp.CheckpointManager.save

    def failing_save(self, step, *args, **kwargs):
        if step == 4:
            raise OSError(28, "No space left on device")
        return save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", failing_save)
    with pytest.raises(checkpoints.CheckpointWriteError, match="checkpoint 4.*No space.*2"):
        loop.run(c, workdir)
    leaves = _unet_leaves_steps(workdir)
    assert leaves and all(np.all(np.isfinite(x)) for x in leaves)
    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    (summary,) = loop.run(c, workdir)  # the same command resumes from step 2
    assert summary["steps"] == 4
    # Exact resume of a run without rollouts: the weights of an uninterrupted run, and one
    # metrics row per step.
    loop.run(c, str(tmp_path / "uninterrupted"))
    a = _unet_leaves(workdir, 1, model_dir)
    b = _unet_leaves(str(tmp_path / "uninterrupted"), 1, model_dir)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    steps = [m["step"] for m in _read_jsonl(os.path.join(workdir, "metrics.jsonl"))]
    assert steps == [1, 2, 3, 4]


def _unet_leaves_steps(workdir):
    import orbax.checkpoint as ocp

    ckpt = os.path.join(workdir, "iteration_1", "checkpoints")
    with ocp.CheckpointManager(ckpt) as m:
        step = m.latest_step()
        restored = m.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore()))
    return [np.asarray(x) for x in jax.tree.leaves(restored["params"])]


def _train_cmd(workdir, model_dir, folder, extra=()):
    return [
        sys.executable,
        "launch/train.py",
        "--config=configs/spin.py",
        f"--workdir={workdir}",
        f"--config.model.path={model_dir}",
        f"--config.data.path={folder}",
        "--config.data.source=imagefolder",
        "--config.model.dtype=float32",
        "--config.model.attention_impl=",
        "--config.model.remat=False",
        "--config.iterations=2",
        "--config.data.resolution=16",
        "--config.train.steps=6",
        "--config.train.batch_size=4",
        "--config.train.accum_steps=2",
        "--config.train.warmup_steps=2",
        "--config.train.learning_rate=0.001",
        "--config.sample.num_steps=2",
        "--config.sample.batch_size=4",
        "--config.checkpoint.every_steps=2",
        "--config.log.every_steps=1",
        *extra,
    ]


def kill_when(cmd, env, target):
    """Starts ``cmd`` and SIGKILLs it as soon as ``target`` exists."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 600
    while not os.path.exists(target) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, f"{cmd} ended before {target} appeared"
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_sigkill_resume_matches_uninterrupted_run(model_dir, folder, tmp_path):
    """Two simulated devices; a run killed mid-training ends with the same weights."""
    flags = "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0"
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    subprocess.run(_train_cmd(full, model_dir, folder), cwd=ROOT, env=env, check=True,
                   capture_output=True)  # fmt: skip
    kill_when(_train_cmd(killed, model_dir, folder), env,
              os.path.join(killed, "iteration_2", "checkpoints", "2"))  # fmt: skip
    assert not os.path.isfile(os.path.join(killed, "iteration_2", "summary.json"))
    result = subprocess.run(_train_cmd(killed, model_dir, folder), cwd=ROOT, env=env,
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    a = _unet_leaves(full, 2, model_dir)
    b = _unet_leaves(killed, 2, model_dir)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_unreadable_checkpoint_is_moved_aside_and_the_previous_one_used(model_dir, folder, tmp_path, capsys):  # fmt: skip
    c = tiny_config("sft", model_dir, folder)
    c.checkpoint.every_steps = 1
    workdir = str(tmp_path / "run")
    loop.run(c, workdir)
    want = _unet_leaves(workdir, 1, model_dir)
    ckpt = os.path.join(workdir, "iteration_1", "checkpoints")
    # Damage every file of the last checkpoint's parameters; the run "died" before its summary.
    for root, _, files in os.walk(os.path.join(ckpt, "3", "params")):
        for name in files:
            with open(os.path.join(root, name), "r+b") as f:
                f.truncate(max(1, os.path.getsize(os.path.join(root, name)) // 3))
    os.remove(os.path.join(workdir, "iteration_1", "summary.json"))
    (summary,) = loop.run(c, workdir)
    out = capsys.readouterr().out
    assert "is unreadable" in out and "moved to" in out
    assert any(n.startswith("3.unreadable") for n in os.listdir(ckpt))
    assert summary["steps"] == 3
    for x, y in zip(want, _unet_leaves(workdir, 1, model_dir), strict=True):
        np.testing.assert_array_equal(x, y)


def test_second_trainer_on_a_workdir_is_refused(model_dir, folder, tmp_path):
    from spin_jax import runlock

    workdir = str(tmp_path / "run")
    c = tiny_config("sft", model_dir, folder)
    # Another live process of this host holds the workdir (a trainer that is running).
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from spin_jax import runlock; "
         f"runlock.acquire({workdir!r}); print('held', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(runlock.LockedError, match=f"pid {holder.pid}"):
            loop.run(c, workdir)
        assert not os.path.exists(os.path.join(workdir, "config.json"))  # nothing was touched
    finally:
        holder.kill()
        holder.wait()
    # The holder died without releasing: its stale lock is taken over and the run goes ahead.
    (summary,) = loop.run(c, workdir)
    assert summary["steps"] == 3


def test_sigterm_and_sigint_write_a_checkpoint_and_resume(model_dir, folder, tmp_path):
    """SIGTERM, then Ctrl-C on the rerun: each time the step in flight ends with a checkpoint,
    one line says where, the exit status is 75; the last rerun ends as an uninterrupted run."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0")  # fmt: skip
    extra = [
        "--config.iterations=1",
        "--config.train.steps=12",
        "--config.checkpoint.every_steps=100",
    ]
    full, run = str(tmp_path / "full"), str(tmp_path / "run")
    cmd = lambda w: _train_cmd(w, model_dir, folder, extra)  # noqa: E731
    subprocess.run(cmd(full), cwd=ROOT, env=env, check=True, capture_output=True)
    metrics = os.path.join(run, "metrics.jsonl")
    last = 0
    for sig in (signal.SIGTERM, signal.SIGINT):
        proc = subprocess.Popen(cmd(run), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            rows = _read_jsonl(metrics) if os.path.isfile(metrics) else []
            if any(r.get("step", 0) > last + 1 for r in rows if "train/loss" in r):
                break
            time.sleep(0.2)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 75, err[-3000:]
        line = [x for x in err.splitlines() if x.startswith("interrupted")]
        assert line and "checkpoint written; rerun the same command to resume" in line[0], err
        step = int(line[0].split("step ")[1].split(";")[0])
        assert step > last and os.path.isdir(
            os.path.join(run, "iteration_1", "checkpoints", str(step))
        )
        assert "Traceback" not in err
        last = step
        seconds = checkpoints.read_meta(run, 1, step)["seconds"]["train"]
    subprocess.run(cmd(run), cwd=ROOT, env=env, check=True, capture_output=True)
    assert [r["step"] for r in _read_jsonl(metrics) if "train/loss" in r] == list(range(1, 13))
    # The round's time counts every attempt (up to each one's checkpoint), not only the last.
    with open(os.path.join(run, "iteration_1", "summary.json")) as f:
        assert json.load(f)["train_seconds"] > seconds > 0
    for x, y in zip(_unet_leaves(full, 1, model_dir), _unet_leaves(run, 1, model_dir), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
