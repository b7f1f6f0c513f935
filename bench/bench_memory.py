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

SD 1.5: ``spin_jax.models.presets.SD15_UNET``. SDXL: ``presets.SDXL_UNET`` if present, else the
config below (stabilityai/stable-diffusion-xl-base-1.0 ``unet/config.json``, written from the
published file); its shapes come from the project's UNet where it builds SDXL, else from
diffusers' UNet on the meta device (no memory), renamed to Flax paths.
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

SDXL_UNET = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}


def _project_shapes(config: dict):
    from spin_jax.models.unet import unet_from_config, unet_param_shapes

    return unet_param_shapes(unet_from_config(config))


def _diffusers_shapes(config: dict):
    """Flax-named ShapeDtypeStructs of diffusers' UNet built on the meta device."""
    import torch
    from diffusers import UNet2DConditionModel

    from spin_jax.models.convert import torch_key_to_path

    with torch.device("meta"):
        model = UNet2DConditionModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})  # fmt: skip
    out: dict = {}
    for key, p in model.state_dict().items():
        path, leaf = torch_key_to_path(key)
        shape = tuple(p.shape)
        if leaf == "weight" and len(shape) == 4:
            leaf, shape = "kernel", (shape[2], shape[3], shape[1], shape[0])
        elif leaf == "weight" and len(shape) == 2:
            leaf, shape = "kernel", (shape[1], shape[0])
        elif leaf == "weight":
            leaf = "scale"
        node = out
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = jax.ShapeDtypeStruct(shape, jnp.float32)
    return out


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--targets", default=",".join(lora.DEFAULT_TARGETS))
    args = ap.parse_args()
    targets = lora.expand_targets(args.targets)
    sdxl = getattr(presets, "SDXL_UNET", None)
    configs = [("sd15", presets.SD15_UNET, "presets.SD15_UNET"),
               ("sdxl", sdxl or SDXL_UNET, "presets.SDXL_UNET" if sdxl else "bench SDXL_UNET")]  # fmt: skip
    for name, config, origin in configs:
        try:
            shapes, how = _project_shapes(dict(config)), "spin_jax UNet"
        except (ValueError, TypeError) as e:  # the project's UNet does not build it (yet)
            shapes, how = _diffusers_shapes(dict(config)), f"diffusers meta UNet ({str(e)[:80]})"
        for row in rows(name, shapes, args.rank, targets):
            print(json.dumps({**row, "config": origin, "shapes_from": how}), flush=True)


if __name__ == "__main__":
    main()
