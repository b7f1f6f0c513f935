"""Record sources: Pick-a-Pic parquet views, imagefolder, the TFDS builder; bad inputs."""

import json
import os
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spin_jax.data import open_source, shard_range
from spin_jax.data.imagefolder import ImageFolderSource
from spin_jax.data.pickapic import PickapicSource

# (caption, label_0, label_1) per row; images are b"<file>:<row>:<side>".
ROWS_A = [
    ("cat", 1.0, 0.0),
    ("dog", 0.0, 1.0),
    ("tie", 0.5, 0.5),
    ("owl", 1.0, 0.0),
    ("fox", 0.0, 1.0),
]
ROWS_B = [("bee", 0.0, 1.0), ("bad", None, None), ("odd", 0.3, 0.7), ("elk", 1.0, 0.0)]


def write_parquet(path, name, rows, row_group_size=2, drop=()):
    os.makedirs(path, exist_ok=True)
    cols = {
        "caption": [r[0] for r in rows],
        "jpg_0": [f"{name}:{i}:0".encode() for i in range(len(rows))],
        "jpg_1": [f"{name}:{i}:1".encode() for i in range(len(rows))],
        "label_0": pa.array([r[1] for r in rows], pa.float64()),
        "label_1": pa.array([r[2] for r in rows], pa.float64()),
        "ranking_id": list(range(len(rows))),
    }
    for c in drop:
        cols.pop(c)
    pq.write_table(pa.table(cols), os.path.join(path, name), row_group_size=row_group_size)


@pytest.fixture
def pickapic_dir(tmp_path):
    d = tmp_path / "pickapic" / "data"
    write_parquet(d, "train-00000-of-00002.parquet", ROWS_A)
    write_parquet(d, "train-00001-of-00002.parquet", ROWS_B)
    write_parquet(d, "test-00000-of-00001.parquet", [("zzz", 1.0, 0.0)])
    return str(tmp_path / "pickapic")


# Non-tie, valid rows in order: (file, row, caption, winner side).
EXPECTED = [
    ("train-00000-of-00002.parquet", 0, "cat", 0),
    ("train-00000-of-00002.parquet", 1, "dog", 1),
    ("train-00000-of-00002.parquet", 3, "owl", 0),
    ("train-00000-of-00002.parquet", 4, "fox", 1),
    ("train-00001-of-00002.parquet", 0, "bee", 1),
    ("train-00001-of-00002.parquet", 3, "elk", 0),
]


def test_pickapic_winners(pickapic_dir):
    src = PickapicSource(pickapic_dir, view="winners")
    assert len(src) == len(EXPECTED)
    assert src.summary() == {"rows": 9, "ties": 1, "invalid_label": 2, "pairs": 6}
    for i, (f, row, cap, w) in enumerate(EXPECTED):
        rec = src[i]
        assert rec == {"index": i, "text": cap, "image": f"{f}:{row}:{w}".encode()}
        assert src.meta(i) == {"index": i, "text": cap}
    with pytest.raises(IndexError):
        src[len(src)]


def test_pickapic_pairs_and_kto(pickapic_dir):
    pairs = PickapicSource(pickapic_dir, view="pairs")
    assert pairs.image_fields == ("image", "image_l")
    kto = PickapicSource(pickapic_dir, view="kto")
    assert len(kto) == 2 * len(EXPECTED)
    for i, (f, row, cap, w) in enumerate(EXPECTED):
        rec = pairs[i]
        assert rec["text"] == cap
        assert rec["image"] == f"{f}:{row}:{w}".encode()
        assert rec["image_l"] == f"{f}:{row}:{1 - w}".encode()
        good, bad = kto[2 * i], kto[2 * i + 1]
        assert (good["label"], bad["label"]) == (1, 0)
        assert good["image"] == rec["image"] and bad["image"] == rec["image_l"]
        assert good["text"] == bad["text"] == cap
    # Splits are kept apart.
    test = PickapicSource(pickapic_dir, view="winners", split="test")
    assert len(test) == 1 and test[0]["text"] == "zzz"


def test_pickapic_pickles_and_fingerprint(pickapic_dir, tmp_path):
    src = PickapicSource(pickapic_dir)
    src[0]  # fills the row-group cache, which must not travel
    clone = pickle.loads(pickle.dumps(src))
    assert [clone[i] for i in range(len(src))] == [src[i] for i in range(len(src))]
    assert clone.fingerprint() == src.fingerprint()
    assert PickapicSource(pickapic_dir, view="pairs").fingerprint() != src.fingerprint()
    write_parquet(os.path.join(pickapic_dir, "data"), "train-00001-of-00002.parquet", ROWS_B[:2])
    assert PickapicSource(pickapic_dir).fingerprint() != src.fingerprint()


