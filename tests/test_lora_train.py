# ruff: noqa: F811  (the fixtures imported from test_trainer are parameters here)
"""LoRA training: only the adapter trains and carries optimizer state, the base reference is the
adapter switched off, every objective starts at its theta = reference value; a SPIN run end to
end with both exports loaded by diffusers."""

import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_trainer import ROOT, _read_jsonl, folder, model_dir, parquet, tiny_config  # noqa: F401

from spin_jax.models import lora
from spin_jax.train import checkpoints, loop, objectives, optim, step
from spin_jax.train.state import TrainState

H = W = 8
C, F, VOCAB, LEN, DIM = 4, 16, 32, 5, 8
TARGETS = ("to_q", "to_k", "conv1")
RANK, SCALE = 2, 1.5


class Net(nn.Module):
    """A few named Dense / Conv layers (LoRA targets are matched by name)."""

    @nn.compact
    def __call__(self, x, t, ctx):
        emb = t.astype(jnp.float32)[:, None] * jnp.exp(-jnp.arange(4.0))[None]
        emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=-1)
        cond = nn.Dense(F, name="time")(emb) + nn.Dense(F, name="to_k")(ctx.mean(axis=1))
        h = nn.silu(nn.Conv(F, (3, 3), name="conv1")(x) + cond[:, None, None, :])
        h = nn.Dense(F, name="to_q")(h)
        return nn.Conv(C, (3, 3), name="conv_out")(h)


NET = Net()


def unet_apply(params, x, t, ctx):
    return NET.apply({"params": params}, x, t, ctx)


def _base():
    shapes = jax.eval_shape(NET.init, jax.random.key(0), jnp.zeros((1, H, W, C)),
                            jnp.zeros((1,), jnp.int32), jnp.zeros((1, LEN, DIM)))["params"]  # fmt: skip
    rng = np.random.default_rng(0)
    return jax.tree.map(
        lambda s: jnp.asarray(rng.normal(size=s.shape) / math.sqrt(np.prod(s.shape[:-1]) or 1), jnp.float32),
        shapes,
    )  # fmt: skip


def _batch(objective, b=8):
    rng = np.random.default_rng(1)
    batch = {"input_ids": rng.integers(0, VOCAB, size=(b, LEN)).astype(np.int32)}
    for f in objectives.OBJECTIVES[objective].batch_fields:
        shape = (b,) if f == "label" else (b, H, W, C)
        batch[f] = (np.arange(b) % 2).astype(np.int32) if f == "label" else rng.normal(size=shape).astype(np.float32)  # fmt: skip
    return batch


def _schedule():
    from test_train_step import sd_schedule

    return sd_schedule()


@pytest.mark.parametrize("objective", ["sft", "spin", "dpo", "kto", "seppo"])
def test_lora_step_trains_only_the_adapter(objective):
    base = _base()
    base_copy = jax.tree.map(np.array, base)
    adapter = lora.init(jax.random.key(0), base, RANK, TARGETS)
    tx, _ = optim.make_optimizer({"learning_rate": 1e-2, "weight_decay": 1e-2})
    text = {
        "embedding": jnp.asarray(np.random.default_rng(0).normal(size=(VOCAB, DIM)), jnp.float32)
    }
    row = objectives.OBJECTIVES[objective]

    def fn(state, ref, text_params, batch, key, base):
        # As the trainer does: the frozen base is an argument, closed over by the wrapper.
        ts = step.make_train_step(
            objective, unet_apply=lora.wrap_apply(unet_apply, base, SCALE),
            encode_text=lambda p, ids: p["embedding"][ids], schedule=_schedule(),
            beta=None if objective == "sft" else 50.0,
        )  # fmt: skip
        return ts(state, ref, text_params, batch, key)

    jitted = step.jit_train_step(fn)
    state = TrainState.create(adapter, tx)
    # The reference: the adapter switched off ({} : no merge at all) for a fixed base rule,
    # the zero adapter (the base exactly) where later rounds' references are adapters.
    ref = {} if row.reference in ("base", "none") else jax.tree.map(jnp.zeros_like, adapter)
    losses = []
    for i in range(2):
        state, m = jitted(state, ref, text, _batch(objective), jax.random.key(i), base)
        assert bool(m["is_finite"])
        losses.append(float(m["loss"]))
    if row.pairwise:
        assert abs(losses[0] - math.log(2)) < 1e-6, losses
    if objective == "kto":
        assert abs(losses[0] - 0.5) < 1e-6, losses  # 1 - sigmoid(0)
    # The base is untouched, the params are the adapter's tree, B has moved off zero.
    for x, y in zip(jax.tree.leaves(base), jax.tree.leaves(base_copy), strict=True):
        assert np.array_equal(np.asarray(x), y)
    assert jax.tree.structure(state.params) == jax.tree.structure(adapter)
    assert all(float(jnp.abs(b).max()) > 0 for _, b in lora.layers_of(state.params).values())
    # Optimizer state: only adapter-shaped leaves (AdamW: mu and nu), besides scalar counters.
    shapes = sorted(x.shape for x in jax.tree.leaves(adapter))
    opt = [x for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0]
    assert sorted(x.shape for x in opt) == sorted(shapes * 2)
    assert sum(x.size for x in opt) == 2 * sum(x.size for x in jax.tree.leaves(adapter))


