# ruff: noqa: F811  (the fixtures imported from test_trainer are parameters here)
"""The round loop: the objective table, reference rules, SePPO end to end, layering rules."""

import ast
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from test_trainer import folder, model_dir, tiny_config  # noqa: F401  (fixtures)

from spin_jax.train import checkpoints, loop, objectives

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "spin_jax"


# ---------------------------------------------------------------------------------------------
# Layering and "one table".


def _modules(root):
    return sorted(p for p in root.rglob("*.py"))


def _imports(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            yield from (f"{node.module}.{a.name}" for a in node.names)


def test_train_does_not_import_toy_and_readers_use_the_checkpoint_module():
    for path in _modules(PACKAGE / "train"):
        bad = [m for m in _imports(path) if m.startswith("spin_jax.toy")]
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"
    readers = [*_modules(PACKAGE / "eval"), ROOT / "launch" / "export.py"]
    for path in readers:
        bad = [m for m in _imports(path) if m.startswith(("spin_jax.train.loop", "spin_jax.train.selfplay"))]  # fmt: skip
        assert not bad, f"{path.relative_to(ROOT)} reads checkpoints through the trainer: {bad}"
    lower = [*_modules(PACKAGE / "models"), *_modules(PACKAGE / "diffusion"), PACKAGE / "losses.py"]
    for path in lower:
        bad = [m for m in _imports(path) if m.startswith(("spin_jax.train", "spin_jax.toy", "spin_jax.eval"))]  # fmt: skip
        assert not bad, f"{path.relative_to(ROOT)} imports a higher layer: {bad}"


def test_objectives_are_declared_in_one_table():
    names = set(objectives.OBJECTIVES)
    assert {"sft", "spin", "dpo", "kto", "seppo"} <= names
    offenders = []
    for path in _modules(PACKAGE):
        if path == PACKAGE / "train" / "objectives.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Dict):
                items = node.keys
            elif isinstance(node, ast.Tuple | ast.List | ast.Set):
                items = node.elts
            elif isinstance(node, ast.Compare) and isinstance(node.left, ast.Attribute | ast.Name):
                # objective == "spin", config.objective in (...): a branch per method
                left = node.left.attr if isinstance(node.left, ast.Attribute) else node.left.id
                consts = [c for c in node.comparators if isinstance(c, ast.Constant)]
                if left == "objective" and any(c.value in names for c in consts):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} (branch)")
                continue
            else:
                continue
            found = {i.value for i in items if isinstance(i, ast.Constant) and i.value in names}
            if len(found) >= 2:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {sorted(found)}")
    assert not offenders, f"objectives declared outside train/objectives.py: {offenders}"


def test_every_row_is_complete():
    for row in objectives.OBJECTIVES.values():
        assert row.view in ("winners", "pairs", "kto")
        assert row.reference in ("none", "base", "previous", "seppo")
        assert row.rollout in ("none", "dataset", "round_prompts", "online_pairs")
        assert row.timesteps in ("uniform", "distilled")
        assert set(row.cache_fields.values()) <= set(row.batch_fields)
        if row.rollout in ("dataset", "round_prompts"):  # a rolled-out sample is the x0_l
            assert row.pairwise and "x0_l" not in row.cache_fields.values()
        if row.rollout == "online_pairs":  # online PSO: both sides are the model's own samples
            assert not row.cache_fields and not row.pairwise


# ---------------------------------------------------------------------------------------------
# Reference rules.


def test_reference_rules():
    get = objectives.get
    assert objectives.pick_reference(get("sft"), 3, [1, 2], seed=0) is None
    assert objectives.pick_reference(get("dpo"), 1, [], seed=0) == 0
    assert [objectives.pick_reference(get("spin"), k, [], seed=0) for k in (1, 2, 3)] == [0, 1, 2]
    seppo = get("seppo")
    assert objectives.pick_reference(seppo, 1, [], seed=0, choice="uniform") == 0
    assert objectives.pick_reference(seppo, 5, [1, 2, 3, 4], seed=0, choice="base") == 0
    assert objectives.pick_reference(seppo, 5, [1, 2, 3, 4], seed=0, choice="latest") == 4
    # Saved round ends only (checkpoint.every_rounds = 2): the pool is {base, 2, 4}.
    draws = [objectives.pick_reference(seppo, 6, [2, 4], seed=s, choice="uniform") for s in range(3000)]  # fmt: skip
    counts = {r: draws.count(r) / len(draws) for r in set(draws)}
    assert set(counts) == {0, 2, 4} and all(abs(v - 1 / 3) < 0.04 for v in counts.values())
    # A pure function: the same arguments draw the same reference (what resume relies on).
    a = objectives.pick_reference(seppo, 4, [1, 2, 3], seed=7, choice="uniform")
    assert a == objectives.pick_reference(seppo, 4, [1, 2, 3], seed=7, choice="uniform")
    with pytest.raises(ValueError, match="seppo.reference"):
        objectives.pick_reference(seppo, 2, [1], seed=0, choice="oldest")


def _seppo_config(model_dir, folder, rounds=3):
    c = tiny_config("spin", model_dir, folder)
    c.objective = "seppo"
    c.iterations = rounds
    c.train.betas = ()
    c.train.steps = 2
    c.checkpoint.every_steps = 100
    return c


