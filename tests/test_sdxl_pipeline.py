# ruff: noqa: F811  (the fixtures imported from test_trainer are parameters here)
"""SDXL end to end on tiny random pipelines built with diffusers: loading, both tokenizers,
encode_prompt, generate() for base (Euler + CFG with zeroed negatives), Turbo (Euler ancestral)
and LCM / DMD2 (LCM scheduler, guidance embedding), export, bad folders, and training."""

import json
import os
import shutil
import warnings

import jax
import numpy as np
import pytest
from test_trainer import folder, parquet, tiny_config  # noqa: F401  (fixtures)
from tiny_sd import make_tiny_sdxl

from spin_jax.diffusion import generate
from spin_jax.models import load_pretrained, save_pretrained

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
diffusers.utils.logging.set_verbosity_error()
warnings.filterwarnings("ignore", category=FutureWarning)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

PROMPTS = ["a red cat", "a blue dog on the left", "photo"]
SIZE, LATENT = 16, 8  # the tiny VAE downsamples by 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = {}
    for kind in ("base", "turbo", "lcm"):
        path = make_tiny_sdxl(str(tmp_path_factory.mktemp(f"sdxl_{kind}")), kind)
        pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(path, add_watermarker=False)
        pipe.set_progress_bar_config(disable=True)
        out[kind] = (path, load_pretrained(path), pipe)
    return out


def latents_for(n, seed=0):
    return np.random.RandomState(seed).randn(n, LATENT, LATENT, 4).astype(np.float32)


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def step_noises(n, steps):
    """The step noise generate() draws for given latents: row j from fold_in(fold_in(key, j), 1)."""
    key = jax.random.key(0)
    rows = [jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, j), 1),
                              (steps, LATENT, LATENT, 4)) for j in range(n)]  # fmt: skip
    return np.stack([np.asarray(r) for r in rows], axis=1)  # [steps, n, h, w, c]


def diffusers_images(pipe, latents, noises=None, **kwargs):
    """pipe(...) with the given starting latents and, for stochastic schedulers, step noises."""
    from diffusers.schedulers import scheduling_euler_ancestral_discrete as ea
    from diffusers.schedulers import scheduling_lcm as lcm

    queue = list(noises) if noises is not None else []

    def fake_randn(shape, generator=None, device=None, dtype=None, layout=None):
        return nchw(queue.pop(0)).to(dtype or torch.float32)

    saved = (ea.randn_tensor, lcm.randn_tensor)
    ea.randn_tensor = lcm.randn_tensor = fake_randn
    try:
        out = pipe(PROMPTS, latents=nchw(latents), height=SIZE, width=SIZE, output_type="np",
                   **kwargs).images  # fmt: skip
    finally:
        ea.randn_tensor, lcm.randn_tensor = saved
    return out


def to_unit(images):
    return np.clip((np.asarray(images) + 1) / 2, 0, 1)


