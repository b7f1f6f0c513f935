"""Stable Diffusion as one object: three Flax networks, a tokenizer, a schedule and their params.

``load_pretrained`` reads a diffusers-format directory with safetensors + numpy (no torch) and
``save_pretrained`` writes one that ``diffusers.StableDiffusionPipeline.from_pretrained`` loads.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from spin_jax import platform
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
    # The attention implementation each network's layers got when traced at load time
    # (``spin_jax.platform.AttentionChoice`` per layer), for ``attention_summary``.
    attention_choices: dict[str, list] = dataclasses.field(default_factory=dict)

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

    @property
    def attention_summary(self) -> str:
        """One line for a start-up report, e.g. "attention: auto -> xla for 46 layers (cpu)"."""
        return attention_report(self)

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


def _read_network(root: str, name: str, allow_pickle: bool):
    """Runs on a helper thread while the main one traces the networks: memory-maps the weight
    files and converts every tensor into one aligned host buffer with layouts guessed from the
    names (``convert.prepare``; checked against the traced template afterwards)."""
    folder = os.path.join(root, name)
    files = weight_files(folder, _WEIGHTS[name], allow_pickle=allow_pickle)
    tensors = read_tensors(files, dtype=None)  # lazy views of the files, in their dtypes
    prepared = convert.prepare(tensors, np.float32)
    source = files[0] if len(files) == 1 else folder
    return tensors, prepared, source


def _convert_network(read, shapes: Params) -> Params:
    tensors, prepared, source = read
    # transformers 5 saves CLIPTextModel without the "text_model." prefix published SD repos have.
    for prefix in [k for k in shapes if len(shapes) == 1]:
        if not any(k.startswith(prefix + ".") for k in tensors):
            tensors = {f"{prefix}.{k}": v for k, v in tensors.items()}
            prepared = {f"{prefix}.{k}": v for k, v in prepared.items()}
    return convert.torch_to_flax(tensors, shapes, source=source, prepared=prepared)


def _shardings(sharding: Any, name: str, params: Params) -> Any:
    if isinstance(sharding, Mapping):
        sharding = sharding.get(name)
    if sharding is None:
        return None
    if isinstance(sharding, jax.sharding.Mesh):
        from spin_jax import parallel

        return parallel.fsdp_param_sharding(sharding, params)
    if isinstance(sharding, jax.sharding.Sharding):
        return jax.tree.map(lambda _: sharding, params)
    return sharding  # a pytree of shardings shaped like the params


def place(params: Params, shardings: Any = None) -> Params:
    """Host (NumPy) params onto devices: one transfer per array, or per shard straight from
    host memory when ``shardings`` (a pytree of ``jax.sharding.Sharding``) is given, also when
    the shardings span other processes' devices (every process holds the same host values)."""
    if shardings is None:
        return jax.device_put(params)
    leaves = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    if all(s.is_fully_addressable for s in leaves):
        return jax.device_put(params, shardings)

    def put(x, s):
        return jax.make_array_from_callback(x.shape, s, lambda index: x[index])

    return jax.tree.map(put, params, shardings)


def check_attention(attention_impl: Any, dtype: Any) -> str:
    """``attention_impl`` normalised ("auto" | "xla" | "cudnn"); an explicit "cudnn" that this
    machine or compute dtype cannot run is a ValueError naming ``model.attention_impl``."""
    impl = platform.check_attention_impl(attention_impl)
    if impl == "cudnn":
        m = platform.describe_machine()
        why = platform.cudnn_unavailable(
            platform=m.platform,
            device_kind=m.device_kind,
            compute_capability=m.compute_capability,
            platform_version=m.platform_version,
            dtype=dtype,
        )
        if why:
            raise ValueError(
                f"{platform.FIELD}='cudnn' cannot run here: {why}. Set {platform.FIELD}='auto' "
                "(cuDNN where it can run, XLA elsewhere) or 'xla'."
            )
    return impl


