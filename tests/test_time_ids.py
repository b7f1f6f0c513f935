"""SDXL micro-conditioning from each image's true size and crop (``data.sdxl_time_ids``): the
latent cache records original sizes, the crop follows from them, ``read_batch`` serves them."""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image
from test_data_cache import RES, CountingEncoder

from spin_jax import parallel
from spin_jax.data import latent_cache, open_latent_cache
from spin_jax.data import transforms as T
from spin_jax.data.imagefolder import ImageFolderSource
from spin_jax.data.pickapic import PickapicSource
from spin_jax.train import batches, objectives
from spin_jax.train.config import base_config, validate

# (height, width, format) of the imagefolder's images; None: a broken file (skipped record).
# 16x33: the resized width minus RES is odd, so the flipped version's crop starts one pixel later.
# The JPEGs are over twice RES on their shorter side: they take the draft path, and from their
# drafted size (e.g. 26x18 for 206x137) the resized height would round to 23, not 24.
IMAGES = [
    (20, 37, "PNG"),
    (16, 33, "PNG"),
    (45, 24, "PNG"),
    (206, 137, "JPEG"),
    None,
    (137, 206, "JPEG"),
    (16, 16, "PNG"),
]


def encode(arr, fmt):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def image(h, w, seed):
    """Smooth gradients plus a little noise: a one-pixel crop shift changes the pixels."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([255 * y / h, 255 * x / w, 128 + 100 * np.sin(6 * y / h + 5 * x / w)], axis=-1)
    return np.clip(base + rng.normal(0, 4, base.shape), 0, 255).astype(np.uint8)


def make_folder(path):
    os.makedirs(path, exist_ok=True)
    lines = []
    for i, spec in enumerate(IMAGES):
        name = f"{i:03d}." + ("jpg" if spec and spec[2] == "JPEG" else "png")
        data = b"broken" if spec is None else encode(image(spec[0], spec[1], i), spec[2])
        with open(os.path.join(path, name), "wb") as f:
            f.write(data)
        lines.append(json.dumps({"file_name": name, "text": f"prompt {i}"}))
    with open(os.path.join(path, "metadata.jsonl"), "w") as f:
        f.write("\n".join(lines))
    return ImageFolderSource(path)


def diffusers_time_ids(h, w, res, flipped=False):
    """diffusers' SDXL examples: resize the shorter side to res, center crop, record the
    original (h, w), the crop's top-left in the resized (for a flip: mirrored) image, (res, res)."""
    scale = res / min(h, w)
    nh, nw = max(res, round(h * scale)), max(res, round(w * scale))
    top, left = (nh - res) // 2, (nw - res) // 2
    if flipped:  # our flipped version mirrors the crop: in the mirrored image it starts here
        left = nw - res - left
    return [h, w, top, left, res, res]


@pytest.fixture
def built(tmp_path):
    src = make_folder(str(tmp_path / "f"))
    cache = open_latent_cache(
        str(tmp_path / "c"), src, resolution=RES, vae_fingerprint="v", shard_size=3
    )
    cache.build(src, CountingEncoder(), batch_size=4, progress=False)
    return src, cache


