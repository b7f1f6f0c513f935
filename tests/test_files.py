"""spin_jax.files: atomic JSON / .npy writes and the cache of opened files."""

import json
import os
import pickle

import numpy as np

from spin_jax.files import LruCache, write_json, write_npy


def test_write_json_and_npy_replace_whole_files(tmp_path):
    path = str(tmp_path / "a.json")
    write_json(path, {"b": 1, "a": np.float32(0.5)}, sort_keys=True)
    write_json(path, {"b": 2, "a": [1, 2]}, sort_keys=True)
    with open(path) as f:
        text = f.read()
    assert json.loads(text) == {"a": [1, 2], "b": 2} and text.index('"a"') < text.index('"b"')
    write_npy(str(tmp_path / "x.npy"), np.arange(6).reshape(2, 3))
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), np.arange(6).reshape(2, 3))
    assert sorted(os.listdir(tmp_path)) == ["a.json", "x.npy"]  # no temporary files left


def test_lru_cache_keeps_the_most_recent_and_pickles_empty():
    opened = []

    def load(key):
        opened.append(key)
        return f"value {key}"

    cache = LruCache(2)
    assert cache.get(1, load) == "value 1"
    cache.get(2, load)
    cache.get(1, load)  # 1 is now the most recent; 2 goes next
    cache.get(3, load)
    cache.get(1, load)
    cache.get(2, load)
    assert opened == [1, 2, 3, 2]
    copy = pickle.loads(pickle.dumps(cache))
    copy.get(1, load)
    assert opened[-1] == 1 and copy.limit == 2
