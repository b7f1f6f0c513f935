"""Stable Diffusion as one object: three Flax networks, a tokenizer, a schedule and their params.

``load_pretrained`` reads a diffusers-format directory with safetensors + numpy (no torch) and
``save_pretrained`` writes one that ``diffusers.StableDiffusionPipeline.from_pretrained`` loads.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from spin_jax.diffusion.schedule import Schedule, schedule_from_config
from spin_jax.files import write_json
from spin_jax.models import convert
from spin_jax.models.clip import text_encoder_from_config, text_encoder_param_shapes
from spin_jax.models.tokenizer import Tokenizer, load_tokenizer
from spin_jax.models.unet import unet_from_config, unet_param_shapes
from spin_jax.models.vae import vae_from_config, vae_param_shapes
from spin_jax.models.weights import read_json, read_tensors, weight_files

Params = dict[str, Any]

# (subfolder, file stem) of each network's weights in a diffusers directory.
_WEIGHTS = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
}
_CLASS_NAMES = {
    "unet": ("diffusers", "UNet2DConditionModel"),
    "vae": ("diffusers", "AutoencoderKL"),
    "text_encoder": ("transformers", "CLIPTextModel"),
    "tokenizer": ("transformers", "CLIPTokenizer"),
}


@dataclasses.dataclass
class StableDiffusion:
    """A loaded Stable Diffusion model. Methods are pure in their params argument."""

    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: Tokenizer
    schedule: Schedule
    params: Params
    configs: dict[str, dict]
    path: str | None = None

    @property
    def scaling_factor(self) -> float:
        return float(self.configs["vae"].get("scaling_factor", 0.18215))

    @property
    def latent_channels(self) -> int:
        return int(self.configs["vae"].get("latent_channels", 4))

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.configs["vae"].get("block_out_channels", [0] * 4)) - 1)

    @property
    def dtype(self) -> Any:
        return self.unet.dtype

    def tokenize(self, prompts: list[str]) -> np.ndarray:
        return self.tokenizer(prompts)

    def encode_text(self, params: Params, input_ids: jax.Array) -> jax.Array:
        return self.text_encoder.apply({"params": params}, input_ids).last_hidden_state

    def unet_apply(self, params: Params, x_t: jax.Array, t: jax.Array, context: jax.Array):
        return self.unet.apply({"params": params}, x_t, t, context)

    def vae_encode(self, params: Params, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.vae.apply({"params": params}, images, method=self.vae.encode)

    def vae_decode(self, params: Params, latents: jax.Array) -> jax.Array:
        return self.vae.apply({"params": params}, latents, method=self.vae.decode)


def _load_network(root: str, name: str, module: nn.Module, shapes: Params, allow_pickle: bool):
    folder = os.path.join(root, name)
    files = weight_files(folder, _WEIGHTS[name], allow_pickle=allow_pickle)
    tensors = read_tensors(files)
    # transformers 5 saves CLIPTextModel without the "text_model." prefix published SD repos have.
    for prefix in [k for k in shapes if len(shapes) == 1]:
        if not any(k.startswith(prefix + ".") for k in tensors):
            tensors = {f"{prefix}.{k}": v for k, v in tensors.items()}
    source = files[0] if len(files) == 1 else folder
    return convert.torch_to_flax(tensors, shapes, source=source)


def load_pretrained(
    path: str,
    dtype: Any = jnp.float32,
    *,
    attention_impl: str | None = None,
    remat: bool = False,
    allow_pickle: bool = False,
) -> StableDiffusion:
    """Loads a diffusers-format Stable Diffusion directory (SD 1.x / 2.x).

    ``dtype`` is the compute dtype of the networks; parameters stay float32.
    ``attention_impl``: None (XLA) or ``"cudnn"``. ``remat`` rematerialises UNet blocks.
    ``allow_pickle``: read ``.bin``/``.ckpt`` weights (needs torch; unpickling runs code).
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory not found: {path}")
    model_index = read_json(os.path.join(path, "model_index.json"))
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if not os.path.isdir(os.path.join(path, name)):
            raise FileNotFoundError(
                f"{path} has no '{name}' folder (a diffusers directory has one)"
            )
    configs = {
        "model_index": model_index,
        "unet": read_json(os.path.join(path, "unet", "config.json")),
        "vae": read_json(os.path.join(path, "vae", "config.json")),
        "text_encoder": read_json(os.path.join(path, "text_encoder", "config.json")),
        "scheduler": read_json(os.path.join(path, "scheduler", "scheduler_config.json")),
    }
    unet = unet_from_config(
        configs["unet"],
        dtype=dtype,
        attention_impl=attention_impl,
        remat=remat,
        source=os.path.join(path, "unet", "config.json"),
    )
    vae = vae_from_config(
        configs["vae"],
        dtype=dtype,
        attention_impl=attention_impl,
        source=os.path.join(path, "vae", "config.json"),
    )
    text_encoder = text_encoder_from_config(
        configs["text_encoder"],
        dtype=dtype,
        attention_impl=attention_impl,
        source=os.path.join(path, "text_encoder", "config.json"),
    )
    schedule = schedule_from_config(
        configs["scheduler"], source=os.path.join(path, "scheduler", "scheduler_config.json")
    )
    max_length = int(configs["text_encoder"].get("max_position_embeddings", 77))
    tokenizer = load_tokenizer(os.path.join(path, "tokenizer"), max_length=max_length)
    params = {
        "unet": _load_network(path, "unet", unet, unet_param_shapes(unet), allow_pickle),
        "vae": _load_network(path, "vae", vae, vae_param_shapes(vae), allow_pickle),
        "text_encoder": _load_network(
            path,
            "text_encoder",
            text_encoder,
            text_encoder_param_shapes(text_encoder),
            allow_pickle,
        ),
    }
    params = jax.tree.map(jnp.asarray, params)
    return StableDiffusion(unet, vae, text_encoder, tokenizer, schedule, params, configs, path)