def test_cache_records_true_sizes(built):
    src, cache = built
    jpeg = open(src.file_path(3), "rb").read()
    drafted, _ = T.decode_image(jpeg, resolution=RES, min_size=RES // 2)
    assert drafted.size != (137, 206)  # the draft path was taken: the decoded size is smaller
    assert T.decode_image_with_size(jpeg, resolution=RES, min_size=RES // 2)[2] == (206, 137)
    want = [(0, 0) if s is None else s[:2] for s in IMAGES]
    np.testing.assert_array_equal(cache.sizes(range(len(IMAGES))), want)
    assert cache.sizes([5, 0]).dtype == np.int32
    assert all(os.path.isfile(os.path.join(cache.dir, f"{k:05d}.image.size.npy")) for k in range(3))
    # Read back from disk by a fresh object, like the moments.
    again = open_latent_cache(cache.dir.rsplit(os.sep, 1)[0], src, resolution=RES,
                              vae_fingerprint="v")  # fmt: skip
    assert again.dir == cache.dir and again.is_complete()
    np.testing.assert_array_equal(again.sizes([3, 5]), [(206, 137), (137, 206)])
    with pytest.raises(IndexError):
        again.sizes([len(IMAGES)])


def test_time_ids_equal_diffusers_formula_and_the_pixels(built):
    src, cache = built
    ok = [i for i, s in enumerate(IMAGES) if s is not None]
    for v, flipped in ((0, False), (1, True)):
        got = cache.time_ids(ok, [v] * len(ok))
        want = [diffusers_time_ids(*IMAGES[i][:2], RES, flipped) for i in ok]
        np.testing.assert_array_equal(got, np.asarray(want, np.float32))
        assert got.dtype == np.float32 and got.shape == (len(ok), 6)
    assert cache.time_ids([1], [0])[0, 3] == 8 and cache.time_ids([1], [1])[0, 3] == 9
    np.testing.assert_array_equal(cache.time_ids([3]), cache.time_ids([3], [0]))
    # The crop the time ids name is the crop that was encoded: cut it from a full decode.
    for i in ok:
        h, w, top, left, _, _ = diffusers_time_ids(*IMAGES[i][:2], RES)
        data = open(src.file_path(i), "rb").read()
        full = Image.open(io.BytesIO(data)).convert("RGB")
        nh, nw = T.resized_size((h, w), RES)
        resized = np.asarray(full.resize((nw, nh), Image.Resampling.BICUBIC)).astype(np.float32)
        cached, _ = T.load_image(data, RES, min_size=RES // 2)  # what the cache encodes
        mirrored = T.hflip(cached)
        left_f = cache.time_ids([i], [1])[0, 3].astype(int)

        def err(a, t, lf, ref=resized):
            return np.abs(a.astype(np.float32) - ref[t : t + RES, lf : lf + RES]).mean()

        def err_flipped(a, t, lf, ref=resized):
            return err(a, t, lf, T.hflip(ref))

        if IMAGES[i][2] == "PNG":
            assert err(cached, top, left) == 0 and err_flipped(mirrored, top, left_f) == 0
        else:  # drafted (DCT-scaled to 18x26 here): not bit-exact, but a one-pixel shift is worse
            shifts = [(top + dt, left + dl) for dt, dl in ((1, 0), (-1, 0), (0, 1), (0, -1))]
            valid = [(t, lf) for t, lf in shifts if 0 <= t <= nh - RES and 0 <= lf <= nw - RES]
            assert valid and all(err(cached, t, lf) > err(cached, top, left) for t, lf in valid)
    with pytest.raises(ValueError, match="record 4 .*skipped .*corrupt_image"):
        cache.time_ids([0, 4])
    with pytest.raises(ValueError, match="2 indices but 1 versions"):
        cache.time_ids([0, 1], [0])


def test_center_crop_shared_with_resize_and_crop():
    rng = np.random.default_rng(0)
    for h, w in [(20, 37), (16, 33), (45, 24), (31, 31), (17, 100)]:
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        out = T.resize_and_crop(Image.fromarray(arr), RES)
        top, left = T.center_crop_top_left((h, w), RES)
        nh, nw = T.resized_size((h, w), RES)
        ref = np.asarray(Image.fromarray(arr).resize((nw, nh), Image.Resampling.BICUBIC))
        np.testing.assert_array_equal(out, ref[top : top + RES, left : left + RES])
        # The flipped version (crop, then mirror) is the mirrored image's crop at left_f.
        top_f, left_f = T.center_crop_top_left((h, w), RES, flipped=True)
        assert top_f == top and left_f == nw - RES - left
        np.testing.assert_array_equal(
            T.hflip(out), T.hflip(ref)[top : top + RES, left_f : left_f + RES]
        )
    with pytest.raises(ValueError, match="positive"):
        T.resized_size((0, 5), RES)


def _config(path, resolution=RES, batch=8):
    c = base_config()
    c.model.path, c.data.path = "unused", path
    c.data.resolution = resolution
    c.train.batch_size = batch
    c.train.steps = 2
    return c


def _data(src, cache):
    pool = np.flatnonzero([cache.status(i) is None for i in range(len(src))])
    captions = [src.text(i) for i in range(len(src))]
    return batches.Data(src, cache, pool, captions, None, {})


def _tokenize(prompts):
    return np.zeros((len(prompts), 4), np.int32)


def test_read_batch_true_and_fixed(built):
    src, cache = built
    data = _data(src, cache)
    mesh = parallel.make_mesh()
    sft = objectives.get("sft")
    c = _config(src.path)
    assert c.data.sdxl_time_ids == "fixed"  # the default
    fixed = batches.read_batch(c, sft, data, 1, 0, mesh, _tokenize, time_ids=True)
    np.testing.assert_array_equal(fixed["time_ids"], np.tile([RES, RES, 0, 0, RES, RES], (8, 1)))
    assert fixed["time_ids"].dtype == np.float32
    c.data.sdxl_time_ids = "true"
    validate(c)
    seen_versions = set()
    for step in range(2):
        out = batches.read_batch(c, sft, data, 1, step, mesh, _tokenize, time_ids=True)
        if step == 0:  # only the time ids differ from "fixed"
            assert out.keys() == fixed.keys()
            for k in fixed.keys() - {"time_ids"}:
                np.testing.assert_array_equal(out[k], fixed[k])
        rows = batches.global_rows(c, sft, data, 1, step)[parallel.process_batch_indices(8, mesh)]
        for row, mean, ids in zip(rows, out["x0.mean"], out["time_ids"], strict=True):
            # Which version was drawn: the one whose moments the batch carries.
            v = [np.array_equal(mean, m.astype(np.float32)) for m in cache.moments(row)[0]]
            v = v.index(True)
            seen_versions.add(v)
            np.testing.assert_array_equal(ids, diffusers_time_ids(*IMAGES[row][:2], RES, v == 1))
    assert seen_versions == {0, 1}
    assert "time_ids" not in batches.read_batch(c, sft, data, 1, 0, mesh, _tokenize)
    c.data.sdxl_time_ids = "own"
    with pytest.raises(ValueError, match=r"data.sdxl_time_ids = 'own'.*\('fixed', 'true'\)"):
        validate(c)


# (jpg_0 size, jpg_1 size, label_0): the winner is jpg_0 in row 0, jpg_1 in rows 1 and 2.
PAIRS = [((20, 37), (40, 16), 1.0), ((20, 37), (45, 24), 0.0), ((16, 33), (33, 16), 0.0)]


def _pairs_folder(path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": [], "label_1": []}
    for i, (s0, s1, label) in enumerate(PAIRS):
        rows["caption"].append(f"pair {i}")
        rows["jpg_0"].append(encode(image(*s0, 2 * i), "PNG"))
        rows["jpg_1"].append(encode(image(*s1, 2 * i + 1), "PNG"))
        rows["label_0"].append(label)
        rows["label_1"].append(1.0 - label)
    os.makedirs(path)
    pq.write_table(pa.table(rows), os.path.join(path, "train-00000.parquet"))
    return str(path)


def test_pairs_use_the_winners_size(tmp_path):
    specs = PAIRS
    src = PickapicSource(_pairs_folder(tmp_path / "p"), view="pairs")
    cache = open_latent_cache(str(tmp_path / "c"), src, resolution=RES, vae_fingerprint="v")
    cache.build(src, CountingEncoder(), batch_size=4, progress=False)
    winners = [s1 if label == 0 else s0 for s0, s1, label in specs]
    losers = [s0 if label == 0 else s1 for s0, s1, label in specs]
    np.testing.assert_array_equal(cache.sizes(range(3), field="image"), winners)
    np.testing.assert_array_equal(cache.sizes(range(3), field="image_l"), losers)
    c = _config(str(tmp_path / "p"))
    c.data.sdxl_time_ids = "true"
    dpo = objectives.get("dpo")
    mesh = parallel.make_mesh()
    out = batches.read_batch(c, dpo, _data(src, cache), 1, 0, mesh, _tokenize, time_ids=True)
    rows = batches.global_rows(c, dpo, _data(src, cache), 1, 0)
    rows = rows[parallel.process_batch_indices(8, mesh)]
    assert out["time_ids"].shape == (8, 6)
    for row, mean, ids in zip(rows, out["x0_w.mean"], out["time_ids"], strict=True):
        v = [np.array_equal(mean, m.astype(np.float32)) for m in cache.moments(row)[0]].index(True)
        np.testing.assert_array_equal(ids, diffusers_time_ids(*winners[row], RES, v == 1))


def test_old_format_cache_is_not_reused(tmp_path, monkeypatch):
    src = make_folder(str(tmp_path / "f"))
    root = str(tmp_path / "c")
    with monkeypatch.context() as m:
        m.setattr(latent_cache, "FORMAT", 1)
        old = open_latent_cache(root, src, resolution=RES, vae_fingerprint="v")
        old.build(src, CountingEncoder(), batch_size=4, progress=False)
        assert old.is_complete() and old.key["format"] == 1
    assert latent_cache.FORMAT == 2
    new = open_latent_cache(root, src, resolution=RES, vae_fingerprint="v")
    assert new.dir != old.dir and new.missing_shards() == [0]
    assert new.key["format"] == 2 and {**new.key, "format": 1} == old.key
    enc = CountingEncoder()
    new.build(src, enc, batch_size=4, progress=False)
    assert enc.images > 0 and new.sizes([0])[0].tolist() == [20, 37]
    # A manifest claiming format 1 in the format-2 folder is refused, not silently read.
    manifest = os.path.join(new.dir, "manifest.json")
    data = json.load(open(manifest))
    data["key"]["format"] = 1
    json.dump(data, open(manifest, "w"))
    with pytest.raises(ValueError, match="format: stored 1, now 2"):
        open_latent_cache(root, src, resolution=RES, vae_fingerprint="v")
