"""The four scorers against PyTorch references on tiny random configurations.

References: transformers' CLIPModel (PickScore, the aesthetic CLIP) with a torch head of the
published layer structure; a small torch model written here with open_clip's module names and
forward (nn.MultiheadAttention with fused in_proj, causal text mask, argmax pooling) for HPSv2;
transformers' BlipVisionModel + BlipTextModel (the port of BLIP's med.py BERT, cross-attention,
bidirectional) for ImageReward. Preprocessing references: transformers' CLIPImageProcessor (PIL
backend) for PickScore, PIL + the torchvision formulas for the others.
"""

import json
import math
import os
from collections import OrderedDict

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors.numpy import save_file

from spin_jax.eval import open_clip as oc
from spin_jax.eval import preprocess as pp
from spin_jax.eval import scorers
from spin_jax.models.convert import WeightMismatchError
from spin_jax.models.tiny import write_clip_tokenizer

WORDS = ["a", "cat", "dog", "red", "blue", "photo", "of", "on", "the", "grass", "painting"]
PROMPTS = ["a photo of a cat", "red dog", "a blue painting of the grass on a red dog cat"]
MEAN = np.asarray(pp.CLIP_MEAN, np.float32)
STD = np.asarray(pp.CLIP_STD, np.float32)


def _perturb(model, seed: int, scale: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _images(seed: int = 0) -> list[np.ndarray]:
    """Non-square sizes, so crop offsets and padding are exercised."""
    rng = np.random.default_rng(seed)
    return [
        rng.integers(0, 256, s, dtype=np.uint8) for s in ((23, 28, 3), (40, 21, 3), (16, 16, 3))
    ]


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _ref_crop(image: np.ndarray, size: int) -> np.ndarray:
    """torchvision Resize(size) + CenterCrop(size) on a PIL image, + ToTensor + Normalize."""
    h, w = image.shape[:2]
    short, long = min(h, w), max(h, w)
    new_short, new_long = size, int(size * long / short)
    nw, nh = (new_short, new_long) if w <= h else (new_long, new_short)
    img = Image.fromarray(image).resize((nw, nh), Image.BICUBIC)
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    x = np.asarray(img.crop((left, top, left + size, top + size)), np.float32) / 255.0
    return (x - MEAN) / STD


def _ref_pad(image: np.ndarray, size: int) -> np.ndarray:
    """open_clip ResizeMaxSize(size, fill=0) + ToTensor + Normalize."""
    h, w = image.shape[:2]
    scale = size / float(max(h, w))
    nh, nw = round(h * scale), round(w * scale)
    img = Image.fromarray(image).resize((nw, nh), Image.BICUBIC)
    pw, ph = size - nw, size - nh
    canvas = Image.new("RGB", (size, size), (0, 0, 0))
    canvas.paste(img, (pw // 2, ph // 2))
    x = np.asarray(canvas, np.float32) / 255.0
    return (x - MEAN) / STD


def _nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


def _torch_head(in_features: int, seed: int) -> torch.nn.Module:
    """The published head: Linear layers with dropouts between, no activations."""

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.Sequential(
                torch.nn.Linear(in_features, 1024),
                torch.nn.Dropout(0.2),
                torch.nn.Linear(1024, 128),
                torch.nn.Dropout(0.2),
                torch.nn.Linear(128, 64),
                torch.nn.Dropout(0.1),
                torch.nn.Linear(64, 16),
                torch.nn.Linear(16, 1),
            )

        def forward(self, x):
            return self.layers(x)

    torch.manual_seed(seed)
    head = MLP().eval()
    _perturb(head, seed, 0.02)
    return head


def _state_np(module: torch.nn.Module, prefix: str = "") -> dict[str, np.ndarray]:
    return {prefix + k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# CLIP (PickScore, aesthetic).


def _hf_clip(path: str, seed: int, hidden_act: str = "gelu", eos_2: bool = False):
    vocab = write_clip_tokenizer(path, WORDS)
    tok = transformers.CLIPTokenizer.from_pretrained(path)
    config = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act=hidden_act,
            bos_token_id=tok.bos_token_id,
            eos_token_id=2 if eos_2 else tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=24,
            intermediate_size=40,
            num_hidden_layers=2,
            num_attention_heads=3,
            image_size=16,
            patch_size=4,
            hidden_act=hidden_act,
        ),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    model = transformers.CLIPModel(config).eval()
    _perturb(model, seed)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(20.0))
    model.save_pretrained(path, safe_serialization=True)
    return model, tok


@pytest.mark.parametrize("eos_2", [False, True])
def test_pickscore_matches_transformers(tmp_path, eos_2):
    model, tok = _hf_clip(str(tmp_path), seed=1, eos_2=eos_2)
    scorer = scorers.load_pickscore(str(tmp_path), batch_size=2)
    images = _images()
    ours = scorer(PROMPTS, images)

    processor = transformers.CLIPImageProcessor(
        size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}
    )
    pixels = processor(images=[Image.fromarray(i) for i in images], return_tensors="np")
    px = pixels["pixel_values"].transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(scorer.preprocess(images), px)  # bit-exact preprocessing
    ids = tok(PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        t = model.get_text_features(**ids).pooler_output
        i = model.get_image_features(pixel_values=_nchw(px)).pooler_output
        t, i = t / t.norm(dim=-1, keepdim=True), i / i.norm(dim=-1, keepdim=True)
        ref = (model.logit_scale.exp() * (t * i).sum(-1)).numpy()
    assert _rel(ours, ref) <= 1e-4
    assert abs(ref).max() > 1.0  # the logit scale is applied


def test_crop_modes_differ_as_documented():
    image = _images()[0]  # 23 x 28 -> 16 x 19: offset round(1.5) = 2 vs 3 // 2 = 1
    a = pp.preprocess([image], 16, "crop")[0]
    b = pp.preprocess([image], 16, "crop_floor")[0]
    np.testing.assert_array_equal(a, _ref_crop(image, 16))
    resized = Image.fromarray(image).resize((19, 16), Image.BICUBIC)
    np.testing.assert_array_equal(a, (np.asarray(resized, np.float32)[:, 2:18] / 255 - MEAN) / STD)
    np.testing.assert_array_equal(b, (np.asarray(resized, np.float32)[:, 1:17] / 255 - MEAN) / STD)


def test_aesthetic_matches_torch(tmp_path):
    clip_dir = str(tmp_path / "clip")
    model, _ = _hf_clip(clip_dir, seed=2, hidden_act="quick_gelu")
    head = _torch_head(16, seed=3)
    head_path = str(tmp_path / "head.safetensors")
    save_file(_state_np(head), head_path)
    scorer = scorers.load_aesthetic(clip_dir, head_path, batch_size=4)
    images = _images(1)
    ours = scorer(PROMPTS, images)

    px = np.stack([_ref_crop(i, 16) for i in images])
    with torch.no_grad():
        emb = model.get_image_features(pixel_values=_nchw(px)).pooler_output.numpy()
        emb = emb / np.linalg.norm(emb, axis=-1, keepdims=True)  # as the reference, in numpy
        ref = head(torch.from_numpy(emb).float())[:, 0].numpy()
    assert _rel(ours, ref) <= 1e-4


# ---------------------------------------------------------------------------------------------
# HPSv2: open_clip names and forward.


class _ResBlock(torch.nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln_1 = torch.nn.LayerNorm(d)
        self.attn = torch.nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln_2 = torch.nn.LayerNorm(d)
        self.mlp = torch.nn.Sequential(
            OrderedDict(
                c_fc=torch.nn.Linear(d, 4 * d),
                gelu=torch.nn.GELU(),
                c_proj=torch.nn.Linear(4 * d, d),
            )
        )

    def forward(self, x, mask=None):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class _Transformer(torch.nn.Module):
    def __init__(self, d: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = torch.nn.ModuleList([_ResBlock(d, heads) for _ in range(layers)])

    def forward(self, x, mask=None):
        for block in self.resblocks:
            x = block(x, mask)
        return x


class _Visual(torch.nn.Module):
    def __init__(self, image: int, patch: int, width: int, layers: int, heads: int, dim: int):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, width, patch, patch, bias=False)
        self.class_embedding = torch.nn.Parameter(torch.randn(width) * 0.1)
        self.positional_embedding = torch.nn.Parameter(
            torch.randn((image // patch) ** 2 + 1, width) * 0.1
        )
        self.ln_pre = torch.nn.LayerNorm(width)
        self.transformer = _Transformer(width, layers, heads)
        self.ln_post = torch.nn.LayerNorm(width)
        self.proj = torch.nn.Parameter(torch.randn(width, dim) * width**-0.5)

    def forward(self, x):
        x = self.conv1(x).flatten(2).transpose(1, 2)
        cls = self.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1])
        x = torch.cat([cls, x], dim=1) + self.positional_embedding
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj


class _OpenCLIP(torch.nn.Module):
    """open_clip's CLIP (ViT), names as its state dict."""

    def __init__(self, cfg: dict, vocab: int):
        super().__init__()
        v, t = cfg["vision_cfg"], cfg["text_cfg"]
        self.visual = _Visual(
            v["image_size"],
            v["patch_size"],
            v["width"],
            v["layers"],
            v["width"] // v["head_width"],
            cfg["embed_dim"],
        )
        self.token_embedding = torch.nn.Embedding(vocab, t["width"])
        self.positional_embedding = torch.nn.Parameter(
            torch.randn(t["context_length"], t["width"]) * 0.1
        )
        self.transformer = _Transformer(t["width"], t["layers"], t["heads"])
        self.ln_final = torch.nn.LayerNorm(t["width"])
        self.text_projection = torch.nn.Parameter(torch.randn(t["width"], cfg["embed_dim"]) * 0.2)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        n = t["context_length"]
        self.register_buffer(
            "attn_mask", torch.full((n, n), float("-inf")).triu_(1), persistent=False
        )

    def encode_text(self, ids):
        x = self.token_embedding(ids) + self.positional_embedding
        x = self.ln_final(self.transformer(x, self.attn_mask))
        return x[torch.arange(x.shape[0]), ids.argmax(dim=-1)] @ self.text_projection

    def forward(self, image, ids):
        i = torch.nn.functional.normalize(self.visual(image), dim=-1)
        t = torch.nn.functional.normalize(self.encode_text(ids), dim=-1)
        return i, t


HPS_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 2, "width": 24, "head_width": 8, "patch_size": 4},
    "text_cfg": {"context_length": 77, "vocab_size": 0, "width": 32, "heads": 4, "layers": 2},
}


def _hps_fixture(tmp_path, seed: int = 4):
    tok_dir = str(tmp_path / "tok")
    vocab = write_clip_tokenizer(tok_dir, WORDS)
    cfg = json.loads(json.dumps(HPS_CFG))
    cfg["text_cfg"]["vocab_size"] = vocab
    torch.manual_seed(seed)
    model = _OpenCLIP(cfg, vocab).eval()
    _perturb(model, seed)
    weights = str(tmp_path / "hps.safetensors")
    save_file(_state_np(model), weights)
    cfg_path = str(tmp_path / "open_clip_config.json")
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    return model, weights, tok_dir, cfg_path


def test_hpsv2_matches_open_clip_forward(tmp_path):
    model, weights, tok_dir, cfg_path = _hps_fixture(tmp_path)
    scorer = scorers.load_hpsv2(weights, tok_dir, cfg_path, batch_size=2)
    images = _images(2)
    ours = scorer(PROMPTS, images)

    px = np.stack([_ref_pad(i, 16) for i in images])
    np.testing.assert_array_equal(scorer.preprocess(images), px)
    ids = torch.from_numpy(np.asarray(scorer.tokenize(PROMPTS)["input_ids"], np.int64))
    with torch.no_grad():
        i, t = model(_nchw(px), ids)
        ref = (i * t).sum(-1).numpy()  # cos; HPSv2 applies no logit scale
    assert _rel(ours, ref) <= 1e-4


def test_open_clip_mapping_errors(tmp_path):
    _, weights, tok_dir, cfg_path = _hps_fixture(tmp_path)
    from safetensors.numpy import load_file

    state = load_file(weights)
    with pytest.raises(ValueError, match="visual.attnpool"):
        oc.open_clip_to_hf({**state, "visual.attnpool.weight": np.zeros(3)})
    mapped = oc.open_clip_to_hf({f"module.{k}": v for k, v in state.items()})  # DDP prefix
    assert "vision_model.encoder.layers.1.self_attn.v_proj.bias" in mapped
    back = oc.hf_to_open_clip(mapped)
    assert sorted(back) == sorted(state)
    for k, v in state.items():
        np.testing.assert_array_equal(back[k], v)
    bad = str(tmp_path / "bad.safetensors")
    save_file({k: v for k, v in state.items() if k != "ln_final.bias"}, bad)
    with pytest.raises(WeightMismatchError, match="final_layer_norm"):
        scorers.load_hpsv2(bad, tok_dir, cfg_path)


# ---------------------------------------------------------------------------------------------
# ImageReward: BLIP ViT + BERT with cross-attention.

BLIP_VISION_RENAMES = (
    ("embeddings.class_embedding", "cls_token"),
    ("embeddings.position_embedding", "pos_embed"),
    ("embeddings.patch_embedding.", "patch_embed.proj."),
    ("encoder.layers.", "blocks."),
    (".layer_norm1.", ".norm1."),
    (".layer_norm2.", ".norm2."),
    (".self_attn.qkv.", ".attn.qkv."),
    (".self_attn.projection.", ".attn.proj."),
    ("post_layernorm.", "norm."),
)


def _blip_names(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """transformers BlipVisionModel names -> salesforce/BLIP vit.py names."""
    out = {}
    for k, v in state.items():
        for a, b in BLIP_VISION_RENAMES:
            k = k.replace(a, b)
        out["blip.visual_encoder." + k] = v
    return out


def _bert_vocab(path: str) -> int:
    os.makedirs(path, exist_ok=True)
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "##s", "##ing"]
    with open(os.path.join(path, "vocab.txt"), "w") as f:
        f.write("\n".join(tokens) + "\n")
    return len(tokens) + 2  # BLIP adds [DEC] and [ENC]


def _imagereward_fixture(tmp_path, seed: int = 5):
    tok_dir = str(tmp_path / "bert")
    vocab = _bert_vocab(tok_dir)
    vcfg = transformers.BlipVisionConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=16,
        patch_size=4,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
    )
    tcfg = transformers.BlipTextConfig(
        vocab_size=vocab,
        hidden_size=24,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=40,
        encoder_hidden_size=32,
        hidden_act="gelu",
        layer_norm_eps=1e-12,
        is_decoder=True,
    )
    torch.manual_seed(seed)
    vision = transformers.BlipVisionModel(vcfg).eval()
    text = transformers.BlipTextModel(tcfg, add_pooling_layer=False).eval()
    head = _torch_head(24, seed + 1)
    for i, m in enumerate((vision, text)):
        _perturb(m, seed + 10 + i)
    state = _blip_names(_state_np(vision))
    state.update(_state_np(text, "blip.text_encoder."))
    state.update(_state_np(head, "mlp."))
    state["blip.vision_proj.weight"] = np.zeros((8, 32), np.float32)  # unused by the scorer
    weights = str(tmp_path / "ImageReward.safetensors")
    save_file(state, weights)
    med = {
        "hidden_size": 24,
        "intermediate_size": 40,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 40,
        "vocab_size": vocab,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,
        "encoder_width": 768,
        "add_cross_attention": True,
        "type_vocab_size": 2,
    }
    med_path = str(tmp_path / "med_config.json")
    with open(med_path, "w") as f:
        json.dump(med, f)
    return (vision, text, head), weights, med_path, tok_dir


