"""Text-to-image throughput of spin_jax's ``generate`` against diffusers' StableDiffusionPipeline.

    python bench/bench_sample.py                       # tiny random model on the CPU
    python bench/bench_sample.py --size sd15           # SD 1.5 shapes, random weights, 512 px,
                                                       # bfloat16 + cuDNN attention on a GPU
    python bench/bench_sample.py --size sdxl_small     # SDXL layout, small, 256 px (CPU)
    python bench/bench_sample.py --size sdxl           # SDXL base / LCM-SDXL shapes, 1024 px (GPU)

Both sides run the same thing: tokenize the prompts, encode them, DPM-Solver++ (diffusers'
``DPMSolverMultistepScheduler`` from the same config) for ``--steps`` steps with classifier-free
guidance (the empty prompt as the unconditional input), same batch; then either stop at the
latents (``latent`` mode) or decode to host pixels (``pixels`` mode). Weights are random
(speed does not depend on them). One JSON line per measurement, then the ratio
spin_jax / diffusers per mode. MFU counts the UNet forwards (2 per step and image with CFG) plus
the VAE decode in pixels mode: 0.787 and 2.50 TFLOP per image for SD 1.5 at 512 px
(ALGORITHMS.md), XLA cost analysis otherwise. The PyTorch side needs torch + diffusers +
transformers and is skipped with a note when any is missing.

SDXL sizes (``sdxl``, ``sdxl_small``, ``sdxl_tiny``) run two settings: ``lcm`` (the LCM-SDXL
UNet with its guidance embedding, LCM scheduler, 4 steps, guidance 8, no CFG batch) and
``euler`` (the SDXL base UNet, Euler, 30 steps, CFG 5 against zeroed negatives). Each pipeline
is built with random weights in diffusers from the presets, written with ``save_pretrained`` to
a temporary folder and read back by spin_jax's ``load_pretrained``, so both sides hold the same
weights; both start from the same latents. The first call of each side is compared (``what:
parity``, max abs difference of the latents or of the [0, 1] pixels; LCM's step noise is fed
to diffusers from spin_jax's draws) before the timed calls. ``compile_s`` is the first call
minus the best later call (tracing and compilation for spin_jax, warm-up for PyTorch; 0 where
noise makes it negative). Full size ``sdxl`` runs only on a GPU (``--force`` to run it elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

# Leave GPU memory to the PyTorch side run in the same process (JAX takes 75% by default).
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from spin_jax.diffusion import generate, schedule_from_config  # noqa: E402
from spin_jax.diffusion.generate import default_mesh, place_params  # noqa: E402
from spin_jax.models import load_pretrained, presets  # noqa: E402
from spin_jax.models.clip import text_encoder_from_config, text_encoder_param_shapes  # noqa: E402
from spin_jax.models.pipeline import StableDiffusion  # noqa: E402
from spin_jax.models.tiny import EOS, write_clip_tokenizer  # noqa: E402
from spin_jax.models.tokenizer import load_tokenizer  # noqa: E402
from spin_jax.models.unet import (  # noqa: E402
    unet_dummy_inputs,
    unet_from_config,
    unet_param_shapes,
)
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
# The CPU comparison point: TINY with 2 layers per block.
SMALL = dict(TINY, unet=dict(TINY["unet"], layers_per_block=2))
SIZES = {"tiny": TINY, "small": SMALL, "sd15": SD15}


def _small_sdxl(channels, heads, depths, layers, time_dim, text_width, vae_channels, resolution):
    """An SDXL-layout spec (attention-free first block, text_time conditioning, two encoders)."""
    unet = dict(
        presets.SDXL_UNET,
        block_out_channels=list(channels),
        attention_head_dim=list(heads),
        transformer_layers_per_block=list(depths),
        layers_per_block=layers,
        down_block_types=["DownBlock2D"] + ["CrossAttnDownBlock2D"] * (len(channels) - 1),
        up_block_types=["CrossAttnUpBlock2D"] * (len(channels) - 1) + ["UpBlock2D"],
        cross_attention_dim=2 * text_width,
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=text_width + 6 * time_dim,
        norm_num_groups=min(32, channels[0] // 2),
        sample_size=resolution // 2 ** (len(vae_channels) - 1),
    )
    text = {"hidden_size": text_width, "intermediate_size": 2 * text_width,
            "num_hidden_layers": 2, "num_attention_heads": 4, "projection_dim": text_width}  # fmt: skip
    return {
        "unet": unet,
        "lcm_unet": dict(unet, time_cond_proj_dim=text_width),
        "vae": dict(
            presets.SDXL_VAE,
            block_out_channels=list(vae_channels),
            down_block_types=["DownEncoderBlock2D"] * len(vae_channels),
            up_block_types=["UpDecoderBlock2D"] * len(vae_channels),
            layers_per_block=1,
            norm_num_groups=vae_channels[0] // 2,
            sample_size=resolution,
        ),
        "text_encoder": dict(presets.SDXL_TEXT_ENCODER, **text),
        "text_encoder_2": dict(presets.SDXL_TEXT_ENCODER_2, **text),
        "resolution": resolution,
    }


# LCM-SDXL's published scheduler config (latent-consistency/lcm-sdxl).
LCM_SDXL_SCHEDULER = {
    "_class_name": "LCMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "original_inference_steps": 50,
    "prediction_type": "epsilon",
    "set_alpha_to_one": True,
    "steps_offset": 1,
    "timestep_scaling": 10.0,
    "timestep_spacing": "leading",
    "trained_betas": None,
}
SDXL_SIZES = {
    "sdxl": {
        "unet": presets.SDXL_UNET,
        "lcm_unet": presets.LCM_SDXL_UNET,
        "vae": presets.SDXL_VAE,
        "text_encoder": presets.SDXL_TEXT_ENCODER,
        "text_encoder_2": presets.SDXL_TEXT_ENCODER_2,
        "resolution": 1024,
    },
    "sdxl_small": _small_sdxl((64, 128), (1, 2), (1, 2), 2, 32, 64, (32, 64, 64, 64), 256),
    "sdxl_tiny": _small_sdxl((32, 64), (1, 2), (1, 1), 1, 8, 32, (16, 32), 32),
}
# setting -> (UNet key, scheduler config, steps, guidance scale)
SDXL_RUNS = {
    "lcm": ("lcm_unet", LCM_SDXL_SCHEDULER, 4, 8.0),
    "euler": ("unet", presets.SDXL_SCHEDULER, 30, 5.0),
}
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
    """FLOPs of ``fn(*args)`` from the lowered (not compiled) function's cost analysis."""
    cost = jax.jit(fn).lower(*args).cost_analysis()
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


