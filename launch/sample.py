r"""Generates one image per prompt with a diffusers-format Stable Diffusion model.

  python launch/sample.py --config=configs/sample.py \
      --config.model.path=/models/stable-diffusion-v1-5 \
      --config.prompts=prompts.txt --config.out_dir=samples/sd15

Writes <out_dir>/<i:06d>.png per prompt, <out_dir>/grid.png, <out_dir>/metadata.jsonl and, with
--config.output.latents=True, the final latents as <out_dir>/latents/<start>-<end>.npy shards.
Rerunning the same command continues a partial folder: prompts whose files exist are skipped.
The folder records what its outputs depend on in <out_dir>/settings.json (a hash of the prompt
list, seed, sampler, steps, guidance, negative prompt, size, dtype and a fingerprint of the model
folder); a rerun with other settings is refused, naming the fields that differ: use another
folder, or --overwrite, which deletes the old outputs first. One run writes a folder at a time
(<out_dir>/.lock). SIGTERM or Ctrl-C finishes the batch in flight, keeps every finished image and
exits with status 75 (spin_jax.interrupt.EXIT_INTERRUPTED); a second Ctrl-C stops at once.
On several hosts, start one process per host; each takes its share of the batches.

A LoRA adapter (diffusers, peft or kohya format, e.g. what launch/export.py writes for a LoRA
run) is merged into the UNet with --lora=PATH (a .safetensors file or a folder holding
pytorch_lora_weights.safetensors), or the config field model.lora; its file is part of the
recorded settings.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from spin_jax import cli  # noqa: E402

cli.quiet_start()  # before jax / transformers are imported

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

PROMPT_FIELDS = ("text", "prompt", "caption")


def read_prompts(path: str) -> list[str]:
    """Prompts from a text file (one per line, blank lines skipped) or JSON lines."""
    if not path:
        raise ValueError("config.prompts is empty: give a prompts file (--config.prompts=FILE)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompts file not found: {path}")
    lines = [(n, line.strip()) for n, line in enumerate(cli.read_lines(path), start=1)]
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
def load_model(path: str, dtype: str, attention_impl: str, allow_pickle: bool,
               components: str = "", param_dtype: str = "float32"):  # fmt: skip
    import jax.numpy as jnp

    from spin_jax.models import load_pretrained

    if not path:
        raise ValueError("config.model.path is empty: give a diffusers-format model folder")
    dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
    if dtype not in dtypes:
        raise ValueError(f"config.model.dtype={dtype!r} is not one of {sorted(dtypes)}")
    return load_pretrained(path, dtypes[dtype], attention_impl=attention_impl or None,
                           allow_pickle=allow_pickle, components=components or None,
                           param_dtype=param_dtype)  # fmt: skip


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


SETTINGS_SAMPLE_FIELDS = (
    "sampler",
    "num_steps",
    "timesteps",
    "guidance_scale",
    "negative_prompt",
    "height",
    "width",
)
_IMAGE_NAME = re.compile(r"^\d{6}\.png$")
_OTHER_OUTPUTS = ("latents", "metadata.jsonl", "grid.png", "settings.json")


def lora_path(config) -> str:
    """The LoRA file to merge into the UNet ("" for none): config field ``model.lora``."""
    return str(config.model.get("lora", "") or "")


def settings_of(config, prompts: list[str]) -> dict:
    """What the images and latents of ``config.out_dir`` depend on (recorded in settings.json)."""
    from spin_jax.runlock import folder_fingerprint

    digest = hashlib.sha256(json.dumps(prompts, ensure_ascii=False).encode()).hexdigest()
    extra = {}
    if lora_path(config):
        from spin_jax.models import lora

        file = lora.lora_file(lora_path(config))
        with open(file, "rb") as f:
            extra["lora"] = {"path": os.path.abspath(file),
                             "sha256": hashlib.sha256(f.read()).hexdigest()[:32]}  # fmt: skip
    return {
        **extra,
        "prompts": {"count": len(prompts), "sha256": digest[:32]},
        "seed": int(config.seed),
        "sample": {k: _plain(config.sample.get(k)) for k in SETTINGS_SAMPLE_FIELDS},
        "model": {
            "path": os.path.abspath(config.model.path),
            "fingerprint": folder_fingerprint(config.model.path),
            "components": _components_fingerprint(config),
            "dtype": config.model.dtype,
            # Only when not the default, so folders written before the field existed resume.
            **({"param_dtype": pd} if (pd := _param_dtype(config)) != "float32" else {}),
        },
    }


def _param_dtype(config) -> str:
    return str(config.model.get("param_dtype", "float32"))


def _components_fingerprint(config) -> str | None:
    """A single-file model's components folder (tokenizers, configs) is part of the model."""
    from spin_jax.runlock import folder_fingerprint

    comp = config.model.get("components", "")
    return folder_fingerprint(comp) if comp else None


