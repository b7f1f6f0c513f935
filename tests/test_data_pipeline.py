"""The grain pipeline: batches, determinism, resume, per-process slices, bad records, joins."""

import io
import json
import os

import grain
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from spin_jax.data import (
    SyntheticStore,
    make_pipeline,
    open_latent_cache,
    open_source,
    state_from_json,
    state_to_json,
)
from spin_jax.data import transforms as T
from spin_jax.data.imagefolder import ImageFolderSource

RES = 16


def image_bytes(w, h, seed, mode="RGB", fmt="JPEG"):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    img = Image.fromarray(arr).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def make_folder(path, n, extra=()):
    """n good JPEG records (sizes vary), then `extra` (file_name, text, bytes or None)."""
    os.makedirs(path, exist_ok=True)
    lines = []
    for i in range(n):
        name = f"{i:03d}.jpg"
        with open(os.path.join(path, name), "wb") as f:
            f.write(image_bytes(20 + i % 3 * 4, 18 + i % 2 * 10, i))
        lines.append({"file_name": name, "text": f"caption {i}"})
    for name, text, data in extra:
        if data is not None:
            with open(os.path.join(path, name), "wb") as f:
                f.write(data)
        lines.append({"file_name": name, "text": text})
    with open(os.path.join(path, "metadata.jsonl"), "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
    return ImageFolderSource(path)


def fake_tokenize(texts):
    return np.array([[len(t), 7] + [0] * 75 for t in texts], np.int32)


def pipe(src, **kw):
    args = dict(
        batch_size=4,
        resolution=RES,
        seed=0,
        num_threads=2,
        shard_options=grain.sharding.NoSharding(),
    )
    args.update(kw)
    return make_pipeline(src, **args)


def take(p, n):
    return [next(p) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_batch_contents(tmp_path):
    src = make_folder(str(tmp_path / "f"), 10)
    b = next(pipe(src, tokenize=fake_tokenize, flip=False))
    assert b["image"].shape == (4, RES, RES, 3) and b["image"].dtype == np.float32
    assert -1.0 <= b["image"].min() and b["image"].max() <= 1.0
    assert b["tokens"].shape == (4, 77) and b["tokens"].dtype == np.int32
    assert b["index"].dtype == np.int64 and b["text"].dtype == object
    for j, i in enumerate(b["index"]):
        assert b["text"][j] == f"caption {i}"
        assert b["tokens"][j, 0] == len(b["text"][j])
        # Reference: full PIL decode, bicubic resize of the shorter side, center crop.
        img = Image.open(src.file_path(i)).convert("RGB")
        w, h = img.size
        s = RES / min(w, h)
        img = img.resize((max(RES, round(w * s)), max(RES, round(h * s))), Image.Resampling.BICUBIC)
        left, top = (img.size[0] - RES) // 2, (img.size[1] - RES) // 2
        ref = np.asarray(img)[top : top + RES, left : left + RES].astype(np.float32) / 127.5 - 1
        np.testing.assert_allclose(b["image"][j], ref, atol=1e-6)


def test_deterministic_and_resumable(tmp_path):
    src = make_folder(str(tmp_path / "f"), 10)
    kw = dict(crop="random", caption_dropout=0.3, seed=3)
    a = take(pipe(src, **kw), 8)  # 32 records: more than three epochs
    assert_batches_equal(a, take(pipe(src, **kw, num_threads=0), 8))
    other = take(pipe(src, **{**kw, "seed": 4}), 8)
    assert not all(np.array_equal(x["index"], y["index"]) for x, y in zip(a, other, strict=True))
    # Each epoch is a new permutation of all records.
    order = np.concatenate([b["index"] for b in a])
    epochs = [order[i : i + 10] for i in (0, 10, 20)]
    assert all(sorted(e) == list(range(10)) for e in epochs)
    assert not np.array_equal(epochs[0], epochs[1])
    # Save after 3 batches, restore into a fresh pipeline: same next batches.
    p = pipe(src, **kw)
    take(p, 3)
    saved = state_to_json(p.get_state())
    q = pipe(src, **kw)
    q.set_state(state_from_json(saved))
    assert_batches_equal(take(q, 5), a[3:])
    assert q.summary()["records"] == 32


def test_processes_read_disjoint_slices(tmp_path):
    src = make_folder(str(tmp_path / "f"), 11)
    seen = []
    for i in range(2):
        opts = grain.sharding.ShardOptions(shard_index=i, shard_count=2, drop_remainder=False)
        p = pipe(src, shard_options=opts, num_epochs=1, drop_remainder=False, batch_size=3)
        seen.append(np.concatenate([b["index"] for b in p]))
    assert set(seen[0]).isdisjoint(seen[1])
    assert sorted(np.concatenate(seen)) == list(range(11))
    assert sorted(seen[0]) == list(range(6))  # contiguous slices, as grain's even split
    # drop_remainder on the shard options: both processes get 5 records.
    opts = [grain.sharding.ShardOptions(i, 2, drop_remainder=True) for i in range(2)]
    counts = [
        sum(len(b["index"]) for b in pipe(src, shard_options=o, num_epochs=1, drop_remainder=False))
        for o in opts
    ]
    assert counts == [5, 5]


def test_bad_records_skipped_and_counted(tmp_path):
    good = image_bytes(24, 24, 0)
    cmyk = image_bytes(24, 24, 1, mode="CMYK")
    rgba = image_bytes(24, 24, 2, mode="RGBA", fmt="PNG")
    grey = image_bytes(24, 24, 3, mode="L")
    i16 = io.BytesIO()
    Image.fromarray(np.full((24, 24), 300, np.uint16)).save(i16, format="PNG")
    extra = [
        ("corrupt.jpg", "x", b"not an image at all"),
        ("truncated.jpg", "x", good[: len(good) // 2]),
        ("missing.jpg", "x", None),
        ("empty.jpg", "   ", good),
        ("tiny.jpg", "x", image_bytes(6, 30, 4)),
        ("i16.png", "x", i16.getvalue()),
        ("cmyk.jpg", "cmyk", cmyk),
        ("rgba.png", "rgba", rgba),
        ("grey.jpg", "grey", grey),
    ]
    src = make_folder(str(tmp_path / "f"), 5, extra)
    p = pipe(src, num_epochs=1, drop_remainder=False, batch_size=3)
    batches = list(p)
    used = np.concatenate([b["index"] for b in batches])
    assert sorted(used) == [0, 1, 2, 3, 4, 11, 12, 13]
    summary = p.summary()
    assert summary["skipped"] == {
        "corrupt_image": 2,
        "missing_file": 1,
        "empty_caption": 1,
        "too_small": 1,
        "unsupported_mode": 1,
    }
    assert summary["skipped_total"] == 6 and summary["records"] == 8
    assert summary["converted_to_rgb"] == 3


def test_transforms_units():
    img, converted = T.decode_image(image_bytes(64, 40, 0), resolution=16, min_size=8)
    assert img.mode == "RGB" and not converted
    # JPEG draft: a big JPEG decodes at reduced scale but still covers the target.
    img, _ = T.decode_image(image_bytes(200, 100, 0), resolution=16, min_size=8)
    assert min(img.size) >= 16 and img.size[0] < 200
    full, _ = T.decode_image(image_bytes(200, 100, 0), resolution=16, min_size=8, draft=False)
    a = T.resize_and_crop(img, 16)
    b = T.resize_and_crop(full, 16)
    assert np.abs(a.astype(float) - b).mean() < 4.0
    rgba = Image.new("RGBA", (20, 20), (10, 20, 30, 0))
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    white, converted = T.decode_image(buf.getvalue(), resolution=16, min_size=8)
    assert converted and np.all(np.asarray(white) == 255)
    with pytest.raises(T.ImageError, match="missing_image"):
        T.decode_image(b"", resolution=16, min_size=8)
    rng = np.random.default_rng(0)
    crops = {T.resize_and_crop(full, 16, crop="random", rng=rng).tobytes() for _ in range(8)}
    assert len(crops) > 1
    np.testing.assert_array_equal(
        T.hflip(np.arange(6).reshape(1, 2, 3, 1))[0, :, :, 0], [[2, 1, 0], [5, 4, 3]]
    )
    np.testing.assert_allclose(T.to_float(np.array([0, 255], np.uint8)), [-1, 1])


def test_caption_dropout_and_flip(tmp_path):
    src = make_folder(str(tmp_path / "f"), 8)
    b = next(pipe(src, caption_dropout=1.0, tokenize=fake_tokenize))
    assert list(b["text"]) == [""] * 4 and np.all(b["tokens"][:, 0] == 0)
    # With flips on, some records come out mirrored relative to the unflipped pipeline.
    plain = take(pipe(src, flip=False, shuffle=False), 2)
    flipped = take(pipe(src, flip=True, shuffle=False), 2)
    same = mirrored = 0
    for x, y in zip(plain, flipped, strict=True):
        for i in range(4):
            same += np.array_equal(x["image"][i], y["image"][i])
            mirrored += np.array_equal(x["image"][i][:, ::-1], y["image"][i])
    assert same + mirrored == 8 and same > 0 and mirrored > 0


def write_pickapic(path):
    os.makedirs(path, exist_ok=True)
    n = 6
    table = pa.table(
        {
            "caption": [f"p{i}" for i in range(n)],
            "jpg_0": [image_bytes(24, 24, 100 + i) for i in range(n)],
            "jpg_1": [image_bytes(24, 24, 200 + i) for i in range(n)],
            "label_0": [1.0, 0.0, 0.5, 1.0, 0.0, 1.0],
            "label_1": [0.0, 1.0, 0.5, 0.0, 1.0, 0.0],
        }
    )
    pq.write_table(table, os.path.join(path, "train-00000-of-00001.parquet"))
    return path


def test_pairs_and_kto_views(tmp_path):
    path = write_pickapic(str(tmp_path / "pp"))
    pairs = open_source("pickapic", path, view="pairs")
    b = next(pipe(pairs, batch_size=5, flip=False, shuffle=False))
    assert b["image"].shape == b["image_l"].shape == (5, RES, RES, 3)
    winners = [0, 1, 0, 1, 0]  # winning side of the 5 non-tie rows
    rows = [0, 1, 3, 4, 5]
    for j in range(5):
        w_seed = (100 if winners[j] == 0 else 200) + rows[j]
        ref = T.to_float(T.load_image(image_bytes(24, 24, w_seed), RES, min_size=8)[0])
        np.testing.assert_allclose(b["image"][j], ref)
        assert not np.allclose(b["image"][j], b["image_l"][j])
    kto = next(pipe(open_source("pickapic", path, view="kto"), batch_size=10, shuffle=False))
    assert kto["label"].dtype == np.int32 and list(kto["label"]) == [1, 0] * 5


def fake_encode(images):
    """[B, R, R, 3] -> moments [B, R/4, R/4, 4] (block means; logvar a constant)."""
    b, r = images.shape[0], images.shape[1]
    x = images.reshape(b, r // 4, 4, r // 4, 4, 3).mean(axis=(2, 4))
    mean = np.concatenate([x, x[..., :1] * 2], axis=-1)
    return mean, np.full_like(mean, -4.0)


def test_latent_path_and_synthetic_join(tmp_path):
    src = make_folder(str(tmp_path / "f"), 9, [("bad.jpg", "x", b"junk")])
    cache = open_latent_cache(
        str(tmp_path / "cache"), src, resolution=RES, vae_fingerprint="v1", shard_size=4
    )
    with pytest.raises(ValueError, match="incomplete"):
        pipe(src, latent_cache=cache)
    cache.build(src, fake_encode, batch_size=4, progress=False)
    store = SyntheticStore(
        str(tmp_path / "syn"),
        num_records=len(src),
        latent_shape=(4, 4, 4),
        dataset_fingerprint=src.fingerprint(),
        model_fingerprint="m0",
        sampler={"name": "dpm_solver_pp", "num_steps": 20},
        seed=0,
    )
    with pytest.raises(ValueError, match="synthetic store .* is incomplete"):
        pipe(src, synthetic=store)
    for k in store.pending_shards():
        idx = store.shard_indices(k)
        store.write_shard(
            k, np.broadcast_to(idx[:, None, None, None], (len(idx), 4, 4, 4)).astype(np.float32)
        )
    p = pipe(
        src,
        latent_cache=cache,
        synthetic=store,
        num_epochs=1,
        drop_remainder=False,
        tokenize=fake_tokenize,
    )
    batches = list(p)
    assert p.summary()["skipped"] == {"corrupt_image": 1}
    assert sorted(np.concatenate([b["index"] for b in batches])) == list(range(9))
    b = batches[0]
    assert (
        "image" not in b
        and b["image_mean"].shape == (4, 4, 4, 4)
        and b["image_mean"].dtype == np.float32
    )
    for j, i in enumerate(b["index"]):
        mean, logvar = cache.moments(i)
        assert any(np.array_equal(b["image_mean"][j], mean[v].astype(np.float32)) for v in (0, 1))
        np.testing.assert_array_equal(b["syn_latent"][j], np.full((4, 4, 4), i, np.float32))
        assert b["text"][j] == f"caption {i}"
    # Same seed -> same flip choices; the pipeline is still deterministic.
    again = list(
        pipe(
            src,
            latent_cache=cache,
            synthetic=store,
            num_epochs=1,
            drop_remainder=False,
            tokenize=fake_tokenize,
        )
    )
    assert_batches_equal(batches, again)


def test_mismatched_cache_or_store_refused(tmp_path):
    src = make_folder(str(tmp_path / "f"), 6)
    cache = open_latent_cache(
        str(tmp_path / "c"), src, resolution=RES, vae_fingerprint="v", flip=False, shard_size=8
    )
    cache.build(src, fake_encode, batch_size=2, progress=False)
    with pytest.raises(ValueError, match="resolution: cache 16, pipeline 32"):
        pipe(src, latent_cache=cache, resolution=32)
    with pytest.raises(ValueError, match="no flipped versions"):
        pipe(src, latent_cache=cache, flip=True)
    with pytest.raises(ValueError, match="center crops"):
        pipe(src, latent_cache=cache, flip=False, crop="random")
    assert next(pipe(src, latent_cache=cache, flip=False))["image_mean"].shape == (4, 4, 4, 4)
    make_folder(str(tmp_path / "g"), 6)
    with open(os.path.join(str(tmp_path / "g"), "000.jpg"), "ab") as f:
        f.write(b"\0")  # other bytes -> other dataset fingerprint
    with pytest.raises(ValueError, match="dataset: cache"):
        pipe(ImageFolderSource(str(tmp_path / "g")), latent_cache=cache, flip=False)
    store = SyntheticStore(
        str(tmp_path / "s"),
        num_records=6,
        latent_shape=(2,),
        dataset_fingerprint="another",
        model_fingerprint="m",
        sampler={},
        seed=0,
    )
    with pytest.raises(ValueError, match="generated for another dataset"):
        pipe(src, synthetic=store)


def test_bad_settings(tmp_path):
    src = make_folder(str(tmp_path / "f"), 3)
    for kw, msg in [
        ({"batch_size": 0}, "must be positive"),
        ({"caption_dropout": 1.5}, "caption_dropout"),
        ({"crop": "left"}, "crop='left'"),
        ({"resize_filter": "nearest"}, "resize_filter"),
        ({"num_epochs": 0}, "num_epochs"),
        ({"shard_options": grain.sharding.ShardOptions(3, 4, True)}, "gets no records"),
    ]:
        with pytest.raises(ValueError, match=msg):
            pipe(src, **kw)
