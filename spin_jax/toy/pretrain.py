r"""The tiny base model of the shapes toy world, built from scratch with the project's own code.

  python -m spin_jax.toy.pretrain --out assets/toy_base

writes a diffusers-format Stable Diffusion directory (UNet2DConditionModel, AutoencoderKL,
CLIPTextModel, CLIPTokenizer, DDIM scheduler config) for 32 px images. No torch: every network
is the project's Flax module with random JAX init, trained here. The stages:

1. Tokenizer: a CLIP BPE folder whose vocabulary holds every caption word as one token
   (``models.tiny.write_clip_tokenizer`` with ``shapes.vocabulary()``).
2. VAE (AutoencoderKL, two blocks: 32 px images <-> 16 x 16 x 4 latents) trained with Adam on
   reconstruction MSE plus a small KL term, on the noisy images plus a fifth of clean renders
   **(choice)**: like SD's autoencoder, trained on broad data rather than on the diffusion
   model's training set; without the clean renders it tints their plain backgrounds and the
   judge reads only ~90% of its reconstructions right (98% with them). The UNet never sees a
   clean image. ``scaling_factor`` is ``1 / std`` of posterior samples of the noisy images,
   measured as SD's authors did.
3. Text encoder: a two-layer CLIP text transformer, random and frozen **(choice)**: the trainer
   never trains it (as in SD fine-tuning), and a random transformer already maps every word and
   position to a distinct vector that the UNet's cross-attention learns to read.
4. UNet (UNet2DConditionModel, four levels 16 / 8 / 4 / 2, cross-attention below the top
   level and in the middle block) pretrained with the project's own trainer
   (``spin_jax.train.loop``, objective ``sft``) on the NOISY distribution (textured
   backgrounds, jitter, 20% wrong captions), with 10% caption dropout so that classifier-free
   guidance works.
5. Export: the trained UNet with the other parts via ``save_pretrained``.

UNet layout **(choices)**: no attention at 16 x 16 (SD 1.5 has it at every level but the lowest):
self-attention over 256 positions is most of the cost on a CPU. Four levels down to 2 x 2: a
convolution learns where it is from the zero padding, and at 2 x 2 every cell is a different
corner, so "on the left" becomes easy to place. With two or three levels the same training
learned colors and shapes but placed objects at random (position accuracy at chance, 3000
steps), with four it reaches about 80% by step 2000.

Measured on the 2-core CPU machine (shared): 25 min (dataset 3 s, VAE 4 min, UNet 4000 steps
21 min). The result (``assets/toy_base``, 9 MB): judge fidelity of its samples on the 60
one-object captions (2 per caption, DPM-Solver++ 15 steps) 0.26 / 0.52 / 0.65 / 0.79 at CFG
1 / 1.5 / 2 / 3 (color 0.89, shape 0.82, position 0.93 at CFG 2), with the noisy data's
textured backgrounds; the VAE's reconstructions of the clean renders are all judged right.

Intermediate results live in ``--work`` (default ``<out>.work``) and a rerun resumes there (the
trainer resumes mid-run); delete it once the base is built.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from spin_jax.data.latent_cache import sample_latents
from spin_jax.diffusion.schedule import schedule_from_config
from spin_jax.models import presets
from spin_jax.models.clip import text_encoder_from_config, text_encoder_param_shapes
from spin_jax.models.pipeline import StableDiffusion, save_pretrained
from spin_jax.models.tiny import EOS, write_clip_tokenizer
from spin_jax.models.tokenizer import load_tokenizer
from spin_jax.models.unet import unet_from_config, unet_param_shapes
from spin_jax.models.vae import vae_from_config, vae_param_shapes
from spin_jax.toy import shapes

RESOLUTION = 32
MAX_LENGTH = 77
# The settings of the shipped base (assets/toy_base); build_base's defaults.
DEFAULTS = {
    "seed": 0,
    "num_noisy": 4096,
    "num_vae_clean": 1024,
    "vae_steps": 1000,
    "vae_batch_size": 32,
    "vae_learning_rate": 2e-3,
    "kl_weight": 1e-6,
    "unet_steps": 4000,
    "unet_batch_size": 32,
    "unet_learning_rate": 1e-3,
    "unet_channels": (32, 48, 64, 64),
    "unet_layers_per_block": 1,
    "vae_channels": (16, 32),
    "text_hidden_size": 32,
    "text_layers": 2,
}


# ----------------------------------------------------------------------------------------------
# Configurations (diffusers / transformers config.json dicts).


def unet_config(channels: tuple[int, ...] = (32, 48, 64, 64), layers_per_block: int = 1,
                cross_attention_dim: int = 32) -> dict[str, Any]:  # fmt: skip
    """UNet2DConditionModel config for 16 x 16 x 4 latents; attention below the top level."""
    n = len(channels)
    return {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": "0.42.1",
        "act_fn": "silu",
        "attention_head_dim": [max(1, c // 16) for c in channels],  # heads of 16 channels
        "block_out_channels": list(channels),
        "center_input_sample": False,
        "cross_attention_dim": cross_attention_dim,
        "down_block_types": ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * (n - 1),
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": layers_per_block,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-5,
        "norm_num_groups": 8,
        "out_channels": 4,
        "sample_size": RESOLUTION // 2,
        "up_block_types": ["CrossAttnUpBlock2D"] * (n - 1) + ["UpBlock2D"],
    }


def vae_config(channels: tuple[int, ...] = (16, 32), scaling_factor: float = 1.0) -> dict:
    """AutoencoderKL config; ``len(channels) - 1`` halvings (two blocks: 32 px -> 16 x 16)."""
    n = len(channels)
    return {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": "0.42.1",
        "act_fn": "silu",
        "block_out_channels": list(channels),
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "in_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "out_channels": 3,
        "sample_size": RESOLUTION,
        "scaling_factor": float(scaling_factor),
        "up_block_types": ["UpDecoderBlock2D"] * n,
    }


def text_encoder_config(vocab_size: int, bos_id: int, eos_id: int, pad_id: int,
                        hidden_size: int = 32, layers: int = 2) -> dict[str, Any]:  # fmt: skip
    """transformers CLIPTextConfig dict of a tiny SD 1.x-style text tower (quick_gelu)."""
    return {
        "architectures": ["CLIPTextModel"],
        "attention_dropout": 0.0,
        "bos_token_id": bos_id,
        "dropout": 0.0,
        "eos_token_id": eos_id,
        "hidden_act": "quick_gelu",
        "hidden_size": hidden_size,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": 2 * hidden_size,
        "layer_norm_eps": 1e-5,
        "max_position_embeddings": MAX_LENGTH,
        "model_type": "clip_text_model",
        "num_attention_heads": max(1, hidden_size // 16),
        "num_hidden_layers": layers,
        "pad_token_id": pad_id,
        "projection_dim": hidden_size,
        "torch_dtype": "float32",
        "vocab_size": vocab_size,
    }


def scheduler_config() -> dict[str, Any]:
    """SD 1.x's noise schedule (scaled_linear 0.00085..0.012, eps prediction) as a DDIM config."""
    config = {k: v for k, v in presets.SD15_SCHEDULER.items() if k != "skip_prk_steps"}
    return {**config, "_class_name": "DDIMScheduler", "_diffusers_version": "0.42.1",
            "timestep_spacing": "leading"}  # fmt: skip


