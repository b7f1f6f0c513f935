"""Benchmark of the Flax UNet against diffusers' PyTorch UNet, and full-size shape/FLOP checks.

    python bench/bench_unet.py                      # tiny on CPU, SD 1.5 size on a GPU
    python bench/bench_unet.py --size sd15 --dtypes bfloat16 --batch_sizes 8,16,32
    python bench/bench_unet.py --shapes             # SD 1.5 parameter counts and FLOPs only
    python bench/bench_unet.py --size sdxl          # SDXL: the same, abstractly, off a GPU

``--size sdxl --shapes`` (what ``--size sdxl`` does off a GPU: no full-size SDXL forward runs on a
CPU) prints the SDXL base UNet's parameter count next to diffusers' (counted on the ``meta``
device) and the TFLOP of one forward at 128x128 latents, batch 2, from XLA's cost analysis of
the lowered function with abstract parameters (nothing is allocated).

One JSON line per measurement: impl, dtype, batch, mode (forward | train = forward+backward),
seconds per iteration, images/s, TFLOP per image (XLA cost analysis of our jitted function,
used for both implementations) and MFU where the device's peak is known (on a CPU, the fraction
of this machine's best measured GEMM rate, printed as ``gemm_peak``). Weights are random:
speed does not depend on their values. The PyTorch side needs torch + diffusers and is skipped
with a note when either is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from spin_jax.models import presets  # noqa: E402
from spin_jax.models.attention import cpu_row_block, unblocked  # noqa: E402
from spin_jax.models.unet import (  # noqa: E402
    unet_dummy_inputs,
    unet_from_config,
    unet_param_shapes,
)
from spin_jax.models.vae import vae_from_config, vae_param_shapes  # noqa: E402

TINY_UNET = {
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 32,
    "attention_head_dim": 4,
    "norm_num_groups": 8,
}
# SDXL's layout (plain first block, text_time added conditioning), tiny.
TINY_SDXL_UNET = {
    **TINY_UNET,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 1, 2],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 16,
    "projection_class_embeddings_input_dim": 32 + 6 * 16,
}
# The CPU comparison point of bench_sample.py --size small: two blocks of 32/64, 2 layers each.
SMALL_UNET = {
    **TINY_UNET,
    "block_out_channels": [32, 64],
    "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "attention_head_dim": 8,
}
SIZES = {  # config, latent size, context length
    "tiny": (TINY_UNET, 32, 77),
    "small": (SMALL_UNET, 16, 77),
    "tiny_sdxl": (TINY_SDXL_UNET, 32, 77),
    "sd15": (presets.SD15_UNET, 64, 77),
    "sd21": (presets.SD21_UNET, 96, 77),
    "sdxl": (presets.SDXL_UNET, 128, 77),
}
# Dense peak TFLOP/s by device name and dtype (tensor cores, no sparsity).
PEAK_TFLOPS = {
    "H100": {"bfloat16": 989.0, "float16": 989.0},
    "A100": {"bfloat16": 312.0, "float16": 312.0},
}


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


def flops_of(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float(cost.get("flops", float("nan")))


def math_flops(fn, *args, compile: bool = True) -> float:
    """FLOPs of ``fn(*args)``'s math, traced afresh with the CPU's query-blocked attention off
    (``attention.unblocked``): XLA's cost analysis counts a loop's body once."""
    with unblocked():  # a new function: JAX caches traces per function
        lowered = jax.jit(lambda *a: fn(*a)).lower(*args)
    return flops_of(lowered.compile() if compile else lowered)


def count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def peak_tflops(device_name: str, dtype: str) -> float | None:
    for key, peaks in PEAK_TFLOPS.items():
        if key in device_name:
            return peaks.get(dtype)
    return None


def gemm_peak_tflops(dtype: str, n: int = 2048, reps: int = 5) -> float:
    """This machine's best measured TFLOP/s of one square matmul in ``dtype``, by JAX and by
    PyTorch (where installed): the bound no network on it can beat, where no peak is tabled."""
    rates = {}
    a = jnp.ones((n, n), jnp.dtype(dtype))
    mm = jax.jit(jnp.matmul)
    jax.block_until_ready(mm(a, a))
    best = min(_seconds(lambda: jax.block_until_ready(mm(a, a))) for _ in range(reps))
    rates["spin_jax"] = 2 * n**3 / best / 1e12
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None and jax.default_backend() == "cpu":
        t = torch.ones(n, n, dtype=getattr(torch, dtype))
        torch.mm(t, t)
        rates["torch"] = (
            2 * n**3 / min(_seconds(lambda: torch.mm(t, t)) for _ in range(reps)) / 1e12
        )
    emit(
        what="gemm_peak", dtype=dtype, n=n, **{f"{k}_tflops": round(v, 4) for k, v in rates.items()}
    )
    return max(rates.values())


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def random_params(shapes, seed: int = 0):
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        x = 0.02 * rng.standard_normal(s.shape, dtype=np.float32)
        return jnp.asarray(x + 1.0 if path[-1].key == "scale" else x)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


def diffusers_param_count(config) -> int | None:
    """Parameters of diffusers' UNet2DConditionModel(**config), built on the meta device."""
    try:
        import torch
        from diffusers import UNet2DConditionModel
    except ImportError as e:
        print(f"# diffusers count skipped: {e}", flush=True)
        return None
    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        model = UNet2DConditionModel(**kwargs)
    return sum(p.numel() for p in model.parameters())


