"""The demo preset: configs, data set-up, a reduced end-to-end SPIN run and the judge's table."""

import importlib.util
import json
import os

import jax
import numpy as np
import pytest

from spin_jax.models import load_pretrained
from spin_jax.toy import demo, shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _get_config(name: str, arg: str = "demo"):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.mark.parametrize("name", ["spin", "sft", "dpo", "kto", "seppo"])
def test_demo_preset_of_every_config(demo_env, name):
    from spin_jax.train.config import validate

    c = _get_config(name)
    validate(c)
    assert c.model.path == demo.shipped_base_path()
    assert c.data.resolution == 32 and c.model.dtype == "float32"
    assert c.model.attention_impl is None and not c.data.random_flip
    assert c.iterations == (3 if name in ("spin", "seppo") else 1)
    assert c.toy_eval.enabled
    for p in c.log.grid_prompts:
        shapes.parse_caption(p)
    assert os.path.isdir(c.data.path)
    assert c.data.source == ("pickapic" if name in ("dpo", "kto") else "imagefolder")


def test_clean_dataset_is_written_once(demo_env):
    path = demo.ensure_clean_dataset(n=12)
    with open(os.path.join(path, "metadata.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 12 and all(r["distribution"] == "clean" for r in rows)
    stamp = os.path.getmtime(os.path.join(path, "metadata.jsonl"))
    assert demo.ensure_clean_dataset(n=12) == path
    assert os.path.getmtime(os.path.join(path, "metadata.jsonl")) == stamp


def test_pairs_dataset_prefers_the_faithful_image(demo_env):
    from spin_jax.data.sources import open_source
    from spin_jax.data.transforms import decode_image
    from spin_jax.toy import judge

    source = open_source("pickapic", demo.ensure_pairs_dataset(n=10), view="pairs")
    assert len(source) == 10
    good, bad, texts = [], [], []
    for i in range(len(source)):
        r = source[i]
        good.append(np.asarray(decode_image(r["image"], resolution=32, min_size=16)[0]))
        bad.append(np.asarray(decode_image(r["image_l"], resolution=32, min_size=16)[0]))
        texts.append(source.text(i))
    assert judge.judge(np.stack(good), texts)["fidelity"] == 1.0
    assert judge.judge(np.stack(bad), texts)["fidelity"] == 0.0


def test_format_table():
    row = {"fidelity": 0.5, "color": 1.0, "shape": 0.75, "position": 0.5, "count": 1.0,
           "distance": 3.14159, "images": 4}  # fmt: skip
    table = demo.format_table({"base": row, "spin iteration 1": row})
    lines = table.splitlines()
    assert len(lines) == 4 and lines[2].startswith("| base | 0.500 | 1.000 | 0.750")
    assert "3.14" in lines[3]


def test_demo_runs_end_to_end_at_reduced_size(demo_env):
    from spin_jax.train import checkpoints, loop

    c = _get_config("spin")
    c.iterations = 2
    c.train.steps = 2
    c.train.batch_size = 8
    c.train.betas = (1000.0, 1000.0)
    c.data.max_examples = 8
    c.sample.num_steps = 2
    c.sample.batch_size = 8
    c.checkpoint.every_steps = 2
    c.log.every_steps = 1
    c.log.grid_prompts = c.log.grid_prompts[:4]
    c.toy_eval.images_per_prompt = 1
    workdir = str(demo_env / "run")
    summaries = loop.run(c, workdir)
    assert [s["iteration"] for s in summaries] == [1, 2]
    for k in (1, 2):
        assert os.path.isfile(os.path.join(workdir, f"iteration_{k}", "grid.png"))
    # The launcher ends with the judge's table (config.toy_eval.enabled); the trainer does not.
    assert not os.path.exists(os.path.join(workdir, "toy_eval.json"))
    demo.demo_report(workdir, c)
    with open(os.path.join(workdir, "toy_eval.json")) as f:
        results = json.load(f)
    assert list(results) == ["base", "spin iteration 1", "spin iteration 2"]
    for r in results.values():
        assert 0.0 <= r["fidelity"] <= 1.0 and r["images"] == 60 and np.isfinite(r["distance"])
    with open(os.path.join(workdir, "toy_eval.md")) as f:
        assert "| spin iteration 2 |" in f.read()
    assert os.path.isfile(os.path.join(workdir, "toy_eval", "base.png"))
    # The trained iterations differ from the base.
    sd = load_pretrained(c.model.path)
    it1 = checkpoints.load_iteration_params(workdir, 1, sd.params["unet"])
    diff = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), it1, sd.params["unet"])
    assert max(jax.tree.leaves(diff)) > 0


def test_unknown_preset_is_named(demo_env):
    with pytest.raises(
        ValueError, match=r"configs/seppo.py: unknown preset 'dmeo' \(known: demo\)"
    ):
        _get_config("seppo", "dmeo")


def test_pso_demo_preset_runs_end_to_end_at_reduced_size(demo_env):
    """configs/pso.py:demo: online PSO on the 4-step toy model, LoRA, the toy judge as reward;
    the launcher's reward model and the judge's table at the end."""
    import subprocess
    import sys

    from spin_jax.train.config import validate

    c = _get_config("pso")
    validate(c)
    assert c.objective == "pso_online" and c.pso.reward == "toy_judge"
    assert c.model.path.endswith("toy_fewstep") and c.model.lora.rank > 0
    assert c.sample.sampler == "auto" and c.sample.num_steps == 4 and c.checkpoint.every_rounds == 1
    workdir = str(demo_env / "pso")
    cmd = [sys.executable, "launch/train.py", "--config=configs/pso.py:demo", f"--workdir={workdir}",
           "--config.iterations=1", "--config.pso.pairs_per_round=8", "--config.train.batch_size=8",
           "--config.train.steps=3", "--config.sample.batch_size=16", "--config.log.grid_prompts=()",
           "--config.toy_eval.images_per_prompt=1"]  # fmt: skip
    env = dict(
        os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2"
    )
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    with open(os.path.join(workdir, "toy_eval.json")) as f:
        results = json.load(f)
    assert list(results) == ["base", "pso_online"]
    assert all(0.0 <= r["fidelity"] <= 1.0 for r in results.values())
    assert os.path.isfile(os.path.join(workdir, "lora.json"))
