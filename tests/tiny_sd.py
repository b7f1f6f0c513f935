"""Tiny random Stable Diffusion pipelines built with diffusers/transformers (PyTorch), for parity tests.

Nothing is downloaded: the tokenizer vocabulary is written by ``spin_jax.models.tiny``.
"""

from __future__ import annotations

import json
import os

from spin_jax.models.tiny import EOS, write_clip_tokenizer

WORDS = [
    "a",
    "cat",
    "dog",
    "red",
    "blue",
    "circle",
    "square",
    "on",
    "the",
    "left",
    "right",
    "photo",
]


def _perturb(model, seed: int, scale: float = 0.05) -> None:
    """Adds noise to every parameter so zero-initialised layers cannot hide bugs."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def unet_kwargs(variant: str = "sd1") -> dict:
    common = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=8,
    )
    if variant == "sd1":
        return dict(common, attention_head_dim=8)
    if variant == "sd2":
        return dict(
            common, attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True
        )
    raise ValueError(variant)


def vae_kwargs() -> dict:
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    )


def scheduler_config(variant: str = "sd1") -> dict:
    return {
        "_class_name": "DDIMScheduler",
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "prediction_type": "v_prediction" if variant == "sd2" else "epsilon",
        "timestep_spacing": "leading",
    }


def make_tiny_sd(
    path: str, variant: str = "sd1", seed: int = 0, tokenizer_layout: str = "vocab"
) -> str:
    """Writes a tiny random diffusers StableDiffusionPipeline to ``path`` and returns it.

    ``sd1``: conv proj_in, int head dim, quick_gelu text encoder, eps prediction, EOS padding.
    ``sd2``: linear projection, per-block head dims, upcast attention, gelu text encoder,
    v-prediction, ``!`` padding.
    ``tokenizer_layout``: ``vocab`` (vocab.json + merges.txt, as the published SD repos) or
    ``json`` (tokenizer.json, as transformers 5 writes).
    """
    import shutil
    import tempfile

    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tok_dir = tempfile.mkdtemp()
    vocab_size = write_clip_tokenizer(tok_dir, WORDS, pad_token="!" if variant == "sd2" else EOS)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_kwargs(variant))
    vae = AutoencoderKL(**vae_kwargs())
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="gelu" if variant == "sd2" else "quick_gelu",
            projection_dim=32,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    for i, m in enumerate((unet, vae, text_encoder)):
        _perturb(m, seed + i)
    scheduler = DDIMScheduler.from_config(scheduler_config(variant))
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    if tokenizer_layout == "vocab":
        shutil.rmtree(os.path.join(path, "tokenizer"))
        shutil.copytree(tok_dir, os.path.join(path, "tokenizer"))
    elif tokenizer_layout == "json":
        for name in ("vocab.json", "merges.txt"):
            if os.path.exists(os.path.join(path, "tokenizer", name)):
                os.remove(os.path.join(path, "tokenizer", name))
    else:
        raise ValueError(tokenizer_layout)
    shutil.rmtree(tok_dir)
    with open(os.path.join(path, "_variant.json"), "w") as f:
        json.dump({"variant": variant, "seed": seed}, f)
    return path


SDXL_KINDS = ("base", "turbo", "lcm")


def sdxl_unet_kwargs(kind: str = "base") -> dict:
    """A tiny SDXL-layout UNet: attention-free first block, per-block transformer depth, linear
    projections, text_time added conditioning (pooled 32 + 6 time ids x 8 = 80)."""
    kwargs = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
        cross_attention_dim=64,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80,
        norm_num_groups=8,
    )
    if kind == "lcm":
        kwargs["time_cond_proj_dim"] = 16
    return kwargs


def sdxl_scheduler_config(kind: str = "base") -> dict:
    """The scheduler configs the published SDXL base / SDXL-Turbo / LCM-SDXL folders carry."""
    common = {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "steps_offset": 1,
        "prediction_type": "epsilon",
    }
    if kind == "base":
        return dict(common, _class_name="EulerDiscreteScheduler", timestep_spacing="leading",
                    interpolation_type="linear", use_karras_sigmas=False)  # fmt: skip
    if kind == "turbo":
        return dict(common, _class_name="EulerAncestralDiscreteScheduler",
                    timestep_spacing="trailing")  # fmt: skip
    if kind == "lcm":
        return dict(common, _class_name="LCMScheduler", timestep_spacing="leading",
                    original_inference_steps=50, timestep_scaling=10.0, clip_sample=False,
                    set_alpha_to_one=True)  # fmt: skip
    raise ValueError(kind)


def make_tiny_sdxl(path: str, kind: str = "base", seed: int = 0) -> str:
    """Writes a tiny random diffusers StableDiffusionXLPipeline to ``path`` and returns it.

    Two text encoders (CLIP, 32 wide, quick_gelu; CLIP with projection, 32 wide, gelu, as
    OpenCLIP bigG), ``tokenizer_2`` padding with ``!``, the SDXL VAE scaling factor and
    force_upcast. ``kind``: ``base`` (Euler), ``turbo`` (Euler ancestral, trailing) or ``lcm``
    (LCM scheduler and a UNet with a guidance embedding).
    """
    import shutil
    import tempfile

    import torch
    from diffusers import (
        AutoencoderKL,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        LCMScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    tok_dirs, toks = [], []
    for pad in (EOS, "!"):
        d = tempfile.mkdtemp()
        vocab_size = write_clip_tokenizer(d, WORDS, pad_token=pad)
        tok_dirs.append(d)
        toks.append(CLIPTokenizer.from_pretrained(d))
    torch.manual_seed(seed)

    def text_config(act: str, **kw) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act=act,
            projection_dim=32,
            bos_token_id=toks[0].bos_token_id,
            eos_token_id=toks[0].eos_token_id,
            pad_token_id=toks[0].pad_token_id,
            **kw,
        )

    unet = UNet2DConditionModel(**sdxl_unet_kwargs(kind))
    vae = AutoencoderKL(**vae_kwargs(), scaling_factor=0.13025, force_upcast=True)
    text_encoder = CLIPTextModel(text_config("quick_gelu"))
    text_encoder_2 = CLIPTextModelWithProjection(text_config("gelu"))
    for i, m in enumerate((unet, vae, text_encoder, text_encoder_2)):
        _perturb(m, seed + i)
    cls = {
        "base": EulerDiscreteScheduler,
        "turbo": EulerAncestralDiscreteScheduler,
        "lcm": LCMScheduler,
    }[kind]
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=toks[0],
        tokenizer_2=toks[1],
        unet=unet,
        scheduler=cls.from_config(sdxl_scheduler_config(kind)),
        force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    for name, d in zip(("tokenizer", "tokenizer_2"), tok_dirs, strict=True):
        shutil.rmtree(os.path.join(path, name))
        shutil.copytree(d, os.path.join(path, name))
        shutil.rmtree(d)
    with open(os.path.join(path, "_variant.json"), "w") as f:
        json.dump({"variant": f"sdxl_{kind}", "seed": seed}, f)
    return path