def _plain(value):
    return list(value) if isinstance(value, tuple | list) else value


def existing_outputs(out_dir: str) -> list[str]:
    """The files and folders of ``out_dir`` this script writes (what --overwrite deletes)."""
    if not os.path.isdir(out_dir):
        return []
    return [
        os.path.join(out_dir, name)
        for name in sorted(os.listdir(out_dir))
        if _IMAGE_NAME.match(name)
        or name in _OTHER_OUTPUTS
        or (name.endswith(".tmp") and (_IMAGE_NAME.match(name[:-4]) or name[:-4] in _OTHER_OUTPUTS))
    ]


def remove_outputs(out_dir: str) -> int:
    """Deletes what ``existing_outputs`` lists (not the folder, nor files of others)."""
    import shutil

    paths = existing_outputs(out_dir)
    for path in paths:
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    return len(paths)


def check_config(config) -> None:
    """Every field the run uses, before any work."""
    from spin_jax.diffusion import samplers

    if not config.out_dir:
        raise ValueError("config.out_dir is empty: give an output folder (--config.out_dir=DIR)")
    if not (config.output.images or config.output.latents):
        raise ValueError("config.output.images and config.output.latents are both off")
    if int(config.sample.batch_size) < 1:
        raise ValueError(f"config.sample.batch_size={config.sample.batch_size} must be >= 1")
    if config.sample.sampler != "auto" and config.sample.sampler not in samplers.SAMPLERS:
        raise ValueError(
            f"config.sample.sampler={config.sample.sampler!r} is not one of "
            f"{['auto', *sorted(samplers.SAMPLERS)]}"
        )
    ts = list(config.sample.get("timesteps") or ())
    if ts and (any(not isinstance(t, int) for t in ts) or ts != sorted(set(ts), reverse=True)):
        raise ValueError(
            f"config.sample.timesteps={ts}: must be distinct integers in descending order "
            "(e.g. DMD2's 999,749,499,249)"
        )
    if int(config.sample.num_steps) < 1:
        raise ValueError(f"config.sample.num_steps={config.sample.num_steps} must be >= 1")
    for field in ("height", "width"):
        if int(config.sample[field]) < 8 or int(config.sample[field]) % 8:
            raise ValueError(
                f"config.sample.{field}={config.sample[field]} must be a positive multiple of 8"
            )
    if config.model.dtype not in ("float32", "bfloat16"):
        raise ValueError(
            f"config.model.dtype={config.model.dtype!r} is not one of ['bfloat16', 'float32']"
        )
    from spin_jax.models.pipeline import check_param_dtype

    check_param_dtype(_param_dtype(config), field="config.model.param_dtype")
    if not config.model.path:
        raise ValueError("config.model.path is empty: give a diffusers-format model folder")
    if not os.path.exists(config.model.path):
        raise FileNotFoundError(
            f"config.model.path: model (directory or single file) not found: {config.model.path}"
        )
    if lora_path(config):
        from spin_jax.models import lora

        lora.lora_file(lora_path(config))  # exists, and is a .safetensors file


