"""bench/toy_benchmark.py: arm configs, statistics over seeds, and a reduced end-to-end run."""

import importlib.util
import json
import os

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location(
        "toy_benchmark", os.path.join(ROOT, "bench", "toy_benchmark.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_arms_get_equal_steps_and_data(demo_env, bench):
    spin = bench.arm_config("spin", 3, 5, 2)
    assert spin.seed == 3 and spin.iterations == 2 and spin.train.steps == 5
    assert list(spin.train.betas) == [spin.train.beta] * 2 and not spin.toy_eval.enabled
    for name in ("sft", "dpo", "kto"):
        c = bench.arm_config(name, 3, 5, 2)
        # One run of iterations * steps, checkpointed (and kept) at every multiple of steps.
        assert c.iterations == 1 and c.train.steps == 10
        assert c.checkpoint.every_steps == 5 and c.checkpoint.max_to_keep == 2
        assert c.train.learning_rate == spin.train.learning_rate
        assert c.train.batch_size == spin.train.batch_size
    # The same 96 preferred images: DPO reads 96 pairs, KTO both images of those 96 pairs.
    assert bench.arm_config("dpo", 0, 5, 2).data.max_examples == spin.data.max_examples == 96
    assert bench.arm_config("kto", 0, 5, 2).data.max_examples == 192
    assert bench.checkpoints("spin", 5, 2) == [("spin@5", 5, 1, 5), ("spin@10", 10, 2, 5)]
    assert bench.checkpoints("dpo", 5, 2) == [("dpo@5", 5, 1, 5), ("dpo@10", 10, 1, 10)]


def test_overrides(demo_env, bench):
    o = bench.parse_overrides(["train.beta=2000", "sample.sampler=ddim", "data.random_flip=True"])
    assert o == {"train.beta": 2000, "sample.sampler": "ddim", "data.random_flip": True}
    c = bench.arm_config("spin", 0, 5, 3, o)
    assert c.train.beta == 2000 and list(c.train.betas) == [2000.0] * 3
    assert c.sample.sampler == "ddim" and c.data.random_flip
    with pytest.raises(ValueError, match="KEY=VALUE"):
        bench.parse_overrides(["train.beta"])
    with pytest.raises(KeyError, match="train.betta"):
        bench.arm_config("sft", 0, 5, 3, {"train.betta": 1.0})


def test_summary_statistics_and_table(bench):
    rng = np.random.default_rng(0)
    per_seed = {
        s: {
            k: {m: float(rng.random()) for m in bench.METRICS}
            for k in ("base", "sft@4", "spin@4", "spin@8", "sft@8")
        }
        for s in (0, 1, 2)
    }
    summary = bench.summarize(per_seed)
    for key in ("base", "spin@8"):
        for m in bench.METRICS:
            v = np.array([per_seed[s][key][m] for s in (0, 1, 2)])
            assert summary[key][m]["mean"] == pytest.approx(v.mean())
            assert summary[key][m]["std"] == pytest.approx(np.sqrt(((v - v.mean()) ** 2).sum() / 2))
            assert summary[key][m]["min"] == v.min() and summary[key][m]["max"] == v.max()
        assert summary[key]["n"] == 3
    assert bench.summarize({0: per_seed[0]})["base"]["fidelity"]["std"] == 0.0
    table = bench.format_markdown(summary, 4).splitlines()
    rows = [line.split(" | ")[0].removeprefix("| ") for line in table[2:]]
    # Grouped by optimizer steps, SPIN last in each group.
    assert rows == [
        "base",
        "SFT",
        "SPIN-Diffusion iteration 1",
        "SFT",
        "SPIN-Diffusion iteration 2",
    ]
    f = summary["spin@8"]["fidelity"]
    assert f"{f['mean']:.3f} ± {f['std']:.3f}" in table[-1]
    # SPIN minus the others, seed by seed.
    diffs = bench.paired_differences(per_seed, 4, 2)
    assert [(r["spin"], r["other"]) for r in diffs] == [
        ("spin@4", "base"), ("spin@4", "sft@4"), ("spin@8", "base"), ("spin@8", "sft@8")
    ]  # fmt: skip
    d = np.array([per_seed[s]["spin@8"]["distance"] - per_seed[s]["sft@8"]["distance"]
                  for s in (0, 1, 2)])  # fmt: skip
    assert diffs[-1]["distance"]["mean"] == pytest.approx(d.mean())
    assert diffs[-1]["distance"]["std"] == pytest.approx(d.std(ddof=1))
    assert "| iteration 2 | SFT | 3 |" in bench.format_differences(diffs, 4)


def test_reduced_benchmark_end_to_end(demo_env, bench):
    from spin_jax.models import load_pretrained
    from spin_jax.toy import demo
    from spin_jax.train import checkpoints

    out = str(demo_env / "bench")
    argv = ["--out", out, "--seeds", "0", "--objectives", "spin", "sft", "--steps", "1",
            "--iterations", "2", "--images-per-prompt", "1", "--eval-prompts", "3"]  # fmt: skip
    result = bench.main(argv)
    keys = ["base", "spin@1", "spin@2", "sft@1", "sft@2"]
    assert list(result["per_seed"][0]) == keys
    for r in result["per_seed"][0].values():
        assert r["images"] == 3 and 0 <= r["fidelity"] <= 1 and np.isfinite(r["distance"])
    with open(os.path.join(out, "results.json")) as f:
        assert json.load(f)["summary"]["sft@2"]["n"] == 1
    with open(os.path.join(out, "results.md")) as f:
        text = f.read()
    assert "| SPIN-Diffusion iteration 2 | 2 | 1 |" in text and "| iteration 2 | SFT | 1 |" in text
    # SFT was read at both checkpoints of its one run, and they differ.
    sd = load_pretrained(demo.ensure_base())
    workdir = os.path.join(out, "seed_0", "sft")
    a = checkpoints.load_iteration_params(workdir, 1, sd.params["unet"], 1)
    b = checkpoints.load_iteration_params(workdir, 1, sd.params["unet"], 2)
    diff = jax.tree.map(lambda x, y: float(np.abs(x - y).max()), a, b)
    assert max(jax.tree.leaves(diff)) > 0
    with pytest.raises(FileNotFoundError, match=r"step 7 .*have \[1, 2\]"):
        checkpoints.load_iteration_params(workdir, 1, sd.params["unet"], 7)
    # Resuming re-trains and re-evaluates nothing.
    mtime = os.path.getmtime(os.path.join(out, "seed_0", "eval.json"))
    assert bench.main(argv)["per_seed"] == result["per_seed"]
    assert os.path.getmtime(os.path.join(out, "seed_0", "eval.json")) == mtime
