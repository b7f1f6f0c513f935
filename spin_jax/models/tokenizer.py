"""The CLIP tokenizer of a Stable Diffusion folder: prompts -> int32 [B, L] as the pipeline does.

transformers' ``CLIPTokenizer`` does the byte-level BPE (it needs no torch). Both folder layouts
load: ``vocab.json`` + ``merges.txt`` (the published SD repositories) and ``tokenizer.json``
(what transformers 5 writes). The padding token is the folder's own: ``<|endoftext|>`` for SD
1.x, ``!`` (id 0) for SD 2.x.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 77
_SANE_MAX_LENGTH = 100_000  # transformers writes int(1e30) when a folder does not say


class Tokenizer:
    """Pads/truncates to ``max_length`` like ``tokenizer(..., padding="max_length",
    truncation=True)``: a long prompt keeps BOS, its first ``max_length - 2`` tokens and EOS.

    A truncated prompt is logged as a warning once per instance.
    """

    def __init__(self, hf_tokenizer, max_length: int, path: str = "tokenizer"):
        self._tok = hf_tokenizer
        self.path = path
        self.max_length = int(max_length)
        self.pad_id = int(hf_tokenizer.pad_token_id)
        self.eos_id = int(hf_tokenizer.eos_token_id)
        self.bos_id = int(hf_tokenizer.bos_token_id)
        self.vocab_size = len(hf_tokenizer)
        self._warned = False

    def __call__(self, prompts: Sequence[str] | str) -> np.ndarray:
        """Returns int32 ``[len(prompts), max_length]``; a single string counts as one prompt."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise TypeError(f"prompt {i} must be a str, got {type(p).__name__}: {p!r}")
        out = np.full((len(prompts), self.max_length), self.pad_id, np.int32)
        if not prompts:
            return out
        # Tokenize untruncated so that truncation can be reported; the cut keeps the final EOS,
        # which is what transformers' truncation does with BOS/EOS-wrapped sequences.
        encoded = self._tok(prompts, add_special_tokens=True, verbose=False)["input_ids"]
        truncated = 0
        for i, ids in enumerate(encoded):
            if len(ids) > self.max_length:
                ids = ids[: self.max_length - 1] + ids[-1:]
                truncated += 1
            out[i, : len(ids)] = ids
        if truncated and not self._warned:
            self._warned = True
            logger.warning(
                "%d of %d prompts are longer than %d tokens and were truncated (reported once "
                "per tokenizer of %s)",
                truncated,
                len(prompts),
                self.max_length,
                self.path,
            )
        return out

    def save(self, path: str) -> None:
        """Writes the tokenizer folder in both layouts (tokenizer.json and vocab.json +
        merges.txt), with ``model_max_length`` set to this tokenizer's length."""
        os.makedirs(path, exist_ok=True)
        self._tok.model_max_length = self.max_length
        self._tok.save_pretrained(path)
        backend = getattr(self._tok, "backend_tokenizer", None)
        if backend is not None and not os.path.exists(os.path.join(path, "vocab.json")):
            backend.model.save(path)  # vocab.json + merges.txt for older transformers

    def __repr__(self) -> str:
        return (
            f"Tokenizer(path={self.path!r}, max_length={self.max_length}, "
            f"pad_id={self.pad_id}, eos_id={self.eos_id}, vocab_size={self.vocab_size})"
        )


def load_tokenizer(path: str, max_length: int | None = None) -> Tokenizer:
    """Loads the CLIP tokenizer folder ``path`` (e.g. ``<sd>/tokenizer``).

    ``max_length``: the text encoder's ``max_position_embeddings`` (the true length); when None
    the folder's ``model_max_length`` is used if it is sane, else 77.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer folder not found: {path}")
    files = set(os.listdir(path))
    if "tokenizer.json" not in files and not {"vocab.json", "merges.txt"} <= files:
        raise FileNotFoundError(
            f"tokenizer folder {path} has neither tokenizer.json nor vocab.json + merges.txt "
            f"(found: {sorted(files)})"
        )
    if max_length is not None and (
        isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2
    ):
        raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
    from transformers import CLIPTokenizer

    # from_pretrained on the folder: the vocab_file=/merges_file= keywords are ignored by
    # transformers 5 (every token would become <|endoftext|>).
    tok = CLIPTokenizer.from_pretrained(path)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(tok, name) is None:
            raise ValueError(f"{path}: the tokenizer defines no {name.removesuffix('_id')}")
    if tok("")["input_ids"] != [tok.bos_token_id, tok.eos_token_id]:
        raise ValueError(
            f"{path}: the tokenizer does not wrap prompts in <|startoftext|> ... <|endoftext|> "
            f"(empty prompt -> {tok('')['input_ids']}); not a CLIP tokenizer"
        )
    if max_length is None:
        model_max = getattr(tok, "model_max_length", None)
        sane = isinstance(model_max, int) and 2 <= model_max < _SANE_MAX_LENGTH
        max_length = model_max if sane else DEFAULT_MAX_LENGTH
    return Tokenizer(tok, max_length, path)
