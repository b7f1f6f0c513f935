"""Tiny random scorer weights in the published file layouts, for tests and dry runs.

:func:`write_tiny_scorers` writes all four scorers (random Flax initialisation, saved with the
published tensor names) and returns the ``scorers`` config section that loads them. The scores
mean nothing; the files exercise every loading, tokenizing and batching path without a download.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from spin_jax.eval import blip as blip_lib
from spin_jax.eval import open_clip as oc
from spin_jax.models import clip, convert
from spin_jax.models.tiny import write_clip_tokenizer

IMAGE_SIZE = 16
PATCH_SIZE = 4
EMBED_DIM = 16


def _random_params(module, *args, seed: int) -> dict:
    """Random parameters shaped like ``module.init(key, *args)``, drawn with NumPy (an eager
    Flax init of four models takes tens of seconds on a CPU; shapes alone are instant)."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), *args)["params"]
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        x = 0.05 * rng.standard_normal(leaf.shape).astype(np.float32)
        return x + 1.0 if name == "scale" else x

    return jax.tree_util.tree_map_with_path(draw, shapes)


def _save(tensors: dict, path: str) -> None:
    tensors = {k: np.array(v, np.float32, order="C") for k, v in tensors.items()}
    if "logit_scale" in tensors:  # a 0-d parameter, as transformers and open_clip store it
        tensors["logit_scale"] = tensors["logit_scale"].reshape(())
    save_file(tensors, path, metadata={"format": "pt"})


def _clip_config(vocab: int, hidden_act: str) -> dict:
    text = dict(
        model_type="clip_text_model",
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=hidden_act,
        eos_token_id=vocab - 1,
    )
    vision = dict(
        model_type="clip_vision_model",
        hidden_size=24,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=3,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        hidden_act=hidden_act,
    )
    return dict(
        model_type="clip",
        projection_dim=EMBED_DIM,
        logit_scale_init_value=2.6592,
        text_config=text,
        vision_config=vision,
    )


def _write_clip_folder(path: str, words: Iterable[str], hidden_act: str, seed: int) -> None:
    vocab = write_clip_tokenizer(path, words)
    config = _clip_config(vocab, hidden_act)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    model = clip.clip_from_config(config)
    v = model.config.vision
    params = _random_params(
        model,
        jnp.zeros((1, 77), jnp.int32),
        jnp.zeros((1, v.image_size, v.image_size, 3)),
        seed=seed,
    )
    _save(clip.params_to_state_dict(params), os.path.join(path, "model.safetensors"))


def _head_state(in_features: int, seed: int) -> dict:
    head = blip_lib.MLPHead()
    return convert.flax_to_torch(_random_params(head, jnp.zeros((1, in_features)), seed=seed))


def _write_bert_vocab(path: str, words: Iterable[str]) -> int:
    os.makedirs(path, exist_ok=True)
    tokens = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        *dict.fromkeys(w.lower() for w in words),
    ]
    with open(os.path.join(path, "vocab.txt"), "w") as f:
        f.write("\n".join(tokens) + "\n")
    return len(tokens) + 2  # BLIP adds [DEC] and [ENC]


def write_tiny_scorers(root: str, words: Iterable[str] = (), seed: int = 0) -> dict:
    """Writes tiny PickScore, aesthetic, HPSv2 and ImageReward weights under ``root``; returns
    the ``scorers`` config fields (paths) that load them."""
    words = list(words) or ["a", "photo", "of", "cat", "dog"]
    os.makedirs(root, exist_ok=True)

    pick = os.path.join(root, "pickscore")
    _write_clip_folder(pick, words, "gelu", seed)

    aes_clip = os.path.join(root, "aesthetic_clip")
    _write_clip_folder(aes_clip, words, "quick_gelu", seed + 1)
    head = os.path.join(root, "aesthetic_head.safetensors")
    _save(_head_state(EMBED_DIM, seed + 2), head)

    hps_tok = os.path.join(root, "hpsv2_tokenizer")
    vocab = write_clip_tokenizer(hps_tok, words)
    hps_cfg = {
        "embed_dim": EMBED_DIM,
        "vision_cfg": {
            "image_size": IMAGE_SIZE,
            "layers": 2,
            "width": 24,
            "head_width": 8,
            "patch_size": PATCH_SIZE,
        },
        "text_cfg": {
            "context_length": 77,
            "vocab_size": vocab,
            "width": 32,
            "heads": 4,
            "layers": 2,
        },
    }
    hps_cfg_path = os.path.join(root, "hpsv2_open_clip_config.json")
    with open(hps_cfg_path, "w") as f:
        json.dump(hps_cfg, f, indent=2)
    model = clip.CLIPModel(oc.clip_config_from_open_clip(hps_cfg))
    params = _random_params(
        model,
        jnp.zeros((1, 77), jnp.int32),
        jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3)),
        seed=seed + 3,
    )
    hps = os.path.join(root, "hpsv2.safetensors")
    _save(oc.hf_to_open_clip(clip.params_to_state_dict(params)), hps)

    bert = os.path.join(root, "bert")
    bert_vocab = _write_bert_vocab(bert, words)
    med = dict(
        vocab_size=bert_vocab,
        hidden_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=40,
        max_position_embeddings=40,
        layer_norm_eps=1e-12,
        hidden_act="gelu",
        encoder_width=32,
        add_cross_attention=True,
    )
    med_path = os.path.join(root, "med_config.json")
    with open(med_path, "w") as f:
        json.dump(med, f, indent=2)
    vision = blip_lib.BlipVisionConfig(
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
    )
    text = blip_lib.text_config_from_dict(med, encoder_width=32)
    ir_model = blip_lib.ImageRewardModel(vision, text)
    v = _random_params(
        ir_model,
        jnp.zeros((1, 35), jnp.int32),
        jnp.ones((1, 35), jnp.int32),
        jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3)),
        seed=seed + 4,
    )
    state = blip_lib.bert_state_dict_from_flax_names(convert.flax_to_torch(v))
    ir = os.path.join(root, "ImageReward.safetensors")
    _save(state, ir)

    return {
        "pickscore": {"model": pick, "tokenizer": ""},
        "aesthetic": {"clip": aes_clip, "head": head},
        "hpsv2": {"weights": hps, "tokenizer": hps_tok, "model_config": hps_cfg_path},
        "imagereward": {
            "weights": ir,
            "med_config": med_path,
            "tokenizer": bert,
            "vision_num_heads": 4,
            "max_length": 35,
        },
    }
