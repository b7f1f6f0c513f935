"""Text to image in one jitted call: text encoder -> CFG sampling loop -> optional VAE decode.

The batch is split over the mesh's data axes (default: every local device); a batch that does
not divide evenly is padded and trimmed. Classifier-free guidance runs the unconditional and
conditional inputs as one doubled UNet batch, interleaved per example so each device keeps its
own examples. Compiled functions are cached per model and static configuration (steps, guidance
on or off, sampler, latent size, decode), so repeated calls do not recompile.
"""

from __future__ import annotations

import inspect
import math
import weakref
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from spin_jax import parallel
from spin_jax.diffusion import samplers

# id(sd) -> (reference to sd, {static key: jitted fn, "empty_ids": ...}).
_CACHE: dict[int, tuple[Callable[[], Any], dict]] = {}
_DEFAULT_MESH: dict[tuple, Mesh] = {}


def default_mesh() -> Mesh:
    """A ``(data, fsdp=1)`` mesh over this process's devices (cached)."""
    devices = tuple(jax.local_devices())
    if devices not in _DEFAULT_MESH:
        _DEFAULT_MESH[devices] = parallel.make_mesh(devices=list(devices))
    return _DEFAULT_MESH[devices]


def place_params(params: Any, mesh: Mesh) -> Any:
    """Replicates ``params`` over ``mesh``; leaves already on the mesh keep their sharding.

    Call it once and pass the result to ``generate`` to skip the check-and-copy per call.
    """
    rep = parallel.replicated(mesh)

    def place(x):
        if isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding):
            if x.sharding.mesh == mesh:
                return x  # laid out on this mesh already (replicated or sharded)
        # Copied where it lives elsewhere; where it is already replicated on these devices under
        # another sharding, the same buffers are relabelled (no copy). Either way the sampler
        # sees one sharding and compiles once: jit keys its programs by input sharding.
        return jax.device_put(x, rep)

    return jax.tree.map(place, params)


def _entry(sd: Any) -> tuple[Callable[[], Any], dict]:
    key = id(sd)
    entry = _CACHE.get(key)
    if entry is not None and entry[0]() is sd:
        return entry
    try:
        ref = weakref.ref(sd)
        # Drop the compiled functions with the model, so its params can be freed.
        weakref.finalize(sd, _CACHE.pop, key, None)
    except TypeError:  # not weak-referenceable: keep it alive with its cache
        ref = lambda: sd  # noqa: E731
    entry = (ref, {})
    _CACHE[key] = entry
    return entry


def _pad(x: np.ndarray, n: int) -> np.ndarray:
    """Pads the leading axis to ``n`` rows by repeating the last row (valid model inputs)."""
    if x.shape[0] == n:
        return x
    return np.concatenate([x, np.repeat(x[-1:], n - x.shape[0], axis=0)], axis=0)


