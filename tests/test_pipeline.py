"""load_pretrained / save_pretrained against diffusers' StableDiffusionPipeline (PyTorch)."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from tiny_sd import make_tiny_sd

from spin_jax.models import load_pretrained, save_pretrained
from spin_jax.models.convert import WeightMismatchError


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def tiny(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp(request.param))
    layout = "vocab" if request.param == "sd1" else "json"
    return make_tiny_sd(path, request.param, tokenizer_layout=layout)


@pytest.fixture(scope="module")
def tiny_sd1(tmp_path_factory):
    return make_tiny_sd(str(tmp_path_factory.mktemp("sd1_bad")), "sd1")


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12)


def _torch_pipe(path):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(path, safety_checker=None)


def _outputs_match(sd, pipe, params=None):
    """Text encoder, UNet and VAE of ``sd`` agree with ``pipe`` to 1e-4 relative."""
    params = sd.params if params is None else params
    prompts = ["a red cat on the left", "", "a photo of a blue square"]
    ids = sd.tokenize(prompts)
    ref_ids = pipe.tokenizer(
        prompts, padding="max_length", max_length=77, truncation=True
    ).input_ids
    np.testing.assert_array_equal(ids, np.array(ref_ids))
    ctx = np.asarray(sd.encode_text(params["text_encoder"], ids))
    with torch.no_grad():
        ref_ctx = pipe.text_encoder(torch.tensor(ids, dtype=torch.long))[0].numpy()
    assert _rel(ctx, ref_ctx) < 1e-4
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 8, 8, 4)).astype(np.float32)
    t = np.array([1, 500, 999], np.int32)
    out = np.asarray(sd.unet_apply(params["unet"], x, t, ctx))
    with torch.no_grad():
        ref = pipe.unet(torch.tensor(x).permute(0, 3, 1, 2), torch.tensor(t), torch.tensor(ref_ctx))
    assert _rel(out, ref.sample.permute(0, 2, 3, 1).numpy()) < 1e-4
    images = np.asarray(sd.vae_decode(params["vae"], x))
    with torch.no_grad():
        ref_img = pipe.vae.decode(torch.tensor(x).permute(0, 3, 1, 2)).sample
    assert _rel(images, ref_img.permute(0, 2, 3, 1).numpy()) < 1e-4
    mean, logvar = sd.vae_encode(params["vae"], images)
    with torch.no_grad():
        dist = pipe.vae.encode(ref_img).latent_dist
    assert _rel(mean, dist.mean.permute(0, 2, 3, 1).numpy()) < 1e-4
    assert _rel(logvar, dist.logvar.permute(0, 2, 3, 1).numpy()) < 1e-4


def test_load_matches_diffusers(tiny):
    sd = load_pretrained(tiny)
    pipe = _torch_pipe(tiny)
    assert sd.schedule.prediction_type == pipe.scheduler.config.prediction_type
    assert sd.scaling_factor == pipe.vae.config.scaling_factor
    _outputs_match(sd, pipe)


def test_export_round_trip(tiny, tmp_path):
    """save_pretrained writes what diffusers loads, with identical weights and outputs."""
    sd = load_pretrained(tiny)
    # Change the UNet so the export is not a copy of the input files.
    params = dict(sd.params)
    params["unet"] = {**params["unet"]}
    params["unet"]["conv_out"] = {
        "kernel": params["unet"]["conv_out"]["kernel"] * 1.5,
        "bias": params["unet"]["conv_out"]["bias"] + 0.1,
    }
    out = save_pretrained(sd, str(tmp_path / "export"), params=params)
    pipe = _torch_pipe(out)
    kernel = pipe.unet.conv_out.weight.detach().permute(2, 3, 1, 0).numpy()
    np.testing.assert_array_equal(kernel, np.asarray(params["unet"]["conv_out"]["kernel"]))
    _outputs_match(sd, pipe, params)
    again = load_pretrained(out)
    for name in ("unet", "vae", "text_encoder"):
        a = np.concatenate([np.ravel(x) for x in __import__("jax").tree.leaves(params[name])])
        b = np.concatenate([np.ravel(x) for x in __import__("jax").tree.leaves(again.params[name])])
        np.testing.assert_array_equal(a, b)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def test_missing_folder_and_file(tiny_sd1, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_pretrained(str(tmp_path / "nowhere"))
    path = _copy(tiny_sd1, tmp_path / "m")
    os.remove(os.path.join(path, "vae", "diffusion_pytorch_model.safetensors"))
    with pytest.raises(FileNotFoundError, match="vae"):
        load_pretrained(path)
    shutil.rmtree(os.path.join(path, "tokenizer"))
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        load_pretrained(path)


def test_pickle_refused_unless_opted_in(tiny_sd1, tmp_path):
    from safetensors.torch import load_file

    path = _copy(tiny_sd1, tmp_path / "p")
    st = os.path.join(path, "unet", "diffusion_pytorch_model.safetensors")
    torch.save(load_file(st), os.path.join(path, "unet", "diffusion_pytorch_model.bin"))
    os.remove(st)
    with pytest.raises(ValueError, match="pickled.*allow_pickle"):
        load_pretrained(path)
    sd = load_pretrained(path, allow_pickle=True)
    ref = load_pretrained(tiny_sd1)
    np.testing.assert_array_equal(
        sd.params["unet"]["conv_in"]["kernel"], ref.params["unet"]["conv_in"]["kernel"]
    )


def test_shape_mismatch_names_tensor(tiny_sd1, tmp_path):
    from safetensors.numpy import load_file, save_file

    path = _copy(tiny_sd1, tmp_path / "s")
    st = os.path.join(path, "unet", "diffusion_pytorch_model.safetensors")
    tensors = load_file(st)
    tensors["conv_in.bias"] = np.zeros(7, np.float32)
    save_file(tensors, st)
    with pytest.raises(WeightMismatchError, match=r"conv_in\.bias.*\(7,\).*\(32,\)"):
        load_pretrained(path)


def test_unknown_config_option(tiny_sd1, tmp_path):
    path = _copy(tiny_sd1, tmp_path / "c")
    cfg_path = os.path.join(path, "unet", "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["class_embed_type"] = "timestep"
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match="class_embed_type"):
        load_pretrained(path)