def test_imagereward_matches_blip(tmp_path):
    (vision, text, head), weights, med_path, tok_dir = _imagereward_fixture(tmp_path)
    scorer = scorers.load_imagereward(weights, med_path, tok_dir, vision_num_heads=4, batch_size=2)
    images = _images(3)
    ours = scorer(PROMPTS, images)

    tok = transformers.BertTokenizer.from_pretrained(tok_dir)
    enc = tok(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert enc["attention_mask"].sum(-1).min() < enc["attention_mask"].sum(-1).max()
    px = np.stack([_ref_crop(i, 16) for i in images])
    with torch.no_grad():
        image_embeds = vision(pixel_values=_nchw(px)).last_hidden_state
        out = text(
            input_ids=enc["input_ids"],
            attention_mask=enc["attention_mask"],
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long),
            is_decoder=False,
        ).last_hidden_state
        raw = head(out[:, 0].float())[:, 0].numpy()
    ref = (raw - scorers.IMAGEREWARD_MEAN) / scorers.IMAGEREWARD_STD
    assert _rel(ours, ref) <= 1e-4
    # The raw head output, before the published normalisation, agrees too.
    assert _rel(ours * scorers.IMAGEREWARD_STD + scorers.IMAGEREWARD_MEAN, raw) <= 1e-4


