"""The few-step toy model: the shipped LCM folder (loads here and in diffusers, same 4-step
images) and the consistency distillation (its loss falls on a tiny model, its step is
deterministic given the key)."""

import filecmp
import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spin_jax.diffusion import generate, samplers
from spin_jax.diffusion.schedule import schedule_from_config
from spin_jax.models import load_pretrained
from spin_jax.toy import distill, pretrain, shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FEWSTEP = os.path.join(ROOT, "assets", "toy_fewstep")
BASE = os.path.join(ROOT, "assets", "toy_base")
PROMPTS = ["a red circle on the left", "a blue triangle at the top", "a green square in the center"]
LATENT = 16  # 32 px images, the toy VAE halves

TINY = dict(
    unet_channels=(16, 32),
    unet_layers_per_block=1,
    vae_channels=(8, 16),
    text_hidden_size=16,
    text_layers=1,
)


@pytest.fixture(scope="module")
def fewstep():
    return load_pretrained(FEWSTEP)


def test_shipped_folder_is_an_lcm_model_of_the_base_architecture(fewstep):
    assert fewstep.schedule.class_name == "LCMScheduler"
    assert samplers.default_sampler(fewstep.schedule) == "lcm"
    assert fewstep.guidance_embedding_dim is None  # the base's UNet, no guidance embedding
    with open(os.path.join(BASE, "unet", "config.json")) as f:
        base_unet = json.load(f)
    assert fewstep.configs["unet"] == base_unet
    with open(os.path.join(FEWSTEP, "model_index.json")) as f:
        assert json.load(f)["scheduler"] == ["diffusers", "LCMScheduler"]
    for name in ("vae", "text_encoder", "tokenizer"):  # shared with the base, byte for byte
        cmp = filecmp.dircmp(os.path.join(BASE, name), os.path.join(FEWSTEP, name))
        assert not (cmp.left_only or cmp.right_only or cmp.diff_files), name
    with open(os.path.join(FEWSTEP, "build_report.json")) as f:
        report = json.load(f)
    rows = report["judge"]
    assert {"student lcm 1 steps", "student lcm 2 steps", "student lcm 4 steps"} <= set(rows)
    assert any(k.startswith("base ddim 20 steps") for k in rows)


def _nchw(torch, x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def test_generate_matches_diffusers_lcm_pipeline(fewstep):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from diffusers.schedulers import scheduling_lcm

    diffusers.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(FEWSTEP, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == "LCMScheduler"

    steps, n = 4, len(PROMPTS)
    latents = np.random.RandomState(0).randn(n, LATENT, LATENT, 4).astype(np.float32)
    key = jax.random.key(0)
    # sampler=None: the folder's (LCM)
    ours = generate(fewstep, fewstep.params, fewstep.tokenize(PROMPTS), key, num_steps=steps,
                    guidance_scale=1.0, latents=latents)  # fmt: skip
    # generate draws step noise of row j from fold_in(fold_in(key, j), 1); diffusers' LCM step
    # asks randn_tensor for one [B, C, h, w] draw per step but the last.
    rows = [np.asarray(jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, j), 1),
                                         (steps, LATENT, LATENT, 4))) for j in range(n)]  # fmt: skip
    queue = list(np.stack(rows, axis=1))

    def fake_randn(shape, generator=None, device=None, dtype=None, layout=None):
        return _nchw(torch, queue.pop(0)).to(dtype or torch.float32)

    saved = scheduling_lcm.randn_tensor
    scheduling_lcm.randn_tensor = fake_randn
    try:
        ref = pipe(PROMPTS, latents=_nchw(torch, latents), height=32, width=32,
                   num_inference_steps=steps, guidance_scale=1.0, output_type="np").images  # fmt: skip
    finally:
        scheduling_lcm.randn_tensor = saved
    assert len(queue) == 1  # three re-noisings for four steps
    ours = np.clip((np.asarray(ours) + 1) / 2, 0, 1)
    np.testing.assert_allclose(ours, ref, atol=2e-4)


def test_lcm_scheduler_config_and_grid():
    base = pretrain.scheduler_config()
    cfg = distill.lcm_scheduler_config(base, 20, 10.0)
    assert cfg["_class_name"] == "LCMScheduler" and cfg["beta_end"] == base["beta_end"]
    schedule = schedule_from_config(cfg)
    grid = distill.solver_timesteps(schedule, 20)
    assert grid[0] == 49 and grid[-1] == 999 and len(grid) == 20
    # LCM sampling picks its steps from the distillation grid.
    assert set(samplers.lcm_timesteps(schedule, 4)) <= set(grid)
    c_skip, c_out = distill.boundary_coefficients(jnp.asarray([0, 999]), 10.0)
    np.testing.assert_allclose(np.asarray(c_skip), [1.0, 0.25 / (9990.0**2 + 0.25)], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(c_out), [0.0, 9990.0 / (9990.0**2 + 0.25) ** 0.5],
                               rtol=1e-6)  # fmt: skip
    tab = samplers.lcm_tables(schedule, 4)
    want_skip, want_out = distill.boundary_coefficients(jnp.asarray(tab["t"]), 10.0)
    np.testing.assert_allclose(tab["c_skip"], np.asarray(want_skip), rtol=1e-5)
    np.testing.assert_allclose(tab["c_out"], np.asarray(want_out), rtol=1e-5)