def _build(
    sd_ref: Callable[[], Any],
    mesh: Mesh,
    num_steps: int,
    do_cfg: bool,
    shared_uncond: bool,
    zero_uncond: bool,
    given_latents: bool,
    latent_shape: tuple[int, int, int],
    decode: bool,
    return_latents: bool,
    sampler: str,
    sampler_kwargs: tuple,
    return_states: bool = False,
) -> Callable:
    sample_fn = samplers.SAMPLERS[sampler]
    kwargs = dict(sampler_kwargs)
    stochastic = "noises" in inspect.signature(sample_fn).parameters
    timesteps = kwargs.get("timesteps")
    num_noises = len(timesteps) if timesteps is not None else num_steps

    def run(params, ids, uncond_ids, start, key, guidance):
        sd = sd_ref()  # traced while the caller holds sd; the cache holds only a weak reference
        context, pooled = sd.encode_prompt(params, ids)
        batch = context.shape[0]
        h, w = latent_shape[0] * sd.vae_scale_factor, latent_shape[1] * sd.vae_scale_factor
        added = sd.added_cond(pooled, sd.time_ids(h, w, batch))
        t_cond = None
        if sd.guidance_embedding_dim:
            from spin_jax.models.unet import guidance_scale_embedding

            # LCM UNets take the guidance scale as an embedding of w - 1 (no CFG batch).
            t_cond = guidance_scale_embedding(jnp.full((batch,), guidance - 1.0),
                                              sd.guidance_embedding_dim)  # fmt: skip
        if given_latents:
            x_T = start.astype(jnp.float32)
        else:
            # Noise per example from its id: the same key and ids give the same images whatever
            # the batch composition and device count.
            def noise(i):
                return jax.random.normal(jax.random.fold_in(key, i), latent_shape, jnp.float32)

            x_T = jax.vmap(noise)(start)
        if do_cfg:
            if zero_uncond:
                u_ctx, u_pooled = jnp.zeros_like(context), pooled
                u_pooled = None if pooled is None else jnp.zeros_like(pooled)
            else:
                u_ctx, u_pooled = sd.encode_prompt(params, uncond_ids)
                if shared_uncond:
                    u_ctx = jnp.broadcast_to(u_ctx, context.shape)
                    u_pooled = None if pooled is None else jnp.broadcast_to(u_pooled, pooled.shape)

            def pair(u, c):  # [u0, c0, u1, c1, ...]: both halves of an example on its device
                return jnp.stack([u, c], axis=1).reshape((-1,) + c.shape[1:])

            context2 = pair(u_ctx, context)
            added2 = None if added is None else jax.tree.map(
                pair, sd.added_cond(u_pooled, added["time_ids"]), added)  # fmt: skip

            def model_fn(x, t):
                out = sd.unet_apply(params["unet"], jnp.repeat(x, 2, axis=0), jnp.repeat(t, 2),
                                    context2, added2)  # fmt: skip
                out = out.astype(jnp.float32).reshape((-1, 2) + out.shape[1:])
                e_u, e_c = out[:, 0], out[:, 1]
                return e_u + guidance * (e_c - e_u)
        else:

            def model_fn(x, t):
                return sd.unet_apply(params["unet"], x, t, context, added, t_cond).astype(
                    jnp.float32
                )

        extra = dict(kwargs)
        if sampler == "ddim" and extra.get("eta", 0.0) > 0:
            extra["key"] = jax.random.fold_in(key, 2**31 - 1)
        if stochastic and "noises" not in extra:
            # Step noise per example from its id too (given latents: from its row).
            ids_ = start if not given_latents else jnp.arange(batch)

            def step_noise(i):
                k = jax.random.fold_in(jax.random.fold_in(key, i), 1)
                return jax.random.normal(k, (num_noises, *latent_shape), jnp.float32)

            extra["noises"] = jnp.swapaxes(jax.vmap(step_noise)(ids_), 0, 1)
        if return_states:
            x0, states = sample_fn(model_fn, x_T, sd.schedule, num_steps, return_states=True,
                                   **extra)  # fmt: skip
            states = jnp.swapaxes(states, 0, 1)  # [B, S + 1, ...]: split over the batch
        else:
            x0 = sample_fn(model_fn, x_T, sd.schedule, num_steps, **extra)
        if not decode:
            return (x0, states) if return_states else x0
        images = sd.vae_decode(params["vae"], x0 / sd.scaling_factor)
        images = jnp.clip(images.astype(jnp.float32), -1.0, 1.0)
        if return_states:
            return images, states
        return (images, x0) if return_latents else images

    return jax.jit(run, out_shardings=parallel.batch_sharding(mesh))