def attention_report(sd: StableDiffusion) -> str:
    """One line saying which attention implementation the layers of ``sd`` run, and why:
    "attention: auto -> cudnn for 32 layers (head dims 40, 80, 160), xla for 14 layers (...)
    (gpu: NVIDIA H100 80GB HBM3, compute capability 9.0)". Networks not traced at load time
    (a model built by hand) are traced abstractly here (nothing runs)."""
    choices = sd.attention_choices
    if not choices:
        choices = {}
        for name, module, shapes in (
            ("unet", sd.unet, unet_param_shapes),
            ("vae", sd.vae, vae_param_shapes),
            ("text_encoder", sd.text_encoder, text_encoder_param_shapes),
        ):
            with platform.record_attention() as log:
                shapes(module)
            choices[name] = log
        sd.attention_choices = choices
    return platform.summarize_attention([c for log in choices.values() for c in log])


def load_pretrained(
    path: str,
    dtype: Any = jnp.float32,
    *,
    attention_impl: str | None = None,
    remat: bool = False,
    allow_pickle: bool = False,
    sharding: Any = None,
) -> StableDiffusion:
    """Loads a diffusers-format Stable Diffusion directory (SD 1.x / 2.x).

    ``dtype`` is the compute dtype of the networks; parameters stay float32.
    ``attention_impl``: None/"xla" (XLA), "auto" (cuDNN flash attention per layer where this
    machine, dtype and head dim allow it; ``spin_jax.platform``) or "cudnn" (cuDNN where the
    head dim allows; a ValueError on a machine or dtype that cannot run it).
    ``remat`` rematerialises UNet blocks.
    ``allow_pickle``: read ``.bin``/``.ckpt`` weights (needs torch; unpickling runs code).
    ``sharding``: where the params go. None: the default device. A ``jax.sharding.Sharding``
    for every array, a ``Mesh`` (``parallel.fsdp_param_sharding``: split over its ``fsdp``
    axis, else replicated), or a dict of those per network ("unet", "vae", "text_encoder");
    shards are placed straight from host memory.

    The weights are memory-mapped, renamed, transposed and cast in NumPy, in one copy into one
    aligned host buffer per network, then put on the devices in one call: no per-tensor device
    dispatch or compilation.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory not found: {path}")
    attention_impl = check_attention(attention_impl, dtype)
    read_json(os.path.join(path, "model_index.json"))  # a diffusers directory, before any work
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if not os.path.isdir(os.path.join(path, name)):
            raise FileNotFoundError(
                f"{path} has no '{name}' folder (a diffusers directory has one)"
            )
    # A helper thread reads and converts the weights (memory maps and NumPy copies, which
    # release the GIL) while this thread parses configs, loads the tokenizer and traces the
    # networks; the conversion is then checked against the traced parameter templates.
    pool = ThreadPoolExecutor(1, thread_name_prefix="spin_jax_load")
    reads = {
        name: pool.submit(_read_network, path, name, allow_pickle)
        for name in ("unet", "vae", "text_encoder")
    }

    def convert_and_place(name: str, shapes: Params) -> Params:
        host = _convert_network(reads[name].result(), shapes)
        return place(host, _shardings(sharding, name, host))

    try:
        return _load(path, dtype, attention_impl, remat, pool, reads, convert_and_place)
    finally:
        # On an error, do not wait for a conversion still copying: raise now.
        pool.shutdown(wait=False, cancel_futures=True)


def _load(path, dtype, attention_impl, remat, pool, reads, convert_and_place) -> StableDiffusion:
    model_index = read_json(os.path.join(path, "model_index.json"))
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
    networks = (
        ("unet", unet, unet_param_shapes),
        ("vae", vae, vae_param_shapes),
        ("text_encoder", text_encoder, text_encoder_param_shapes),
    )
    params, choices, done = {}, {}, {}
    for name, module, shapes_of in networks:
        with platform.record_attention() as log:
            shapes = shapes_of(module)
        choices[name] = log
        done[name] = pool.submit(convert_and_place, name, shapes)
    for name, future in done.items():
        params[name] = future.result()
    sd = StableDiffusion(unet, vae, text_encoder, tokenizer, schedule, params, configs, path)
    sd.attention_choices = choices
    return sd


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
