"""Prepares data once: the TFDS (array_record) Pick-a-Pic dataset and the VAE latent cache.

    # Pick-a-Pic parquet -> TFDS dataset, then the latent cache of its winners at 512px:
    python launch/prepare_data.py --source=pickapic --path=/data/pickapic_v2 \
        --tfds_dir=/data/tfds --model=/models/stable-diffusion-v1-5 --cache_dir=/data/latents

    # Your own images (a folder with metadata.jsonl):
    python launch/prepare_data.py --source=imagefolder --path=/data/mine \
        --model=/models/sd15 --cache_dir=/data/latents

The cache lands in <cache_dir>/<hash of its settings>/ and is what the trainer reuses when it is
given the same data, model VAE, resolution and flip settings (config.data.cache_dir). A killed
run continues with the unfinished shards. With several hosts, run it on every host (one process
per host, --distributed): each builds its share of the shards into the shared folder.
Records that cannot be used are listed in <cache>/skipped.jsonl (index, file, reason, detail);
the first few are printed. SIGTERM or Ctrl-C stops after the shard in flight (finished shards are
kept) and exits with status 75: rerun the same command to continue.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from spin_jax import cli  # noqa: E402

cli.quiet_start()  # before jax / transformers are imported

from absl import flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum(
    "source", "pickapic", ["imagefolder", "pickapic", "tfds"], "Kind of dataset at --path."
)
flags.DEFINE_string("path", None, "Dataset folder (parquet shards, imagefolder or TFDS data_dir).")
flags.DEFINE_enum(
    "view", "winners", ["winners", "pairs", "kto"], "Records: winners (SFT/SPIN), pairs (DPO), kto."
)
flags.DEFINE_string("split", "train", "Pick-a-Pic / TFDS split.")
flags.DEFINE_string("caption_field", "text", "imagefolder: caption key in metadata.jsonl.")
flags.DEFINE_string(
    "tfds_dir", "", "If set (with --source=pickapic): build the TFDS dataset into this data_dir."
)
flags.DEFINE_string("model", "", "diffusers-format Stable Diffusion folder (for the latent cache).")
flags.DEFINE_string("cache_dir", "", "If set: build the latent cache under this folder.")
flags.DEFINE_integer("resolution", 512, "Square crop size in pixels.")
flags.DEFINE_bool("flip", True, "Also cache the mirrored images (for random flips in training).")
flags.DEFINE_enum("resize_filter", "bicubic", ["bilinear", "bicubic", "lanczos"], "Resize filter.")
flags.DEFINE_bool("draft", True, "Decode large JPEGs at reduced scale before resizing.")
flags.DEFINE_integer(
    "min_size", 0, "Skip images whose shorter side is below this (0: resolution/2)."
)
flags.DEFINE_enum("dtype", "float16", ["float16", "float32"], "Storage dtype of the moments.")
flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16"], "VAE compute dtype.")
flags.DEFINE_integer("shard_size", 256, "Records per cache shard file.")
flags.DEFINE_integer(
    "batch_size", 32, "Images per VAE call (a multiple of the local device count)."
)
flags.DEFINE_integer("num_threads", 8, "Threads decoding images.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host).")
flags.DEFINE_enum(
    "empty_caption",
    "skip",
    ["skip", "unconditional"],
    "Records with an empty caption: skipped and counted, or kept as unconditional examples.",
)


def make_encode_fn(sd, batch_size: int):
    """jit(vae_encode) with the batch split over this process's local devices."""
    import jax
    import numpy as np
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    devices = jax.local_devices()
    if batch_size % len(devices):
        raise ValueError(
            f"--batch_size={batch_size} must be a multiple of the {len(devices)} local devices"
        )
    mesh = jax.make_mesh((len(devices),), ("data",), axis_types=(AxisType.Auto,), devices=devices)
    batch = NamedSharding(mesh, P("data"))
    params = jax.device_put(sd.params["vae"], NamedSharding(mesh, P()))
    encode = jax.jit(
        sd.vae_encode, in_shardings=(NamedSharding(mesh, P()), batch), out_shardings=batch
    )

    def encode_fn(images):
        mean, logvar = encode(params, jax.device_put(np.asarray(images, np.float32), batch))
        return np.asarray(mean), np.asarray(logvar)

    return encode_fn


