"""Input throughput at 512x512 on the trainer's own path: records/s from JPEG bytes (the latent
cache build: decode, resize, crop, encode) and from cached latents (what every train step reads).

    python bench/bench_data.py --out=bench_data.jsonl [--num_images=192 --batch_size=32]

Writes JSON lines: one per (path, num_threads) and a summary line that turns the measured
per-image CPU cost into CPU cores per GPU. A SPIN / DPO step on one H100 trains about
70 pairs/s; without the latent cache that is about 70 real images/s to decode per GPU (DPO: 140),
with the cache the pipeline only reads moments (+ the synthetic latent) and tokenizes.

The synthetic JPEGs are smooth random images (upsampled noise plus grain, quality 90) of
512-1024 px, about as costly to decode as photos of those sizes. JPEG decoding is the cost.
"""

from __future__ import annotations

import io
import json
import os
import sys
import tempfile
import time

import numpy as np
from absl import app, flags
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "", "JSON lines output file (also printed).")
flags.DEFINE_integer("num_images", 192, "Distinct JPEGs in the synthetic dataset.")
flags.DEFINE_integer("batch_size", 32, "Per-process batch size.")
flags.DEFINE_integer("batches", 12, "Timed batches per configuration (after 2 warm-up batches).")
flags.DEFINE_list("thread_counts", ["1", "2"], "decoding threads of the cache build to try.")
flags.DEFINE_float("pairs_per_s", 70.0, "Trainer consumption per GPU (pairs/s).")

SIZES = [(512, 512), (768, 768), (640, 512), (768, 512), (1024, 1024), (512, 768)]


def synthetic_jpeg(rng: np.random.Generator, w: int, h: int) -> bytes:
    low = rng.integers(0, 256, (h // 32 + 1, w // 32 + 1, 3), dtype=np.uint8)
    img = Image.fromarray(low).resize((w, h), Image.Resampling.BICUBIC)
    arr = np.asarray(img).astype(np.int16) + rng.integers(-12, 13, (h, w, 3), dtype=np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_dataset(path: str, n: int) -> list[int]:
    rng = np.random.default_rng(0)
    sizes = []
    with open(os.path.join(path, "metadata.jsonl"), "w") as meta:
        for i in range(n):
            w, h = SIZES[i % len(SIZES)]
            data = synthetic_jpeg(rng, w, h)
            sizes.append(len(data))
            with open(os.path.join(path, f"{i:05d}.jpg"), "wb") as f:
                f.write(data)
            words = " ".join(
                rng.choice(["a", "red", "cat", "on", "the", "moon", "painting", "of"], 12)
            )
            meta.write(json.dumps({"file_name": f"{i:05d}.jpg", "text": words}) + "\n")
    return sizes


def make_tokenizer(path: str):
    try:
        from spin_jax.models.tiny import write_clip_tokenizer
        from spin_jax.models.tokenizer import load_tokenizer
    except ImportError:
        return lambda texts: np.zeros((len(texts), 77), np.int32)
    write_clip_tokenizer(path, ["red", "cat", "moon", "painting"])
    return load_tokenizer(path)


def emit(line: dict, out) -> None:
    text = json.dumps(line, sort_keys=True)
    print(text, flush=True)
    if out is not None:
        out.write(text + "\n")
        out.flush()


def _encode(images):
    # A stand-in for the VAE (only reading and decoding are timed): moments of 4x64x64 latents.
    b = images.shape[0]
    x = images.reshape(b, 64, 8, 64, 8, 3).mean(axis=(2, 4))
    m = np.concatenate([x, x[..., :1]], axis=-1)
    return m, m - 8


def main(argv):
    del argv
    from spin_jax.data import SyntheticStore, open_latent_cache, transforms
    from spin_jax.data.imagefolder import ImageFolderSource

    out = open(FLAGS.out, "w") if FLAGS.out else None
    tmp = tempfile.mkdtemp(prefix="bench_data_")
    sizes = make_dataset(tmp, FLAGS.num_images)
    src = ImageFolderSource(tmp)
    tokenize = make_tokenizer(os.path.join(tmp, "tokenizer"))
    env = {
        "cpu_count": os.cpu_count(),
        "num_images": len(src),
        "mean_jpeg_kb": round(float(np.mean(sizes)) / 1024, 1),
    }

    # One core: decode + resize + crop of one image (the unit of CPU cost).
    data = [open(src.file_path(i), "rb").read() for i in range(len(src))]
    t0 = time.perf_counter()
    for d in data:
        transforms.load_image(d, 512, min_size=256)
    ms_per_image = 1000 * (time.perf_counter() - t0) / len(data)
    t0 = time.perf_counter()
    for d in data:
        transforms.load_image(d, 512, min_size=256, draft=False)
    ms_no_draft = 1000 * (time.perf_counter() - t0) / len(data)
    emit({"bench": "decode_one_core", "ms_per_image": round(ms_per_image, 2),
          "ms_per_image_without_draft": round(ms_no_draft, 2), **env}, out)  # fmt: skip

    results = {}
    for threads in (int(t) for t in FLAGS.thread_counts):
        cache = open_latent_cache(os.path.join(tmp, f"cache_{threads}"), src, resolution=512,
                                  vae_fingerprint="bench")  # fmt: skip
        t0 = time.perf_counter()
        cache.build(src, _encode, batch_size=16, num_threads=threads, progress=False)
        rate = len(src) / (time.perf_counter() - t0)
        results[("pixels", threads)] = rate
        emit({"bench": "cache_build", "path": "pixels", "num_threads": threads,
              "records_per_s": round(rate, 1), **env}, out)  # fmt: skip

    # What a SPIN step reads: moments of the real image (both flips) + the synthetic latent,
    # and the token ids, for a batch of random examples.
    store = SyntheticStore(os.path.join(tmp, "syn"), num_records=len(src), latent_shape=(64, 64, 4),
                           dataset_fingerprint=src.fingerprint(), model_fingerprint="bench",
                           sampler={}, seed=0)  # fmt: skip
    for k in store.pending_shards():
        store.write_shard(k, np.zeros((len(store.shard_indices(k)), 64, 64, 4), np.float32))
    rng = np.random.default_rng(0)
    captions = [src.text(i) for i in range(len(src))]
    n = 0
    t0 = time.perf_counter()
    for _ in range(FLAGS.batches):
        rows = rng.integers(0, len(src), FLAGS.batch_size)
        cache.read(rows, field="image")
        store.read(rows)
        tokenize([captions[r] for r in rows])
        n += len(rows)
    rate = n / (time.perf_counter() - t0)
    results[("latents", 1)] = rate
    emit({"bench": "batch_read", "path": "latents", "records_per_s": round(rate, 1), **env}, out)

    need = FLAGS.pairs_per_s
    best_pixels = max(v for (p, _), v in results.items() if p == "pixels")
    best_latents = results[("latents", 1)]
    emit(
        {
            "bench": "summary",
            "trainer_images_per_s_per_gpu": need,
            # CPU seconds per image x images per second = cores kept busy decoding.
            "cores_per_gpu_decoding_spin_sft": round(need * ms_per_image / 1000, 2),
            "cores_per_gpu_decoding_dpo": round(2 * need * ms_per_image / 1000, 2),
            "best_pixels_records_per_s": round(best_pixels, 1),
            "best_latents_records_per_s": round(best_latents, 1),
            "latent_path_headroom_x": round(best_latents / need, 1),
            **env,
        },
        out,
    )
    if out is not None:
        out.close()


if __name__ == "__main__":
    app.run(main)