def sdxl_shapes_report(batch: int = 2, latent: int = 128, ctx_len: int = 77) -> None:
    """SDXL base UNet at full size, abstractly: parameter count and lowered FLOPs."""
    config = presets.SDXL_UNET
    unet = unet_from_config(config)
    shapes = unet_param_shapes(unet)
    ours = count(shapes)
    ref = diffusers_param_count(config)
    emit(
        what="sdxl_unet_params",
        count=ours,
        millions=round(ours / 1e6, 2),
        diffusers_count=ref,
        equal=None if ref is None else ref == ours,
    )
    args = unet_dummy_inputs(unet, batch=batch, size=latent, context_len=ctx_len)

    def unet_fwd(p, *a):
        return unet.apply({"params": p}, *a)

    start = time.perf_counter()
    tflop = math_flops(unet_fwd, shapes, *args, compile=False) / 1e12
    emit(
        what=f"sdxl_unet_forward_{latent}x{latent}",
        batch=batch,
        context_len=ctx_len,
        tflop_per_forward=round(tflop, 4),
        tflop_per_image=round(tflop / batch, 4),
        source="lowered cost_analysis",
        seconds=round(time.perf_counter() - start, 1),
    )


def shapes_report() -> None:
    """SD 1.5 at full size, abstractly: parameter counts and compiled FLOPs, nothing executed."""
    unet = unet_from_config(presets.SD15_UNET)
    vae = vae_from_config(presets.SD15_VAE)
    up, vp = unet_param_shapes(unet), vae_param_shapes(vae)
    emit(what="sd15_unet_params", count=count(up), millions=round(count(up) / 1e6, 2))
    emit(what="sd15_vae_params", count=count(vp), millions=round(count(vp) / 1e6, 2))
    f32 = jnp.float32
    x = jax.ShapeDtypeStruct((1, 64, 64, 4), f32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    ctx = jax.ShapeDtypeStruct((1, 77, 768), f32)
    images = jax.ShapeDtypeStruct((1, 512, 512, 3), f32)

    def cost(fn, *args):
        return math_flops(fn, *args) / 1e12

    def unet_fwd(p, x, t, c):
        return unet.apply({"params": p}, x, t, c)

    def unet_train(p, x, t, c):
        return jax.grad(lambda p: jnp.mean(unet.apply({"params": p}, x, t, c) ** 2))(p)

    def encode(p, im):
        return vae.apply({"params": p}, im, method=vae.encode)

    def decode(p, z):
        return vae.apply({"params": p}, z, method=vae.decode)

    emit(what="sd15_unet_forward_64x64", tflop_per_image=round(cost(unet_fwd, up, x, t, ctx), 4))
    emit(
        what="sd15_unet_forward_backward_64x64",
        tflop_per_image=round(cost(unet_train, up, x, t, ctx), 4),
    )
    emit(what="sd15_vae_encode_512", tflop_per_image=round(cost(encode, vp, images), 4))
    emit(what="sd15_vae_decode_512", tflop_per_image=round(cost(decode, vp, x), 4))


def added_cond(config, batch: int, latent: int) -> dict[str, np.ndarray] | None:
    """SDXL's added conditioning: random pooled embeddings, time ids (H, W, 0, 0, H, W)."""
    if config.get("addition_embed_type") != "text_time":
        return None
    a = config["addition_time_embed_dim"]
    pooled = config["projection_class_embeddings_input_dim"] - 6 * a
    rng = np.random.default_rng(2)
    size = 8.0 * latent
    return {
        "text_embeds": rng.standard_normal((batch, pooled), dtype=np.float32),
        "time_ids": np.tile(np.float32([size, size, 0, 0, size, size]), (batch, 1)),
    }


def bench_jax(config, dtype, batch, latent, ctx_len, attention_impl, remat, steps, modes, peak):
    model = unet_from_config(
        config, dtype=jnp.dtype(dtype), attention_impl=attention_impl, remat=remat
    )
    params = random_params(unet_param_shapes(model))
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((batch, latent, latent, 4), dtype=np.float32))
    t = jnp.asarray(rng.integers(0, 1000, batch), jnp.int32)
    ctx = jnp.asarray(rng.standard_normal((batch, ctx_len, model.context_dim), dtype=np.float32))
    cond = added_cond(config, batch, latent)
    cond = None if cond is None else jax.tree.map(jnp.asarray, cond)

    def forward(p, x, t, c, cond):
        return model.apply({"params": p}, x, t, c, cond)

    def train(p, x, t, c, cond):
        return jax.grad(lambda p: jnp.mean(model.apply({"params": p}, x, t, c, cond) ** 2))(p)

    for mode in modes:
        fn = jax.jit(forward if mode == "forward" else train)
        compiled = fn.lower(params, x, t, ctx, cond).compile()
        if cpu_row_block(4096):  # attention loops here: count the math, not the loop
            f = forward if mode == "forward" else train
            tflop = math_flops(f, params, x, t, ctx, cond, compile=False) / 1e12 / batch
        else:
            tflop = flops_of(compiled) / 1e12 / batch
        for _ in range(2):  # warm-up, excluded
            jax.block_until_ready(compiled(params, x, t, ctx, cond))
        start = time.perf_counter()
        for _ in range(steps):
            out = compiled(params, x, t, ctx, cond)
        jax.block_until_ready(out)
        sec = (time.perf_counter() - start) / steps
        ips = batch / sec
        emit(
            impl="spin_jax",
            dtype=dtype,
            batch=batch,
            mode=mode,
            seconds_per_iter=round(sec, 5),
            images_per_s=round(ips, 3),
            tflop_per_image=round(tflop, 4),
            mfu=round(tflop * ips / peak, 4) if peak else None,
            attention_impl=attention_impl,
            remat=remat,
        )
        yield mode, tflop