def prepare(
    *,
    source: str,
    path: str,
    view: str = "winners",
    split: str = "train",
    caption_field: str = "text",
    tfds_dir: str = "",
    model: str = "",
    cache_dir: str = "",
    resolution: int = 512,
    flip: bool = True,
    resize_filter: str = "bicubic",
    draft: bool = True,
    min_size: int = 0,
    dtype: str = "float16",
    compute_dtype: str = "float32",
    shard_size: int = 256,
    batch_size: int = 32,
    num_threads: int = 8,
    empty_caption: str = "skip",
    stop=None,
) -> dict:
    """Does the work of the command line; returns a summary dict (``"interrupted": True``
    when ``stop()`` ended the cache build early)."""
    from spin_jax.data import open_latent_cache, open_source, params_fingerprint

    if not path:
        raise ValueError("--path is required")
    if cache_dir and not model:
        raise ValueError("--cache_dir needs --model (the VAE that encodes the images)")
    if not cache_dir and not tfds_dir:
        raise ValueError(
            "nothing to do: give --cache_dir (latent cache) and/or --tfds_dir (TFDS build)"
        )
    if tfds_dir and source != "pickapic":
        raise ValueError("--tfds_dir builds from Pick-a-Pic parquet shards: use --source=pickapic")
    summary: dict = {}
    src = open_source(source, path, view=view, split=split, caption_field=caption_field)
    summary["source"] = {"records": len(src), **src.summary()}
    print(f"{src!r}: {summary['source']}", flush=True)

    if tfds_dir:
        from spin_jax.data.tfds_pickapic import build_tfds

        t0 = time.time()
        summary["tfds_dir"] = build_tfds(path, tfds_dir, view=view)
        print(f"TFDS dataset ready at {summary['tfds_dir']} ({time.time() - t0:.0f}s)", flush=True)

    if cache_dir:
        import jax
        import jax.numpy as jnp

        from spin_jax.models import load_pretrained

        sd = load_pretrained(
            model, dtype=jnp.bfloat16 if compute_dtype == "bfloat16" else jnp.float32
        )
        cache = open_latent_cache(
            cache_dir,
            src,
            resolution=resolution,
            vae_fingerprint=params_fingerprint(sd.params["vae"]),
            flip=flip,
            resize_filter=resize_filter,
            draft=draft,
            min_size=min_size or None,
            dtype=dtype,
            shard_size=shard_size,
            empty_caption=empty_caption,
        )
        print(
            f"latent cache {cache.dir}: {len(cache.missing_shards())} of {cache.num_shards} shards to build"
        )
        t0 = time.time()
        built = cache.build(
            src,
            make_encode_fn(sd, batch_size),
            batch_size=batch_size,
            num_threads=num_threads,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            progress=jax.process_index() == 0,
            stop=stop,
        )
        seconds = time.time() - t0
        summary["cache"] = {
            "dir": cache.dir,
            "built": built,
            "seconds": round(seconds, 1),
            "images_per_s": round(built.get("records", 0) / max(seconds, 1e-9), 1),
            "complete": cache.is_complete(),
            "status": cache.summary(),
            "shards_done": cache.num_shards - len(cache.missing_shards()),
            "shards": cache.num_shards,
        }
        if built.get("interrupted"):
            summary["interrupted"] = True
    return summary


def main(argv):
    del argv
    from spin_jax import interrupt

    if FLAGS.distributed:
        import jax

        jax.distributed.initialize()
    with interrupt.Guard() as guard:
        try:
            summary = _prepare_from_flags(lambda: guard.requested)
        except (ValueError, FileNotFoundError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
    if summary.get("interrupted"):
        c = summary["cache"]
        interrupt.exit_interrupted(
            f"interrupted; {c['shards_done']} of {c['shards']} latent cache shards done; "
            "rerun the same command to resume"
        )
    print(json.dumps(summary, indent=2, sort_keys=True))


def _prepare_from_flags(stop) -> dict:
    return prepare(
        source=FLAGS.source,
        path=FLAGS.path,
        view=FLAGS.view,
        split=FLAGS.split,
        caption_field=FLAGS.caption_field,
        tfds_dir=FLAGS.tfds_dir,
        model=FLAGS.model,
        cache_dir=FLAGS.cache_dir,
        resolution=FLAGS.resolution,
        flip=FLAGS.flip,
        resize_filter=FLAGS.resize_filter,
        draft=FLAGS.draft,
        min_size=FLAGS.min_size,
        dtype=FLAGS.dtype,
        compute_dtype=FLAGS.compute_dtype,
        shard_size=FLAGS.shard_size,
        batch_size=FLAGS.batch_size,
        num_threads=FLAGS.num_threads,
        empty_caption=FLAGS.empty_caption,
        stop=stop,
    )


if __name__ == "__main__":
    flags.mark_flag_as_required("path")
    cli.run(main)
