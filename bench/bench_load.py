"""How long loading a Stable Diffusion folder takes, against reading its tensors once.

    python bench/bench_load.py                         # full-size SD 1.5, float32 + bfloat16 files
    python bench/bench_load.py --size small --repeats 1   # tiny folders (a quick test)
    python bench/bench_load.py --folder /tmp/sd15 --keep  # build once, keep for later runs
    python bench/bench_load.py --size pickscore --file_dtypes float32   # the PickScore scorer

Builds (once per dtype, in ``--folder`` or a temporary folder that is deleted afterwards) a
diffusers-format SD 1.5 directory with random weights, or with ``--size pickscore`` a
transformers ``CLIPModel`` folder of PickScore's shapes (ViT-H/14, 986M parameters), written as
safetensors of the right names and shapes straight from the Flax parameter shapes (nothing is
downloaded; no torch needed). Then, each in a fresh subprocess, measures:

- ``read``: ``safetensors.numpy.load_file`` of every weight file (each tensor read once);
- ``spin_jax``: ``spin_jax.models.load_pretrained`` (``spin_jax.eval.scorers.load_pickscore``
  for a scorer) until its params are on the device, the
  networks' parameter templates read from the cache (``spin_jax.models.templates``, in a
  folder of the benchmark's that an untimed first load fills), as every load after the first
  on a machine;
- ``spin_jax_traced``: the same with the cache off, every template traced (a first load);
- ``spin_jax_inference``: ``spin_jax`` with ``param_dtype`` the file's dtype (an inference-only
  load, as diffusers' ``torch_dtype``; run for 16-bit Stable Diffusion files only, since for
  float32 files it is ``spin_jax``);
- ``diffusers``: ``diffusers.StableDiffusionPipeline.from_pretrained`` (``transformers.CLIPModel``
  for a scorer; skipped with a note when diffusers is not importable), with ``torch_dtype`` the
  file's dtype.

One JSON line per measurement: ``seconds`` is the call itself, ``process_seconds`` the whole
fresh process (interpreter start and imports included), ``cpu_seconds`` the process's user +
system CPU time, ``load_average`` the machine's 1-minute load average right after (other work
competing for the cores). The files are in the page cache after
the first pass (they were just written), so these are warm-cache figures on both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

WEIGHT_FILES = (
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
)
SCORER_FILE = "model.safetensors"

# PickScore_v1's transformers config (a CLIP ViT-H/14); the small one for tests.
PICKSCORE = {
    "architectures": ["CLIPModel"],
    "model_type": "clip",
    "projection_dim": 1024,
    "logit_scale_init_value": 2.6592,
    "text_config": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_attention_heads": 16,
        "num_hidden_layers": 24,
        "max_position_embeddings": 77,
        "vocab_size": 49408,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-05,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    },
    "vision_config": {
        "hidden_size": 1280,
        "intermediate_size": 5120,
        "num_attention_heads": 16,
        "num_hidden_layers": 32,
        "image_size": 224,
        "patch_size": 14,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-05,
    },
}
PICKSCORE_SMALL = {
    **PICKSCORE,
    "projection_dim": 16,
    "text_config": {**PICKSCORE["text_config"], "hidden_size": 32, "intermediate_size": 37,
                    "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 1000},
    "vision_config": {**PICKSCORE["vision_config"], "hidden_size": 32, "intermediate_size": 37,
                      "num_attention_heads": 4, "num_hidden_layers": 2, "image_size": 32,
                      "patch_size": 8},
}  # fmt: skip

SMALL_UNET = {
    "_class_name": "UNet2DConditionModel",
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
}
SMALL_VAE = {
    "_class_name": "AutoencoderKL",
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "block_out_channels": [16, 32],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 16,
}
SMALL_TEXT = {
    "architectures": ["CLIPTextModel"],
    "model_type": "clip_text_model",
    "vocab_size": 1000,
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 32,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


def configs(size: str) -> dict[str, dict]:
    from spin_jax.models import presets

    if size == "sd15":
        unet, vae, text = presets.SD15_UNET, presets.SD15_VAE, presets.SD15_TEXT_ENCODER
    else:
        unet, vae, text = SMALL_UNET, SMALL_VAE, SMALL_TEXT
    return {
        "unet": dict(unet),
        "vae": dict(vae),
        "text_encoder": dict(text),
        "scheduler": dict(presets.SD15_SCHEDULER),
    }


def torch_shapes(cfgs: dict[str, dict]) -> dict[str, dict[str, tuple[int, ...]]]:
    """Per network, the diffusers/transformers tensor names and shapes, from the Flax shapes."""
    import jax

    from spin_jax.models import convert
    from spin_jax.models.clip import text_encoder_from_config, text_encoder_param_shapes
    from spin_jax.models.unet import unet_from_config, unet_param_shapes
    from spin_jax.models.vae import vae_from_config, vae_param_shapes

    trees = {
        "unet": unet_param_shapes(unet_from_config(cfgs["unet"])),
        "vae": vae_param_shapes(vae_from_config(cfgs["vae"])),
        "text_encoder": text_encoder_param_shapes(text_encoder_from_config(cfgs["text_encoder"])),
    }
    out = {}
    for name, tree in trees.items():
        flat = {}
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            keys = tuple(p.key for p in path)
            torch_leaf = "weight" if keys[-1] in ("kernel", "scale", "embedding") else keys[-1]
            shape = tuple(leaf.shape)
            if keys[-1] == "kernel":
                shape = shape[::-1] if len(shape) == 2 else (shape[3], shape[2], *shape[:2])
            flat[convert.path_to_torch_key(keys[:-1], torch_leaf)] = shape
        out[name] = flat
    return out


def build(folder: str, size: str, dtype: str, seed: int = 0) -> dict:
    """Writes a random-weight diffusers SD folder (or a CLIPModel folder for a scorer size);
    returns {"bytes": ..., "tensors": ...}."""
    import ml_dtypes
    import numpy as np
    from safetensors.numpy import save_file

    from spin_jax.files import write_json
    from spin_jax.models.tiny import write_clip_tokenizer

    np_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}[dtype]
    if size.startswith("pickscore"):
        return build_scorer(folder, size, np_dtype, seed)
    cfgs = configs(size)
    rng = np.random.default_rng(seed)
    total_bytes = total_tensors = 0
    for (name, shapes), rel in zip(torch_shapes(cfgs).items(), WEIGHT_FILES, strict=True):
        os.makedirs(os.path.join(folder, name), exist_ok=True)
        write_json(os.path.join(folder, name, "config.json"), cfgs[name])
        tensors = {}
        for key, shape in shapes.items():
            x = rng.standard_normal(shape, dtype=np.float32)
            x *= 0.02
            tensors[key] = x.astype(np_dtype) if np_dtype is not np.float32 else x
        if name == "text_encoder":  # a buffer transformers 4 saved and loaders must skip
            n = cfgs[name].get("max_position_embeddings", 77)
            tensors["text_model.embeddings.position_ids"] = np.arange(n, dtype=np.int64)[None]
        save_file(tensors, os.path.join(folder, rel), metadata={"format": "pt"})
        total_bytes += os.path.getsize(os.path.join(folder, rel))
        total_tensors += len(tensors)
        del tensors
    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    write_json(os.path.join(folder, "scheduler", "scheduler_config.json"), cfgs["scheduler"])
    write_clip_tokenizer(os.path.join(folder, "tokenizer"), ["a", "photo", "of", "cat"])
    write_json(
        os.path.join(folder, "model_index.json"),
        {
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": "0.30.0",
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
            "safety_checker": [None, None],
            "scheduler": ["diffusers", cfgs["scheduler"]["_class_name"]],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        },
    )
    return {"bytes": total_bytes, "tensors": total_tensors}


def build_scorer(folder: str, size: str, np_dtype, seed: int) -> dict:
    import jax
    import numpy as np
    from safetensors.numpy import save_file

    from spin_jax.files import write_json
    from spin_jax.models import clip
    from spin_jax.models.tiny import write_clip_tokenizer

    cfg = PICKSCORE if size == "pickscore" else PICKSCORE_SMALL
    os.makedirs(folder, exist_ok=True)
    write_json(os.path.join(folder, "config.json"), cfg)
    write_clip_tokenizer(folder, ["a", "photo", "of", "cat"])
    shapes = clip.param_shapes(clip.clip_from_config(cfg))
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape, dtype=np.float32) * 0.02, shapes)
    tensors = clip.params_to_state_dict(params)
    del params
    tensors = {k: v.astype(np_dtype) if v.dtype != np_dtype else v for k, v in tensors.items()}
    path = os.path.join(folder, SCORER_FILE)
    save_file(tensors, path, metadata={"format": "pt"})
    return {"bytes": os.path.getsize(path), "tensors": len(tensors)}


# ---------------------------------------------------------------------------------------------
# Children: one measurement each, in a fresh process.


def child(what: str, folder: str, dtype: str) -> dict:
    t0 = time.perf_counter()
    scorer = not os.path.isfile(os.path.join(folder, "model_index.json"))
    if what == "read":
        import ml_dtypes  # noqa: F401 (registers bfloat16 with NumPy)
        from safetensors.numpy import load_file

        t0 = time.perf_counter()
        n = 0
        for rel in (SCORER_FILE,) if scorer else WEIGHT_FILES:
            n += sum(v.nbytes for v in load_file(os.path.join(folder, rel)).values())
        return {"seconds": time.perf_counter() - t0, "bytes_read": n}
    if what in ("spin_jax", "spin_jax_traced", "spin_jax_inference"):
        import jax
        import jax.numpy as jnp

        from spin_jax.models import load_pretrained

        compute = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
        t0 = time.perf_counter()
        if scorer:
            from spin_jax.eval.scorers import load_pickscore

            loaded = load_pickscore(folder, dtype=compute, attention_impl="auto")
        else:
            param_dtype = compute if what == "spin_jax_inference" else jnp.float32
            loaded = load_pretrained(
                folder, compute, attention_impl="auto", param_dtype=param_dtype
            )
        jax.block_until_ready(loaded.params)
        seconds = time.perf_counter() - t0
        leaves = jax.tree.leaves(loaded.params)
        return {
            "seconds": seconds,
            "params": int(sum(x.size for x in leaves)),
            "param_dtypes": sorted({str(x.dtype) for x in leaves}),
            "platform": jax.devices()[0].platform,
        }
    if what == "diffusers":
        import torch

        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
        t0 = time.perf_counter()
        if scorer:
            from transformers import CLIPModel

            nets = (CLIPModel.from_pretrained(folder, dtype=torch_dtype),)
        else:
            from diffusers import StableDiffusionPipeline

            pipe = StableDiffusionPipeline.from_pretrained(
                folder, torch_dtype=torch_dtype, safety_checker=None, feature_extractor=None
            )
            nets = (pipe.unet, pipe.vae, pipe.text_encoder)
        seconds = time.perf_counter() - t0
        return {
            "seconds": seconds,
            "params": int(sum(p.numel() for m in nets for p in m.parameters())),
        }
    raise ValueError(what)


def measure(what: str, folder: str, dtype: str, timeout: float, cache: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", what, "--folder", folder]
    cmd += ["--file_dtypes", dtype]
    env = dict(os.environ, SPIN_JAX_CACHE_DIR="none" if what == "spin_jax_traced" else cache)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    process_seconds = time.perf_counter() - t0
    load = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail), "process_seconds": round(process_seconds, 2)}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_seconds"] = round(process_seconds, 2)
    result["seconds"] = round(result["seconds"], 3)
    result["cpu_seconds"] = round(result["cpu_seconds"], 2)
    result["load_average"] = load  # other work on the machine (1-minute load average)
    return result


def diffusers_available() -> str | None:
    try:
        import diffusers  # noqa: F401
        import torch  # noqa: F401
    except ImportError as e:
        return f"diffusers/torch not importable ({e.name})"
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sizes = ("sd15", "small", "pickscore", "pickscore_small")
    ap.add_argument("--size", choices=sizes, default="sd15")
    ap.add_argument("--file_dtypes", default="float32,bfloat16")
    ap.add_argument("--folder", default="", help="where to build (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the built folders")
    ap.add_argument("--repeats", type=int, default=2, help="fresh processes per measurement")
    ap.add_argument("--what", default="read,spin_jax,spin_jax_traced,spin_jax_inference,diffusers")
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        import resource

        result = child(args.child, args.folder, args.file_dtypes)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        result["cpu_seconds"] = usage.ru_utime + usage.ru_stime  # the whole process
        print(json.dumps(result), flush=True)
        return 0

    root = args.folder or tempfile.mkdtemp(prefix="bench_load_", dir="/tmp")
    whats = [w for w in args.what.split(",") if w]
    note = diffusers_available()
    if "diffusers" in whats and note:
        emit(what="diffusers", skipped=note)
        whats.remove("diffusers")
    try:
        for dtype in args.file_dtypes.split(","):
            folder = os.path.join(root, f"{args.size}_{dtype}")
            if not os.path.isfile(os.path.join(folder, "model_index.json")):
                t0 = time.perf_counter()
                info = build(folder, args.size, dtype)
                emit(
                    what="build",
                    size=args.size,
                    file_dtype=dtype,
                    folder=folder,
                    gigabytes=round(info["bytes"] / 1e9, 3),
                    tensors=info["tensors"],
                    seconds=round(time.perf_counter() - t0, 2),
                )
            cache = os.path.join(root, "template_cache")
            if "spin_jax" in whats:  # untimed: fills the template cache
                measure("spin_jax", folder, dtype, args.timeout, cache)
            for i in range(args.repeats):
                for what in whats:
                    if what == "spin_jax_inference" and (
                        dtype == "float32" or "pickscore" in args.size
                    ):
                        continue  # the same load as spin_jax / no param_dtype for a scorer
                    r = measure(what, folder, dtype, args.timeout, cache)
                    emit(what=what, size=args.size, file_dtype=dtype, repeat=i, **r)
    finally:
        if not args.keep and not args.folder:
            shutil.rmtree(root, ignore_errors=True)
        else:
            shutil.rmtree(os.path.join(root, "template_cache"), ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