def model_index() -> dict[str, Any]:
    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
    }


# ----------------------------------------------------------------------------------------------
# A random pipeline.


def toy_tokenizer() -> Any:
    """CLIP tokenizer with one token per caption word.

    Words go in longest first, the order that numbered the tokens of the shipped base
    (``assets/toy_base/tokenizer``), so a rebuilt base reads the same token ids.
    """
    words = sorted(shapes.vocabulary(), key=lambda w: (-len(w), w))
    with tempfile.TemporaryDirectory() as tmp:
        write_clip_tokenizer(tmp, words, pad_token=EOS, max_length=MAX_LENGTH)
        tokenizer = load_tokenizer(tmp, max_length=MAX_LENGTH)
    split = [w for w in words if tokenizer(w)[0][2] != tokenizer.eos_id]  # BOS, word, EOS
    if split:
        raise ValueError(f"toy tokenizer: words {split} are not single tokens")
    return tokenizer


def init_params(shapes_tree: Any, rng: np.random.Generator) -> Any:
    """Random params with Flax's default initializers, drawn with numpy.

    Dense / Conv ``kernel``: LeCun normal (truncated at 2 std, fan_in = all axes but the last);
    ``bias`` zeros; norm ``scale`` ones; ``embedding`` normal with std 1/sqrt(features) -- what
    the modules' own ``init`` draws, without compiling a random-number kernel per parameter
    (about a minute on a CPU for the UNet alone).
    """

    def draw(path: tuple, leaf: Any) -> jax.Array:
        name, shape = path[-1].key, tuple(leaf.shape)
        if name == "bias":
            return jnp.zeros(shape, jnp.float32)
        if name == "scale":
            return jnp.ones(shape, jnp.float32)
        if name == "embedding":
            return jnp.asarray(rng.normal(0.0, shape[-1] ** -0.5, shape), jnp.float32)
        if name == "kernel":
            x = rng.standard_normal(shape)
            bad = np.abs(x) > 2.0
            while bad.any():  # truncated normal by rejection, as jax.random.truncated_normal
                x[bad] = rng.standard_normal(int(bad.sum()))
                bad = np.abs(x) > 2.0
            std = (1.0 / np.prod(shape[:-1])) ** 0.5 / 0.87962566103423978
            return jnp.asarray(x * std, jnp.float32)
        raise ValueError(f"init_params: no initializer for parameter {jax.tree_util.keystr(path)}")

    return jax.tree_util.tree_map_with_path(draw, shapes_tree)


