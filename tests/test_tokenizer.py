"""spin_jax.models.tokenizer against transformers' CLIPTokenizer on tiny vocabularies."""

import json
import logging
import os

import numpy as np
import pytest
from transformers import CLIPTokenizer

from spin_jax.models.tiny import EOS, write_clip_tokenizer
from spin_jax.models.tokenizer import load_tokenizer

WORDS = ["a", "photo", "of", "cat", "dog", "red", "circle", "on", "the", "left"]
PROMPTS = [
    "a photo of a cat",
    "",
    "A RED Circle, on the LEFT!!! ",
    "café naïve 日本語 🐱 — “quotes” ½",
    "a,b;c... (d) [e] {f} <g> #h $i %j &k",
    "  a   cat \n dog\t",
    "photo of " * 40,  # far longer than 77 tokens
    "a " * 75,  # exactly 77 with BOS/EOS: fits
    "a " * 76,  # one token too many
]


def _folder(root, pad: str, layout: str) -> str:
    name = f"{'eos' if pad == EOS else 'bang'}_{layout}"
    path = os.path.join(root, name)
    if not os.path.isdir(path):
        write_clip_tokenizer(path, WORDS, pad_token=pad)
        if layout == "json":  # rewrite as transformers 5 does: tokenizer.json only
            CLIPTokenizer.from_pretrained(path).save_pretrained(path)
            os.remove(os.path.join(path, "vocab.json"))
            os.remove(os.path.join(path, "merges.txt"))
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tokenizers"))


def _reference(path: str, prompts, max_length: int = 77) -> np.ndarray:
    tok = CLIPTokenizer.from_pretrained(path)
    out = tok(prompts, padding="max_length", truncation=True, max_length=max_length)
    return np.asarray(out["input_ids"], np.int32)


@pytest.mark.parametrize("layout", ["vocab", "json"])
@pytest.mark.parametrize("pad", [EOS, "!"])
def test_matches_transformers(root, pad, layout):
    path = _folder(root, pad, layout)
    tok = load_tokenizer(path)
    ids = tok(PROMPTS)
    assert ids.dtype == np.int32 and ids.shape == (len(PROMPTS), 77)
    np.testing.assert_array_equal(ids, _reference(path, PROMPTS))
    ref = CLIPTokenizer.from_pretrained(path)
    assert tok.pad_id == ref.pad_token_id and tok.eos_id == ref.eos_token_id
    assert tok.pad_id == (0 if pad == "!" else tok.eos_id)
    assert tok.max_length == 77
    # Truncation keeps BOS ... EOS; the empty prompt is BOS EOS pad...
    assert ids[6, 0] == tok.bos_id and ids[6, -1] == tok.eos_id
    assert list(ids[1, :3]) == [tok.bos_id, tok.eos_id, tok.pad_id]


def test_explicit_max_length_and_single_string(root):
    path = _folder(root, "!", "vocab")
    tok = load_tokenizer(path, max_length=12)
    np.testing.assert_array_equal(tok(PROMPTS), _reference(path, PROMPTS, 12))
    np.testing.assert_array_equal(tok("a cat"), _reference(path, ["a cat"], 12))
    assert tok([]).shape == (0, 12)
    with pytest.raises(TypeError, match="prompt 1"):
        tok(["a", None])
    with pytest.raises(ValueError, match="max_length"):
        load_tokenizer(path, max_length=1)


def test_huge_model_max_length_falls_back_to_77(tmp_path):
    path = str(tmp_path / "tok")
    write_clip_tokenizer(path, WORDS)
    with open(os.path.join(path, "tokenizer_config.json")) as f:
        config = json.load(f)
    config["model_max_length"] = int(1e30)
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    assert load_tokenizer(path).max_length == 77
    assert load_tokenizer(path, max_length=77)(["a cat"]).shape == (1, 77)


def test_truncation_warns_once_per_instance(root, caplog):
    path = _folder(root, EOS, "vocab")
    tok = load_tokenizer(path)
    caplog.set_level(logging.WARNING, logger="spin_jax.models.tokenizer")
    tok(["a cat", "a " * 75])  # fits exactly
    assert not caplog.records
    tok(PROMPTS)
    tok(PROMPTS)
    assert len(caplog.records) == 1
    assert "2 of 9 prompts" in caplog.records[0].getMessage()
    load_tokenizer(path)(["a " * 100])  # a new instance warns again
    assert len(caplog.records) == 2


def test_save_round_trip_both_layouts(root, tmp_path):
    src = _folder(root, "!", "json")
    tok = load_tokenizer(src, max_length=77)
    out = str(tmp_path / "saved")
    tok.save(out)
    assert {"tokenizer.json", "vocab.json", "merges.txt"} <= set(os.listdir(out))
    np.testing.assert_array_equal(load_tokenizer(out)(PROMPTS), tok(PROMPTS))
    np.testing.assert_array_equal(_reference(out, PROMPTS), tok(PROMPTS))
    os.remove(os.path.join(out, "tokenizer.json"))  # what transformers 4 / slow tokenizers read
    np.testing.assert_array_equal(load_tokenizer(out)(PROMPTS), tok(PROMPTS))


def test_missing_folder_and_files(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="nope"):
        load_tokenizer(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(str(empty))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_word_is_one_token_in_any_order(tmp_path, seed):
    # Words that share pieces, shortest first: "right"'s merge "r i" lies inside "triangle",
    # "re" inside "red" and "circle"; transformers' BPE must still see one token per word.
    words = ["right", "re", "red", "triangle", "circle", "ci", "le", "left", "tri", "angle"]
    rng = np.random.default_rng(seed)
    words += ["".join(rng.choice(list("abcrt"), int(rng.integers(2, 9)))) for _ in range(30)]
    if seed:
        words = list(rng.permutation(words))
    write_clip_tokenizer(str(tmp_path), words)
    ref = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    split = {w: ref.tokenize(w) for w in words if len(ref.tokenize(w)) != 1}
    assert not split
