"""The papers' four learned scorers in Flax: PickScore, HPSv2, ImageReward, LAION aesthetic v2.

A :class:`Scorer` maps (prompts, uint8 images) to one float per pair. Images are preprocessed on
the host exactly as each reference does (``preprocess.py``), the networks run jitted on the
local devices with the batch split across them. Weights are local safetensors files (convert
the published pickles once with ``launch/convert_scorer.py``):

- ``pickscore``: ``model`` = a transformers ``CLIPModel`` folder (``config.json`` +
  ``model.safetensors``; yuvalkirstain/PickScore_v1), ``tokenizer`` = a CLIP tokenizer folder
  (the processor of laion/CLIP-ViT-H-14-laion2B-s32B-b79K; default: the model folder).
  Score ``exp(logit_scale) * cos(text, image)`` (about 21 for SD 1.5). Preprocessing
  ``crop_floor`` (transformers' ``CLIPImageProcessor``), 77 tokens. The reference pads to the
  longest prompt with an attention mask; padding to 77 gives the same result (causal text
  tower pooled at the end-of-text token).
- ``aesthetic``: ``clip`` = a ``CLIPModel`` (or ``CLIPVisionModelWithProjection``) folder of
  openai/clip-vit-large-patch14, ``head`` = ``sac+logos+ava1-l14-linearMSE`` as safetensors
  (``layers.{0,2,4,6,7}``). Score = head(L2-normalised image embedding) (about 5-6).
  Preprocessing ``crop`` (OpenAI ``clip``'s transform). The text tower is not loaded.
- ``hpsv2``: ``weights`` = ``HPS_v2_compressed.pt`` (or v2.1) as safetensors, open_clip names;
  ``tokenizer`` = a CLIP tokenizer folder (open_clip's ViT-H-14 uses the same BPE vocabulary,
  e.g. the laion processor folder); ``model_config`` = an open_clip model config JSON (default
  ViT-H-14). Score ``cos(text, image)``, no logit scale (about 0.27), as HPSv2's
  ``img_score.py`` computes ``image_features @ text_features.T`` of normalised features.
  Preprocessing ``pad`` (open_clip ``ResizeMaxSize``, fill 0). open_clip's own tokenizer also
  runs ``ftfy.fix_text`` and HTML unescaping; transformers' does when ftfy is installed, so
  prompts with unusual Unicode may tokenize differently without it.
- ``imagereward``: ``weights`` = ``ImageReward.pt`` as safetensors (``blip.visual_encoder.*``,
  ``blip.text_encoder.*``, ``mlp.layers.*``; the unused ``vision_proj``/``text_proj`` are
  ignored), ``med_config`` = its ``med_config.json``, ``tokenizer`` = a bert-base-uncased
  tokenizer folder (``vocab.txt``). 35 tokens with an attention mask; the feature is the first
  token (``[CLS]``) after cross-attention to the image, as ImageReward's ``score`` and
  ``inference_rank`` take it (BLIP's ITM head would swap in ``[ENC]``; ImageReward does not).
  Score ``(mlp(feature) - 0.16717362830052426) / 1.0333394966054072`` (about 0.8 for SD 1.5).
  Preprocessing ``crop``. The ViT's shape is read from the weights; its head count is
  ``width // 64`` (BLIP's base and large) unless ``vision_num_heads`` says otherwise.

The references run their networks in float16 on CUDA (``torch.cuda.amp.autocast`` for HPSv2,
``clip.load`` for the aesthetic CLIP); with ``dtype=float32`` the scores here are the float32
values of the same networks, so expect differences of about 1e-3 relative to published
numbers computed in half precision.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from spin_jax.eval import open_clip as oc
from spin_jax.eval import preprocess as pp
from spin_jax.eval.blip import (
    BlipVisionConfig,
    ImageRewardModel,
    MLPHead,
    bert_state_dict_to_flax_names,
    imagereward_param_shapes,
    text_config_from_dict,
)
from spin_jax.eval.weights import read_json, weight_files
from spin_jax.models import clip, convert, templates
from spin_jax.models import weights as model_weights

METRICS = ("pickscore", "hpsv2", "imagereward", "aesthetic")
DISPLAY = {
    "pickscore": "PickScore",
    "hpsv2": "HPSv2",
    "imagereward": "ImageReward",
    "aesthetic": "Aesthetic",
}
IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

Params = dict[str, Any]
TextInputs = dict[str, np.ndarray]


def _read_weights(path: str) -> dict[str, np.ndarray]:
    """Every tensor at ``path`` as lazy views of the memory-mapped files in their stored dtypes;
    ``convert.torch_to_flax`` casts and lays them out in one copy (no per-tensor dispatch)."""
    return model_weights.read_tensors(weight_files(path), dtype=None)


def _template(model: nn.Module, shapes_of, *args) -> Params:
    """The params template, traced once per machine and model (``spin_jax.models.templates``)."""
    return templates.traced(model, shapes_of, *args)[0]


def _normalize(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


@functools.lru_cache(maxsize=4)
def _mesh(devices: tuple) -> jax.sharding.Mesh:
    from spin_jax import parallel

    return parallel.make_mesh(devices=list(devices))


@dataclasses.dataclass
class Scorer:
    """One scorer: ``scorer(prompts, images)`` -> float64 ``[N]``, one score per pair.

    ``apply(params, text_inputs, pixels) -> [B]`` is pure; ``tokenize(prompts)`` gives the
    text inputs (int arrays ``[B, L]``); images are preprocessed with ``mode`` at
    ``image_size`` (``preprocess.py``). Batches of ``batch_size`` are split over the local
    devices (the last one is padded and trimmed, so one compilation serves all).
    """

    name: str
    apply: Callable[[Params, TextInputs, jax.Array], jax.Array]
    params: Params
    tokenize: Callable[[Sequence[str]], TextInputs]
    image_size: int
    mode: str
    batch_size: int = 32
    source: str = ""

    def __post_init__(self):
        from spin_jax import parallel

        if self.batch_size < 1:
            raise ValueError(f"{self.name}: batch_size must be >= 1, got {self.batch_size}")
        self.mesh = _mesh(tuple(jax.local_devices()))
        self._n = parallel.data_parallel_size(self.mesh)
        self._batch_sh = parallel.batch_sharding(self.mesh)
        self.params = jax.device_put(self.params, parallel.replicated(self.mesh))
        self._fn = jax.jit(self.apply)

    def preprocess(self, images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        return pp.preprocess(images, self.image_size, self.mode)

    def score_pixels(self, prompts: Sequence[str], pixels: np.ndarray) -> np.ndarray:
        """Scores preprocessed pixels ``[N, S, S, 3]`` against their prompts."""
        prompts = list(prompts)
        if len(prompts) != len(pixels):
            raise ValueError(f"{self.name}: {len(prompts)} prompts for {len(pixels)} images")
        if not prompts:
            return np.zeros((0,), np.float64)
        text = self.tokenize(prompts)
        bs = min(self.batch_size, len(prompts))
        bs = -(-bs // self._n) * self._n
        out = []
        for start in range(0, len(prompts), bs):
            stop = min(start + bs, len(prompts))
            chunk = {k: _pad(v[start:stop], bs) for k, v in text.items()}
            px = _pad(np.asarray(pixels[start:stop], np.float32), bs)
            chunk = jax.device_put(chunk, self._batch_sh)
            scores = self._fn(self.params, chunk, jax.device_put(px, self._batch_sh))
            out.append(np.asarray(jax.device_get(scores), np.float64)[: stop - start])
        return np.concatenate(out)

    def __call__(
        self, prompts: Sequence[str], images: np.ndarray | Sequence[np.ndarray]
    ) -> np.ndarray:
        """uint8 images (NHWC, or a list of HWC of any size) -> scores ``[N]``."""
        prompts = list(prompts)
        if len(prompts) != len(images):
            raise ValueError(f"{self.name}: {len(prompts)} prompts for {len(images)} images")
        out = [np.zeros((0,), np.float64)]
        step = max(self.batch_size, 1)
        for start in range(0, len(prompts), step):
            px = self.preprocess(images[start : start + step])
            out.append(self.score_pixels(prompts[start : start + step], px))
        return np.concatenate(out)


def _pad(x: np.ndarray, n: int) -> np.ndarray:
    if len(x) == n:
        return x
    return np.concatenate([x, np.repeat(x[-1:], n - len(x), axis=0)], axis=0)


def _dtype(dtype: Any) -> Any:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} not in {sorted(DTYPES)}")
        return DTYPES[dtype]
    return dtype


# ---------------------------------------------------------------------------------------------
# Tokenizers.


def _clip_tokenizer(path: str, max_length: int) -> Callable[[Sequence[str]], TextInputs]:
    from spin_jax.models.tokenizer import load_tokenizer

    folder = path
    if os.path.isdir(os.path.join(path, "tokenizer")) and not os.path.isfile(
        os.path.join(path, "vocab.json")
    ):
        folder = os.path.join(path, "tokenizer")
    tok = load_tokenizer(folder, max_length=max_length)
    return lambda prompts: {"input_ids": tok(list(prompts))}


def bert_tokenizer(path: str, max_length: int = 35) -> Callable[[Sequence[str]], TextInputs]:
    """BLIP's text tokenizer (bert-base-uncased) from a local folder with ``vocab.txt``:
    ``[CLS] ... [SEP]``, padded and truncated to ``max_length``, with the attention mask."""
    if not os.path.isfile(os.path.join(path, "vocab.txt")) and not os.path.isfile(
        os.path.join(path, "tokenizer.json")
    ):
        raise FileNotFoundError(f"BERT tokenizer folder {path} has no vocab.txt or tokenizer.json")
    from transformers import BertTokenizer

    tok = BertTokenizer.from_pretrained(path)

    def tokenize(prompts: Sequence[str]) -> TextInputs:
        enc = tok(list(prompts), padding="max_length", truncation=True, max_length=max_length)
        return {
            "input_ids": np.asarray(enc["input_ids"], np.int32),
            "attention_mask": np.asarray(enc["attention_mask"], np.int32),
        }

    return tokenize


# ---------------------------------------------------------------------------------------------
# PickScore.


def _clip_pair_features(model: clip.CLIPModel, params: Params, ids, pixels):
    text = model.apply({"params": params}, ids, method="get_text_features")
    image = model.apply({"params": params}, pixels, method="get_image_features")
    return jnp.sum(_normalize(text) * _normalize(image), axis=-1)


def load_pickscore(
    model_path: str,
    tokenizer_path: str = "",
    *,
    dtype: Any = jnp.float32,
    attention_impl: str | None = None,
    batch_size: int = 32,
) -> Scorer:
    """PickScore from a transformers ``CLIPModel`` folder (module doc)."""
    config_path = os.path.join(model_path, "config.json")
    model = clip.clip_from_config(
        read_json(config_path),
        dtype=_dtype(dtype),
        attention_impl=attention_impl,
        source=config_path,
    )
    params = clip.params_from_state_dict(
        _read_weights(model_path), _template(model, clip.param_shapes), source=model_path
    )
    tokenize = _clip_tokenizer(
        tokenizer_path or model_path, model.config.text.max_position_embeddings
    )

    def apply(params, text, pixels):
        cos = _clip_pair_features(model, params, text["input_ids"], pixels)
        return jnp.exp(params["logit_scale"]) * cos

    return Scorer(
        "pickscore",
        apply,
        params,
        tokenize,
        model.config.vision.image_size,
        "crop_floor",
        batch_size,
        model_path,
    )


# ---------------------------------------------------------------------------------------------
# LAION aesthetic predictor v2.


class AestheticModel(nn.Module):
    """CLIP image tower + ``visual_projection`` (HF names), L2 normalisation, the MLP head."""

    config: clip.CLIPVisionConfig
    projection_dim: int
    dtype: Any = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        pooled = clip.CLIPVisionTransformer(
            self.config, self.dtype, self.attention_impl, name="vision_model"
        )(pixel_values).pooler_output
        emb = nn.Dense(
            self.projection_dim,
            use_bias=False,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name="visual_projection",
        )(pooled)
        return MLPHead(name="head")(_normalize(emb))[:, 0]


def load_aesthetic(
    clip_path: str,
    head_path: str,
    *,
    dtype: Any = jnp.float32,
    attention_impl: str | None = None,
    batch_size: int = 32,
) -> Scorer:
    """LAION aesthetic predictor v2 on CLIP ViT-L/14 image embeddings (module doc)."""
    config_path = os.path.join(clip_path, "config.json")
    cfg = read_json(config_path)
    vision_cfg = cfg.get("vision_config") if cfg.get("model_type", "clip") == "clip" else cfg
    vision = clip.vision_config_from_dict(vision_cfg or {}, source=config_path)
    projection_dim = cfg.get("projection_dim", 512)
    model = AestheticModel(vision, projection_dim, _dtype(dtype), attention_impl)
    tensors = {
        k: v
        for k, v in _read_weights(clip_path).items()
        if k.startswith(("vision_model.", "visual_projection."))
    }
    head = _read_weights(head_path)
    tensors.update({f"head.{k}": v for k, v in head.items()})
    shapes = jax.eval_shape(
        model.init,
        jax.random.key(0),
        jnp.zeros((1, vision.image_size, vision.image_size, 3), jnp.float32),
    )["params"]
    params = convert.torch_to_flax(tensors, shapes, source=f"{clip_path} + {head_path}")

    def apply(params, text, pixels):
        del text
        return model.apply({"params": params}, pixels)

    def tokenize(prompts):
        return {"n": np.zeros((len(prompts), 1), np.int32)}  # the score ignores the prompt

    return Scorer(
        "aesthetic",
        apply,
        params,
        tokenize,
        vision.image_size,
        "crop",
        batch_size,
        f"{clip_path} + {head_path}",
    )


# ---------------------------------------------------------------------------------------------
# HPSv2.


def load_hpsv2(
    weights: str,
    tokenizer_path: str,
    model_config: str = "",
    *,
    dtype: Any = jnp.float32,
    attention_impl: str | None = None,
    batch_size: int = 32,
) -> Scorer:
    """HPSv2 from an open_clip-named safetensors file (module doc)."""
    cfg_dict = read_json(model_config) if model_config else oc.VIT_H_14
    config = oc.clip_config_from_open_clip(cfg_dict, source=model_config or "ViT-H-14")
    model = clip.CLIPModel(config, _dtype(dtype), attention_impl)
    state = oc.open_clip_to_hf(_read_weights(weights), source=weights)
    params = clip.params_from_state_dict(state, _template(model, clip.param_shapes), source=weights)
    tokenize = _clip_tokenizer(tokenizer_path, config.text.max_position_embeddings)

    def apply(params, text, pixels):
        return _clip_pair_features(model, params, text["input_ids"], pixels)

    return Scorer(
        "hpsv2", apply, params, tokenize, config.vision.image_size, "pad", batch_size, weights
    )


# ---------------------------------------------------------------------------------------------
# ImageReward.

_IMAGEREWARD_PREFIXES = ("blip.visual_encoder.", "blip.text_encoder.", "mlp.")


def blip_vision_config(
    state: Mapping[str, np.ndarray], num_heads: int | None = None, *, source: str = "checkpoint"
) -> BlipVisionConfig:
    """The ViT's shape read from BLIP weights (``blip.visual_encoder.*``)."""
    p = "blip.visual_encoder."
    need = [p + "cls_token", p + "pos_embed", p + "patch_embed.proj.weight"]
    missing = [k for k in need if k not in state]
    if missing:
        raise ValueError(f"{source}: not ImageReward weights (missing {', '.join(missing)})")
    width = int(state[p + "cls_token"].shape[-1])
    patch = int(state[p + "patch_embed.proj.weight"].shape[-1])
    grid = int(round((state[p + "pos_embed"].shape[1] - 1) ** 0.5))
    depth = len({k.split(".")[3] for k in state if k.startswith(p + "blocks.")})
    fc1 = state.get(p + "blocks.0.mlp.fc1.weight")
    if depth == 0 or fc1 is None:
        raise ValueError(f"{source}: no ViT blocks under {p}blocks.")
    heads = num_heads or max(width // 64, 1)
    if width % heads:
        raise ValueError(f"{source}: ViT width {width} is not divisible by {heads} heads")
    return BlipVisionConfig(
        image_size=grid * patch,
        patch_size=patch,
        hidden_size=width,
        num_hidden_layers=depth,
        num_attention_heads=heads,
        intermediate_size=int(fc1.shape[0]),
    )


def load_imagereward(
    weights: str,
    med_config: str,
    tokenizer_path: str,
    *,
    vision_num_heads: int | None = None,
    max_length: int = 35,
    dtype: Any = jnp.float32,
    attention_impl: str | None = None,
    batch_size: int = 32,
) -> Scorer:
    """ImageReward (BLIP ViT + BERT with cross-attention + linear head; module doc)."""
    state = {k: v for k, v in _read_weights(weights).items() if k.startswith(_IMAGEREWARD_PREFIXES)}
    vision = blip_vision_config(state, vision_num_heads, source=weights)
    text = text_config_from_dict(
        read_json(med_config), encoder_width=vision.hidden_size, source=med_config
    )
    model = ImageRewardModel(vision, text, _dtype(dtype), attention_impl)
    params = convert.torch_to_flax(
        bert_state_dict_to_flax_names(state),
        _template(model, imagereward_param_shapes, int(max_length)),
        source=weights,
    )
    tokenize = bert_tokenizer(tokenizer_path, max_length)

    def apply(params, text, pixels):
        raw = model.apply({"params": params}, text["input_ids"], text["attention_mask"], pixels)
        return (raw - IMAGEREWARD_MEAN) / IMAGEREWARD_STD

    return Scorer(
        "imagereward", apply, params, tokenize, vision.image_size, "crop", batch_size, weights
    )


# ---------------------------------------------------------------------------------------------
# From a config.

# Per metric: the config fields that must name existing paths, then the optional ones.
REQUIRED = {
    "pickscore": ("model",),
    "aesthetic": ("clip", "head"),
    "hpsv2": ("weights", "tokenizer"),
    "imagereward": ("weights", "med_config", "tokenizer"),
}
OPTIONAL = {"pickscore": ("tokenizer",), "hpsv2": ("model_config",)}


def check_scorer(name: str, cfg: Mapping[str, Any]) -> str | None:
    """None if the files of scorer ``name`` are configured and present, else the reason."""
    if name not in REQUIRED:
        raise ValueError(f"unknown metric {name!r}; known: {', '.join(METRICS)}")
    for field in REQUIRED[name]:
        path = cfg.get(field) or ""
        if not path:
            return f"scorers.{name}.{field} is not set"
        if not os.path.exists(path):
            return f"scorers.{name}.{field}: {path} not found"
    for field in OPTIONAL.get(name, ()):
        path = cfg.get(field) or ""
        if path and not os.path.exists(path):
            return f"scorers.{name}.{field}: {path} not found"
    return None


def load_scorer(
    name: str,
    cfg: Mapping[str, Any],
    *,
    dtype: Any = jnp.float32,
    attention_impl: str | None = None,
    batch_size: int = 32,
) -> Scorer:
    """Builds scorer ``name`` from its config section (fields as in ``configs/eval.py``)."""
    reason = check_scorer(name, cfg)
    if reason:
        raise FileNotFoundError(reason)
    kw = dict(dtype=dtype, attention_impl=attention_impl, batch_size=batch_size)
    if name == "pickscore":
        return load_pickscore(cfg["model"], cfg.get("tokenizer") or "", **kw)
    if name == "aesthetic":
        return load_aesthetic(cfg["clip"], cfg["head"], **kw)
    if name == "hpsv2":
        return load_hpsv2(cfg["weights"], cfg["tokenizer"], cfg.get("model_config") or "", **kw)
    heads = cfg.get("vision_num_heads") or None
    return load_imagereward(
        cfg["weights"],
        cfg["med_config"],
        cfg["tokenizer"],
        vision_num_heads=heads,
        max_length=int(cfg.get("max_length") or 35),
        **kw,
    )
