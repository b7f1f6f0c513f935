"""launch/prepare_data.py: TFDS build and latent cache with a stand-in model."""

import importlib.util
import io
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import spin_jax.models
from spin_jax.data import open_latent_cache, open_source, params_fingerprint

_spec = importlib.util.spec_from_file_location(
    "prepare_data", os.path.join(os.path.dirname(__file__), "..", "launch", "prepare_data.py")
)
prepare_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prepare_data)


class FakeSD:
    """What prepare_data uses of a loaded model: params["vae"] and vae_encode."""

    def __init__(self):
        self.params = {"vae": {"w": np.arange(4, dtype=np.float32)}}

    def vae_encode(self, params, images):
        b, r = images.shape[0], images.shape[1]
        x = images.reshape(b, r // 8, 8, r // 8, 8, 3).mean(axis=(2, 4))
        mean = jnp.concatenate([x, x[..., :1]], axis=-1) * params["w"]
        return mean, jnp.zeros_like(mean) - 5.0


def jpeg(seed, size=24):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), np.uint8)).save(
        buf, "JPEG"
    )
    return buf.getvalue()


def test_prepare_imagefolder_cache(tmp_path, monkeypatch):
    d = tmp_path / "f"
    d.mkdir()
    lines = []
    for i in range(5):
        (d / f"{i}.jpg").write_bytes(jpeg(i) if i != 2 else b"bad")
        lines.append(json.dumps({"file_name": f"{i}.jpg", "text": f"t{i}"}))
    (d / "metadata.jsonl").write_text("\n".join(lines))
    monkeypatch.setattr(
        spin_jax.models, "load_pretrained", lambda path, dtype: FakeSD(), raising=False
    )
    kw = dict(
        source="imagefolder",
        path=str(d),
        model="fake",
        cache_dir=str(tmp_path / "c"),
        resolution=16,
    )
    summary = prepare_data.prepare(**kw, batch_size=8, shard_size=2, num_threads=2)
    assert summary["cache"]["complete"] and summary["cache"]["status"] == {
        "ok": 4,
        "corrupt_image": 1,
    }
    src = open_source("imagefolder", str(d))
    cache = open_latent_cache(
        str(tmp_path / "c"),
        src,
        resolution=16,
        vae_fingerprint=params_fingerprint(FakeSD().params["vae"]),
    )
    assert cache.dir == summary["cache"]["dir"] and cache.is_complete()
    assert cache.moments(0)[0].shape == (2, 2, 2, 4)
    again = prepare_data.prepare(**kw, batch_size=8, shard_size=2, num_threads=2)
    assert again["cache"]["built"] == {"shards_done_before": 3}


def test_prepare_tfds_and_errors(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "pp"
    d.mkdir()
    pq.write_table(
        pa.table(
            {
                "caption": ["a", "b"],
                "jpg_0": [jpeg(0), jpeg(1)],
                "jpg_1": [jpeg(2), jpeg(3)],
                "label_0": [1.0, 0.5],
                "label_1": [0.0, 0.5],
            }
        ),  # fmt: skip
        d / "train-00000-of-00001.parquet",
    )
    summary = prepare_data.prepare(source="pickapic", path=str(d), tfds_dir=str(tmp_path / "tfds"))
    assert summary["source"] == {"records": 1, "rows": 2, "ties": 1, "invalid_label": 0, "pairs": 1}
    tf_src = open_source("tfds", summary["tfds_dir"])
    assert tf_src[0]["text"] == "a" and tf_src[0]["image"] == jpeg(0)
    with pytest.raises(ValueError, match="nothing to do"):
        prepare_data.prepare(source="pickapic", path=str(d))
    with pytest.raises(ValueError, match="needs --model"):
        prepare_data.prepare(source="pickapic", path=str(d), cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match="--source=pickapic"):
        prepare_data.prepare(source="imagefolder", path=str(d), tfds_dir=str(tmp_path / "t"))
