"""Text-to-image throughput of spin_jax's ``generate`` against diffusers' StableDiffusionPipeline.

    python bench/bench_sample.py                       # tiny random model on the CPU
    python bench/bench_sample.py --size sd15           # SD 1.5 shapes, random weights, 512 px,
                                                       # bfloat16 + cuDNN attention on a GPU

Both sides run the same thing: tokenize the prompts, encode them, DPM-Solver++ (diffusers'
``DPMSolverMultistepScheduler`` from the same config) for ``--steps`` steps with classifier-free
guidance (the empty prompt as the unconditional input), same batch; then either stop at the
latents (``latent`` mode) or decode to host pixels (``pixels`` mode). Weights are random
(speed does not depend on them). One JSON line per measurement, then the ratio
spin_jax / diffusers per mode. MFU counts the UNet forwards (2 per step and image with CFG) plus
the VAE decode in pixels mode: 0.787 and 2.50 TFLOP per image for SD 1.5 at 512 px
(ALGORITHMS.md), XLA cost analysis otherwise. The PyTorch side needs torch + diffusers +
transformers and is skipped with a note when any is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from spin_jax.diffusion import generate, schedule_from_config  # noqa: E402
from spin_jax.diffusion.generate import default_mesh, place_params  # noqa: E402
from spin_jax.models import presets  # noqa: E402
from spin_jax.models.clip import text_encoder_from_config, text_encoder_param_shapes  # noqa: E402
from spin_jax.models.pipeline import StableDiffusion  # noqa: E402
from spin_jax.models.tiny import write_clip_tokenizer  # noqa: E402
from spin_jax.models.tokenizer import load_tokenizer  # noqa: E402
from spin_jax.models.unet import unet_from_config, unet_param_shapes  # noqa: E402
from spin_jax.models.vae import vae_from_config, vae_param_shapes  # noqa: E402

TINY = {
    "unet": {
        "sample_size": 16,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "cross_attention_dim": 32,
        "attention_head_dim": 8,
        "norm_num_groups": 8,
    },
    "vae": {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 2,
        "up_block_types": ["UpDecoderBlock2D"] * 2,
        "block_out_channels": [16, 32],
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 8,
        "sample_size": 32,
    },
    "text_encoder": {
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "projection_dim": 32,
    },
    "scheduler": presets.SD15_SCHEDULER,
    "resolution": 32,
}
SD15 = {
    "unet": presets.SD15_UNET,
    "vae": presets.SD15_VAE,
    "text_encoder": presets.SD15_TEXT_ENCODER,
    "scheduler": presets.SD15_SCHEDULER,
    "resolution": 512,
    "unet_tflop": 0.787,  # per image forward at 64x64 latents (ALGORITHMS.md)
    "decode_tflop": 2.50,
}
SIZES = {"tiny": TINY, "sd15": SD15}
WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "on", "the", "beach", "at", "night"]
PEAK_TFLOPS = {  # dense, by device name and dtype
    "H100": {"bfloat16": 989.0, "float16": 989.0},
    "H200": {"bfloat16": 989.0, "float16": 989.0},
    "A100": {"bfloat16": 312.0, "float16": 312.0},
}


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


def peak_tflops(device_kind: str, dtype: str) -> float | None:
    for name, peaks in PEAK_TFLOPS.items():
        if name in device_kind:
            return peaks.get(dtype)
    return None


def flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost.get("flops", float("nan")))


def random_params(shapes, seed: int):
    """Small normal weights (norm scales 1), drawn on the device."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    key = jax.random.key(seed)
    out = []
    for i, (path, s) in enumerate(leaves):
        name = getattr(path[-1], "key", "")
        if name == "scale":
            out.append(jnp.ones(s.shape, jnp.float32))
        else:
            out.append(0.02 * jax.random.normal(jax.random.fold_in(key, i), s.shape, jnp.float32))
    return jax.tree_util.tree_unflatten(treedef, out)


def build_jax(spec: dict, tok_dir: str, dtype: str, attention_impl: str | None):
    cdtype = jnp.dtype(dtype)
    unet = unet_from_config(spec["unet"], dtype=cdtype, attention_impl=attention_impl)
    vae = vae_from_config(spec["vae"], dtype=cdtype, attention_impl=attention_impl)
    text = text_encoder_from_config(
        spec["text_encoder"], dtype=cdtype, attention_impl=attention_impl
    )
    params = {
        "unet": random_params(unet_param_shapes(unet), 0),
        "vae": random_params(vae_param_shapes(vae), 1),
        "text_encoder": random_params(text_encoder_param_shapes(text), 2),
    }
    configs = {k: dict(spec[k]) for k in ("unet", "vae", "text_encoder", "scheduler")}
    configs["model_index"] = {}
    return StableDiffusion(
        unet=unet,
        vae=vae,
        text_encoder=text,
        tokenizer=load_tokenizer(tok_dir, max_length=77),
        schedule=schedule_from_config(spec["scheduler"]),
        params=params,
        configs=configs,
    )


def model_tflop(spec: dict, sd, size: int) -> tuple[float, float]:
    """(UNet forward, VAE decode) TFLOP per image."""
    if "unet_tflop" in spec and size == spec["resolution"]:
        return spec["unet_tflop"], spec["decode_tflop"]
    lat = size // sd.vae_scale_factor
    x = jnp.zeros((1, lat, lat, sd.latent_channels), jnp.float32)
    ctx = jnp.zeros((1, 77, sd.unet.context_dim), jnp.float32)
    unet = flops(sd.unet_apply, sd.params["unet"], x, jnp.zeros((1,), jnp.int32), ctx) / 1e12
    decode = flops(sd.vae_decode, sd.params["vae"], x) / 1e12
    return unet, decode


