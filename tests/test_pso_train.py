"""PSO end to end on tiny pipelines (8 simulated CPU devices): offline on a Pick-a-Pic parquet,
online with a tiny random PickScore-architecture scorer, and the bad inputs."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from test_trainer import parquet, tiny_config  # noqa: F401  (fixtures)
from tiny_sd import WORDS, make_tiny_sd, make_tiny_sdxl

from spin_jax.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def turbo(tmp_path_factory):
    return make_tiny_sdxl(str(tmp_path_factory.mktemp("turbo")), "turbo")


@pytest.fixture(scope="module")
def reward(tmp_path_factory):
    """A tiny random PickScore (CLIP architecture, spin_jax.eval.tiny) as online PSO's reward."""
    from spin_jax.eval import scorers
    from spin_jax.eval.tiny import write_tiny_scorers
    from spin_jax.train import pso

    cfg = write_tiny_scorers(str(tmp_path_factory.mktemp("scorers")), words=WORDS)
    return pso.reward_from_scorer(scorers.load_scorer("pickscore", cfg["pickscore"])), cfg


def pso_config(objective, model, data):
    c = tiny_config("dpo", model, data, source="pickapic")
    c.objective = objective
    c.sample.sampler = "auto"
    c.sample.guidance_scale = 0.0
    c.sample.num_steps = 4
    c.pso.num_steps = 4
    c.log.grid_prompts = ("a red circle",)
    return c


def _train_rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r for r in rows if "train/loss" in r], rows


def test_offline_pso_lora_end_to_end_and_exports(turbo, parquet, tmp_path):  # noqa: F811
    torch = pytest.importorskip("torch")
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    from spin_jax.models import load_pretrained
    from spin_jax.train import checkpoints

    workdir = str(tmp_path / "run")
    c = pso_config("pso", turbo, parquet)
    c.model.lora.rank = 2
    c.pso.prior_weight = 0.5  # the personalization script's extra term, exercised
    summaries = loop.run(c, workdir)
    assert len(summaries) == 1 and np.isfinite(summaries[0]["loss"])
    train, _ = _train_rows(workdir)
    assert len(train) == 3
    # theta = the base (adapter B = 0) at step 1: DPO's log 2 plus the prior term.
    assert abs(train[0]["train/loss"] - np.log(2) - 0.5 * train[0]["train/prior_term"]) < 1e-5
    assert os.path.isfile(os.path.join(workdir, "iteration_1", "grid.png"))

    # Both exports load in diffusers and give the trained UNet's outputs.
    sd = load_pretrained(turbo)
    merged = checkpoints.load_iteration_params(workdir, 1, sd.params["unet"])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
    t = np.array([999, 249], np.int32)
    ctx = rng.normal(size=(2, 5, 64)).astype(np.float32)
    added = {"text_embeds": rng.normal(size=(2, 32)).astype(np.float32),
             "time_ids": np.tile(np.float32([16, 16, 0, 0, 16, 16]), (2, 1))}  # fmt: skip
    ours = np.asarray(sd.unet_apply(merged, x, t, ctx, added))
    base = np.asarray(sd.unet_apply(sd.params["unet"], x, t, ctx, added))
    assert np.abs(ours - base).max() > 1e-6  # the adapter trained

    def torch_out(unet):
        with torch.no_grad():
            out = unet(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t).long(),
                       encoder_hidden_states=torch.from_numpy(ctx),
                       added_cond_kwargs={k: torch.from_numpy(v) for k, v in added.items()}).sample  # fmt: skip
        return out.numpy().transpose(0, 2, 3, 1)

    def export(out, *extra):
        cmd = [sys.executable, "launch/export.py", f"--workdir={workdir}", "--iteration=1",
               f"--out={out}", *extra]  # fmt: skip
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True,
                       env=dict(os.environ, PYTHONPATH=ROOT))  # fmt: skip

    tol = 1e-4 * np.abs(ours).max()
    export(str(tmp_path / "lora"))
    pipe = StableDiffusionXLPipeline.from_pretrained(turbo)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    np.testing.assert_allclose(torch_out(pipe.unet), ours, rtol=0, atol=tol)
    export(str(tmp_path / "merged"), "--merge")
    unet = UNet2DConditionModel.from_pretrained(str(tmp_path / "merged" / "unet")).eval()
    np.testing.assert_allclose(torch_out(unet), ours, rtol=0, atol=tol)


def test_online_pso_bad_inputs(turbo, parquet, reward, tmp_path):  # noqa: F811
    c = pso_config("pso_online", turbo, parquet)
    c.pso.pairs_per_round = 6
    with pytest.raises(ValueError, match=r"pso.pairs_per_round = 6: must be divisible by the 8"):
        loop.run(c, str(tmp_path / "a"), reward_fn=reward[0])
    c.pso.pairs_per_round = 8
    with pytest.raises(ValueError, match="reward"):
        loop.run(c, str(tmp_path / "b"))
    c.sample.sampler = "euler"
    with pytest.raises(ValueError, match="deterministic"):
        loop.run(c, str(tmp_path / "c"), reward_fn=reward[0])


def test_offline_pso_without_few_step_scheduler(parquet, tmp_path):  # noqa: F811
    ddim = make_tiny_sd(str(tmp_path / "sd"), "sd1")
    c = pso_config("pso", ddim, parquet)
    with pytest.raises(ValueError, match=r"DDIMScheduler.*--config\.pso\.timesteps="):
        loop.run(c, str(tmp_path / "run"))


def test_launcher_missing_scorer_weights(turbo, parquet, tmp_path):  # noqa: F811
    workdir = str(tmp_path / "run")
    out = subprocess.run(
        [sys.executable, "launch/train.py", "--config=configs/pso.py:online",
         f"--workdir={workdir}", f"--config.model.path={turbo}", f"--config.data.path={parquet}",
         "--config.pso.scorers.pickscore.model=/nonexistent/PickScore_v1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, PYTHONPATH=ROOT),
    )  # fmt: skip
    assert out.returncode == 1, out.stderr[-2000:]
    assert "pso.scorers.pickscore.model: /nonexistent/PickScore_v1 not found" in out.stderr
    assert not os.path.exists(os.path.join(workdir, "iteration_1"))  # nothing sampled