def run(config, *, overwrite: bool = False) -> dict:
    """Generates what is missing in ``config.out_dir``; returns counts of done and skipped.

    ``overwrite`` deletes the folder's earlier outputs first. ``interrupted`` in the result is
    True when SIGTERM / SIGINT stopped the run between batches (finished images are kept);
    ``finished`` of ``total`` prompts of this process are then done.
    """
    import jax

    from spin_jax import runlock

    prompts = read_prompts(config.prompts)
    check_config(config)
    out_dir = config.out_dir
    main = jax.process_index() == 0
    with runlock.acquire(out_dir, what="output folder", enabled=main):
        if main and overwrite:
            removed = remove_outputs(out_dir)
            if removed:
                logging.getLogger("spin_jax").info("--overwrite: removed %d outputs", removed)
        if main:
            outputs = [p for p in existing_outputs(out_dir) if not p.endswith("settings.json")]
            runlock.check_settings(
                out_dir, settings_of(config, prompts), what="output folder",
                has_outputs=bool(outputs),
            )  # fmt: skip
        _sync("sample_settings")
        return _generate(config, prompts)


def _sync(name: str) -> None:
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _generate(config, prompts: list[str]) -> dict:
    import jax
    import numpy as np
    from tqdm import tqdm

    from spin_jax import interrupt
    from spin_jax.diffusion import generate
    from spin_jax.diffusion.generate import default_mesh, place_params

    out_dir = config.out_dir
    want_images, want_latents = bool(config.output.images), bool(config.output.latents)
    bs = int(config.sample.batch_size)
    sd = load_model(
        config.model.path,
        config.model.dtype,
        config.model.attention_impl,
        bool(config.model.allow_pickle),
        config.model.get("components", ""),
        _param_dtype(config),
    )
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
    params = sd.params
    if lora_path(config):
        from spin_jax.models import lora

        adapter, scale = lora.from_file(lora_path(config), sd.params["unet"])
        params = dict(params, unet=lora.merge_jit(sd.params["unet"], adapter, scale))
    params = place_params(params, mesh)
    key = jax.random.key(int(config.seed))
    neg = None
    if config.sample.negative_prompt:
        neg = sd.tokenize([config.sample.negative_prompt])
    done = 0
    main = jax.process_index() == 0
    with interrupt.Guard() as guard:
        bar = tqdm(work, desc="sample", unit="batch", disable=not main)
        for start, end, todo, need_shard in bar:
            if guard.requested:
                break  # the batch in flight is written; stop before the next one
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
                sampler=None if config.sample.sampler == "auto" else config.sample.sampler,
                timesteps=list(config.sample.timesteps) or None,
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
                latents = np.asarray(latents, np.float32)[: len(todo)]
                _save_npy(latents, shard_path(out_dir, start, end))
            done += len(todo)
        bar.close()
    summary = {"prompts": n, "generated": done, "skipped": skipped, "interrupted": False}
    if guard.requested:
        # Other processes may be elsewhere in their share: no barrier; a rerun completes it.
        return {**summary, "interrupted": True, "finished": skipped + done, "total": mine}

    _sync("sample_done")
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
    return summary


def main(argv):
    del argv
    from spin_jax import interrupt, parallel, runlock

    parallel.init_distributed()  # before any other JAX call
    logging.getLogger("spin_jax").setLevel(logging.INFO)
    config = _CONFIG.value
    if _LORA.value:
        with config.unlocked():
            config.model.lora = _LORA.value
    try:
        summary = run(config, overwrite=_OVERWRITE.value)
    except (ValueError, FileNotFoundError, runlock.LockedError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if summary["interrupted"]:
        interrupt.exit_interrupted(
            f"interrupted; {summary['finished']} of {summary['total']} images done; "
            "rerun the same command to resume"
        )
    print(json.dumps(summary))


if __name__ == "__main__":
    # Defined here, so tests can import run() next to other launchers' flags.
    _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:preset]).")
    _OVERWRITE = flags.DEFINE_bool(
        "overwrite", False, "Delete the outputs already in config.out_dir first."
    )
    _LORA = flags.DEFINE_string(
        "lora", "", "A LoRA file or folder to merge into the UNet (sets config.model.lora)."
    )
    flags.mark_flags_as_required(["config"])
    cli.run(main)
