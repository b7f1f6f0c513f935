"""SPIN-Diffusion train-step throughput and memory: spin_jax vs a PyTorch step on diffusers' UNet.

    python bench/bench_train_step.py                         # tiny UNet on CPU, SD 1.5 on a GPU
    python bench/bench_train_step.py --size sd15 --batch 16 --dtype bfloat16 --remat

Both sides run the same step on random weights: shared t and noise per (real, synthetic) pair,
policy forward+backward on the 2B latents, frozen opponent forward under no-grad, the SPIN
logistic loss, global-norm clipping and AdamW (float32 master weights; ``--dtype bfloat16``
computes in bfloat16, autocast on the PyTorch side). Text contexts are random (the text
encoder is frozen and runs once per batch). One JSON line per measurement: pairs/s, seconds per
step, TFLOP per pair (XLA cost analysis of the jitted step, used for both sides), MFU where the
device's peak is known, and peak device memory where the backend reports it. The PyTorch side
needs torch + diffusers and is skipped with a note when either is missing.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from spin_jax import parallel  # noqa: E402
from spin_jax.train import optim, step  # noqa: E402
from spin_jax.train.state import TrainState, state_sharding  # noqa: E402

TINY_UNET = {
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 64,
    "attention_head_dim": 4,
    "norm_num_groups": 8,
}
LATENT = {"tiny": 16, "sd15": 64}  # 64x64x4 latents = 512x512 images
CONTEXT_LEN = 77
BETA = 2000.0  # SPIN-Diffusion iteration 1
OPT = {"optimizer": "adamw", "learning_rate": 2e-5, "weight_decay": 1e-2, "grad_clip_norm": 1.0}
# Dense peak TFLOP/s by device name and dtype (tensor cores, no sparsity).
PEAK_TFLOPS = {
    "H100": {"bfloat16": 989.0, "float16": 989.0},
    "H200": {"bfloat16": 989.0, "float16": 989.0},
    "A100": {"bfloat16": 312.0, "float16": 312.0},
}


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


def unet_config(size: str) -> dict:
    if size == "tiny":
        return dict(TINY_UNET)
    from spin_jax.models import presets  # lazily: only the SD 1.5 size needs it

    return copy.deepcopy(presets.SD15_UNET)


def peak_tflops(device_name: str, dtype: str) -> float | None:
    for key, peaks in PEAK_TFLOPS.items():
        if key in device_name:
            return peaks.get(dtype)
    return None


def device_peak_bytes(device) -> int | None:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return None if not stats else stats.get("peak_bytes_in_use")


def make_data(batch: int, latent: int, ctx_dim: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (batch, latent, latent, 4)
    return {
        "x0_w": rng.standard_normal(shape, dtype=np.float32),
        "x0_l": rng.standard_normal(shape, dtype=np.float32),
        "context": rng.standard_normal((batch, CONTEXT_LEN, ctx_dim), dtype=np.float32),
    }


def bench_jax(args, config, data, schedule_config, peak):
    from spin_jax.diffusion import schedule_from_config
    from spin_jax.models.unet import unet_from_config, unet_param_shapes

    model = unet_from_config(
        config, dtype=jnp.dtype(args.dtype), attention_impl=args.attention_impl, remat=args.remat
    )
    rng = np.random.default_rng(0)

    def leaf(path, s):
        x = 0.02 * rng.standard_normal(s.shape, dtype=np.float32)
        return x + 1.0 if path[-1].key == "scale" else x

    params = jax.tree_util.tree_map_with_path(leaf, unet_param_shapes(model))
    mesh = parallel.make_mesh()
    tx, lr_fn = optim.make_optimizer(OPT)
    state = TrainState.create(params, tx, mesh=mesh)
    ref = parallel.replicate(params, mesh)
    batch = parallel.global_batch_from_local(data, mesh)

    def make(unroll=None):
        return step.make_train_step(
            "spin",
            unet_apply=lambda p, x, t, c: model.apply({"params": p}, x, t, c),
            schedule=schedule_from_config(schedule_config),
            beta=BETA,
            accum_steps=args.accum_steps,
            unroll=unroll,
            learning_rate_fn=lr_fn,
            mesh=mesh,
        )

    jitted = step.jit_train_step(make(), state_sharding(state))
    keys = [parallel.replicate(jax.random.key(i), mesh) for i in range(args.steps + 2)]
    start = time.perf_counter()
    compiled = jitted.lower(state, ref, None, batch, keys[0]).compile()
    compile_s = time.perf_counter() - start
    # FLOPs from the step with every micro-batch unrolled: XLA's cost analysis counts a while
    # loop's body once, so a rolled accumulation loop would read as one micro-batch.
    cost = jax.jit(make(unroll=args.accum_steps)).lower(state, ref, None, batch, keys[0])
    cost = cost.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    tflop_pair = float(cost.get("flops", float("nan"))) / 1e12 / args.batch
    mem = compiled.memory_analysis()
    temp_gib = getattr(mem, "temp_size_in_bytes", None) if mem is not None else None
    for i in range(2):  # warm-up, excluded
        state, metrics = compiled(state, ref, None, batch, keys[i])
    jax.block_until_ready((state, metrics))
    start = time.perf_counter()
    for i in range(args.steps):
        state, metrics = compiled(state, ref, None, batch, keys[2 + i])
    jax.block_until_ready((state, metrics))
    sec = (time.perf_counter() - start) / args.steps
    pairs = args.batch / sec
    peak_bytes = device_peak_bytes(jax.local_devices()[0])
    emit(
        impl="spin_jax",
        size=args.size,
        dtype=args.dtype,
        batch_pairs=args.batch,
        accum_steps=args.accum_steps,
        devices=jax.device_count(),
        attention_impl=args.attention_impl,
        remat=args.remat,
        seconds_per_step=round(sec, 5),
        pairs_per_s=round(pairs, 3),
        tflop_per_pair=round(tflop_pair, 5),
        mfu=round(tflop_pair * pairs / (peak * jax.device_count()), 4) if peak else None,
        peak_mem_gib=round(peak_bytes / 2**30, 3) if peak_bytes else None,
        xla_temp_gib=round(temp_gib / 2**30, 3) if temp_gib else None,
        compile_s=round(compile_s, 2),
        loss=float(metrics["loss"]),
        is_finite=bool(metrics["is_finite"]),
    )
    return tflop_pair


def bench_torch(args, config, data, schedule_config, tflop_pair, peak):
    try:
        import torch
        import torch.nn.functional as F
        from diffusers import UNet2DConditionModel
    except ImportError as e:
        print(f"# PyTorch side skipped: {e}", flush=True)
        return
    from spin_jax.diffusion import schedule_from_config

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    policy = UNet2DConditionModel.from_config(dict(config)).to(device)
    opponent = copy.deepcopy(policy).eval().requires_grad_(False)
    policy.train()
    opt = torch.optim.AdamW(
        policy.parameters(), lr=OPT["learning_rate"], weight_decay=OPT["weight_decay"]
    )
    ab = torch.as_tensor(np.array(schedule_from_config(schedule_config).alphas_cumprod))
    ab = ab.to(device)
    # NHWC -> NCHW once, outside the timed loop.
    real = torch.as_tensor(data["x0_w"]).permute(0, 3, 1, 2).contiguous().to(device)
    syn = torch.as_tensor(data["x0_l"]).permute(0, 3, 1, 2).contiguous().to(device)
    ctx = torch.as_tensor(data["context"]).to(device)
    b = real.shape[0]
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

    def train_step():
        t = torch.randint(0, ab.shape[0], (b,), device=device)
        noise = torch.randn_like(real)  # shared within a pair
        x0 = torch.cat([real, syn])
        tt, eps, cc = torch.cat([t, t]), torch.cat([noise, noise]), torch.cat([ctx, ctx])
        a = ab[tt].sqrt().view(-1, 1, 1, 1)
        s = (1 - ab[tt]).sqrt().view(-1, 1, 1, 1)
        x_t = a * x0 + s * eps
        with autocast:
            with torch.no_grad():
                ref_pred = opponent(x_t, tt, cc).sample
            pred = policy(x_t, tt, cc).sample
        err = (pred.float() - eps).pow(2).mean(dim=(1, 2, 3))
        err_ref = (ref_pred.float() - eps).pow(2).mean(dim=(1, 2, 3))
        d = err - err_ref
        loss = -F.logsigmoid(-0.5 * BETA * (d[:b] - d[b:])).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), OPT["grad_clip_norm"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(2):
        train_step()
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = train_step()
    sync()
    sec = (time.perf_counter() - start) / args.steps
    pairs = b / sec
    peak_bytes = torch.cuda.max_memory_allocated() if device == "cuda" else None
    emit(
        impl="diffusers_torch",
        size=args.size,
        dtype=args.dtype,
        batch_pairs=b,
        device=device,
        seconds_per_step=round(sec, 5),
        pairs_per_s=round(pairs, 3),
        tflop_per_pair=round(tflop_pair, 5) if tflop_pair else None,
        mfu=round(tflop_pair * pairs / peak, 4) if (peak and tflop_pair) else None,
        peak_mem_gib=round(peak_bytes / 2**30, 3) if peak_bytes else None,
        loss=loss.item(),
    )


def main(argv=None) -> None:
    on_gpu = jax.default_backend() == "gpu"
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(LATENT), default="sd15" if on_gpu else "tiny")
    parser.add_argument("--batch", type=int, default=8 if on_gpu else 2, help="pairs per step")
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default="bfloat16" if on_gpu else "float32"
    )
    parser.add_argument(
        "--attention_impl",
        default="auto",
        choices=["auto", "none", "xla", "cudnn"],
        help="auto: cudnn for bfloat16 on a GPU, else XLA",
    )
    parser.add_argument("--remat", action="store_true", help="rematerialise UNet blocks")
    parser.add_argument("--accum_steps", type=int, default=1, help="micro-batches per step")
    parser.add_argument("--steps", type=int, default=10 if on_gpu else 3, help="timed steps")
    parser.add_argument("--no_torch", action="store_true", help="skip the PyTorch side")
    args = parser.parse_args(argv)
    if args.attention_impl == "auto":
        args.attention_impl = "cudnn" if (on_gpu and args.dtype == "bfloat16") else None
    elif args.attention_impl == "none":
        args.attention_impl = None
    if args.batch < 1 or args.steps < 1:
        parser.error("--batch and --steps must be >= 1")
    try:
        parallel.check_batch_divisible(
            args.batch // args.accum_steps,
            parallel.make_mesh(),
            what="micro-batch (--batch / --accum_steps)",
        )
    except ValueError as e:
        parser.error(str(e))

    from spin_jax.models import presets

    config = unet_config(args.size)
    data = make_data(args.batch, LATENT[args.size], config["cross_attention_dim"])
    device_name = getattr(jax.devices()[0], "device_kind", str(jax.devices()[0]))
    peak = peak_tflops(device_name, args.dtype)
    emit(
        what="setup",
        backend=jax.default_backend(),
        device=device_name,
        size=args.size,
        devices=jax.device_count(),
        latent=LATENT[args.size],
        beta=BETA,
    )
    tflop_pair = bench_jax(args, config, data, presets.SD15_SCHEDULER, peak)
    if not args.no_torch:
        bench_torch(args, config, data, presets.SD15_SCHEDULER, tflop_pair, peak)


if __name__ == "__main__":
    main()
