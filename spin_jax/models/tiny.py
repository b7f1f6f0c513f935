"""Tiny CLIP tokenizer folders written from scratch, for tests and the toy demo.

A published CLIP vocabulary cannot be downloaded here, so small models get a byte-level BPE
vocabulary of their own: the 256 byte symbols (alone and word-final) plus whole-word tokens for
the given words, in the same file layouts Stable Diffusion repositories use.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _byte_symbols() -> list[str]:
    # GPT-2/CLIP byte-to-unicode table: printable bytes map to themselves, the rest above 255.
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    extra = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(extra))]


def clip_vocab(words: Iterable[str] = ()) -> tuple[dict[str, int], list[str]]:
    """Returns (vocab, merges) where every word in ``words`` becomes a single token."""
    symbols = _byte_symbols()
    vocab: dict[str, int] = {}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab[s] = len(vocab)
    merges: list[str] = []
    for word in dict.fromkeys(w.lower() for w in words):
        if len(word) < 2 or not all(c in vocab for c in word):
            continue
        left = word[0]
        for i, c in enumerate(word[1:], start=1):
            right = c + "</w>" if i == len(word) - 1 else c
            merged = left + right
            if merged not in vocab:
                merges.append(f"{left} {right}")
                vocab[merged] = len(vocab)
            left = merged
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    return vocab, merges


def write_clip_tokenizer(
    path: str,
    words: Iterable[str] = (),
    *,
    pad_token: str = EOS,
    max_length: int = 77,
) -> int:
    """Writes ``vocab.json`` + ``merges.txt`` + ``tokenizer_config.json``; returns the vocab size.

    ``pad_token``: ``<|endoftext|>`` as SD 1.x, ``!`` as SD 2.x.
    """
    vocab, merges = clip_vocab(words)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(path, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(m + "\n" for m in merges))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": pad_token,
        "model_max_length": max_length,
        "do_lower_case": True,
    }
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(path, "special_tokens_map.json"), "w") as f:
        json.dump({k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}, f)
    return len(vocab)
