"""generate() against diffusers' StableDiffusionPipeline on tiny random models; sharding; keys."""

import importlib
import warnings

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from spin_jax import parallel
from spin_jax.diffusion import generate

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
diffusers.utils.logging.set_verbosity_error()
warnings.filterwarnings("ignore", category=FutureWarning)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# The package attribute ``generate`` is the function; the module holds the compile cache.
generate_lib = importlib.import_module("spin_jax.diffusion.generate")

PROMPTS = ["a red cat", "a blue dog on the left", "photo"]  # 3 prompts on 8 devices: padded
SIZE = 16  # pixels: the tiny VAE downsamples by 2, so latents are 8x8x4
LATENT = 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tiny_sd import make_tiny_sd

    from spin_jax.models import load_pretrained

    out = {}
    for variant in ("sd1", "sd2"):
        path = make_tiny_sd(str(tmp_path_factory.mktemp(variant)), variant)
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(path, safety_checker=None)
        pipe.set_progress_bar_config(disable=True)
        out[variant] = (load_pretrained(path), pipe)
    return out


def latents_for(n, seed):
    return np.random.RandomState(seed).randn(n, LATENT, LATENT, 4).astype(np.float32)


def diffusers_images(pipe, scheduler_cls, latents, steps, guidance, negative=None):
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    return pipe(
        PROMPTS,
        negative_prompt=negative,
        num_inference_steps=steps,
        guidance_scale=guidance,
        latents=torch.from_numpy(latents.transpose(0, 3, 1, 2)),
        height=SIZE,
        width=SIZE,
        output_type="np",
    ).images


def to_unit(images):
    return np.clip((np.asarray(images) + 1) / 2, 0, 1)


def run_sd1(sd, prompts, key, example_ids=None, mesh=None):
    # One static configuration for every sd1 call below, so they share one compilation.
    return generate(sd, sd.params, sd.tokenize(prompts), key, num_steps=7, guidance_scale=7.5,
                    height=SIZE, width=SIZE, example_ids=example_ids, mesh=mesh,
                    sampler="dpm_solver_pp")  # fmt: skip


@pytest.fixture(scope="module")
def sd1_images(tiny):
    return run_sd1(tiny["sd1"][0], PROMPTS, jax.random.key(0))


def test_sd1_dpm_solver_cfg_matches_diffusers(tiny, sd1_images):
    sd, pipe = tiny["sd1"]
    images = sd1_images
    assert images.shape == (3, SIZE, SIZE, 3) and images.dtype == np.float32
    # generate's documented starting noise, handed to diffusers as its latents.
    key = jax.random.key(0)
    latents = np.stack(
        [np.asarray(jax.random.normal(jax.random.fold_in(key, i), (LATENT, LATENT, 4)))
         for i in range(3)]
    )  # fmt: skip
    ref = diffusers_images(pipe, diffusers.DPMSolverMultistepScheduler, latents, 7, 7.5)
    np.testing.assert_allclose(to_unit(images), ref, atol=1e-4)


def test_one_device_gives_the_same_images(tiny, sd1_images):
    one = parallel.make_mesh(devices=jax.devices()[:1])
    single = run_sd1(tiny["sd1"][0], PROMPTS, jax.random.key(0), mesh=one)
    np.testing.assert_allclose(np.asarray(single), np.asarray(sd1_images), atol=1e-5)


def test_sd2_ddim_negative_prompts_match_diffusers(tiny):
    sd, pipe = tiny["sd2"]  # v-prediction, "!" padding
    latents = latents_for(3, seed=1)
    negative = ["dog", "", "a red square"]
    ref = diffusers_images(pipe, diffusers.DDIMScheduler, latents, 5, 5.0, negative)
    images = generate(sd, sd.params, sd.tokenize(PROMPTS), jax.random.key(0), num_steps=5,
                      guidance_scale=5.0, latents=latents, sampler="ddim",
                      negative_prompt_ids=sd.tokenize(negative))  # fmt: skip
    np.testing.assert_allclose(to_unit(images), ref, atol=1e-4)


def test_keys_reproduce_and_compiled_function_is_reused(tiny, sd1_images):
    sd, _ = tiny["sd1"]
    cache = generate_lib._CACHE[id(sd)][1]
    fns = dict(cache)
    prompts = ["a cat", "a cat", "a dog"]

    def run(key, prompts=prompts, example_ids=None):
        return np.asarray(run_sd1(sd, prompts, key, example_ids))

    a = run(jax.random.key(1))
    np.testing.assert_array_equal(run(jax.random.key(1)), a)
    assert not np.allclose(run(jax.random.key(2)), a)
    assert not np.allclose(a[0], a[1])  # same prompt, different noise
    # Noise follows the example id, not the position in the batch.
    perm = [2, 0, 1]
    b = run(jax.random.key(1), [prompts[i] for i in perm], np.array(perm))
    np.testing.assert_allclose(b, a[perm], atol=1e-5)
    # Same static configuration and shapes: no new function and no recompilation.
    assert cache.keys() == fns.keys()
    assert all(f._cache_size() == 1 for f in cache.values() if callable(f))


def test_params_from_another_mesh_reuse_the_compiled_sampler(tiny, sd1_images):
    # The trainer hands over params laid out on its own (data, fsdp) mesh: same devices, same
    # replicated values, another sharding object. The sampler must not compile again.
    sd, _ = tiny["sd1"]
    other = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))
    params = jax.device_put(sd.params, NamedSharding(other, P()))
    images = generate(sd, params, sd.tokenize(PROMPTS), jax.random.key(0), num_steps=7,
                      guidance_scale=7.5, height=SIZE, width=SIZE,
                      sampler="dpm_solver_pp")  # fmt: skip
    np.testing.assert_allclose(np.asarray(images), np.asarray(sd1_images), atol=1e-6)
    cache = generate_lib._CACHE[id(sd)][1]
    assert all(f._cache_size() == 1 for f in cache.values() if callable(f))


def test_bad_input(tiny):
    sd, _ = tiny["sd1"]
    ids = sd.tokenize(PROMPTS)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="multiples"):
        generate(sd, sd.params, ids, key, height=15, width=16)
    with pytest.raises(ValueError, match="prompt_ids"):
        generate(sd, sd.params, ids[0], key)
    with pytest.raises(ValueError, match="negative_prompt_ids"):
        generate(sd, sd.params, ids, key, negative_prompt_ids=ids[:2])
    with pytest.raises(ValueError, match="sampler"):
        generate(sd, sd.params, ids, key, sampler="heun")
    with pytest.raises(ValueError, match="latents"):
        generate(sd, sd.params, ids, key, latents=latents_for(2, 0))