# SDXL ------------------------------------------------------------------------------------------


def timed(fn, reps: int) -> tuple[float, float, object]:
    """(first call seconds, best of ``reps`` later calls, the first call's result)."""
    start = time.perf_counter()
    result = fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return first, min(times), result


def sdxl_tokenizers(root: str) -> tuple[list[str], int]:
    """SDXL's two CLIP tokenizers (the second pads with ``!``), written locally."""
    dirs = []
    for i, pad in enumerate((EOS, "!")):
        d = os.path.join(root, f"tokenizer_{i}")
        vocab = write_clip_tokenizer(d, WORDS, pad_token=pad)
        dirs.append(d)
    return dirs, vocab


def build_sdxl_pipeline(spec: dict, setting: str, tok_dirs: list[str], vocab: int, device: str,
                        tdtype, seed: int = 0):  # fmt: skip
    """diffusers' StableDiffusionXLPipeline with random weights, made on ``device`` in ``tdtype``."""
    import torch
    from diffusers import (
        AutoencoderKL,
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

    unet_key, scheduler_config, _, _ = SDXL_RUNS[setting]
    toks = [CLIPTokenizer.from_pretrained(d) for d in tok_dirs]
    # The presets' vocabulary (49408 rows) is kept; the local tokenizer uses its first ids.
    ids = dict(bos_token_id=toks[0].bos_token_id, eos_token_id=toks[0].eos_token_id,
               pad_token_id=toks[0].pad_token_id)  # fmt: skip

    def text_config(name: str) -> CLIPTextConfig:
        c = {k: v for k, v in spec[name].items() if not k.startswith("_") and k != "architectures"}
        c.update(ids, vocab_size=max(vocab, c.get("vocab_size", 0)))
        return CLIPTextConfig(**c)

    def clean(config: dict) -> dict:
        return {k: v for k, v in config.items() if not k.startswith("_")}

    torch.manual_seed(seed)
    with torch.device(device):  # random init where the weights will run (fast on a GPU)
        unet = UNet2DConditionModel(**clean(spec[unet_key]))
        vae = AutoencoderKL(**clean(spec["vae"]))
        text_encoder = CLIPTextModel(text_config("text_encoder"))
        text_encoder_2 = CLIPTextModelWithProjection(text_config("text_encoder_2"))
    cls = LCMScheduler if setting == "lcm" else EulerDiscreteScheduler
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=toks[0],
        tokenizer_2=toks[1],
        unet=unet,
        scheduler=cls.from_config(scheduler_config),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    ).to(device, tdtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def write_sdxl_folder(pipe, folder: str, tok_dirs: list[str]) -> None:
    """``save_pretrained`` (weights in the pipeline's dtype), tokenizers as written locally."""
    import shutil

    pipe.save_pretrained(folder, safe_serialization=True)
    for name, d in zip(("tokenizer", "tokenizer_2"), tok_dirs, strict=True):
        shutil.rmtree(os.path.join(folder, name))
        shutil.copytree(d, os.path.join(folder, name))


def sdxl_tflop(sd, size: int) -> tuple[float, float]:
    """(UNet forward, VAE decode) TFLOP per image from the lowered functions' cost analysis,
    with XLA attention (a cuDNN custom call carries no FLOP count) and abstract parameters."""
    unet = unet_from_config(sd.configs["unet"])
    lat = size // sd.vae_scale_factor
    args = unet_dummy_inputs(unet, batch=1, size=lat, context_len=77)

    def cost(fn, *a) -> float:
        c = jax.jit(fn).lower(*a).cost_analysis()
        c = c[0] if isinstance(c, list | tuple) else c
        return float(c.get("flops", float("nan"))) / 1e12

    unet_t = cost(lambda p, *a: unet.apply({"params": p}, *a), unet_param_shapes(unet), *args)
    vae = vae_from_config(sd.configs["vae"])
    z = jax.ShapeDtypeStruct((1, lat, lat, sd.latent_channels), jnp.float32)
    decode = cost(lambda p, z: vae.apply({"params": p}, z, method=vae.decode),
                  vae_param_shapes(vae), z)  # fmt: skip
    return unet_t, decode


def lcm_noises(batch: int, steps: int, latent_shape: tuple) -> np.ndarray:
    """The step noise ``generate`` draws with given latents (row j: fold_in(fold_in(key, j), 1)),
    [steps, B, h, w, c], to feed diffusers' LCM scheduler the same draws."""
    key = jax.random.key(0)
    rows = [np.asarray(jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, j), 1),
                                         (steps, *latent_shape))) for j in range(batch)]  # fmt: skip
    return np.stack(rows, axis=1)