def init_pipeline(
    seed: int,
    *,
    unet_channels: tuple[int, ...] = DEFAULTS["unet_channels"],
    unet_layers_per_block: int = DEFAULTS["unet_layers_per_block"],
    vae_channels: tuple[int, ...] = DEFAULTS["vae_channels"],
    text_hidden_size: int = DEFAULTS["text_hidden_size"],
    text_layers: int = DEFAULTS["text_layers"],
) -> StableDiffusion:
    """A randomly initialised toy Stable Diffusion (float32) with the toy vocabulary;
    ``seed`` seeds the numpy generator of ``init_params``."""
    tokenizer = toy_tokenizer()
    configs = {
        "model_index": model_index(),
        "unet": unet_config(unet_channels, unet_layers_per_block, text_hidden_size),
        "vae": vae_config(vae_channels),
        "text_encoder": text_encoder_config(
            tokenizer.vocab_size,
            tokenizer.bos_id,
            tokenizer.eos_id,
            tokenizer.pad_id,
            text_hidden_size,
            text_layers,
        ),  # fmt: skip
        "scheduler": scheduler_config(),
    }
    unet = unet_from_config(configs["unet"])
    vae = vae_from_config(configs["vae"])
    text_encoder = text_encoder_from_config(configs["text_encoder"])
    # One generator per network, so that a change to one network leaves the others' init.
    params = {
        "unet": init_params(unet_param_shapes(unet), np.random.default_rng([seed, 0])),
        "vae": init_params(vae_param_shapes(vae), np.random.default_rng([seed, 1])),
        "text_encoder": init_params(
            text_encoder_param_shapes(text_encoder), np.random.default_rng([seed, 2])
        ),
    }
    schedule = schedule_from_config(configs["scheduler"])
    return StableDiffusion(unet, vae, text_encoder, tokenizer, schedule, params, configs)


# ----------------------------------------------------------------------------------------------
# VAE.