def generate(
    sd: Any,
    params: dict,
    prompt_ids: Any,
    key: jax.Array,
    num_steps: int = 20,
    guidance_scale: float = 7.5,
    height: int = 512,
    width: int = 512,
    decode: bool = True,
    *,
    negative_prompt_ids: Any = None,
    latents: Any = None,
    sampler: str | None = None,
    timesteps: Any = None,
    mesh: Mesh | None = None,
    example_ids: Any = None,
    sampler_kwargs: dict | None = None,
    return_latents: bool = False,
    return_states: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Images NHWC float32 in [-1, 1] for tokenized prompts (or the final scaled latents).

    ``prompt_ids``: int [B, L] (SDXL: [B, 2, L]) from ``sd.tokenize``. ``key``: PRNG key; example i starts from
    noise drawn with ``fold_in(key, example_ids[i])`` (``example_ids`` defaults to 0..B-1), or
    from ``latents`` [B, height/8, width/8, C] when given (they then set the size).
    ``guidance_scale > 1`` runs classifier-free guidance against ``negative_prompt_ids`` ([B, L]
    or [1, L]) or the empty prompt (zeros when the folder sets ``force_zeros_for_empty_prompt``,
    as SDXL's); otherwise the unconditional pass is skipped (as diffusers). A UNet with a
    guidance embedding (LCM) gets ``guidance_scale - 1`` embedded instead, with no CFG batch.
    SDXL's micro-conditioning is ``(height, width, 0, 0, height, width)``.
    ``decode=False`` returns the sampler's latents (scaled, as the UNet sees them);
    ``return_latents=True`` with ``decode=True`` returns ``(images, latents)``.
    ``sampler``: a name of ``samplers.SAMPLERS`` (``dpm_solver_pp``, ``ddim``, ``euler``,
    ``euler_ancestral``, ``lcm``); None: the one diffusers' pipeline uses for the folder's
    scheduler (``samplers.default_sampler``). ``timesteps``: custom descending timesteps
    (e.g. DMD2's [999, 749, 499, 249]) for the samplers that take them. Stochastic samplers
    draw step i's noise of example j from ``fold_in(fold_in(key, example_ids[j]), 1)``.
    ``sampler_kwargs`` go to the sampler (e.g. ``order``, ``eta``). ``mesh``: batch split over
    its data axes; default all local devices. ``return_states=True`` (the few-step samplers
    only) returns ``(images or latents, states)`` with the trajectory ``states`` [B, S + 1, h, w,
    C] (``samplers.euler``'s ``return_states``, per example: online PSO's transitions).
    """
    if sampler is None:
        sampler = samplers.default_sampler(sd.schedule)
    if sampler not in samplers.SAMPLERS:
        raise ValueError(f"sampler={sampler!r} is not one of {sorted(samplers.SAMPLERS)}")
    if (
        return_states
        and "return_states" not in inspect.signature(samplers.SAMPLERS[sampler]).parameters
    ):
        raise ValueError(f"return_states=True: sampler {sampler!r} does not return its states")
    ids = np.asarray(prompt_ids)
    want = "[B, L]" if not sd.family.pooled else f"[B, {len(sd.family.tokenizers)}, L]"
    ndim = 2 if not sd.family.pooled else 3
    if ids.ndim != ndim or ids.shape[0] == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"prompt_ids must be a non-empty int array {want} (sd.tokenize), got "
                         f"{ids.dtype} {ids.shape}")  # fmt: skip
    ids = ids.astype(np.int32)
    batch, length = ids.shape[0], ids.shape[1:]
    guidance = float(guidance_scale)
    do_cfg = guidance > 1.0 and not sd.guidance_embedding_dim
    zero_uncond = do_cfg and negative_prompt_ids is None and sd.force_zeros_for_empty_prompt
    sampler_kwargs = dict(sampler_kwargs or {})
    if timesteps is not None:
        sampler_kwargs["timesteps"] = tuple(int(t) for t in np.asarray(timesteps).reshape(-1))
    channels = int(sd.latent_channels)
    if latents is not None:
        latents = np.asarray(latents, np.float32)
        if latents.ndim != 4 or latents.shape[0] != batch or latents.shape[-1] != channels:
            raise ValueError(f"latents must be [{batch}, h, w, {channels}] (NHWC), got "
                             f"{latents.shape}")  # fmt: skip
        latent_shape = tuple(latents.shape[1:])
    else:
        f = int(sd.vae_scale_factor)
        if height <= 0 or width <= 0 or height % f or width % f:
            raise ValueError(f"height={height} and width={width} must be positive multiples of "
                             f"the VAE's downsampling factor {f}")  # fmt: skip
        latent_shape = (height // f, width // f, channels)
    if example_ids is None:
        example_ids = np.arange(batch, dtype=np.int32)
    example_ids = np.asarray(example_ids, np.int32).reshape(-1)
    if example_ids.shape[0] != batch:
        raise ValueError(f"example_ids has {example_ids.shape[0]} entries for {batch} prompts")

    ref, cache = _entry(sd)
    shared_uncond = True
    uncond = np.zeros((1, *length), np.int32)
    if do_cfg and not zero_uncond:
        if negative_prompt_ids is None:
            if "empty_ids" not in cache:
                cache["empty_ids"] = np.asarray(sd.tokenize([""]), np.int32)
            uncond = cache["empty_ids"]
        else:
            uncond = np.asarray(negative_prompt_ids, np.int32)
            if uncond.ndim != ndim or uncond.shape[0] not in (1, batch):
                raise ValueError(f"negative_prompt_ids must be {want} with B = {batch} or 1, got "
                                 f"{uncond.shape}")  # fmt: skip
            shared_uncond = uncond.shape[0] == 1
        if uncond.shape[1:] != length:
            raise ValueError(f"negative/empty prompt ids have shape {uncond.shape[1:]} per "
                             f"prompt, prompts {length}")  # fmt: skip

    mesh = default_mesh() if mesh is None else mesh
    for d in mesh.devices.flat:
        if d.process_index != jax.process_index():
            raise ValueError("generate runs on this process's devices: give a mesh of local "
                             "devices (the default)")  # fmt: skip
    n = parallel.data_parallel_size(mesh)
    padded = math.ceil(batch / n) * n
    batch_sh, rep = parallel.batch_sharding(mesh), parallel.replicated(mesh)
    start = latents if latents is not None else example_ids
    if latents is None and padded > batch:
        # Padding rows draw their own (discarded) noise.
        start = np.concatenate([start, np.arange(padded - batch, dtype=np.int32) + start.max() + 1])
    start = _pad(start, padded)
    ids_p = _pad(ids, padded)
    uncond = uncond if shared_uncond else _pad(uncond, padded)

    static = (
        mesh,
        int(num_steps),
        do_cfg,
        shared_uncond,
        zero_uncond,
        latents is not None,
        latent_shape,
        bool(decode),
        bool(decode and return_latents),
        sampler,
        tuple(sorted(sampler_kwargs.items())),
        bool(return_states),
    )
    fn = cache.get(static)
    if fn is None:
        fn = cache[static] = _build(ref, *static)
    out = fn(
        place_params(params, mesh),
        jax.device_put(ids_p, batch_sh),
        jax.device_put(uncond, rep if shared_uncond else batch_sh),
        jax.device_put(start, batch_sh),
        jax.device_put(key, rep),
        jax.device_put(np.float32(guidance), rep),
    )
    if padded > batch:
        out = jax.tree.map(lambda x: x[:batch], out)
    return out
