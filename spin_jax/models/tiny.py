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


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    # CLIP's BPE: the last symbol is word-final; merge the lowest-ranked adjacent pair until none
    # of the pairs is a merge.
    parts = [*word[:-1], word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = {(a, b) for a, b in zip(parts, parts[1:], strict=False)}
        best = min(pairs, key=lambda p: ranks.get(p, len(ranks)))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(parts):
            if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


def clip_vocab(words: Iterable[str] = ()) -> tuple[dict[str, int], list[str]]:
    """Returns (vocab, merges) where every word in ``words`` becomes a single token.

    Each word is first split by the merges made so far (a shorter word's merges can apply inside
    it), then joined left to right by new merges. A new merge ranks after all earlier ones, so it
    never changes how an earlier word is split: every word stays one token, whatever the order.
    """
    symbols = _byte_symbols()
    vocab: dict[str, int] = {}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab[s] = len(vocab)
    merges: list[str] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in dict.fromkeys(w.lower() for w in words):
        if len(word) < 2 or not all(c in vocab for c in word):
            continue
        parts = _bpe(word, ranks)
        while len(parts) > 1:
            left = parts[0]
            for right in parts[1:]:
                if (left, right) not in ranks:
                    ranks[(left, right)] = len(merges)
                    merges.append(f"{left} {right}")
                left += right
                vocab.setdefault(left, len(vocab))
            # A new merge can also apply elsewhere in the same word ("c c" in "cccc"); split
            # again and join what is left. Each round leaves fewer pieces.
            parts = _bpe(word, ranks)
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