def to_model_range(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC -> float32 in [-1, 1]."""
    return np.asarray(images, np.float32) / 127.5 - 1.0


def vae_loss(vae: Any, params: Any, images: jax.Array, key: jax.Array, kl_weight: float):
    """Mean squared reconstruction error of a posterior sample + kl_weight * mean KL per latent."""
    mean, logvar = vae.apply({"params": params}, images, method=vae.encode)
    z = sample_latents(mean, logvar, key, 1.0)
    recon = vae.apply({"params": params}, z, method=vae.decode)
    mse = jnp.mean((recon - images) ** 2)
    kl = 0.5 * jnp.mean(mean**2 + jnp.exp(logvar) - 1.0 - logvar)
    return mse + kl_weight * kl, {"mse": mse, "kl": kl}


def train_vae(
    sd: StableDiffusion,
    images: np.ndarray,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float = 1e-3,
    kl_weight: float = 1e-4,
    seed: int = 0,
    log_every: int = 100,
) -> tuple[Any, list[dict[str, float]]]:
    """Trains ``sd``'s VAE on uint8 images [N, H, W, 3] (Adam, cosine decay); returns
    (vae params, history of {"step", "loss", "mse", "kl"})."""
    if len(images) < batch_size:
        raise ValueError(f"train_vae: {len(images)} images < batch_size {batch_size}")
    vae = sd.vae
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adam(optax.warmup_cosine_decay_schedule(0.0, learning_rate, 20, max(steps, 21))),
    )
    params = sd.params["vae"]
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, batch, key):
        grad_fn = jax.value_and_grad(
            lambda p: vae_loss(vae, p, batch, key, kl_weight), has_aux=True
        )
        (loss, aux), grads = grad_fn(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, {"loss": loss, **aux}

    data = to_model_range(images)
    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    history = []
    order = rng.permutation(len(data))
    pos = 0
    for i in range(steps):
        if pos + batch_size > len(data):
            order, pos = rng.permutation(len(data)), 0
        batch = jnp.asarray(data[order[pos : pos + batch_size]])
        pos += batch_size
        params, opt_state, metrics = step(params, opt_state, batch, jax.random.fold_in(key, i))
        if (i + 1) % log_every == 0 or i + 1 == steps:
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}
            history.append({"step": i + 1, **m})
            print(f"vae step {i + 1}/{steps}: " + " ".join(f"{k} {v:.5f}" for k, v in m.items()),
                  flush=True)  # fmt: skip
    return params, history


def reconstruction_mse(sd: StableDiffusion, vae_params: Any, images: np.ndarray) -> float:
    """Mean squared error (in [-1, 1] units) of decode(posterior mean) over uint8 images."""
    x = jnp.asarray(to_model_range(images))
    recon = jax.jit(lambda p, x: sd.vae.apply({"params": p}, x))(vae_params, x)
    return float(jnp.mean((recon - x) ** 2))


def latent_scaling_factor(
    sd: StableDiffusion, vae_params: Any, images: np.ndarray, seed: int = 0
) -> float:
    """``1 / std`` of posterior samples of ``images`` (how SD's 0.18215 was found), 4 digits."""
    encode = jax.jit(lambda p, x: sd.vae.apply({"params": p}, x, method=sd.vae.encode))
    samples = []
    for start in range(0, len(images), 256):
        mean, logvar = encode(vae_params, jnp.asarray(to_model_range(images[start : start + 256])))
        samples.append(np.asarray(sample_latents(mean, logvar, jax.random.key(seed + start), 1.0)))
    std = float(np.concatenate(samples).std())
    if not np.isfinite(std) or std <= 0:
        raise ValueError(f"latent std is {std}; the VAE did not train")
    return float(f"{1.0 / std:.4g}")


# ----------------------------------------------------------------------------------------------
# UNet pretraining with the project's trainer.


def sft_config(
    model_path: str,
    data_path: str,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int = 0,
) -> ml_collections.ConfigDict:
    """The trainer config that pretrains the UNet (objective ``sft``) on the noisy toy data."""
    from spin_jax.train.config import base_config

    c = base_config()
    c.seed = seed
    c.objective = "sft"
    c.iterations = 1
    c.model.path = os.path.abspath(model_path)
    c.model.dtype = "float32"
    c.data.source = "imagefolder"
    c.data.path = os.path.abspath(data_path)
    c.data.resolution = RESOLUTION
    c.data.random_flip = False  # a flip turns "on the left" into a wrong caption
    c.data.caption_dropout = 0.1  # the unconditional model classifier-free guidance needs
    c.data.encode_batch_size = 256
    c.train.steps = steps
    c.train.batch_size = batch_size
    c.train.optimizer = "adamw"
    c.train.learning_rate = learning_rate
    c.train.lr_schedule = "cosine"
    c.train.warmup_steps = min(200, steps // 10)
    c.train.weight_decay = 0.0
    c.train.grad_clip_norm = 1.0
    c.sample.num_steps = 20
    c.sample.guidance_scale = 3.0
    c.checkpoint.every_steps = max(1, min(500, steps))
    c.log.every_steps = max(1, min(50, steps))
    c.log.grid_prompts = shapes.GRID_PROMPTS[:9]
    return c


def _done(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "model_index.json"))


def build_base(
    out_dir: str,
    *,
    seed: int = DEFAULTS["seed"],
    work_dir: str | None = None,
    num_noisy: int = DEFAULTS["num_noisy"],
    num_vae_clean: int = DEFAULTS["num_vae_clean"],
    vae_steps: int = DEFAULTS["vae_steps"],
    vae_batch_size: int = DEFAULTS["vae_batch_size"],
    vae_learning_rate: float = DEFAULTS["vae_learning_rate"],
    kl_weight: float = DEFAULTS["kl_weight"],
    unet_steps: int = DEFAULTS["unet_steps"],
    unet_batch_size: int = DEFAULTS["unet_batch_size"],
    unet_learning_rate: float = DEFAULTS["unet_learning_rate"],
    unet_channels: tuple[int, ...] = DEFAULTS["unet_channels"],
    unet_layers_per_block: int = DEFAULTS["unet_layers_per_block"],
    vae_channels: tuple[int, ...] = DEFAULTS["vae_channels"],
    text_hidden_size: int = DEFAULTS["text_hidden_size"],
    text_layers: int = DEFAULTS["text_layers"],
) -> dict[str, Any]:
    """Builds the toy base model into ``out_dir`` (a diffusers directory); returns a report.

    ``work_dir`` (default ``out_dir + ".work"``) keeps the noisy dataset, the VAE-only
    pipeline and the pretraining run; a second call resumes from it. The report (also written
    to ``out_dir/build_report.json``) holds the settings, stage times, VAE reconstruction
    errors and the scaling factor.
    """
    from spin_jax.models import load_pretrained
    from spin_jax.train import checkpoints, loop

    if unet_batch_size % jax.device_count():
        raise ValueError(
            f"unet_batch_size={unet_batch_size} must be divisible by the {jax.device_count()} "
            "devices"
        )
    settings = {k: v for k, v in locals().items() if k in DEFAULTS}
    work_dir = work_dir or out_dir.rstrip("/") + ".work"
    os.makedirs(work_dir, exist_ok=True)
    report: dict[str, Any] = {"settings": settings, "seconds": {}}
    t_all = time.time()

    # Noisy pretraining data (the trainer reads the folder; the VAE the same images).
    t0 = time.time()
    noisy_dir = os.path.join(work_dir, "noisy")
    meta = os.path.join(noisy_dir, "metadata.jsonl")
    if not _noisy_ready(meta, num_noisy):
        tmp = noisy_dir + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shapes.write_imagefolder(tmp, "noisy", num_noisy, seed=seed, size=RESOLUTION)
        shutil.rmtree(noisy_dir, ignore_errors=True)
        os.replace(tmp, noisy_dir)
    report["seconds"]["dataset"] = round(time.time() - t0, 1)

    # VAE, then a VAE-only pipeline (random UNet) for the trainer to start from.
    vae_base = os.path.join(work_dir, "vae_base")
    t0 = time.time()
    if not _done(vae_base):
        sd = init_pipeline(
            seed,
            unet_channels=tuple(unet_channels),
            unet_layers_per_block=unet_layers_per_block,
            vae_channels=tuple(vae_channels),
            text_hidden_size=text_hidden_size,
            text_layers=text_layers,
        )
        images, _ = shapes.generate("noisy", num_noisy, seed=seed, size=RESOLUTION)
        clean, _ = shapes.generate("clean", num_vae_clean, seed=seed + 1, size=RESOLUTION)
        held_out, _ = shapes.generate("noisy", min(256, num_noisy), seed=seed + 1, size=RESOLUTION)
        clean_eval = np.stack([shapes.render(o, RESOLUTION) for o in shapes.all_combinations(1)])
        before = reconstruction_mse(sd, sd.params["vae"], held_out)
        vae_params, history = train_vae(
            sd, np.concatenate([images, clean]), steps=vae_steps, batch_size=vae_batch_size,
            learning_rate=vae_learning_rate, kl_weight=kl_weight, seed=seed,
        )  # fmt: skip
        scaling = latent_scaling_factor(sd, vae_params, images[:1024], seed=seed)
        sd.configs["vae"]["scaling_factor"] = scaling
        sd.params = dict(sd.params, vae=vae_params)
        vae_report = {
            "scaling_factor": scaling,
            "recon_mse_noisy_before": before,
            "recon_mse_noisy_after": reconstruction_mse(sd, vae_params, held_out),
            "recon_mse_clean_after": reconstruction_mse(sd, vae_params, clean_eval),
            "judge_fidelity_clean_recon": _judge_reconstructions(sd, vae_params, clean_eval),
            "history": history,
        }
        tmp = vae_base + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_pretrained(sd, tmp)
        with open(os.path.join(tmp, "vae_report.json"), "w") as f:
            json.dump(vae_report, f, indent=2)
        shutil.rmtree(vae_base, ignore_errors=True)
        os.replace(tmp, vae_base)
    with open(os.path.join(vae_base, "vae_report.json")) as f:
        report["vae"] = json.load(f)
    report["seconds"]["vae"] = round(time.time() - t0, 1)

    # UNet: the project's SFT trainer on the noisy data.
    t0 = time.time()
    run_dir = os.path.join(work_dir, "sft")
    config = sft_config(vae_base, noisy_dir, steps=unet_steps, batch_size=unet_batch_size,
                        learning_rate=unet_learning_rate, seed=seed)  # fmt: skip
    summaries = loop.run(config, run_dir)
    report["sft"] = summaries[-1] if summaries else {}
    report["seconds"]["unet"] = round(time.time() - t0, 1)

    # Export: trained UNet + the VAE-only pipeline's other parts.
    sd = load_pretrained(vae_base)
    unet = checkpoints.load_iteration_params(run_dir, 1, sd.params["unet"])
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(sd, tmp, params=dict(sd.params, unet=unet))
    grid = os.path.join(run_dir, "iteration_1", "grid.png")
    if os.path.isfile(grid):  # the pretraining run's samples of shapes.GRID_PROMPTS[:9], for a look
        shutil.copy(grid, os.path.join(tmp, "pretrain_grid.png"))
    report["seconds"]["total"] = round(time.time() - t_all, 1)
    with open(os.path.join(tmp, "build_report.json"), "w") as f:
        json.dump(report, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return report


def _judge_reconstructions(sd: StableDiffusion, vae_params: Any, images: np.ndarray) -> float:
    """The judge's fidelity on VAE reconstructions of the 60 clean one-object renders."""
    from spin_jax.toy import judge

    recon = jax.jit(lambda p, x: sd.vae.apply({"params": p}, x))(
        vae_params, jnp.asarray(to_model_range(images))
    )
    return judge.judge(np.asarray(recon), shapes.all_captions(1))["fidelity"]


def _noisy_ready(meta: str, n: int) -> bool:
    if not os.path.isfile(meta):
        return False
    with open(meta) as f:
        return sum(1 for line in f if line.strip()) == n


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Build the tiny toy base model (diffusers format).")
    p.add_argument("--out", required=True, help="output diffusers directory")
    p.add_argument("--work", default=None, help="intermediate folder (default <out>.work)")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    p.add_argument("--num-noisy", type=int, default=DEFAULTS["num_noisy"])
    p.add_argument("--vae-steps", type=int, default=DEFAULTS["vae_steps"])
    p.add_argument("--unet-steps", type=int, default=DEFAULTS["unet_steps"])
    p.add_argument("--unet-batch-size", type=int, default=DEFAULTS["unet_batch_size"])
    p.add_argument("--unet-learning-rate", type=float, default=DEFAULTS["unet_learning_rate"])
    p.add_argument("--keep-work", action="store_true", help="keep the intermediate folder")
    a = p.parse_args(argv)
    for name in ("num_noisy", "vae_steps", "unet_steps", "unet_batch_size"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    work = a.work or a.out.rstrip("/") + ".work"
    report = build_base(
        a.out, seed=a.seed, work_dir=work, num_noisy=a.num_noisy, vae_steps=a.vae_steps,
        unet_steps=a.unet_steps, unet_batch_size=a.unet_batch_size,
        unet_learning_rate=a.unet_learning_rate,
    )  # fmt: skip
    if not a.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"out": a.out, "seconds": report["seconds"],
                      "scaling_factor": report["vae"]["scaling_factor"]}))  # fmt: skip


if __name__ == "__main__":
    main()