def diffusers_call(pipe, prompts, latents_nchw, steps, guidance, size, mode, noises=None):
    """One pipeline call; latent mode -> NHWC latents, pixel mode -> NHWC [0, 1] pixels."""
    import torch
    from diffusers.schedulers import scheduling_lcm

    queue = list(noises) if noises is not None else None
    saved = scheduling_lcm.randn_tensor

    def given_noise(shape, generator=None, device=None, dtype=None, layout=None):
        x = np.ascontiguousarray(queue.pop(0).transpose(0, 3, 1, 2))
        return torch.from_numpy(x).to(device=device, dtype=dtype or torch.float32)

    if queue is not None:
        scheduling_lcm.randn_tensor = given_noise
    try:
        with torch.inference_mode():
            out = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, height=size,
                       width=size, latents=latents_nchw,
                       output_type="latent" if mode == "latent" else "np").images  # fmt: skip
        if mode == "latent":
            out = out.float().permute(0, 2, 3, 1).cpu().numpy()
        elif latents_nchw.is_cuda:
            torch.cuda.synchronize()
    finally:
        scheduling_lcm.randn_tensor = saved
    return np.asarray(out)


def bench_sdxl(args, on_gpu: bool) -> None:
    import shutil

    spec = SDXL_SIZES[args.size]
    if args.size == "sdxl" and not on_gpu and not args.force:
        print(f"# --size sdxl: full-size SDXL (2.6B-parameter UNet, 1024 px) is skipped off a GPU "
              f"(backend: {jax.default_backend()}); run --size sdxl_small here, or --force",
              flush=True)  # fmt: skip
        return
    for s in args.samplers.split(","):
        if s not in SDXL_RUNS:
            raise SystemExit(f"--samplers: unknown setting {s!r} (one of {sorted(SDXL_RUNS)})")
    try:
        import torch
    except ImportError as e:
        raise SystemExit(f"--size {args.size} builds its pipelines with diffusers: {e}") from e
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
    torch_dtype = args.torch_dtype or dtype
    tdevice = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = dict(
        spec=spec,
        dtype=dtype,
        torch_dtype=torch_dtype,
        tdevice=tdevice,
        impl=args.attention_impl
        if args.attention_impl is not None
        else ("cudnn" if on_gpu else ""),
        size=args.resolution or spec["resolution"],
        batches=[int(b) for b in (args.batch_sizes or "1,4").split(",")],
        modes=[m for m in args.modes.split(",") if m],
        peak=peak_tflops(jax.devices()[0].device_kind, dtype),
        mesh=default_mesh(),
    )
    root = tempfile.mkdtemp(prefix="bench_sdxl_")
    try:
        tok_dirs, vocab = sdxl_tokenizers(root)
        emit(what="setup", size=args.size, device=jax.devices()[0].device_kind,
             devices=len(jax.local_devices()), dtype=dtype, torch_dtype=torch_dtype,
             torch_device=tdevice, attention_impl=cfg["impl"] or None, resolution=cfg["size"],
             settings=args.samplers, batches=cfg["batches"], peak_tflops=cfg["peak"])  # fmt: skip
        for setting in args.samplers.split(","):
            bench_sdxl_setting(args, cfg, setting, os.path.join(root, setting), tok_dirs, vocab)
            if tdevice == "cuda":
                torch.cuda.empty_cache()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def bench_sdxl_setting(args, cfg: dict, setting: str, folder: str, tok_dirs, vocab: int) -> None:
    """One SDXL setting: build + save + load, then per batch and mode: parity, then timings."""
    import torch

    _, _, steps, guidance = SDXL_RUNS[setting]
    steps = args.steps or steps
    guidance = args.guidance if args.guidance is not None else guidance
    size, dtype, tdevice, peak = cfg["size"], cfg["dtype"], cfg["tdevice"], cfg["peak"]
    tdtype = getattr(torch, cfg["torch_dtype"])
    t0 = time.perf_counter()
    pipe = build_sdxl_pipeline(cfg["spec"], setting, tok_dirs, vocab, tdevice, tdtype)
    t1 = time.perf_counter()
    write_sdxl_folder(pipe, folder, tok_dirs)
    t2 = time.perf_counter()
    sd = load_pretrained(folder, dtype=jnp.dtype(dtype), attention_impl=cfg["impl"] or None)
    params = jax.block_until_ready(place_params(sd.params, cfg["mesh"]))
    t3 = time.perf_counter()
    unet_tflop, decode_tflop = sdxl_tflop(sd, size)
    emit(what="build", size=args.size, setting=setting, diffusers_init_s=round(t1 - t0, 2),
         save_pretrained_s=round(t2 - t1, 2), load_pretrained_s=round(t3 - t2, 2),
         unet_tflop_per_image=round(unet_tflop, 5),
         decode_tflop_per_image=round(decode_tflop, 5))  # fmt: skip
    passes = 2 if (guidance > 1 and not sd.guidance_embedding_dim) else 1
    lat = size // sd.vae_scale_factor
    shape = (lat, lat, sd.latent_channels)
    rng = np.random.default_rng(0)
    for batch in cfg["batches"]:
        prompts = [" ".join(rng.choice(WORDS, 6)) for _ in range(batch)]
        latents = rng.standard_normal((batch, *shape), dtype=np.float32)
        lat_t = torch.from_numpy(np.ascontiguousarray(latents.transpose(0, 3, 1, 2)))
        lat_t = lat_t.to(tdevice, tdtype)
        noises = lcm_noises(batch, steps, shape) if setting == "lcm" else None
        for mode in cfg["modes"]:
            decode = mode == "pixels"

            def ours(decode=decode, prompts=prompts, latents=latents):
                out = generate(sd, params, sd.tokenize(prompts), jax.random.key(0),
                               num_steps=steps, guidance_scale=guidance, height=size, width=size,
                               decode=decode, latents=latents, mesh=cfg["mesh"])  # fmt: skip
                return np.asarray(out) if decode else jax.block_until_ready(out)

            first, best, mine = timed(ours, args.reps)
            tflop = steps * passes * unet_tflop + (decode_tflop if decode else 0.0)
            common = dict(size=args.size, sampler=setting, mode=mode, batch=batch, steps=steps,
                          guidance=guidance, resolution=size)  # fmt: skip
            emit(impl="spin_jax", **common, dtype=dtype, device=jax.devices()[0].device_kind,
                 first_call_s=round(first, 3), compile_s=round(max(first - best, 0.0), 3),
                 seconds_per_batch=round(best, 4), images_per_s=round(batch / best, 3),
                 tflop_per_image=round(tflop, 4),
                 mfu=round(tflop * batch / best / peak, 4) if peak else None)  # fmt: skip
            if args.no_torch:
                continue
            mine = np.asarray(mine, np.float32)
            if decode:
                mine = np.clip((mine + 1) / 2, 0, 1)  # as diffusers' "np" pixels

            def theirs(mode=mode, prompts=prompts, lat_t=lat_t, noises=None):
                return diffusers_call(pipe, prompts, lat_t, steps, guidance, size, mode, noises)

            start = time.perf_counter()
            ref = theirs(noises=noises)  # first call: the same step noise as ours
            t_first = time.perf_counter() - start
            emit(what="parity", **common, dtype=dtype, torch_dtype=cfg["torch_dtype"],
                 max_abs_diff=float(np.max(np.abs(mine - np.asarray(ref, np.float32)))),
                 max_abs_value=float(np.max(np.abs(mine))))  # fmt: skip
            times = []
            for _ in range(args.reps):
                start = time.perf_counter()
                theirs()
                times.append(time.perf_counter() - start)
            t_best = min(times)
            emit(impl="diffusers", **common, dtype=cfg["torch_dtype"], device=tdevice,
                 first_call_s=round(t_first, 3), compile_s=round(max(t_first - t_best, 0.0), 3),
                 seconds_per_batch=round(t_best, 4), images_per_s=round(batch / t_best, 3),
                 tflop_per_image=round(tflop, 4),
                 mfu=round(tflop * batch / t_best / peak, 4) if peak else None)  # fmt: skip
            emit(what="ratio", size=args.size, sampler=setting, mode=mode, batch=batch,
                 spin_jax_over_diffusers=round(t_best / best, 3))  # fmt: skip