def test_imagereward_bfloat16_close_to_float32(tmp_path):
    _, weights, med_path, tok_dir = _imagereward_fixture(tmp_path)
    kw = dict(vision_num_heads=4, batch_size=4)
    f32 = scorers.load_imagereward(weights, med_path, tok_dir, **kw)(PROMPTS, _images(3))
    bf16 = scorers.load_imagereward(weights, med_path, tok_dir, dtype="bfloat16", **kw)
    assert _rel(bf16(PROMPTS, _images(3)), f32) <= 3e-2


def test_preprocess_jax_within_one_level():
    rng = np.random.default_rng(0)
    for shape in ((2, 64, 64, 3), (2, 40, 70, 3)):
        x = rng.integers(0, 256, shape, dtype=np.uint8)
        for mode in pp.MODES:
            ref = pp.preprocess(x, 24, mode)
            got = np.asarray(pp.preprocess_jax(x.astype(np.float32) / 127.5 - 1.0, 24, mode))
            levels = np.abs(got - ref) * STD * 255
            assert levels.max() <= 1.0 + 1e-3, (shape, mode, levels.max())
            assert (levels > 0.5).mean() < 0.01


def test_imagereward_shape_errors(tmp_path):
    _, weights, med_path, tok_dir = _imagereward_fixture(tmp_path)
    with pytest.raises(ValueError, match="not divisible"):
        scorers.load_imagereward(weights, med_path, tok_dir, vision_num_heads=5)
    with open(med_path) as f:
        med = json.load(f)
    med["hidden_size"] = 16
    with open(med_path, "w") as f:
        json.dump(med, f)
    with pytest.raises(WeightMismatchError, match="med_config|ImageReward"):
        scorers.load_imagereward(weights, med_path, tok_dir, vision_num_heads=4)


def test_pickle_refused_with_conversion_hint(tmp_path):
    path = str(tmp_path / "ImageReward.pt")
    torch.save({"state_dict": {"mlp.layers.0.weight": torch.zeros(2, 2)}}, path)
    with pytest.raises(ValueError, match="convert_scorer.py"):
        scorers.load_imagereward(path, str(tmp_path), str(tmp_path))