def bench_torch(config, dtype, batch, latent, ctx_len, steps, modes, tflops, peak):
    try:
        import torch
        from diffusers import UNet2DConditionModel
        from diffusers.utils import logging as diffusers_logging
    except ImportError as e:
        print(f"# PyTorch side skipped: {e}", flush=True)
        return
    diffusers_logging.set_verbosity_error()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    torch.manual_seed(0)
    model = UNet2DConditionModel.from_config(dict(config)).to(device, tdtype[dtype])
    x = torch.randn(batch, 4, latent, latent, device=device, dtype=tdtype[dtype])
    t = torch.randint(0, 1000, (batch,), device=device)
    ctx = torch.randn(batch, ctx_len, model.config.cross_attention_dim, device=device)
    ctx = ctx.to(tdtype[dtype])
    cond = added_cond(config, batch, latent)
    if cond is not None:
        cond = {k: torch.from_numpy(v).to(device, tdtype[dtype]) for k, v in cond.items()}

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def step(mode):
        if mode == "forward":
            with torch.no_grad():
                model(x, t, ctx, added_cond_kwargs=cond)
        else:
            model.zero_grad(set_to_none=True)
            model(x, t, ctx, added_cond_kwargs=cond).sample.float().pow(2).mean().backward()

    for mode in modes:
        model.train(mode != "forward")
        for _ in range(2):
            step(mode)
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            step(mode)
        sync()
        sec = (time.perf_counter() - start) / steps
        ips = batch / sec
        tflop = tflops.get(mode)
        emit(
            impl="diffusers_torch_sdpa",
            dtype=dtype,
            batch=batch,
            mode=mode,
            seconds_per_iter=round(sec, 5),
            images_per_s=round(ips, 3),
            tflop_per_image=round(tflop, 4) if tflop else None,
            mfu=round(tflop * ips / peak, 4) if (peak and tflop) else None,
        )


