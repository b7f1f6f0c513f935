r"""Per-device memory of training state, full fine-tuning vs LoRA, for SD 1.5 and SDXL UNets.

  python bench/bench_memory.py [--rank 16] [--targets to_q,to_k,to_v,to_out.0]

Shapes only (``jax.eval_shape``; nothing is allocated, nothing is compiled): the UNet params,
the AdamW state ``optax`` builds for what trains, and the gradients, in float32, with parameters
replicated over the data-parallel devices (the trainer's default, ``mesh.fsdp = 1``), so every
number is per device whatever the device count. One JSON line per (model, mode, reference):

  reference "none"    SFT: no second model
  reference "base"    DPO / KTO: full fine-tuning holds a frozen copy of the UNet; LoRA uses
                      the base with the adapter off (no copy)
  reference "adapter" SPIN / SePPO: full fine-tuning holds the opponent's UNet; LoRA holds the
                      opponent's adapter, and its step merges it into the base (the merged
                      copies of the adapted kernels are transient, counted as ``merged_bytes``)

Activations and compiler temporaries are not included (they depend on batch, resolution,
remat and attention kernels, and are the same for both modes up to the adapter's own small
ones); the compiled step's ``memory_analysis`` gives them on a device machine.

SD 1.5: ``spin_jax.models.presets.SD15_UNET``; SDXL: ``presets.SDXL_UNET`` (shapes of the
project's UNet). ``--fsdp N`` also prints the per-device share when parameters, gradients and
optimizer state are split over N devices (``mesh.fsdp``; small leaves stay replicated, ignored
here). ``--activations`` compiles one forward + backward of the UNet (bf16 compute, remat, one
example at the given resolution) on this machine and prints XLA's memory analysis of it: the
temporaries a training step adds per example on top of the state (CPU compile; a GPU's
kernels differ, so treat it as an estimate).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from spin_jax.models import lora, presets  # noqa: E402
from spin_jax.train.optim import make_optimizer  # noqa: E402
from spin_jax.train.state import TrainState  # noqa: E402


def _project_shapes(config: dict):
    from spin_jax.models.unet import unet_from_config, unet_param_shapes

    return unet_param_shapes(unet_from_config(config))


def _nbytes(tree) -> int:
    return int(sum(np.prod(x.shape, dtype=np.int64) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))  # fmt: skip


def rows(name: str, shapes, rank: int, targets) -> list[dict]:
    tx, _ = make_optimizer({"learning_rate": 1e-5})
    params = _nbytes(shapes)
    full_state = jax.eval_shape(lambda p: TrainState.create(p, tx), shapes)
    adapter = jax.eval_shape(lambda p: lora.init(jax.random.key(0), p, rank, targets), shapes)
    lora_state = jax.eval_shape(lambda a: TrainState.create(a, tx), adapter)
    layers = lora.layers_of(adapter)
    kernels = {p: k for p, k in lora._kernels(shapes).items() if p in layers}
    merged = _nbytes(kernels)
    gib = 2.0**30
    out = []
    for reference in ("none", "base", "adapter"):
        f_opt = _nbytes(full_state.opt_state)
        f_ref = 0 if reference == "none" else params
        full = {"params": params, "opt_state": f_opt, "grads": params, "reference": f_ref}
        a = _nbytes(adapter)
        l_ref = a if reference == "adapter" else 0
        lo = {"params": params + a, "opt_state": _nbytes(lora_state.opt_state), "grads": a,
              "reference": l_ref, "merged_bytes": merged * (2 if reference == "adapter" else 1)}  # fmt: skip
        for mode, parts in (("full", full), (f"lora_r{rank}", lo)):
            total = sum(parts.values())
            out.append({
                "model": name, "mode": mode, "reference": reference,
                "unet_params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(shapes))),
                "trained_params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(
                    shapes if mode == "full" else adapter))),
                "lora_layers": 0 if mode == "full" else len(layers),
                **{f"{k}_gib": round(v / gib, 3) for k, v in parts.items()},
                "total_gib": round(total / gib, 3),
            })  # fmt: skip
    return out


def activations(name: str, config: dict, resolution: int, context_dim: int) -> dict:
    """XLA's memory analysis of one compiled UNet forward + backward (bf16, remat, batch 1)."""
    from spin_jax.models.unet import unet_from_config, unet_param_shapes

    model = unet_from_config(config, dtype=jnp.bfloat16, remat=True)
    shapes = unet_param_shapes(model)
    h = resolution // 8
    x = jax.ShapeDtypeStruct((1, h, h, 4), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    ctx = jax.ShapeDtypeStruct((1, 77, context_dim), jnp.float32)
    extra = {}
    if config.get("addition_embed_type") == "text_time":
        pooled = (
            config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        )
        extra["added_cond"] = {"text_embeds": jax.ShapeDtypeStruct((1, pooled), jnp.float32),
                               "time_ids": jax.ShapeDtypeStruct((1, 6), jnp.float32)}  # fmt: skip

    def loss(p, x, t, ctx, extra):
        out = model.apply({"params": p}, x, t, ctx, **extra)
        return jnp.mean(jnp.square(out.astype(jnp.float32)))

    compiled = jax.jit(jax.grad(loss)).lower(shapes, x, t, ctx, extra).compile()
    mem = compiled.memory_analysis()
    gib = 2.0**30
    return {"model": name, "activations": f"{resolution}px, batch 1, bf16, remat",
            "temp_gib": round(mem.temp_size_in_bytes / gib, 3),
            "argument_gib": round(mem.argument_size_in_bytes / gib, 3),
            "output_gib": round(mem.output_size_in_bytes / gib, 3),
            "device": jax.devices()[0].platform}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--targets", default=",".join(lora.DEFAULT_TARGETS))
    ap.add_argument("--fsdp", type=int, default=1, help="devices the state is split over")
    ap.add_argument("--activations", action="store_true")
    ap.add_argument("--models", default="sd15,sdxl")
    args = ap.parse_args()
    targets = lora.expand_targets(args.targets)
    configs = {"sd15": (presets.SD15_UNET, 512, 768), "sdxl": (presets.SDXL_UNET, 1024, 2048)}
    for name in args.models.split(","):
        config, resolution, context_dim = configs[name]
        shapes = _project_shapes(dict(config))
        for row in rows(name, shapes, args.rank, targets):
            if args.fsdp > 1:
                state = sum(v for k, v in row.items() if k.endswith("_gib") and k != "total_gib"
                            and k != "merged_bytes_gib")  # fmt: skip
                row["fsdp"] = args.fsdp
                row["per_device_state_gib"] = round(state / args.fsdp, 3)
            print(json.dumps({**row, "config": f"presets.{name.upper()}_UNET"}), flush=True)
        if args.activations:
            print(json.dumps(activations(name, dict(config), resolution, context_dim)), flush=True)


if __name__ == "__main__":
    main()