def main() -> None:
    on_gpu = jax.default_backend() == "gpu"
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES) + sorted(SDXL_SIZES),
                   default="sd15" if on_gpu else "tiny")  # fmt: skip
    p.add_argument("--batch_sizes", default=None,
                   help="comma list (default 16,64 sd15; 4 tiny; 1,4 SDXL sizes)")  # fmt: skip
    p.add_argument("--steps", type=int, default=None,
                   help="default 20 (SD); SDXL: per setting (lcm 4, euler 30)")  # fmt: skip
    p.add_argument("--guidance", type=float, default=None,
                   help="default 7.5 (SD); SDXL: per setting (lcm 8, euler 5)")  # fmt: skip
    p.add_argument("--samplers", default="lcm,euler", help="SDXL sizes: settings to run")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    p.add_argument("--torch_dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="SDXL sizes: the diffusers side's dtype (default: --dtype)")  # fmt: skip
    p.add_argument("--force", action="store_true", help="run --size sdxl off a GPU too")
    p.add_argument("--attention_impl", default=None, help="'' (XLA) or cudnn; default per backend")
    p.add_argument("--resolution", type=int, default=None, help="pixels (default per size)")
    p.add_argument("--modes", default="latent,pixels")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--no_torch", action="store_true", help="skip the diffusers side")
    args = p.parse_args()
    if args.size in SDXL_SIZES:
        bench_sdxl(args, on_gpu)
        return
    args.steps = 20 if args.steps is None else args.steps
    args.guidance = 7.5 if args.guidance is None else args.guidance

    spec = SIZES[args.size]
    dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
    impl = args.attention_impl if args.attention_impl is not None else ("cudnn" if on_gpu else "")
    size = args.resolution or spec["resolution"]
    default_batches = {"sd15": "16,64", "small": "8"}.get(args.size, "4")
    batches = [int(b) for b in (args.batch_sizes or default_batches).split(",")]
    modes = [m for m in args.modes.split(",") if m]
    device_kind = jax.devices()[0].device_kind
    peak = peak_tflops(device_kind, dtype)

    tok_dir = tempfile.mkdtemp()
    vocab = write_clip_tokenizer(tok_dir, WORDS)
    if args.size in ("tiny", "small"):  # the tiny text encoder's vocabulary is the tiny tokenizer's
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