def save_pretrained(sd: StableDiffusion, path: str, params: Params | None = None) -> str:
    """Writes ``sd`` (with ``params``, default ``sd.params``) as a diffusers directory.

    Folders of the source directory that spin_jax does not model (safety_checker,
    feature_extractor, ...) are copied unchanged, so the export is the whole pipeline.
    """
    from safetensors.numpy import save_file

    params = sd.params if params is None else params
    os.makedirs(path, exist_ok=True)
    model_index = dict(sd.configs["model_index"])
    for name, (library, cls) in _CLASS_NAMES.items():
        model_index[name] = [library, cls]
    model_index["scheduler"] = [
        "diffusers",
        sd.configs["scheduler"].get("_class_name", "DDIMScheduler"),
    ]
    for name, stem in _WEIGHTS.items():
        folder = os.path.join(path, name)
        os.makedirs(folder, exist_ok=True)
        cfg_name = "config.json"
        write_json(os.path.join(folder, cfg_name), sd.configs[name], sort_keys=True)
        tensors = convert.flax_to_torch(jax.device_get(params[name]))
        tmp = os.path.join(folder, f".{stem}.safetensors.tmp")
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, os.path.join(folder, f"{stem}.safetensors"))
    os.makedirs(os.path.join(path, "scheduler"), exist_ok=True)
    write_json(
        os.path.join(path, "scheduler", "scheduler_config.json"),
        sd.configs["scheduler"],
        sort_keys=True,
    )
    sd.tokenizer.save(os.path.join(path, "tokenizer"))
    if sd.path and os.path.abspath(sd.path) != os.path.abspath(path):
        for name, entry in sd.configs["model_index"].items():
            src = os.path.join(sd.path, name)
            dst = os.path.join(path, name)
            if name in _CLASS_NAMES or name == "scheduler" or not os.path.isdir(src):
                continue
            if isinstance(entry, list) and entry[0] is not None and not os.path.exists(dst):
                shutil.copytree(src, dst)
    write_json(os.path.join(path, "model_index.json"), model_index, sort_keys=True)
    return path