def main(argv=None) -> None:
    on_gpu = jax.default_backend() == "gpu"
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--size",
        choices=sorted(SIZES),
        default=None,
        help="default: sd15 on a GPU, else tiny (with --shapes: sd15)",
    )
    parser.add_argument("--batch_sizes", default="1,4,8" if on_gpu else "1,2")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument(
        "--attention_impl",
        default="auto",
        choices=["auto", "none", "xla", "cudnn"],
        help="auto: cudnn for 16-bit dtypes on a GPU, else XLA",
    )
    parser.add_argument("--latent", type=int, default=None, help="latent side (default per size)")
    parser.add_argument("--modes", default="forward,train")
    parser.add_argument("--steps", type=int, default=10 if on_gpu else 3)
    parser.add_argument("--remat", action="store_true", help="rematerialise blocks (training)")
    parser.add_argument("--no_torch", action="store_true", help="skip the PyTorch side")
    parser.add_argument(
        "--shapes", action="store_true", help="shapes and FLOPs only (SD 1.5, or --size sdxl)"
    )
    args = parser.parse_args(argv)

    if args.size == "sdxl" and not (args.shapes or on_gpu):
        print("# --size sdxl off a GPU: shapes and FLOPs only (no full-size forward)", flush=True)
        args.shapes = True
    if args.shapes:
        if args.size == "sdxl":
            sdxl_shapes_report()
        elif args.size in (None, "sd15"):
            shapes_report()
        else:
            parser.error(f"--shapes: only for --size sd15 or sdxl, not {args.size!r}")
        return
    args.size = args.size or ("sd15" if on_gpu else "tiny")
    config, latent, ctx_len = SIZES[args.size]
    latent = args.latent or latent
    device = jax.devices()[0]
    device_name = getattr(device, "device_kind", str(device))
    emit(what="setup", backend=jax.default_backend(), device=device_name, size=args.size,
         latent=latent, cpu_count=os.cpu_count(), load_1min=round(os.getloadavg()[0], 2))  # fmt: skip
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in ("forward", "train"):
            parser.error(f"--modes: unknown mode {m!r} (forward, train)")
    for dtype in args.dtypes.split(","):
        if dtype not in ("float32", "bfloat16", "float16"):
            parser.error(f"--dtypes: unknown dtype {dtype!r}")
        impl = args.attention_impl
        if impl == "auto":
            impl = "cudnn" if (on_gpu and dtype != "float32") else None
        elif impl == "none":
            impl = None
        peak = peak_tflops(device_name, dtype)  # TFLOP/s: MFU = TFLOP/image * images/s / peak
        if peak is None and jax.default_backend() == "cpu":
            peak = gemm_peak_tflops(dtype)  # "mfu" is then the fraction of the measured GEMM rate
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            tflops = dict(
                bench_jax(
                    config, dtype, batch, latent, ctx_len, impl, args.remat, args.steps, modes, peak
                )
            )
            if not args.no_torch:
                bench_torch(config, dtype, batch, latent, ctx_len, args.steps, modes, tflops, peak)


if __name__ == "__main__":
    main()