def time_calls(fn, reps: int) -> tuple[float, float]:
    """(first call seconds, best of ``reps`` later calls)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return first, min(times)


def bench_torch(spec, tok_dir, dtype, batch, size, steps, guidance, reps, prompts, modes):
    try:
        import torch
        from diffusers import (
            AutoencoderKL,
            DPMSolverMultistepScheduler,
            StableDiffusionPipeline,
            UNet2DConditionModel,
        )
        from diffusers.utils import logging as diffusers_logging
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    except ImportError as e:
        print(f"# diffusers side skipped: {e}", flush=True)
        return {}
    diffusers_logging.set_verbosity_error()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_config(spec["vae"]),
        text_encoder=CLIPTextModel(CLIPTextConfig(**spec["text_encoder"])),
        tokenizer=CLIPTokenizer.from_pretrained(tok_dir),
        unet=UNet2DConditionModel.from_config(spec["unet"]),
        scheduler=DPMSolverMultistepScheduler.from_config(spec["scheduler"]),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).to(device, tdtype)
    pipe.set_progress_bar_config(disable=True)
    out = {}
    for mode in modes:

        def call(mode=mode):
            with torch.inference_mode():
                pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, height=size,
                     width=size, output_type="latent" if mode == "latent" else "np",
                     generator=torch.Generator(device).manual_seed(0))  # fmt: skip
            if device == "cuda":
                torch.cuda.synchronize()

        first, best = time_calls(call, reps)
        out[mode] = batch / best
        emit(impl="diffusers", mode=mode, batch=batch, steps=steps, guidance=guidance,
             dtype=dtype, size=size, device=device, first_call_s=round(first, 3),
             seconds_per_batch=round(best, 4), images_per_s=round(batch / best, 3))  # fmt: skip
    return out


def main() -> None:
    on_gpu = jax.default_backend() == "gpu"
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="sd15" if on_gpu else "tiny")
    p.add_argument("--batch_sizes", default=None, help="comma list (default 16,64 sd15; 4 tiny)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    p.add_argument("--attention_impl", default=None, help="'' (XLA) or cudnn; default per backend")
    p.add_argument("--resolution", type=int, default=None, help="pixels (default per size)")
    p.add_argument("--modes", default="latent,pixels")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--no_torch", action="store_true", help="skip the diffusers side")
    args = p.parse_args()

    spec = SIZES[args.size]
    dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
    impl = args.attention_impl if args.attention_impl is not None else ("cudnn" if on_gpu else "")
    size = args.resolution or spec["resolution"]
    default_batches = "16,64" if args.size == "sd15" else "4"
    batches = [int(b) for b in (args.batch_sizes or default_batches).split(",")]
    modes = [m for m in args.modes.split(",") if m]
    device_kind = jax.devices()[0].device_kind
    peak = peak_tflops(device_kind, dtype)

    tok_dir = tempfile.mkdtemp()
    vocab = write_clip_tokenizer(tok_dir, WORDS)
    if args.size == "tiny":  # the tiny text encoder's vocabulary is the tiny tokenizer's
        spec = dict(spec, text_encoder=dict(spec["text_encoder"], vocab_size=vocab,
                    bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1))  # fmt: skip
    sd = build_jax(spec, tok_dir, dtype, impl or None)
    unet_tflop, decode_tflop = model_tflop(spec, sd, size)
    mesh = default_mesh()
    params = place_params(sd.params, mesh)
    passes = 2 if args.guidance > 1 else 1
    emit(what="setup", size=args.size, device=device_kind, devices=len(jax.local_devices()),
         dtype=dtype, attention_impl=impl or None, resolution=size, steps=args.steps,
         guidance=args.guidance, unet_tflop_per_image=round(unet_tflop, 5),
         decode_tflop_per_image=round(decode_tflop, 5), peak_tflops=peak)  # fmt: skip

    rng = np.random.default_rng(0)
    for batch in batches:
        prompts = [" ".join(rng.choice(WORDS, 6)) for _ in range(batch)]
        ours = {}
        for mode in modes:
            decode = mode == "pixels"

            def call(decode=decode, prompts=prompts):
                out = generate(sd, params, sd.tokenize(prompts), jax.random.key(0),
                               num_steps=args.steps, guidance_scale=args.guidance, height=size,
                               width=size, decode=decode, mesh=mesh)  # fmt: skip
                # diffusers hands back host pixels (output_type="np") or device latents.
                np.asarray(out) if decode else jax.block_until_ready(out)

            first, best = time_calls(call, args.reps)
            ips = batch / best
            tflop = args.steps * passes * unet_tflop + (decode_tflop if decode else 0.0)
            ours[mode] = ips
            emit(impl="spin_jax", mode=mode, batch=batch, steps=args.steps,
                 guidance=args.guidance, dtype=dtype, size=size, device=device_kind,
                 first_call_s=round(first, 3), seconds_per_batch=round(best, 4),
                 images_per_s=round(ips, 3), tflop_per_image=round(tflop, 4),
                 mfu=round(tflop * ips / peak, 4) if peak else None)  # fmt: skip
        if args.no_torch:
            print("# diffusers side skipped: --no_torch", flush=True)
            continue
        theirs = bench_torch(spec, tok_dir, dtype, batch, size, args.steps, args.guidance,
                             args.reps, prompts, modes)  # fmt: skip
        for mode in modes:
            if mode in theirs:
                emit(what="ratio", mode=mode, batch=batch,
                     spin_jax_over_diffusers=round(ours[mode] / theirs[mode], 3))  # fmt: skip


if __name__ == "__main__":
    main()
