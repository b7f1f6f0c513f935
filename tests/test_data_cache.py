"""Latent cache (build, reuse, invalidation, resume) and the synthetic-sample store."""

import io
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from spin_jax.data import (
    SyntheticStore,
    generation_work,
    open_latent_cache,
    params_fingerprint,
    sample_latents,
)
from spin_jax.data import transforms as T
from spin_jax.data.imagefolder import ImageFolderSource

RES = 16


def make_folder(path, n, bad=()):
    os.makedirs(path, exist_ok=True)
    lines = []
    for i in range(n):
        name = f"{i:03d}.png"
        if i in bad:
            data = b"broken"
        else:
            arr = np.random.default_rng(i).integers(0, 256, (20, 24 + i, 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="PNG")
            data = buf.getvalue()
        with open(os.path.join(path, name), "wb") as f:
            f.write(data)
        lines.append(json.dumps({"file_name": name, "text": f"prompt {i}"}))
    with open(os.path.join(path, "metadata.jsonl"), "w") as f:
        f.write("\n".join(lines))
    return ImageFolderSource(path)


class CountingEncoder:
    """Block-mean 'VAE' that counts images; can fail after a number of calls (a kill)."""

    def __init__(self, fail_after=None):
        self.images = 0
        self.calls = 0
        self.fail_after = fail_after

    def __call__(self, images):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated kill")
        self.calls += 1
        self.images += len(images)
        b = images.shape[0]
        x = images.reshape(b, RES // 4, 4, RES // 4, 4, 3).mean(axis=(2, 4))
        mean = np.concatenate([x, -x[..., :1]], axis=-1)
        return mean, np.full_like(mean, -3.0) + x[..., :1]


def test_build_read_reuse(tmp_path):
    src = make_folder(str(tmp_path / "f"), 7, bad={3})
    enc = CountingEncoder()
    cache = open_latent_cache(
        str(tmp_path / "c"), src, resolution=RES, vae_fingerprint="vae0", shard_size=3
    )
    assert cache.missing_shards() == [0, 1, 2]
    counts = cache.build(src, enc, batch_size=4, progress=False)
    assert counts == {
        "shards_done_before": 0,
        "shards_built": 3,
        "records": 7,
        "ok": 6,
        "corrupt_image": 1,
    }
    assert cache.is_complete() and cache.summary() == {"ok": 6, "corrupt_image": 1}
    assert enc.images == 4 * enc.calls  # padded to a fixed batch
    for i in range(7):
        if i == 3:
            assert cache.status(i) == "corrupt_image"
            continue
        assert cache.status(i) is None
        img, _ = T.load_image(open(src.file_path(i), "rb").read(), RES, min_size=RES // 2)
        both = T.to_float(np.stack([img, T.hflip(img)]))
        ref_mean, ref_logvar = CountingEncoder()(both)
        mean, logvar = cache.moments(i)
        assert mean.dtype == np.float16 and mean.shape == (2, 4, 4, 4)
        np.testing.assert_allclose(mean, ref_mean, atol=2e-3)
        np.testing.assert_allclose(logvar, ref_logvar, atol=5e-3)
    m, lv = cache.read([0, 6, 2])
    assert m.shape == lv.shape == (3, 2, 4, 4, 4)
    np.testing.assert_array_equal(m[1], cache.moments(6)[0])
    # Reopened with the same settings: same folder, nothing to encode.
    again = open_latent_cache(
        str(tmp_path / "c"), src, resolution=RES, vae_fingerprint="vae0", shard_size=3
    )
    assert again.dir == cache.dir and again.is_complete()
    enc2 = CountingEncoder()
    assert again.build(src, enc2, progress=False) == {"shards_done_before": 3}
    assert enc2.calls == 0


@pytest.mark.parametrize(
    "change",
    [
        {"resolution": 8},
        {"vae_fingerprint": "vae1"},
        {"flip": False},
        {"resize_filter": "lanczos"},
        {"dtype": "float32"},
    ],
)
def test_any_key_change_invalidates(tmp_path, change):
    src = make_folder(str(tmp_path / "f"), 4)
    base = dict(resolution=RES, vae_fingerprint="vae0", shard_size=4)
    cache = open_latent_cache(str(tmp_path / "c"), src, **base)
    cache.build(src, CountingEncoder(), progress=False)
    changed = open_latent_cache(str(tmp_path / "c"), src, **{**base, **change})
    assert changed.dir != cache.dir and changed.missing_shards() == [0]


def test_dataset_change_invalidates_and_tampered_manifest_refused(tmp_path):
    src = make_folder(str(tmp_path / "f"), 4)
    cache = open_latent_cache(str(tmp_path / "c"), src, resolution=RES, vae_fingerprint="v")
    cache.build(src, CountingEncoder(), progress=False)
    with open(os.path.join(str(tmp_path / "f"), "metadata.jsonl"), "a") as f:
        f.write('\n{"file_name": "000.png", "text": "more"}')
    grown = ImageFolderSource(str(tmp_path / "f"))
    assert (
        open_latent_cache(str(tmp_path / "c"), grown, resolution=RES, vae_fingerprint="v").dir
        != cache.dir
    )
    with pytest.raises(ValueError, match="source has 5 records"):
        cache.build(grown, CountingEncoder(), progress=False)
    manifest = os.path.join(cache.dir, "manifest.json")
    data = json.load(open(manifest))
    data["key"]["vae"] = "edited"
    json.dump(data, open(manifest, "w"))
    with pytest.raises(ValueError, match="vae: stored 'edited', now 'v'"):
        open_latent_cache(str(tmp_path / "c"), src, resolution=RES, vae_fingerprint="v")


def test_killed_build_resumes(tmp_path):
    src = make_folder(str(tmp_path / "f"), 10)
    root = str(tmp_path / "c")
    cache = open_latent_cache(
        root, src, resolution=RES, vae_fingerprint="v", shard_size=2, flip=False
    )
    with pytest.raises(KeyboardInterrupt):
        cache.build(src, CountingEncoder(fail_after=2), batch_size=2, progress=False)
    assert cache.missing_shards() == [2, 3, 4]
    done = {
        f: os.path.getmtime(os.path.join(cache.dir, f))
        for f in os.listdir(cache.dir)
        if f.startswith("0000")
    }
    enc = CountingEncoder()
    reopened = open_latent_cache(
        root, src, resolution=RES, vae_fingerprint="v", shard_size=99, flip=False
    )
    assert reopened.shard_size == 2  # from the manifest
    counts = reopened.build(src, enc, batch_size=2, progress=False)
    assert counts["shards_built"] == 3 and enc.images == 6
    assert all(os.path.getmtime(os.path.join(cache.dir, f)) == t for f, t in done.items())
    assert reopened.is_complete()


def test_build_split_over_processes(tmp_path):
    src = make_folder(str(tmp_path / "f"), 9)
    caches = [
        open_latent_cache(
            str(tmp_path / "c"), src, resolution=RES, vae_fingerprint="v", shard_size=2
        )
        for _ in range(3)
    ]
    assert [c.pending_shards(p, 3) for p, c in enumerate(caches)] == [[0, 3], [1, 4], [2]]
    for p, c in enumerate(caches):
        c.build(
            src, CountingEncoder(), batch_size=2, process_index=p, process_count=3, progress=False
        )
    assert caches[0].is_complete() and caches[0].summary() == {"ok": 9}


def test_sample_latents():
    mean = np.random.default_rng(0).normal(size=(4000, 4)).astype(np.float16)
    logvar = np.full_like(mean, np.log(0.25))
    for rng in (np.random.default_rng(1), jax.random.key(1)):
        z = np.asarray(sample_latents(mean, logvar, rng, 0.5))
        noise = z / 0.5 - mean.astype(np.float32)
        assert abs(noise.std() - 0.5) < 0.02 and abs(noise.mean()) < 0.02
    # A vanishing variance returns the scaled mean (logvar clipped at -30 like diffusers).
    z = sample_latents(mean, np.full_like(mean, -1e4), np.random.default_rng(0), 0.18215)
    np.testing.assert_allclose(z, mean.astype(np.float32) * 0.18215, atol=1e-5)
    zj = jax.jit(lambda m, lv, k: sample_latents(m, lv, k, 0.18215))(
        mean, logvar, jax.random.key(0)
    )
    assert zj.shape == mean.shape and zj.dtype == np.float32


def test_params_fingerprint():
    p = {"a": {"kernel": np.ones((2, 3), np.float32)}, "b": np.zeros(3, np.float32)}
    f = params_fingerprint(p)
    assert f == params_fingerprint(
        {"b": np.zeros(3, np.float32), "a": {"kernel": np.ones((2, 3), np.float32)}}
    )
    p["a"]["kernel"] = p["a"]["kernel"].copy()
    p["a"]["kernel"][0, 0] = 2
    assert params_fingerprint(p) != f


SETTINGS = dict(
    num_records=10,
    latent_shape=(2, 2, 4),
    dataset_fingerprint="d0",
    model_fingerprint="m0",
    sampler={"name": "dpm_solver_pp", "num_steps": 20, "guidance_scale": 7.5},
    seed=1,
    config={"sample": {"num_steps": 20}},
    shard_size=4,
)


def latents_for(indices):
    return np.broadcast_to(
        np.asarray(indices, np.float32)[:, None, None, None], (len(indices), 2, 2, 4)
    )


def test_synthetic_store_resume(tmp_path):
    d = str(tmp_path / "iter_1")
    store = SyntheticStore(d, **SETTINGS)
    assert store.num_shards == 3 and not store.is_complete()
    assert [store.pending_shards(p, 2) for p in range(2)] == [[0, 2], [1]]
    np.testing.assert_array_equal(store.missing_indices(), np.arange(10))
    store.write_shard(0, latents_for(range(4)))
    # A kill mid-write leaves only a temporary file: the shard does not count as done.
    with open(os.path.join(d, "shard_00002.latents.npy.tmp.1.x"), "wb") as f:
        f.write(b"partial")
    mtime = os.path.getmtime(os.path.join(d, "shard_00000.latents.npy"))
    reopened = SyntheticStore(d, **SETTINGS)
    assert reopened.pending_shards() == [1, 2]
    np.testing.assert_array_equal(reopened.missing_indices(), np.arange(4, 10))
    for k in reopened.pending_shards():
        reopened.write_shard(k, latents_for(reopened.shard_indices(k)))
    assert reopened.is_complete() and len(reopened.missing_indices()) == 0
    assert os.path.getmtime(os.path.join(d, "shard_00000.latents.npy")) == mtime
    reader = SyntheticStore.open(d)
    np.testing.assert_array_equal(reader.read([9, 0, 5])[:, 0, 0, 0], [9, 0, 5])
    assert reader.get(3).dtype == np.float16 and reader.get(3).shape == (2, 2, 4)
    with pytest.raises(IndexError):
        reader.get(10)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_fingerprint": "m1"}, "model: stored 'm0', now 'm1'"),
        ({"seed": 2}, "seed: stored 1, now 2"),
        ({"sampler": {"name": "ddim", "num_steps": 20, "guidance_scale": 7.5}}, "sampler.name"),
        ({"config": {"sample": {"num_steps": 25}}}, r"config.sample.num_steps: stored 20, now 25"),
        ({"latent_shape": (4, 4, 4)}, "latent_shape"),
    ],
)
def test_synthetic_store_refuses_other_settings(tmp_path, change, message):
    d = str(tmp_path / "iter_1")
    SyntheticStore(d, **SETTINGS).write_shard(0, latents_for(range(4)))
    with pytest.raises(ValueError, match=message):
        SyntheticStore(d, **{**SETTINGS, **change})


def test_synthetic_store_bad_writes(tmp_path):
    store = SyntheticStore(str(tmp_path / "s"), **SETTINGS)
    with pytest.raises(ValueError, match=r"latents \(3, 2, 2, 4\), expected \(4, 2, 2, 4\)"):
        store.write_shard(0, latents_for(range(3)))
    bad = latents_for(range(4)).copy()
    bad[1, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        store.write_shard(0, bad)
    with pytest.raises(FileNotFoundError, match="not generated yet"):
        store.get(0)
    with pytest.raises(IndexError):
        store.write_shard(3, latents_for(range(1)))
    with pytest.raises(TypeError, match="not JSON-able"):
        SyntheticStore(str(tmp_path / "t"), **{**SETTINGS, "config": {"f": print}})


def test_generation_work(tmp_path):
    src = make_folder(str(tmp_path / "f"), 10)
    store = SyntheticStore(
        str(tmp_path / "s"), **{**SETTINGS, "dataset_fingerprint": src.fingerprint()}
    )
    store.write_shard(1, latents_for(range(4, 8)))
    work = {p: list(generation_work(store, src, p, 2)) for p in range(2)}
    assert [w[0] for w in work[0]] == [0, 2] and work[1] == []
    shard, indices, prompts = work[0][1]
    assert list(indices) == [8, 9] and prompts == ["prompt 8", "prompt 9"]
    with pytest.raises(ValueError, match="for 10 examples, the source has 3"):
        next(generation_work(store, make_folder(str(tmp_path / "g"), 3)))


def test_skipped_jsonl_lists_records_and_is_printed(tmp_path, capsys):
    src = make_folder(str(tmp_path / "f"), 7, bad={1, 5})
    os.remove(os.path.join(src.path, "006.png"))
    cache = open_latent_cache(
        str(tmp_path / "c"), src, resolution=RES, vae_fingerprint="v", shard_size=3
    )
    counts = cache.build(src, CountingEncoder(), batch_size=4)
    assert counts["corrupt_image"] == 2 and counts["missing_file"] == 1
    lines = (tmp_path / "c" / os.path.basename(cache.dir) / "skipped.jsonl").read_text()
    records = [json.loads(line) for line in lines.splitlines()]
    assert [(r["index"], os.path.basename(r["file"]), r["reason"]) for r in records] == [
        (1, "001.png", "corrupt_image"),
        (5, "005.png", "corrupt_image"),
        (6, "006.png", "missing_file"),
    ]
    assert all(r["detail"] for r in records)
    printed = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert printed[0].startswith("latent cache: 3 records skipped")
    assert cache.skipped_path in printed[0]
    assert "#1 " in printed[1] and "001.png: corrupt_image" in printed[1]
    assert len(printed) <= 5


def test_print_skipped_at_most_five_lines(tmp_path, capsys):
    src = make_folder(str(tmp_path / "f"), 9, bad=set(range(8)))
    cache = open_latent_cache(str(tmp_path / "c"), src, resolution=RES, vae_fingerprint="v")
    cache.build(src, CountingEncoder(), batch_size=4)
    printed = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(printed) == 5 and "8 records skipped (corrupt_image: 8)" in printed[0]
    assert len(open(cache.skipped_path).read().splitlines()) == 8


def test_empty_captions_skip_or_unconditional(tmp_path):
    src = make_folder(str(tmp_path / "f"), 4)
    lines = open(src.metadata_path).read().splitlines()
    rows = [json.loads(line) for line in lines]
    rows[1]["text"] = ""
    rows[2]["text"] = None
    with open(src.metadata_path, "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows))
    src = ImageFolderSource(src.path)
    cache = open_latent_cache(str(tmp_path / "c"), src, resolution=RES, vae_fingerprint="v")
    cache.build(src, CountingEncoder(), batch_size=4, progress=False)
    assert cache.summary() == {"ok": 2, "empty_caption": 2}  # the documented default
    assert [cache.status(i) for i in range(4)] == [None, "empty_caption", "empty_caption", None]
    records = [json.loads(line) for line in open(cache.skipped_path)]
    assert [(r["index"], r["reason"]) for r in records] == [
        (1, "empty_caption"),
        (2, "empty_caption"),
    ]
    kept = open_latent_cache(
        str(tmp_path / "c"), src, resolution=RES, vae_fingerprint="v", empty_caption="unconditional"
    )
    assert kept.dir == cache.dir and kept.is_complete()  # no rebuild for this setting
    assert kept.summary() == {"ok": 4, "empty_caption_unconditional": 2}
    assert [kept.status(i) for i in range(4)] == [None] * 4
    with pytest.raises(ValueError, match="empty_caption='drop'"):
        open_latent_cache(
            str(tmp_path / "c"), src, resolution=RES, vae_fingerprint="v", empty_caption="drop"
        )


def test_build_stops_between_shards(tmp_path):
    src = make_folder(str(tmp_path / "f"), 7)
    cache = open_latent_cache(
        str(tmp_path / "c"), src, resolution=RES, vae_fingerprint="v", shard_size=2
    )
    counts = cache.build(src, CountingEncoder(), batch_size=2, progress=False, stop=lambda: True)
    assert counts["interrupted"] == 1 and counts["shards_built"] == 1
    assert cache.missing_shards() == [1, 2, 3] and not os.path.exists(cache.skipped_path)
    counts = cache.build(src, CountingEncoder(), batch_size=2, progress=False)
    assert "interrupted" not in counts and cache.is_complete()


def test_latin1_metadata_names_file_and_line(tmp_path):
    src = make_folder(str(tmp_path / "f"), 3)
    raw = open(src.metadata_path, "rb").read().splitlines()
    raw[2] = raw[2].replace(b"prompt 2", "café".encode("latin-1"))
    open(src.metadata_path, "wb").write(b"\n".join(raw))
    with pytest.raises(ValueError) as e:
        ImageFolderSource(src.path)
    assert str(e.value).startswith(f"{src.metadata_path}:3: not valid UTF-8 (byte 0xe9")
