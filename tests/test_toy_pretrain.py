"""The toy base-model builder: a tiny build loads (here and in diffusers); the VAE learns."""

import json
import os

import jax
import numpy as np
import pytest

from spin_jax.toy import pretrain, shapes

TINY = dict(
    unet_channels=(16, 32),
    unet_layers_per_block=1,
    vae_channels=(8, 16),
    text_hidden_size=16,
    text_layers=1,
)


def test_train_vae_lowers_reconstruction_error():
    sd = pretrain.init_pipeline(0, **TINY)
    images, _ = shapes.generate("noisy", 48, seed=0)
    before = pretrain.reconstruction_mse(sd, sd.params["vae"], images[:16])
    params, history = pretrain.train_vae(
        sd, images, steps=40, batch_size=16, learning_rate=3e-3, kl_weight=1e-6, log_every=20
    )
    after = pretrain.reconstruction_mse(sd, params, images[:16])
    assert [h["step"] for h in history] == [20, 40]
    assert after < 0.5 * before, (before, after)
    scale = pretrain.latent_scaling_factor(sd, params, images)
    assert np.isfinite(scale) and scale > 0


def test_train_vae_refuses_too_few_images():
    sd = pretrain.init_pipeline(0, **TINY)
    with pytest.raises(ValueError, match="batch_size"):
        pretrain.train_vae(sd, np.zeros((4, 32, 32, 3), np.uint8), steps=1, batch_size=8)


def test_tokenizer_has_one_token_per_caption_word():
    sd = pretrain.init_pipeline(0, **TINY)
    text = "a yellow triangle on the left and a blue circle at the top"
    ids = sd.tokenize([text])[0]
    assert ids[0] == sd.tokenizer.bos_id
    assert ids[len(text.split()) + 1] == sd.tokenizer.eos_id
    assert len(set(ids[1 : len(text.split()) + 1]) & {sd.tokenizer.eos_id}) == 0


def test_build_base_tiny_is_a_loadable_diffusers_dir(tmp_path):
    from spin_jax.models import load_pretrained

    out = str(tmp_path / "base")
    report = pretrain.build_base(
        out, seed=0, num_noisy=32, num_vae_clean=8, vae_steps=4, vae_batch_size=8, unet_steps=2,
        unet_batch_size=8, unet_learning_rate=1e-3, **TINY,
    )  # fmt: skip
    assert set(report["seconds"]) >= {"dataset", "vae", "unet", "total"}
    with open(os.path.join(out, "build_report.json")) as f:
        assert json.load(f)["settings"]["unet_steps"] == 2
    sd = load_pretrained(out)
    scale = report["vae"]["scaling_factor"]
    assert sd.scaling_factor == pytest.approx(scale) and scale > 0
    assert sd.vae_scale_factor == 2 and sd.latent_channels == 4
    # The exported UNet is the trained one, not the random start.
    start = load_pretrained(os.path.join(out + ".work", "vae_base"))
    diff = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), sd.params["unet"],
                        start.params["unet"])  # fmt: skip
    assert max(jax.tree.leaves(diff)) > 0
    # diffusers (PyTorch, test-only) reads the directory as a Stable Diffusion pipeline.
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    assert pipe.vae.config.scaling_factor == pytest.approx(scale)
    with torch.no_grad():
        ids = torch.tensor(np.asarray(sd.tokenize(["a red circle on the left"])), dtype=torch.long)
        ctx = pipe.text_encoder(ids)[0]
        eps = pipe.unet(torch.zeros(1, 4, 16, 16), 10, encoder_hidden_states=ctx).sample
    assert tuple(eps.shape) == (1, 4, 16, 16)