def test_pickapic_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PickapicSource(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="train-"):
        PickapicSource(str(tmp_path))
    d = tmp_path / "broken"
    write_parquet(d, "train-00000-of-00002.parquet", ROWS_A)
    write_parquet(d, "train-00001-of-00002.parquet", ROWS_B, drop=("jpg_1", "label_1"))
    with pytest.raises(
        ValueError, match=r"train-00001-of-00002.parquet lacks column\(s\) \['jpg_1', 'label_1'\]"
    ):
        PickapicSource(str(d))
    # A null image is a record error (skipped and counted later), not a crash.
    d = tmp_path / "nulls"
    os.makedirs(d)
    table = pa.table(
        {
            "caption": ["a", "b"],
            "jpg_0": pa.array([b"x", None], pa.binary()),
            "jpg_1": pa.array([b"y", b"z"], pa.binary()),
            "label_0": [1.0, 1.0],
            "label_1": [0.0, 0.0],
        }
    )
    pq.write_table(table, d / "train-0.parquet")
    src = PickapicSource(str(d))
    assert "error" not in src[0]
    assert src[1]["error"] == "missing_image" and "jpg_0 is null" in src[1]["detail"]


def write_folder(path, entries, files=None):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "metadata.jsonl"), "w") as f:
        for e in entries:
            f.write((e if isinstance(e, str) else json.dumps(e)) + "\n")
    for name, data in (files or {}).items():
        with open(os.path.join(path, name), "wb") as f:
            f.write(data)


def test_imagefolder(tmp_path):
    d = str(tmp_path / "f")
    write_folder(
        d,
        [{"file_name": "a.png", "text": "one"}, "", {"file_name": "b.png", "text": None, "x": 1}],
        {"a.png": b"AAA", "b.png": b"BB"},
    )
    src = open_source("imagefolder", d)
    assert len(src) == 2
    assert src[0] == {"index": 0, "text": "one", "image": b"AAA"}
    assert src[1] == {"index": 1, "text": "", "image": b"BB"}
    fp = src.fingerprint()
    os.remove(os.path.join(d, "b.png"))
    rec = src[1]
    assert rec["error"] == "missing_file" and "b.png" in rec["detail"]
    assert ImageFolderSource(d).fingerprint() != fp
    assert pickle.loads(pickle.dumps(src))[0] == src[0]


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", r"metadata.jsonl:2: not valid JSON"),
        ('{"text": "x"}', r"metadata.jsonl:2: field 'file_name' missing"),
        ('{"file_name": "b.png"}', r"metadata.jsonl:2: field 'text' missing"),
        ('{"file_name": "b.png", "text": 3}', r"metadata.jsonl:2: field 'text' is int"),
    ],
)
def test_imagefolder_bad_metadata(tmp_path, line, message):
    d = str(tmp_path / "f")
    write_folder(d, [{"file_name": "a.png", "text": "one"}, line])
    with pytest.raises(ValueError, match=message):
        ImageFolderSource(d)


def test_imagefolder_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderSource(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="metadata.jsonl not found"):
        ImageFolderSource(str(tmp_path))
    with pytest.raises(ValueError, match="imagefolder has only"):
        open_source("imagefolder", str(tmp_path), view="pairs")
    with pytest.raises(ValueError, match="data source 'lmdb'"):
        open_source("lmdb", str(tmp_path))


@pytest.mark.parametrize("view", ["winners", "pairs", "kto"])
def test_tfds_matches_parquet(pickapic_dir, tmp_path, view):
    from spin_jax.data.tfds_pickapic import TfdsSource, build_tfds

    data_dir = str(tmp_path / "tfds")
    built = build_tfds(pickapic_dir, data_dir, view=view)
    parquet = PickapicSource(pickapic_dir, view=view)
    for src in (TfdsSource(data_dir, view=view), open_source("tfds", built, view=view)):
        assert len(src) == len(parquet)
        assert src.image_fields == parquet.image_fields
        for i in range(len(src)):
            assert src[i] == parquet[i]
            assert src.meta(i) == parquet.meta(i)
        assert pickle.loads(pickle.dumps(src))[1] == parquet[1]
    test = TfdsSource(data_dir, view=view, split="test")
    assert test[0]["text"] == "zzz"
    with pytest.raises(ValueError, match="split 'validation' not in"):
        TfdsSource(data_dir, view=view, split="validation")
    other = "pairs" if view != "pairs" else "kto"
    with pytest.raises(ValueError, match=f"holds the '{view}' view"):
        TfdsSource(built, view=other)
    with pytest.raises(FileNotFoundError, match="no prepared dataset"):
        TfdsSource(data_dir, view=other)


@pytest.mark.parametrize(
    "n, count, drop", [(10, 3, False), (10, 3, True), (7, 7, False), (5, 2, True)]
)
def test_shard_range_splits_evenly(n, count, drop):
    # Reference: np.array_split's contiguous split (the first n % count shards one longer), or
    # n // count records each when the remainder is dropped.
    parts = np.array_split(np.arange(n // count * count if drop else n), count)
    covered = []
    for i in range(count):
        got = shard_range(n, i, count, drop)
        assert (
            got == (int(parts[i][0]), int(parts[i][-1]) + 1) if len(parts[i]) else got[0] == got[1]
        )
        covered.extend(range(*got))
    assert covered == list(range(n if not drop else n // count * count))
    with pytest.raises(ValueError):
        shard_range(n, count, count)
    assert np.all(np.diff(covered) == 1)