@pytest.fixture(scope="module")
def tiny():
    sd = pretrain.init_pipeline(0, **TINY)
    images, records = shapes.generate("noisy", 16, seed=0)
    data = distill.encode_dataset(sd, images, [r["text"] for r in records])
    return sd, data


def test_tiny_distillation_lowers_its_loss_and_is_deterministic(tiny):
    sd, data = tiny
    settings = distill.LossSettings(guidance_scale=2.0, original_inference_steps=10)
    tx = distill.make_optimizer(20, 1e-3, warmup_steps=0)
    step = distill.make_train_step(sd.unet_apply, sd.schedule, tx, settings, ema_decay=0.5)
    teacher = sd.params["unet"]
    batch = {k: jnp.asarray(v[:8]) for k, v in data.items() if k != "uncond"}
    batch["uncond"] = jnp.asarray(data["uncond"])
    keys = [jax.random.fold_in(jax.random.key(3), j) for j in range(4)]

    # Determinism: the same state, batch and key give the same update, bit for bit.
    a, ma = step(distill.init_state(teacher, tx), teacher, batch, keys[0])
    b, mb = step(distill.init_state(teacher, tx), teacher, batch, keys[0])
    assert float(ma["loss"]) == float(mb["loss"])
    same = jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), a, b)
    assert all(jax.tree.leaves(same))
    moved = jax.tree.map(lambda x, y: float(jnp.abs(x - y).max()), a["student"], teacher)
    assert max(jax.tree.leaves(moved)) > 0

    # The step's loss is that of the state it starts from: the loss at a fixed (batch, key)
    # before and after 20 steps of training on four keys (noise and timestep draws).
    before = float(ma["loss"])
    state = a
    for i in range(1, 20):
        state, _ = step(state, teacher, batch, keys[i % 4])
    after = float(step(state, teacher, batch, keys[0])[1]["loss"])
    assert np.isfinite(after) and after < 0.7 * before, (before, after)


def test_distill_refuses_small_data(tiny):
    sd, data = tiny
    with pytest.raises(ValueError, match="batch_size"):
        distill.distill(sd, data, steps=1, batch_size=64, learning_rate=1e-4)


def test_reward_fn_ranks_faithful_and_clean_images_first():
    from spin_jax.toy import judge

    captions = ["a red circle on the left", "a blue square at the top"]
    objects = [shapes.parse_caption(c) for c in captions]
    clean = np.stack([shapes.render(o, 32, "clean") for o in objects])
    wrong = [dict(o[0], color="green") for o in objects]
    clean_wrong = np.stack([shapes.render([w], 32, "clean") for w in wrong])
    rng = [np.random.default_rng(7), np.random.default_rng(7)]
    noisy = shapes.render(objects[0], 32, "noisy", rng[0])
    noisy_wrong = shapes.render([wrong[0]], 32, "noisy", rng[1])  # same background and jitter

    np.testing.assert_array_equal(judge.reward_fn(clean, captions), [1.0, 1.0])
    r_wrong = judge.reward_fn(clean_wrong, captions)
    assert np.all(r_wrong < 0)
    r = judge.reward_fn(np.stack([noisy, noisy_wrong]), [captions[0]] * 2)
    assert 1.0 > r[0] > r[1]
    # Per image: a batch scores as its images one by one; floats in [-1, 1] as uint8.
    both, prompts = np.concatenate([clean_wrong, noisy[None]]), [*captions, captions[0]]
    one_by_one = [judge.reward_fn(im[None], [c])[0] for im, c in zip(both, prompts, strict=True)]
    np.testing.assert_allclose(judge.reward_fn(both, prompts), one_by_one)
    as_objects = [shapes.parse_caption(c) for c in prompts]
    np.testing.assert_allclose(judge.reward_fn(both / 127.5 - 1.0, as_objects), one_by_one,
                               atol=1e-9)  # fmt: skip
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        judge.reward_fn(clean, captions[:1])


def test_build_fewstep_tiny_writes_an_lcm_folder(tiny, tmp_path):
    from spin_jax.models import save_pretrained

    sd, _ = tiny
    base = save_pretrained(sd, str(tmp_path / "base"))
    out = str(tmp_path / "fewstep")
    distill.main(["--out", out, "--base", base, "--num-images", "8", "--steps", "2",
                  "--batch-size", "4", "--no-eval"])  # fmt: skip
    with open(os.path.join(out, "build_report.json")) as f:
        report = json.load(f)
    assert report["settings"]["steps"] == 2 and [h["step"] for h in report["history"]] == [2]
    assert set(report["seconds"]) == {"dataset", "distill", "total"}
    student = load_pretrained(out)
    assert samplers.default_sampler(student.schedule) == "lcm"
    assert student.schedule.original_inference_steps == 20
    moved = jax.tree.map(lambda x, y: float(np.abs(np.asarray(x) - np.asarray(y)).max()),
                         student.params["unet"], sd.params["unet"])  # fmt: skip
    assert max(jax.tree.leaves(moved)) > 0
    assert filecmp.cmp(os.path.join(base, "vae", "diffusion_pytorch_model.safetensors"),
                       os.path.join(out, "vae", "diffusion_pytorch_model.safetensors"),
                       shallow=False)  # fmt: skip
