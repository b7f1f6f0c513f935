"""Stable Diffusion as one object: the Flax networks, tokenizers, a schedule and their params.

``load_pretrained`` reads a diffusers-format directory with safetensors + numpy (no torch) and
``save_pretrained`` writes one that diffusers' pipeline class loads. Two families share the
object (``FAMILIES``): SD 1.x/2.x (one CLIP text encoder) and SDXL (two text encoders, pooled
text embedding and micro-conditioning time ids added to the UNet's time embedding). Every other
module asks ``sd.family`` (or the methods below) instead of testing keys.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import sys
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
from spin_jax.models import convert, templates
from spin_jax.models.clip import text_encoder_from_config, text_encoder_param_shapes
from spin_jax.models.tokenizer import Tokenizer, load_tokenizer
from spin_jax.models.unet import check_added_cond_dims, unet_from_config, unet_param_shapes
from spin_jax.models.vae import vae_from_config, vae_param_shapes
from spin_jax.models.weights import read_json, read_tensors, weight_files

Params = dict[str, Any]

# (subfolder, file stem) of each network's weights in a diffusers directory.
_WEIGHTS = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
    "text_encoder_2": "model",
}
_CLASS_NAMES = {
    "unet": ("diffusers", "UNet2DConditionModel"),
    "vae": ("diffusers", "AutoencoderKL"),
    "text_encoder": ("transformers", "CLIPTextModel"),
    "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
    "tokenizer": ("transformers", "CLIPTokenizer"),
    "tokenizer_2": ("transformers", "CLIPTokenizer"),
}


@dataclasses.dataclass(frozen=True)
class Family:
    """What a model family holds and how its prompts condition the UNet."""

    name: str
    pipeline_class: str  # diffusers' pipeline class (model_index.json ``_class_name``)
    text_encoders: tuple[str, ...]  # folders, in the order their states are concatenated
    tokenizers: tuple[str, ...]
    pooled: bool  # the last text encoder's projected pooled embedding conditions the UNet
    penultimate: bool  # the context is each encoder's penultimate hidden state (no final LN)

    @property
    def networks(self) -> tuple[str, ...]:
        return ("unet", "vae", *self.text_encoders)

    @property
    def folders(self) -> tuple[str, ...]:
        return (*self.networks, *self.tokenizers, "scheduler")


FAMILIES = {
    "sd": Family(
        "sd",
        "StableDiffusionPipeline",
        ("text_encoder",),
        ("tokenizer",),
        pooled=False,
        penultimate=False,
    ),  # fmt: skip
    "sdxl": Family(
        "sdxl",
        "StableDiffusionXLPipeline",
        ("text_encoder", "text_encoder_2"),
        ("tokenizer", "tokenizer_2"),
        pooled=True,
        penultimate=True,
    ),  # fmt: skip
}


def family_of(model_index: Mapping[str, Any], source: str = "model_index.json") -> Family:
    """The family a diffusers ``model_index.json`` describes (its pipeline class, else whether
    it lists a second text encoder)."""
    cls = model_index.get("_class_name")
    for fam in FAMILIES.values():
        if cls == fam.pipeline_class:
            return fam
    if isinstance(cls, str) and cls.startswith("StableDiffusionXL"):
        return FAMILIES["sdxl"]  # img2img / inpaint pipelines hold the same networks
    entry = model_index.get("text_encoder_2")
    if isinstance(entry, list) and entry and entry[0] is not None:
        return FAMILIES["sdxl"]
    return FAMILIES["sd"]


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
    text_encoder_2: nn.Module | None = None
    tokenizer_2: Tokenizer | None = None
    family: Family = FAMILIES["sd"]
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

    @property
    def force_zeros_for_empty_prompt(self) -> bool:
        """SDXL: the unconditional branch of CFG is zeros, not the encoded empty prompt."""
        return bool(self.configs["model_index"].get("force_zeros_for_empty_prompt", False))

    @property
    def guidance_embedding_dim(self) -> int | None:
        """LCM UNets embed the guidance scale (``time_cond_proj_dim``); None otherwise."""
        return self.configs["unet"].get("time_cond_proj_dim")

    def tokenize(self, prompts: list[str]) -> np.ndarray:
        """int32 ids: [B, L] (one tokenizer) or [B, 2, L] (SDXL: both tokenizers)."""
        if self.tokenizer_2 is None:
            return self.tokenizer(prompts)
        return np.stack([self.tokenizer(prompts), self.tokenizer_2(prompts)], axis=1)

    def text_params(self, params: Params) -> Params:
        """The text encoders' params of a params dict: what ``encode_prompt`` reads."""
        return {name: params[name] for name in self.family.text_encoders}

    def encode_prompt(self, params: Params, input_ids: jax.Array) -> tuple[jax.Array, Any]:
        """``(context [B, L, D], pooled [B, P] or None)`` as diffusers' ``encode_prompt``.

        ``params``: a dict holding the text encoders' params (``sd.params`` or
        ``sd.text_params(...)``). SD 1.x/2.x: the last hidden state, no pooled embedding. SDXL:
        both encoders' penultimate hidden states concatenated, and ``text_encoder_2``'s
        projected pooled ``text_embeds``.
        """
        if not self.family.penultimate:
            out = self.text_encoder.apply({"params": params["text_encoder"]}, input_ids)
            return out.last_hidden_state, None
        if input_ids.ndim != 3 or input_ids.shape[1] != len(self.family.text_encoders):
            raise ValueError(
                f"{self.family.name} prompt ids must be [B, {len(self.family.text_encoders)}, L] "
                f"(sd.tokenize), got shape {tuple(input_ids.shape)}"
            )
        states, pooled = [], None
        modules = (self.text_encoder, self.text_encoder_2)
        for i, (name, module) in enumerate(zip(self.family.text_encoders, modules, strict=True)):
            out = module.apply({"params": params[name]}, input_ids[:, i], output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled = getattr(out, "text_embeds", None)
        return jnp.concatenate(states, axis=-1), pooled

    def encode_text(self, params: Any, input_ids: jax.Array) -> jax.Array:
        """The context only. SD: ``params`` may be the text encoder's own params (as before)."""
        if not self.family.pooled and "text_encoder" not in params:
            params = {"text_encoder": params}
        return self.encode_prompt(params, input_ids)[0]

    def time_ids(self, height: int, width: int, batch: int) -> np.ndarray:
        """SDXL micro-conditioning at sampling: (H, W, 0, 0, H, W) per example, float32 [B, 6]."""
        row = np.asarray([height, width, 0, 0, height, width], np.float32)
        return np.broadcast_to(row, (batch, 6)).copy()

    def added_cond(self, pooled: Any, time_ids: Any) -> dict[str, jax.Array] | None:
        """``unet_apply``'s ``added_cond`` for this family (None for SD 1.x/2.x)."""
        if not self.family.pooled:
            return None
        return {"text_embeds": pooled, "time_ids": jnp.asarray(time_ids, jnp.float32)}

    def unet_apply(
        self,
        params: Params,
        x_t: jax.Array,
        t: jax.Array,
        context: jax.Array,
        added_cond: Mapping[str, jax.Array] | None = None,
        timestep_cond: jax.Array | None = None,
    ):
        """The UNet; ``added_cond`` as diffusers' ``added_cond_kwargs`` (SDXL: ``text_embeds``
        [B, P] and ``time_ids`` [B, 6]), ``timestep_cond`` the LCM guidance embedding."""
        kwargs = {}
        if added_cond is not None:
            kwargs["added_cond"] = dict(added_cond)
        if timestep_cond is not None:
            kwargs["timestep_cond"] = timestep_cond
        return self.unet.apply({"params": params}, x_t, t, context, **kwargs)

    def vae_encode(self, params: Params, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.vae.apply({"params": params}, images, method=self.vae.encode)

    def vae_decode(self, params: Params, latents: jax.Array) -> jax.Array:
        return self.vae.apply({"params": params}, latents, method=self.vae.decode)


def _read_network(root: str, name: str, allow_pickle: bool, param_dtype: np.dtype):
    """Runs on a helper thread while the main one traces the networks: memory-maps the weight
    files and converts every tensor into one aligned host buffer with layouts guessed from the
    names (``convert.prepare``; checked against the traced template afterwards)."""
    folder = os.path.join(root, name)
    files = weight_files(folder, _WEIGHTS[name], allow_pickle=allow_pickle)
    tensors = read_tensors(files, dtype=None)  # lazy views of the files, in their dtypes
    prepared = convert.prepare(tensors, param_dtype)
    source = files[0] if len(files) == 1 else folder
    return tensors, prepared, source


def _convert_network(read, shapes: Params, param_dtype: np.dtype) -> Params:
    tensors, prepared, source = read
    # transformers 5 saves CLIPTextModel without the "text_model." prefix published SD repos have
    # (CLIPTextModelWithProjection keeps it, beside its "text_projection").
    if "text_model" in shapes and not any(k.startswith("text_model.") for k in tensors):
        others = tuple(f"{k}." for k in shapes if k != "text_model")

        def fix(d):
            return {(k if k.startswith(others) else f"text_model.{k}"): v for k, v in d.items()}

        tensors, prepared = fix(tensors), fix(prepared)
    return convert.torch_to_flax(tensors, shapes, source=source, dtype=param_dtype,
                                 prepared=prepared)  # fmt: skip


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


PARAM_DTYPES = ("float32", "bfloat16", "float16")


def check_param_dtype(param_dtype: Any, *, field: str = "param_dtype") -> np.dtype:
    """``param_dtype`` as a NumPy dtype; anything but float32 / bfloat16 / float16 is a
    ValueError naming ``field`` and the value."""
    try:
        dt = np.dtype(param_dtype)
    except TypeError:
        dt = None
    if dt is None or dt.name not in PARAM_DTYPES:
        raise ValueError(f"{field}={param_dtype!r} is not one of {', '.join(PARAM_DTYPES)}")
    return dt


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
        for name, module, shapes in _networks(sd):
            with platform.record_attention() as log:
                shapes(module)
            choices[name] = log
        sd.attention_choices = choices
    return platform.summarize_attention([c for log in choices.values() for c in log])


def _networks(sd: StableDiffusion) -> list[tuple[str, nn.Module, Any]]:
    """(name, module, param-shapes function) of each network of ``sd``."""
    modules = {"unet": sd.unet, "vae": sd.vae, "text_encoder": sd.text_encoder,
               "text_encoder_2": sd.text_encoder_2}  # fmt: skip
    shapes = {"unet": unet_param_shapes, "vae": vae_param_shapes}
    return [
        (name, modules[name], shapes.get(name, text_encoder_param_shapes))
        for name in sd.family.networks
    ]


def load_pretrained(
    path: str,
    dtype: Any = jnp.float32,
    *,
    attention_impl: str | None = None,
    remat: bool = False,
    allow_pickle: bool = False,
    sharding: Any = None,
    components: str | None = None,
    prediction_type: str | None = None,
    param_dtype: Any = jnp.float32,
) -> StableDiffusion:
    """Loads a diffusers-format Stable Diffusion directory (SD 1.x / 2.x, SDXL), or one
    single-file checkpoint in the original Stability / CompVis layout (``.safetensors``).

    ``dtype`` is the compute dtype of the networks. ``param_dtype`` is the parameters' dtype:
    float32 (default; what training needs, as the optimizer's master weights), or bfloat16 /
    float16 for inference only (half the memory, and a 16-bit file loads without widening; the
    layers cast the weights to ``dtype`` as they use them).
    ``attention_impl``: None/"xla" (XLA), "auto" (cuDNN flash attention per layer where this
    machine, dtype and head dim allow it; ``spin_jax.platform``) or "cudnn" (cuDNN where the
    head dim allows; a ValueError on a machine or dtype that cannot run it).
    ``remat`` rematerialises UNet blocks.
    ``allow_pickle``: read ``.bin``/``.ckpt`` weights (needs torch; unpickling runs code).
    ``sharding``: where the params go. None: the default device. A ``jax.sharding.Sharding``
    for every array, a ``Mesh`` (``parallel.fsdp_param_sharding``: split over its ``fsdp``
    axis, else replicated), or a dict of those per network ("unet", "vae", "text_encoder",
    "text_encoder_2"); shards are placed straight from host memory.

    Single files (``spin_jax.models.single_file``): the architecture is inferred from the
    tensors; ``components`` is a diffusers folder of the same family whose tokenizer(s) (a file
    holds none), scheduler and network configs are used (as diffusers' ``from_single_file(...,
    config=)``); without one the inferred configs and scheduler are used and the tokenizer is
    an error. ``prediction_type`` overrides the scheduler's (768-v SD 2.x: "v_prediction").

    The weights are memory-mapped, renamed, transposed and cast in NumPy, in one copy into one
    aligned host buffer per network, then put on the devices in one call: no per-tensor device
    dispatch or compilation.
    """
    attention_impl = check_attention(attention_impl, dtype)
    param_dtype = check_param_dtype(param_dtype)
    if os.path.isfile(path):
        spec = _single_file_spec(path, components, prediction_type, allow_pickle)
    elif os.path.isdir(path):
        spec = _folder_spec(path, allow_pickle)
    else:
        raise FileNotFoundError(f"model directory (or single-file checkpoint) not found: {path}")
    # A helper thread reads and converts the weights (memory maps and NumPy copies, which
    # release the GIL) while this thread parses configs, loads the tokenizer and traces the
    # networks; the conversion is then checked against the traced parameter templates.
    pool = ThreadPoolExecutor(1, thread_name_prefix="spin_jax_load")

    def convert_and_place(name: str, shapes: Params) -> Params:
        host = _convert_network(reads[name].result(), shapes, param_dtype)
        return place(host, _shardings(sharding, name, host))

    with _quick_gil_handoff():
        reads = {name: pool.submit(spec.read, name, param_dtype) for name in spec.family.networks}
        try:
            return _load(spec, dtype, attention_impl, remat, pool, convert_and_place)
        finally:
            # On an error, do not wait for a conversion still copying: raise now.
            pool.shutdown(wait=False, cancel_futures=True)


@contextlib.contextmanager
def _quick_gil_handoff(seconds: float = 2e-4):
    """Python's thread switch interval lowered (default 5 ms) while a load runs: the copying
    thread takes the GIL back between NumPy calls thousands of times, each time waiting up to
    one interval for the tracing thread to yield it (a 2-3x slower copy, measured)."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(min(before, seconds))
    try:
        yield
    finally:
        sys.setswitchinterval(before)


@dataclasses.dataclass
class _Spec:
    """Where a model's parts come from: configs (and the file each came from), tokenizer
    folders, and a function reading one network's tensors."""

    path: str
    family: Family
    configs: dict[str, dict]
    sources: dict[str, str]
    tokenizers: dict[str, str]
    read: Any  # (name, param dtype) -> (tensors, prepared, source)


def _folder_spec(path: str, allow_pickle: bool) -> _Spec:
    index_path = os.path.join(path, "model_index.json")
    family = family_of(read_json(index_path), index_path)  # a diffusers directory, before any work
    for name in family.folders:
        if not os.path.isdir(os.path.join(path, name)):
            raise FileNotFoundError(
                f"{path} has no '{name}' folder (a diffusers {family.pipeline_class} directory "
                f"has {', '.join(family.folders)})"
            )
    configs, sources = {"model_index": read_json(index_path)}, {"model_index": index_path}
    for name in (*family.networks, "scheduler"):
        file = "scheduler_config.json" if name == "scheduler" else "config.json"
        sources[name] = os.path.join(path, name, file)
        configs[name] = read_json(sources[name])
    tokenizers = {name: os.path.join(path, name) for name in family.tokenizers}
    return _Spec(path, family, configs, sources, tokenizers,
                 lambda name, dt: _read_network(path, name, allow_pickle, dt))  # fmt: skip


def _single_file_spec(path: str, components: str | None, prediction_type: str | None,
                      allow_pickle: bool) -> _Spec:  # fmt: skip
    from spin_jax.models import single_file

    if components is None:
        raise FileNotFoundError(
            f"{path} is a single-file checkpoint, which holds no tokenizer: pass "
            "components=<a diffusers folder of the same family> (its tokenizer(s), scheduler "
            "and network configs are used)"
        )
    comp = _folder_spec(components, allow_pickle)
    kind = single_file.file_family(path, allow_pickle=allow_pickle)
    family = FAMILIES["sdxl" if kind == "sdxl" else "sd"]
    if comp.family is not family:
        raise ValueError(
            f"components={components} is a {comp.family.pipeline_class} folder, but {path} "
            f"holds a {kind} checkpoint"
        )
    # The folder's configs decide what the tensors cannot tell (heads, norm groups, ...).
    overrides = {name: comp.configs[name] for name in comp.family.networks}
    sf = single_file.read_single_file(path, prediction_type=prediction_type,
                                      overrides=overrides, allow_pickle=allow_pickle)  # fmt: skip
    configs, sources = dict(sf.configs), {}
    for name in (*family.networks, "scheduler", "model_index"):
        configs[name], sources[name] = comp.configs[name], comp.sources[name]
    if prediction_type is not None:
        configs["scheduler"] = dict(configs["scheduler"], prediction_type=prediction_type)

    def read(name, param_dtype):
        tensors = sf.state_dicts[name]
        return tensors, convert.prepare(tensors, param_dtype), path

    return _Spec(path, family, configs, sources, comp.tokenizers, read)


def _load(spec: _Spec, dtype, attention_impl, remat, pool, convert_and_place) -> StableDiffusion:
    family, configs, sources = spec.family, spec.configs, spec.sources
    if family.pooled:
        check_text_conditioning(configs, sources)
    unet = unet_from_config(configs["unet"], dtype=dtype, attention_impl=attention_impl,
                            remat=remat, source=sources["unet"])  # fmt: skip
    # force_upcast (the SDXL VAE overflows in half precision): the VAE computes in float32.
    vae_dtype = jnp.float32 if configs["vae"].get("force_upcast") else dtype
    vae = vae_from_config(configs["vae"], dtype=vae_dtype, attention_impl=attention_impl,
                          source=sources["vae"])  # fmt: skip
    encoders = [
        text_encoder_from_config(
            configs[name], dtype=dtype, attention_impl=attention_impl, source=sources[name]
        )  # fmt: skip
        for name in family.text_encoders
    ]
    schedule = schedule_from_config(configs["scheduler"], source=sources["scheduler"])
    tokenizers = [
        load_tokenizer(
            spec.tokenizers[tok], max_length=int(configs[enc].get("max_position_embeddings", 77))
        )  # fmt: skip
        for tok, enc in zip(family.tokenizers, family.text_encoders, strict=True)
    ]
    sd = StableDiffusion(unet, vae, encoders[0], tokenizers[0], schedule, {}, configs,
                         spec.path if os.path.isdir(spec.path) else None,
                         text_encoder_2=encoders[1] if len(encoders) > 1 else None,
                         tokenizer_2=tokenizers[1] if len(tokenizers) > 1 else None,
                         family=family)  # fmt: skip
    params, choices, done = {}, {}, {}
    for name, module, shapes_of in _networks(sd):
        shapes, choices[name] = templates.traced(module, shapes_of)  # cached between processes
        done[name] = pool.submit(convert_and_place, name, shapes)
    for name, future in done.items():
        params[name] = future.result()
    sd.params = params
    sd.attention_choices = choices
    return sd


def check_text_conditioning(configs: Mapping[str, dict], sources: Mapping[str, str]) -> None:
    """SDXL: the UNet's added-conditioning input must be the pooled text embedding plus six
    embedded time ids, its context width the sum of both encoders' widths."""
    unet, source = configs["unet"], sources["unet"]
    pooled = int(configs["text_encoder_2"].get("projection_dim", 0))
    check_added_cond_dims(unet, pooled, source=source)
    width = sum(int(configs[n].get("hidden_size", 0)) for n in ("text_encoder", "text_encoder_2"))
    cross = unet.get("cross_attention_dim")
    if cross != width:
        raise ValueError(
            f"{source}: cross_attention_dim={cross} disagrees with the text encoders' widths "
            f"(hidden_size {configs['text_encoder'].get('hidden_size')} + "
            f"{configs['text_encoder_2'].get('hidden_size')} = {width})"
        )


def save_pretrained(sd: StableDiffusion, path: str, params: Params | None = None) -> str:
    """Writes ``sd`` (with ``params``, default ``sd.params``) as a diffusers directory.

    Folders of the source directory that spin_jax does not model (safety_checker,
    feature_extractor, ...) are copied unchanged, so the export is the whole pipeline.
    """
    from safetensors.numpy import save_file

    params = sd.params if params is None else params
    os.makedirs(path, exist_ok=True)
    family = sd.family
    model_index = dict(sd.configs["model_index"])
    model_index["_class_name"] = model_index.get("_class_name") or family.pipeline_class
    for name in (*family.networks, *family.tokenizers):
        model_index[name] = list(_CLASS_NAMES[name])
    model_index["scheduler"] = [
        "diffusers",
        sd.configs["scheduler"].get("_class_name", "DDIMScheduler"),
    ]
    for name in family.networks:
        stem = _WEIGHTS[name]
        folder = os.path.join(path, name)
        os.makedirs(folder, exist_ok=True)
        write_json(os.path.join(folder, "config.json"), sd.configs[name], sort_keys=True)
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
    tokenizers = (sd.tokenizer, sd.tokenizer_2)
    for name, tok in zip(family.tokenizers, tokenizers, strict=False):
        tok.save(os.path.join(path, name))
    if sd.path and os.path.abspath(sd.path) != os.path.abspath(path):
        for name, entry in sd.configs["model_index"].items():
            src = os.path.join(sd.path, name)
            dst = os.path.join(path, name)
            if name in family.folders or not os.path.isdir(src):
                continue
            if isinstance(entry, list) and entry[0] is not None and not os.path.exists(dst):
                shutil.copytree(src, dst)
    write_json(os.path.join(path, "model_index.json"), model_index, sort_keys=True)
    return path