def test_seppo_rounds_draw_their_reference_from_saved_rounds(
    model_dir, folder, tmp_path, monkeypatch
):
    from spin_jax.data.latent_cache import params_fingerprint
    from spin_jax.data.synthetic_store import SyntheticStore
    from spin_jax.models import load_pretrained

    c = _seppo_config(model_dir, folder, rounds=4)
    c.checkpoint.every_rounds = 2
    c.seed = 3
    workdir = str(tmp_path / "seppo")
    traces = []
    make = loop.make_train_step
    monkeypatch.setattr(loop, "make_train_step", lambda *a, **k: traces.append(1) or make(*a, **k))
    summaries = loop.run(c, workdir)
    assert len(traces) == 1  # one compiled step for all rounds
    assert [s["iteration"] for s in summaries] == [1, 2, 3, 4]
    # Round ends saved every 2 rounds (and the last); round 1's end is not.
    assert [s["checkpointed"] for s in summaries] == [False, True, False, True]
    saved = []
    base = load_pretrained(model_dir).params["unet"]
    for k, s in enumerate(summaries, start=1):
        want = objectives.pick_reference(
            objectives.get("seppo"), k, saved, seed=3, choice="uniform"
        )
        assert s["reference"] == loop._ref_name(want)
        assert 0.0 <= s["reference_loser_frac"] <= 1.0
        # The round's samples were made by that reference, one per prompt of the round.
        store = SyntheticStore.open(os.path.join(workdir, f"iteration_{k}", "synthetic"))
        ref = base if want == 0 else checkpoints.load_iteration_params(workdir, want, base)
        assert store.manifest["model"] == params_fingerprint(ref)
        if s["checkpointed"]:
            saved.append(k)
    # Continuous: one learning-rate schedule over all rounds, and metrics once per step.
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if "train/loss" in line]
    assert [r["step"] for r in rows] == list(range(1, 9))
    # Round 1's reference is the base = the starting policy: the first loss is log 2.
    assert abs(rows[0]["train/loss"] - np.log(2)) < 1e-5


def _train_cmd(workdir, model_dir, folder, config):
    return [
        sys.executable, "launch/train.py", f"--config={config}", f"--workdir={workdir}",
        f"--config.model.path={model_dir}", f"--config.data.path={folder}",
        "--config.data.source=imagefolder", "--config.model.dtype=float32",
        "--config.model.attention_impl=", "--config.model.remat=False", "--config.iterations=3",
        "--config.data.resolution=16", "--config.train.steps=4", "--config.train.batch_size=4",
        "--config.train.accum_steps=2", "--config.train.warmup_steps=2",
        "--config.train.learning_rate=0.001", "--config.sample.num_steps=2",
        "--config.sample.batch_size=4", "--config.checkpoint.every_steps=2",
        "--config.log.every_steps=1", "--config.seed=1",
    ]  # fmt: skip


def test_seppo_sigkill_resume_and_export(model_dir, folder, tmp_path):
    """configs/seppo.py on 2 simulated devices, 3 rounds: killed mid-round 2, the same command
    ends with the weights of an uninterrupted run; the export loads in diffusers."""
    from test_trainer import _unet_leaves, kill_when

    flags = "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0"
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    cmd = lambda w: _train_cmd(w, model_dir, folder, "configs/seppo.py")  # noqa: E731
    subprocess.run(cmd(full), cwd=ROOT, env=env, check=True, capture_output=True)
    kill_when(cmd(killed), env, os.path.join(killed, "iteration_2", "checkpoints", "2"))
    assert not os.path.isfile(os.path.join(killed, "iteration_2", "summary.json"))
    result = subprocess.run(cmd(killed), cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    for x, y in zip(
        _unet_leaves(full, 3, model_dir), _unet_leaves(killed, 3, model_dir), strict=True
    ):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    for k in (1, 2, 3):
        with open(os.path.join(full, f"iteration_{k}", "summary.json")) as f:
            a = json.load(f)
        with open(os.path.join(killed, f"iteration_{k}", "summary.json")) as f:
            b = json.load(f)
        assert a["reference"] == b["reference"] and a["objective"] == "seppo"
    out = str(tmp_path / "export")
    subprocess.run([sys.executable, "launch/export.py", f"--workdir={killed}", "--iteration=3",
                    f"--out={out}"], cwd=ROOT, check=True, capture_output=True)  # fmt: skip
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(os.path.join(out, "unet"))
    ours = _unet_leaves(killed, 3, model_dir)
    assert any(
        np.array_equal(unet.conv_in.weight.detach().permute(2, 3, 1, 0).numpy(), x) for x in ours
    )


def test_paper_config_runs_on_cpu_with_only_model_data_and_sizes(
    model_dir, folder, tmp_path, capsys
):
    """configs/spin.py as written for 8 GPUs (bf16/cuDNN by default there, 8 per device, remat):
    on this CPU it picks float32 and XLA attention and derives the accumulation steps."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("spin_cfg", ROOT / "configs" / "spin.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.model.path, c.data.source, c.data.path = model_dir, "imagefolder", folder
    c.data.resolution, c.iterations, c.train.steps, c.train.batch_size = 16, 1, 2, 16
    c.train.warmup_steps = 1
    c.sample.num_steps, c.sample.batch_size, c.log.grid_prompts = 1, 8, ("a red circle",)
    (summary,) = loop.run(c, str(tmp_path / "paper"))
    assert np.isfinite(summary["loss"])
    out = capsys.readouterr().out
    assert "float32 compute, auto on cpu" in out
    assert "attention: auto -> xla" in out
    assert "16 = 1 x 2 per device x 8 devices" in out