def test_family_tokenizers_and_encode_prompt(tiny):
    _, sd, pipe = tiny["base"]
    assert sd.family.name == "sdxl" and sd.force_zeros_for_empty_prompt
    ids = sd.tokenize(PROMPTS)
    assert ids.shape == (3, 2, 77)
    for i, tok in enumerate((pipe.tokenizer, pipe.tokenizer_2)):
        ref = tok(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
        np.testing.assert_array_equal(ids[:, i], np.asarray(ref))
    assert ids[0, 1, -1] == pipe.tokenizer_2.convert_tokens_to_ids("!")  # tokenizer_2 pads with !
    context, pooled = sd.encode_prompt(sd.params, ids)
    with torch.no_grad():
        emb, neg, pool, neg_pool = pipe.encode_prompt(PROMPTS, device="cpu",
                                                      do_classifier_free_guidance=True)  # fmt: skip
    np.testing.assert_allclose(np.asarray(context), emb.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(pooled), pool.numpy(), atol=1e-5)
    assert not neg.abs().max() and not neg_pool.abs().max()  # force_zeros_for_empty_prompt


def test_unet_with_added_cond_matches_diffusers(tiny):
    _, sd, pipe = tiny["lcm"]
    x = latents_for(2)
    ctx = np.random.RandomState(1).randn(2, 77, 64).astype(np.float32)
    pooled = np.random.RandomState(2).randn(2, 32).astype(np.float32)
    time_ids = sd.time_ids(SIZE, SIZE, 2)
    from spin_jax.models.unet import guidance_scale_embedding

    w_emb = guidance_scale_embedding(np.full((2,), 3.0, np.float32), 16)
    ours = sd.unet_apply(sd.params["unet"], x, np.array([999, 250]), ctx,
                         sd.added_cond(pooled, time_ids), w_emb)  # fmt: skip
    with torch.no_grad():
        ref = pipe.unet(nchw(x), torch.tensor([999, 250]), torch.from_numpy(ctx),
                        timestep_cond=torch.from_numpy(np.asarray(w_emb)),
                        added_cond_kwargs={"text_embeds": torch.from_numpy(pooled),
                                           "time_ids": torch.from_numpy(time_ids)}).sample  # fmt: skip
    np.testing.assert_allclose(np.asarray(ours), ref.numpy().transpose(0, 2, 3, 1), atol=1e-4)


def test_generate_base_euler_cfg_matches_diffusers(tiny):
    _, sd, pipe = tiny["base"]
    latents = latents_for(3)
    ours = generate(
        sd,
        sd.params,
        sd.tokenize(PROMPTS),
        jax.random.key(0),
        num_steps=5,
        guidance_scale=5.0,
        latents=latents,
    )  # fmt: skip  (folder default: euler)
    ref = diffusers_images(pipe, latents, num_inference_steps=5, guidance_scale=5.0)
    np.testing.assert_allclose(to_unit(ours), ref, atol=2e-4)


@pytest.mark.parametrize("steps", [1, 4])
def test_generate_turbo_euler_ancestral_matches_diffusers(tiny, steps):
    _, sd, pipe = tiny["turbo"]
    latents = latents_for(3, seed=steps)
    ours = generate(sd, sd.params, sd.tokenize(PROMPTS), jax.random.key(0), num_steps=steps,
                    guidance_scale=0.0, latents=latents)  # fmt: skip
    ref = diffusers_images(pipe, latents, step_noises(3, steps), num_inference_steps=steps,
                           guidance_scale=0.0)  # fmt: skip
    np.testing.assert_allclose(to_unit(ours), ref, atol=2e-4)


@pytest.mark.parametrize("timesteps", [None, [999, 749, 499, 249]])
def test_generate_lcm_and_dmd2_timesteps_match_diffusers(tiny, timesteps):
    _, sd, pipe = tiny["lcm"]
    latents = latents_for(3, seed=7)
    ours = generate(sd, sd.params, sd.tokenize(PROMPTS), jax.random.key(0), num_steps=4,
                    guidance_scale=4.0, latents=latents, timesteps=timesteps)  # fmt: skip
    kwargs = {"timesteps": timesteps} if timesteps else {"num_inference_steps": 4}
    ref = diffusers_images(pipe, latents, step_noises(3, 4), guidance_scale=4.0, **kwargs)
    np.testing.assert_allclose(to_unit(ours), ref, atol=2e-4)


def test_export_loads_in_diffusers_with_identical_outputs(tiny, tmp_path):
    path, sd, pipe = tiny["turbo"]
    params = dict(sd.params)
    params["unet"] = jax.tree.map(lambda p: p * 1.01, sd.params["unet"])  # a "trained" UNet
    out = save_pretrained(sd, str(tmp_path / "export"), params=params)
    with open(os.path.join(out, "model_index.json")) as f:
        index = json.load(f)
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    back = diffusers.StableDiffusionXLPipeline.from_pretrained(out, add_watermarker=False)
    back.set_progress_bar_config(disable=True)
    latents = latents_for(3, seed=3)
    ours = generate(sd, params, sd.tokenize(PROMPTS), jax.random.key(0), num_steps=2,
                    guidance_scale=0.0, latents=latents)  # fmt: skip
    ref = diffusers_images(back, latents, step_noises(3, 2), num_inference_steps=2,
                           guidance_scale=0.0)  # fmt: skip
    np.testing.assert_allclose(to_unit(ours), ref, atol=2e-4)
    again = load_pretrained(out)
    assert again.family.name == "sdxl"
    leaves = zip(jax.tree.leaves(again.params), jax.tree.leaves(params), strict=True)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in leaves)


def test_bad_sdxl_folders(tiny, tmp_path):
    path = tiny["base"][0]
    missing = str(tmp_path / "missing")
    shutil.copytree(path, missing)
    shutil.rmtree(os.path.join(missing, "text_encoder_2"))
    with pytest.raises(FileNotFoundError, match="text_encoder_2"):
        load_pretrained(missing)

    wrong = str(tmp_path / "wrong")
    shutil.copytree(path, wrong)
    cfg_path = os.path.join(wrong, "unet", "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["projection_class_embeddings_input_dim"] = 96
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    with pytest.raises(
        ValueError, match="unet/config.json.*projection_class_embeddings_input_dim.*96"
    ):
        load_pretrained(wrong)

    sched = str(tmp_path / "sched")
    shutil.copytree(path, sched)
    s_path = os.path.join(sched, "scheduler", "scheduler_config.json")
    with open(s_path) as f:
        cfg = json.load(f)
    cfg["_class_name"] = "FlowMatchEulerDiscreteScheduler"
    with open(s_path, "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match="FlowMatchEulerDiscreteScheduler"):
        load_pretrained(sched)


@pytest.mark.parametrize("objective,time_ids", [("spin", "true"), ("dpo", "fixed")])
def test_sdxl_trains_end_to_end(tiny, tmp_path, folder, parquet, objective, time_ids):
    from spin_jax.train import loop

    path = tiny["base"][0]
    if objective == "spin":
        c = tiny_config("spin", path, folder)
        c.iterations = 1
        c.train.betas = ()
    else:
        c = tiny_config("dpo", path, parquet, source="pickapic")
    c.mesh.fsdp = 2  # 4 x 2 simulated devices: data parallel and sharded parameters
    c.data.sdxl_time_ids = time_ids
    c.sample.sampler = "euler"
    c.log.grid_prompts = ()
    summaries = loop.run(c, str(tmp_path / "run"))
    assert len(summaries) == 1
    assert np.isfinite(summaries[0]["loss"])
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        first = next(r for r in map(json.loads, f) if "train/loss" in r)
    # The reference is the base (SPIN round 1's opponent, DPO's reference): loss log 2 at step 1.
    np.testing.assert_allclose(first["train/loss"], np.log(2.0), rtol=1e-5)