def test_lora_config_checks(model_dir, folder, tmp_path):
    from spin_jax.train import config as config_lib

    c = tiny_config("spin", model_dir, folder)
    c.model.lora.rank = 2
    c.model.lora.dropout = 0.1
    with pytest.raises(ValueError, match=r"config\.model\.lora\.dropout = 0\.1: LoRA dropout is not supported"):  # fmt: skip
        config_lib.validate(c)
    c.model.lora.dropout = 0.0
    c.model.lora.rank = -1
    with pytest.raises(ValueError, match=r"model\.lora\.rank = -1"):
        config_lib.validate(c)
    # Resuming a LoRA run with another rank is another config: refused.
    c.model.lora.rank = 2
    workdir = str(tmp_path / "run")
    loop.check_workdir(workdir, c)
    c.model.lora.rank = 4
    with pytest.raises(ValueError, match=r"model\.lora\.rank: 2 -> 4"):
        loop.check_workdir(workdir, c)


def _unet_out(unet_apply_fn, params):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
    ctx = rng.normal(size=(2, 77, 32)).astype(np.float32)
    t = np.array([5, 800], np.int32)
    return np.asarray(jax.jit(unet_apply_fn)(params, x, t, ctx)), (x, t, ctx)


def test_spin_lora_run_and_exports(model_dir, folder, tmp_path):
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from spin_jax.models import load_pretrained

    workdir = str(tmp_path / "run")
    c = tiny_config("spin", model_dir, folder)
    c.model.lora.rank = 2
    c.model.lora.alpha = 4.0
    summaries = loop.run(c, workdir)
    assert [s["iteration"] for s in summaries] == [1, 2]
    train = [m for m in _read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "train/loss" in m]
    assert abs(train[0]["train/loss"] - math.log(2)) < 1e-5
    # Round 2's opponent is base + adapter 1 (round 2 starts at it: log 2 again, other samples).
    assert abs(train[3]["train/loss"] - math.log(2)) < 1e-5
    from spin_jax.data.synthetic_store import SyntheticStore

    s1 = SyntheticStore.open(os.path.join(workdir, "iteration_1", "synthetic")).read(range(4))
    s2 = SyntheticStore.open(os.path.join(workdir, "iteration_2", "synthetic")).read(range(4))
    assert not np.allclose(s1, s2)
    # Checkpoints hold the adapter (and its optimizer state) only.
    info = checkpoints.read_lora_info(workdir)
    assert info["scale"] == 2.0 and set(info["layers"].values()) == {2}
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(checkpoints.checkpoint_dir(workdir, 2)) as mgr:
        args = ocp.args.Composite(params=ocp.args.StandardRestore(), opt_state=ocp.args.StandardRestore())  # fmt: skip
        restored = mgr.restore(mgr.latest_step(), args=args)
    saved = restored["params"]
    opt = [x for x in jax.tree.leaves(restored["opt_state"]) if np.ndim(x) > 0]
    assert sum(np.size(x) for x in opt) == 2 * sum(np.size(x) for x in jax.tree.leaves(saved))
    assert lora.is_adapter(saved) and "conv_in" not in saved
    assert sorted(lora.describe(saved)) == sorted(info["layers"])
    # A finished run restarted restores the adapter state and does nothing more.
    assert loop.run(c, workdir) == summaries

    sd = load_pretrained(model_dir)
    merged = checkpoints.load_iteration_params(workdir, 2, sd.params["unet"])
    # Evaluation reads a LoRA run's iteration (name=run@2) as the merged UNet.
    import ml_collections

    from spin_jax.eval.evaluate import ModelSpec, load_model

    cfg = ml_collections.ConfigDict(dict(base_model="", model=dict(dtype="float32", attention_impl="", allow_pickle=False)))  # fmt: skip
    _, params = load_model(ModelSpec("lora", "run", workdir, 2), cfg)
    for u, v in zip(jax.tree.leaves(params["unet"]), jax.tree.leaves(merged), strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    ours, (x, t, ctx) = _unet_out(sd.unet_apply, merged)
    base_out, _ = _unet_out(sd.unet_apply, sd.params["unet"])
    assert np.abs(ours - base_out).max() > 1e-6

    def torch_out(unet):
        with torch.no_grad():
            out = unet(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t).long(),
                       encoder_hidden_states=torch.from_numpy(ctx)).sample  # fmt: skip
        return out.numpy().transpose(0, 2, 3, 1)

    def export(out, *extra):
        cmd = [sys.executable, "launch/export.py", f"--workdir={workdir}", "--iteration=2",
               f"--out={out}", *extra]  # fmt: skip
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)

    export(str(tmp_path / "lora"))
    assert os.listdir(tmp_path / "lora") == ["pytorch_lora_weights.safetensors"]
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    np.testing.assert_allclose(torch_out(pipe.unet), ours, rtol=0, atol=1e-4 * np.abs(ours).max())
    export(str(tmp_path / "merged"), "--merge")
    unet = UNet2DConditionModel.from_pretrained(str(tmp_path / "merged" / "unet")).eval()
    np.testing.assert_allclose(torch_out(unet), ours, rtol=0, atol=1e-4 * np.abs(ours).max())
    # The trainer starts from a LoRA file (model.lora.init_from): the exported adapter.
    adapter, scale = lora.from_config(
        dict(rank=2, alpha=0.0, init_from=str(tmp_path / "lora")), sd.params["unet"], jax.random.key(0)
    )  # fmt: skip
    want, _ = checkpoints.load_iteration_adapter(workdir, 2, sd.params["unet"])
    assert scale == 2.0
    for u, v in zip(jax.tree.leaves(adapter), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), atol=1e-7)
    with pytest.raises(ValueError, match="rank = 4 but model.lora.init_from"):
        lora.from_config(dict(rank=4, init_from=str(tmp_path / "lora")), sd.params["unet"], jax.random.key(0))  # fmt: skip


def test_dpo_lora_run_uses_the_base_as_reference(model_dir, parquet, tmp_path):
    c = tiny_config("dpo", model_dir, parquet, "pickapic")
    c.model.lora.rank = 2
    c.model.lora.targets = ("attn", "ff")
    c.train.steps = 2
    c.log.grid_prompts = ()
    (summary,) = loop.run(c, str(tmp_path / "dpo"))
    train = [m for m in _read_jsonl(str(tmp_path / "dpo" / "metrics.jsonl")) if "train/loss" in m]
    assert abs(train[0]["train/loss"] - math.log(2)) < 1e-5 and np.isfinite(summary["loss"])
    adapter, scale = checkpoints.load_iteration_adapter(
        str(tmp_path / "dpo"), 1, _tiny_unet(model_dir)
    )
    assert scale == 1.0 and any(n.endswith("ff.net.2") for n in lora.describe(adapter))


def _tiny_unet(model_dir):
    from spin_jax.models import load_pretrained

    return load_pretrained(model_dir).params["unet"]
