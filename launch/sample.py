r"""Generates one image per prompt with a diffusers-format Stable Diffusion model.

  python launch/sample.py --config=configs/sample.py \
      --config.model.path=/models/stable-diffusion-v1-5 \
      --config.prompts=prompts.txt --config.out_dir=samples/sd15

Writes <out_dir>/<i:06d>.png per prompt, <out_dir>/grid.png, <out_dir>/metadata.jsonl and, with
--config.output.latents=True, the final latents as <out_dir>/latents/<start>-<end>.npy shards.
Rerunning the same command continues a partial folder: prompts whose files exist are skipped.
On several hosts, start one process per host; each takes its share of the batches.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROMPT_FIELDS = ("text", "prompt", "caption")


def read_prompts(path: str) -> list[str]:
    """Prompts from a text file (one per line, blank lines skipped) or JSON lines."""
    if not path:
        raise ValueError("config.prompts is empty: give a prompts file (--config.prompts=FILE)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompts file not found: {path}")
    with open(path, encoding="utf-8") as f:
        lines = [(n, line.strip()) for n, line in enumerate(f, start=1)]
    lines = [(n, line) for n, line in lines if line]
    if not lines:
        raise ValueError(f"prompts file {path} has no prompts")
    as_json = path.endswith((".jsonl", ".json")) or all(line.startswith("{") for _, line in lines)
    if not as_json:
        return [line for _, line in lines]
    prompts = []
    for n, line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
        field = next((k for k in PROMPT_FIELDS if isinstance(record, dict) and k in record), None)
        if field is None or not isinstance(record[field], str):
            raise ValueError(f"{path}:{n}: needs a string field {' / '.join(PROMPT_FIELDS)}")
        prompts.append(record[field])
    return prompts


@functools.lru_cache(maxsize=1)
def load_model(path: str, dtype: str, attention_impl: str, allow_pickle: bool):
    import jax.numpy as jnp

    from spin_jax.models import load_pretrained

    if not path:
        raise ValueError("config.model.path is empty: give a diffusers-format model folder")
    dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
    if dtype not in dtypes:
        raise ValueError(f"config.model.dtype={dtype!r} is not one of {sorted(dtypes)}")
    return load_pretrained(
        path, dtypes[dtype], attention_impl=attention_impl or None, allow_pickle=allow_pickle
    )


def _to_uint8(images):
    import numpy as np

    return np.round((np.clip(np.asarray(images, np.float32), -1, 1) + 1) * 127.5).astype(np.uint8)


def _save_png(array, path: str) -> None:
    from PIL import Image

    tmp = path + ".tmp"
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)  # a killed run never leaves a truncated image that counts as done


def _save_npy(array, path: str) -> None:
    import numpy as np

    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def save_grid(paths: list[str], path: str) -> None:
    """Tiles the images at ``paths`` (same size) into a near-square grid PNG."""
    import numpy as np
    from PIL import Image

    images = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    h, w, _ = images[0].shape
    grid = np.zeros((rows * h, cols * w, 3), np.uint8)
    for k, img in enumerate(images):
        r, c = divmod(k, cols)
        grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = img
    _save_png(grid, path)


def image_path(out_dir: str, index: int) -> str:
    return os.path.join(out_dir, f"{index:06d}.png")


def shard_path(out_dir: str, start: int, end: int) -> str:
    return os.path.join(out_dir, "latents", f"{start:06d}-{end:06d}.npy")


def run(config) -> dict:
    """Generates what is missing in ``config.out_dir``; returns counts of done and skipped."""
    import jax
    import numpy as np
    from tqdm import tqdm

    from spin_jax.diffusion import generate
    from spin_jax.diffusion.generate import default_mesh, place_params

    if not config.out_dir:
        raise ValueError("config.out_dir is empty: give an output folder (--config.out_dir=DIR)")
    want_images, want_latents = bool(config.output.images), bool(config.output.latents)
    if not (want_images or want_latents):
        raise ValueError("config.output.images and config.output.latents are both off")
    bs = int(config.sample.batch_size)
    if bs < 1:
        raise ValueError(f"config.sample.batch_size={bs} must be >= 1")
    prompts = read_prompts(config.prompts)
    sd = load_model(
        config.model.path,
        config.model.dtype,
        config.model.attention_impl,
        bool(config.model.allow_pickle),
    )
    out_dir = config.out_dir
    os.makedirs(os.path.join(out_dir, "latents") if want_latents else out_dir, exist_ok=True)

    # Work: aligned chunks of batch_size prompts, round-robin over processes.
    work = []
    n = len(prompts)
    mine = 0
    for c, start in enumerate(range(0, n, bs)):
        if c % jax.process_count() != jax.process_index():
            continue
        mine += min(start + bs, n) - start
        end = min(start + bs, n)
        need_shard = want_latents and not os.path.isfile(shard_path(out_dir, start, end))
        todo = [
            i
            for i in range(start, end)
            if need_shard or (want_images and not os.path.isfile(image_path(out_dir, i)))
        ]
        if todo:
            work.append((start, end, todo, need_shard))
    skipped = mine - sum(len(todo) for _, _, todo, _ in work)

    mesh = default_mesh()
    params = place_params(sd.params, mesh)
    key = jax.random.key(int(config.seed))
    neg = None
    if config.sample.negative_prompt:
        neg = sd.tokenize([config.sample.negative_prompt])
    done = 0
    main = jax.process_index() == 0
    for start, end, todo, need_shard in tqdm(work, desc="sample", unit="batch", disable=not main):
        # Always a full batch (the last index repeated), so every call reuses one compilation.
        ids = np.array(todo + [todo[-1]] * (bs - len(todo)), np.int32)
        out = generate(
            sd,
            params,
            sd.tokenize([prompts[i] for i in ids]),
            key,
            num_steps=int(config.sample.num_steps),
            guidance_scale=float(config.sample.guidance_scale),
            height=int(config.sample.height),
            width=int(config.sample.width),
            decode=want_images,
            negative_prompt_ids=neg,
            sampler=config.sample.sampler,
            mesh=mesh,
            example_ids=ids,
            return_latents=want_images and want_latents,
        )
        if want_images and want_latents:
            images, latents = out
        elif want_images:
            images, latents = out, None
        else:
            images, latents = None, out
        if images is not None:
            pixels = _to_uint8(images)
            for k, i in enumerate(todo):
                _save_png(pixels[k], image_path(out_dir, i))
        if need_shard:
            _save_npy(np.asarray(latents, np.float32)[: len(todo)], shard_path(out_dir, start, end))
        done += len(todo)

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("sample_done")
    if main and want_images:
        records = [
            {"file_name": os.path.basename(image_path(out_dir, i)), "text": p}
            for i, p in enumerate(prompts)
            if os.path.isfile(image_path(out_dir, i))
        ]
        tmp = os.path.join(out_dir, "metadata.jsonl.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        os.replace(tmp, os.path.join(out_dir, "metadata.jsonl"))
        grid = [image_path(out_dir, i) for i in range(min(int(config.output.grid_size), n))]
        grid = [p for p in grid if os.path.isfile(p)]
        if grid:
            save_grid(grid, os.path.join(out_dir, "grid.png"))
    return {"prompts": n, "generated": done, "skipped": skipped}


def main(argv):
    del argv
    from spin_jax import parallel

    parallel.init_distributed()  # before any other JAX call
    logging.getLogger("spin_jax").setLevel(logging.INFO)
    try:
        summary = run(_CONFIG.value)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps(summary))


if __name__ == "__main__":
    # Defined here, so tests can import run() next to other launchers' flags.
    _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:preset]).")
    flags.mark_flags_as_required(["config"])
    app.run(main)
