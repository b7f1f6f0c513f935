"""Single-file (original Stability/CompVis layout) checkpoints <-> diffusers, against diffusers.

The reverse mapping (``write_single_file``) is checked independently by diffusers' own
``from_single_file`` (offline, with the tiny pipeline's folder as ``config=``); the forward one
(``read_single_file``) against the original diffusers/transformers state dicts, and its inferred
configs by building diffusers/transformers models from them and comparing outputs.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from spin_jax.models.single_file import read_single_file, write_single_file
from spin_jax.models.tiny import write_clip_tokenizer

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from tiny_sd import WORDS, _perturb, make_tiny_sd, scheduler_config, vae_kwargs  # noqa: E402

NETWORKS = {
    "sd1": ("unet", "vae", "text_encoder"),
    "sd2": ("unet", "vae", "text_encoder"),
    "sdxl": ("unet", "vae", "text_encoder", "text_encoder_2"),
}
# What the tensors cannot tell about the tiny models (the published ones need none of these).
TINY_OVERRIDES = {
    "sd1": {
        "unet": {"norm_num_groups": 8},
        "vae": {"norm_num_groups": 8},
        "text_encoder": {"num_attention_heads": 4},
    },
    "sd2": {
        "unet": {"norm_num_groups": 8, "attention_head_dim": [2, 4]},
        "vae": {"norm_num_groups": 8},
        "text_encoder": {"num_attention_heads": 4},
    },
    # widths chosen so that SDXL's heads follow the head-dim-64 rule
    "sdxl": {"vae": {"norm_num_groups": 8}},
}
PREDICTION = {"sd1": None, "sd2": "v_prediction", "sdxl": None}


def make_tiny_sdxl(path: str, seed: int = 0) -> str:
    """A tiny random StableDiffusionXLPipeline: DownBlock2D + CrossAttnDownBlock2D with two
    transformer layers (as SDXL's deeper levels), CLIP-L-like (width 64) and bigG-like (width 128,
    projection 96) text encoders, text_time addition embedding."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    tok_dirs = [tempfile.mkdtemp(), tempfile.mkdtemp()]
    vocab = write_clip_tokenizer(tok_dirs[0], WORDS)
    write_clip_tokenizer(tok_dirs[1], WORDS, pad_token="!")
    tokenizers = [CLIPTokenizer.from_pretrained(d) for d in tok_dirs]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(64, 128),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(1, 2),
        cross_attention_dim=64 + 128,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=96 + 6 * 8,
    )
    vae = AutoencoderKL(**vae_kwargs())

    def text_config(width, act, proj, pad):
        return CLIPTextConfig(
            vocab_size=vocab,
            hidden_size=width,
            intermediate_size=width + 32,
            num_hidden_layers=2,
            num_attention_heads=width // 64,
            max_position_embeddings=77,
            hidden_act=act,
            projection_dim=proj,
            bos_token_id=tokenizers[0].bos_token_id,
            eos_token_id=tokenizers[0].eos_token_id,
            pad_token_id=pad,
        )

    te = CLIPTextModel(text_config(64, "quick_gelu", 64, tokenizers[0].pad_token_id))
    te2 = CLIPTextModelWithProjection(text_config(128, "gelu", 96, tokenizers[1].pad_token_id))
    for i, m in enumerate((unet, vae, te, te2)):
        _perturb(m, seed + i)
    sched = EulerDiscreteScheduler.from_config(
        {
            k: v
            for k, v in scheduler_config().items()
            if k not in ("clip_sample", "set_alpha_to_one")
        }
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=te,
        text_encoder_2=te2,
        tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1],
        unet=unet,
        scheduler=sched,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def _pipeline_class(variant):
    return (
        diffusers.StableDiffusionXLPipeline
        if variant == "sdxl"
        else diffusers.StableDiffusionPipeline
    )


def _numpy(module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def _with_text_model(name: str, sd: dict) -> dict:
    # transformers >= 5.6 saves CLIPTextModel without the "text_model." level; spin_jax keeps it
    if not name.startswith("text_encoder"):
        return sd
    return {
        (
            k if k.startswith("text_model.") or k == "text_projection.weight" else "text_model." + k
        ): v
        for k, v in sd.items()
    }


def _for_module(module, sd: dict) -> dict:
    if hasattr(module, "text_model"):
        return sd
    return {k.removeprefix("text_model."): v for k, v in sd.items()}


@pytest.fixture(scope="module", params=["sd1", "sd2", "sdxl"])
def tiny(request, tmp_path_factory):
    variant = request.param
    root = tmp_path_factory.mktemp(variant)
    folder = str(root / "diffusers")
    if variant == "sdxl":
        make_tiny_sdxl(folder)
    else:
        make_tiny_sd(folder, variant)
    pipe = _pipeline_class(variant).from_pretrained(folder)
    sds = {n: _numpy(getattr(pipe, n)) for n in NETWORKS[variant]}
    path = write_single_file(sds, variant, str(root / "model.safetensors"))
    return variant, folder, pipe, sds, path


def test_from_single_file_gives_back_every_tensor(tiny):
    variant, folder, _, sds, path = tiny
    back = _pipeline_class(variant).from_single_file(path, config=folder, local_files_only=True)
    for name, ref in sds.items():
        got = _numpy(getattr(back, name))
        assert set(got) == set(ref), (name, sorted(set(got) ^ set(ref))[:5])
        for k, v in ref.items():
            np.testing.assert_array_equal(got[k], v, err_msg=f"{name}: {k}")


def test_file_layout(tiny):
    variant, _, _, _, path = tiny
    keys = set(load_file(path))
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    # the upsampler follows the attention when the up level has one (SDXL's first), else the resnet
    slot = 2 if variant == "sdxl" else 1
    assert f"model.diffusion_model.output_blocks.1.{slot}.conv.weight" in keys
    assert "first_stage_model.encoder.mid.attn_1.q.weight" in keys
    if variant == "sd1":
        assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in keys
    elif variant == "sd2":
        assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in keys
        assert "cond_stage_model.model.transformer.resblocks.2.attn.in_proj_weight" in keys
    else:
        assert "model.diffusion_model.label_emb.0.0.weight" in keys
        assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in keys
        assert "conditioner.embedders.1.model.text_projection" in keys


def test_read_single_file_equals_original(tiny):
    variant, _, pipe, sds, path = tiny
    sf = read_single_file(
        path, prediction_type=PREDICTION[variant], overrides=TINY_OVERRIDES[variant]
    )
    assert sf.family == variant
    assert set(sf.state_dicts) == set(NETWORKS[variant])
    for name, ref in sds.items():
        ref = _with_text_model(name, ref)
        got = sf.state_dicts[name]
        assert set(got) == set(ref), (name, sorted(set(got) ^ set(ref))[:5])
        for k, v in ref.items():
            assert got[k].shape == v.shape, (name, k)
            np.testing.assert_array_equal(got[k], v, err_msg=f"{name}: {k}")
    if variant == "sd2":  # OpenCLIP's last resblock and projection are not SD 2.x's
        assert "cond_stage_model.model.text_projection" in sf.skipped
        assert any("resblocks.2." in k for k in sf.skipped)
    else:
        assert sf.skipped == []


def _norm(v):
    return list(v) if isinstance(v, (list, tuple)) else v


SHAPING = {
    "unet": [
        "in_channels",
        "out_channels",
        "block_out_channels",
        "layers_per_block",
        "down_block_types",
        "up_block_types",
        "mid_block_type",
        "attention_head_dim",
        "cross_attention_dim",
        "use_linear_projection",
        "norm_num_groups",
        "conv_in_kernel",
        "conv_out_kernel",
        "addition_embed_type",
        "addition_time_embed_dim",
        "projection_class_embeddings_input_dim",
        "flip_sin_to_cos",
        "freq_shift",
    ],
    "vae": [
        "in_channels",
        "out_channels",
        "block_out_channels",
        "layers_per_block",
        "latent_channels",
        "down_block_types",
        "up_block_types",
        "norm_num_groups",
        "mid_block_add_attention",
        "use_quant_conv",
        "use_post_quant_conv",
    ],
    "text": [
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "projection_dim",
        "num_hidden_layers",
        "num_attention_heads",
        "max_position_embeddings",
        "hidden_act",
        "layer_norm_eps",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
    ],
}


def _depths(cfg: dict, n: int) -> list[int]:
    d = _norm(cfg.get("transformer_layers_per_block", 1))
    return d if isinstance(d, list) else [d] * n


def _build(name: str, cfg: dict, variant: str):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if name == "unet":
        return UNet2DConditionModel.from_config(cfg)
    if name == "vae":
        return AutoencoderKL.from_config(cfg)
    fields = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type")}
    cls = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
    assert cfg["architectures"] == [cls.__name__]
    return cls(CLIPTextConfig(**fields))


def _outputs(name: str, model, variant: str, cfgs: dict):
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if name == "unet":
            ctx = cfgs["unet"]["cross_attention_dim"]
            x = torch.randn(2, 4, 8, 8, generator=gen)
            kw = {}
            if variant == "sdxl":
                kw["added_cond_kwargs"] = {
                    "text_embeds": torch.randn(2, 96, generator=gen),
                    "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 2),
                }
            out = model(
                x, torch.tensor([10, 500]), torch.randn(2, 5, ctx, generator=gen), **kw
            ).sample
            return [out]
        if name == "vae":
            img = torch.rand(1, 3, 16, 16, generator=gen) * 2 - 1
            post = model.encode(img).latent_dist
            return [post.mean, post.logvar, model.decode(post.mean).sample]
        vocab = cfgs[name]["vocab_size"]
        ids = torch.randint(0, vocab - 2, (2, 9), generator=gen)
        ids[:, 0], ids[:, -1] = vocab - 2, vocab - 1
        out = model(ids)
        extra = [out.text_embeds] if name == "text_encoder_2" else [out.pooler_output]
        return [out.last_hidden_state, *extra]


def test_inferred_configs_give_the_same_models(tiny):
    variant, _, pipe, _, path = tiny
    sf = read_single_file(
        path, prediction_type=PREDICTION[variant], overrides=TINY_OVERRIDES[variant]
    )
    for name in NETWORKS[variant]:
        orig = getattr(pipe, name)
        ocfg = orig.config.to_dict() if hasattr(orig.config, "to_dict") else dict(orig.config)
        fields = SHAPING["text" if name.startswith("text") else name]
        for f in fields:
            assert _norm(sf.configs[name].get(f)) == _norm(ocfg.get(f)), (name, f)
        if name == "unet":
            n = len(ocfg["block_out_channels"])
            assert _depths(sf.configs[name], n) == _depths(ocfg, n)
        model = _build(name, sf.configs[name], variant).eval()
        model.load_state_dict(_for_module(model, {k: torch.from_numpy(np.array(v)) for k, v in sf.state_dicts[name].items()}), strict=True)  # fmt: skip
        for got, ref in zip(
            _outputs(name, model, variant, sf.configs),
            _outputs(name, orig.eval(), variant, sf.configs),
            strict=True,
        ):
            np.testing.assert_allclose(got.numpy(), ref.numpy(), atol=1e-5, rtol=0, err_msg=name)


def test_scheduler_and_pipeline_hints(tiny):
    from spin_jax.diffusion import schedule_from_config

    variant, _, _, _, path = tiny
    sf = read_single_file(
        path, prediction_type=PREDICTION[variant], overrides=TINY_OVERRIDES[variant]
    )
    sched = sf.configs["scheduler"]
    assert sched["prediction_type"] == (PREDICTION[variant] or "epsilon")
    schedule_from_config(sched, source="single file")  # accepted by spin_jax's samplers
    assert sf.configs["unet"]["upcast_attention"] == (variant == "sd2")
    if variant == "sdxl":
        assert sf.configs["model_index"]["force_zeros_for_empty_prompt"] is True
        assert sf.configs["vae"]["scaling_factor"] == 0.13025
    else:
        assert sf.configs["vae"]["scaling_factor"] == 0.18215


# ---------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def sd1_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd1_bad")
    folder = make_tiny_sd(str(root / "diffusers"), "sd1")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    sds = {n: _numpy(getattr(pipe, n)) for n in NETWORKS["sd1"]}
    return write_single_file(sds, "sd1", str(root / "model.safetensors")), sds


def _rewrite(src: str, dst: str, edit) -> str:
    tensors = dict(load_file(src))
    edit(tensors)
    save_file(tensors, dst)
    return dst


def test_unknown_keys_are_listed(sd1_file, tmp_path):
    src, _ = sd1_file

    def add_foreign(t):
        for i in range(10):
            t[f"lora_unet_thing.{i}.weight"] = np.zeros(2, np.float32)

    path = _rewrite(src, str(tmp_path / "foreign.safetensors"), add_foreign)
    with pytest.raises(ValueError, match=r"10 keys match no known prefix.*lora_unet_thing\.0\.weight.*2 more") as e:  # fmt: skip
        read_single_file(path)
    assert str(path) in str(e.value)

    def add_leftover(t):
        t["model.diffusion_model.input_blocks.1.0.bogus.weight"] = np.zeros(2, np.float32)
        t["first_stage_model.encoder.down.0.block.0.extra.bias"] = np.zeros(2, np.float32)

    path = _rewrite(src, str(tmp_path / "leftover.safetensors"), add_leftover)
    with pytest.raises(ValueError, match=r"2 keys left over after mapping") as e:
        read_single_file(path)
    assert "model.diffusion_model.input_blocks.1.0.bogus.weight" in str(e.value)
    assert "first_stage_model.encoder.down.0.block.0.extra.bias" in str(e.value)


def test_skipped_buffers_and_ema(sd1_file, tmp_path):
    src, sds = sd1_file

    def add(t):
        t["alphas_cumprod"] = np.ones(1000, np.float32)
        t["model_ema.decay"] = np.ones((), np.float32)
        t["cond_stage_model.transformer.text_model.embeddings.position_ids"] = np.arange(
            77, dtype=np.int64
        )[None]

    path = _rewrite(src, str(tmp_path / "buffers.safetensors"), add)
    sf = read_single_file(path, overrides=TINY_OVERRIDES["sd1"])
    assert sorted(sf.skipped) == sorted(
        [
            "alphas_cumprod",
            "model_ema.decay",
            "cond_stage_model.transformer.text_model.embeddings.position_ids",
        ]
    )
    assert set(sf.state_dicts["unet"]) == set(sds["unet"])


def test_text_encoder_without_text_model_level(sd1_file, tmp_path):
    src, sds = sd1_file

    def strip(t):
        for k in [k for k in t if k.startswith("cond_stage_model.transformer.text_model.")]:
            t[k.replace(".text_model.", ".", 1)] = t.pop(k)

    path = _rewrite(src, str(tmp_path / "old_clip.safetensors"), strip)
    sf = read_single_file(path, overrides=TINY_OVERRIDES["sd1"])
    ref = _with_text_model("text_encoder", sds["text_encoder"])
    assert set(sf.state_dicts["text_encoder"]) == set(ref)


def test_missing_vae_names_the_prefix(sd1_file, tmp_path):
    src, _ = sd1_file

    def drop_vae(t):
        for k in [k for k in t if k.startswith("first_stage_model.")]:
            del t[k]

    path = _rewrite(src, str(tmp_path / "novae.safetensors"), drop_vae)
    with pytest.raises(ValueError, match=r"no vae .*'first_stage_model\.'"):
        read_single_file(path)

    def drop_text(t):
        for k in [k for k in t if k.startswith("cond_stage_model.")]:
            del t[k]

    path = _rewrite(src, str(tmp_path / "notext.safetensors"), drop_text)
    with pytest.raises(ValueError, match=r"no text encoder found.*cond_stage_model\.transformer\."):
        read_single_file(path)


def test_pickled_checkpoint_refused_unless_allowed(sd1_file, tmp_path):
    src, sds = sd1_file
    ckpt = str(tmp_path / "model.ckpt")
    torch.save({"state_dict": {k: torch.from_numpy(v.copy()) for k, v in load_file(src).items()}}, ckpt)  # fmt: skip
    with pytest.raises(ValueError, match=r"model\.ckpt is a pickled checkpoint.*[Cc]onvert.*allow_pickle"):  # fmt: skip
        read_single_file(ckpt)
    sf = read_single_file(ckpt, allow_pickle=True, overrides=TINY_OVERRIDES["sd1"])
    np.testing.assert_array_equal(
        sf.state_dicts["unet"]["conv_in.weight"], sds["unet"]["conv_in.weight"]
    )


def test_heads_that_cannot_be_inferred_are_an_error(sd1_file):
    src, _ = sd1_file  # width 32 text encoder: the head-dim-64 rule gives no heads
    with pytest.raises(ValueError, match=r"text_encoder's attention heads.*overrides"):
        read_single_file(src)
    with pytest.raises(ValueError, match=r"unknown network 'unet_2'"):
        read_single_file(src, overrides={"unet_2": {}})


def test_write_rejects_unknown_and_missing(sd1_file, tmp_path):
    _, sds = sd1_file
    bad = {**sds, "unet": {**sds["unet"], "down_blocks.0.weird.weight": np.zeros(1, np.float32)}}
    with pytest.raises(ValueError, match=r"1 keys have no original-layout name: unet: down_blocks\.0\.weird\.weight"):  # fmt: skip
        write_single_file(bad, "sd1", str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match=r"missing \['vae'\]"):
        write_single_file(
            {k: v for k, v in sds.items() if k != "vae"}, "sd1", str(tmp_path / "x.safetensors")
        )
    assert not os.path.exists(tmp_path / "x.safetensors")


# ------------------------------------------------- full-size shapes (meta tensors, no memory)

_SD_VAE = dict(
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=4,
)
_CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
               num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768)  # fmt: skip
# The published configs' fields that shape the models (SD 1.5, SD 2.1 768-v, SDXL base 1.0).
FULL = {
    "sd1": {
        "unet": dict(
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768,
            attention_head_dim=8,
        ),
        "vae": _SD_VAE,
        "text_encoder": _CLIP_L,
    },
    "sd2": {
        "unet": dict(
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=1024,
            attention_head_dim=(5, 10, 20, 20),
            use_linear_projection=True,
            upcast_attention=True,
            sample_size=96,
        ),
        "vae": _SD_VAE,
        "text_encoder": dict(
            vocab_size=49408,
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=23,
            num_attention_heads=16,
            hidden_act="gelu",
            projection_dim=1024,
        ),  # fmt: skip
    },
    "sdxl": {
        "unet": dict(
            block_out_channels=(320, 640, 1280),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        ),
        "vae": _SD_VAE,
        "text_encoder": _CLIP_L,
        "text_encoder_2": dict(
            vocab_size=49408,
            hidden_size=1280,
            intermediate_size=5120,
            num_hidden_layers=32,
            num_attention_heads=20,
            hidden_act="gelu",
            projection_dim=1280,
        ),  # fmt: skip
    },
}
MODEL_TYPE = {"sd1": "v1", "sd2": "v2", "sdxl": "xl_base"}


def _meta_state_dict(name: str, cfg: dict) -> dict[str, np.ndarray]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        if name == "unet":
            model = UNet2DConditionModel(**cfg)
        elif name == "vae":
            model = AutoencoderKL(**cfg)
        else:
            cls = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
            model = cls(CLIPTextConfig(**cfg))
    # zero-stride arrays: the shapes without the memory
    zero = np.zeros((), np.float16)
    return {k: np.broadcast_to(zero, tuple(v.shape)) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("variant", ["sd1", "sd2", "sdxl"])
def test_full_size_layouts_and_configs(variant):
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    from spin_jax.models.single_file import convert_from_original, convert_to_original

    sds = {n: _meta_state_dict(n, cfg) for n, cfg in FULL[variant].items()}
    original = convert_to_original(sds, variant)
    assert infer_diffusers_model_type(original) == MODEL_TYPE[variant]  # diffusers agrees
    sf = convert_from_original(
        original, prediction_type="v_prediction" if variant == "sd2" else None
    )
    assert sf.family == variant
    for name, ref in sds.items():
        ref = _with_text_model(name, ref)
        got = sf.state_dicts[name]
        assert set(got) == set(ref), (name, sorted(set(got) ^ set(ref))[:5])
        assert all(got[k].shape == v.shape for k, v in ref.items()), name
        cfg = sf.configs[name]
        for field, value in FULL[variant][name].items():
            assert _norm(cfg[field]) == _norm(value), (name, field, cfg[field], value)
    assert _depths(sf.configs["unet"], len(FULL[variant]["unet"]["block_out_channels"])) == (
        [1, 2, 10] if variant == "sdxl" else [1] * 4
    )
    assert sf.configs["unet"]["upcast_attention"] == (variant == "sd2")


# SDXL's UNet and projection text encoder come to spin_jax's builders in another branch.
SPIN_JAX_NETWORKS = {
    "sd1": NETWORKS["sd1"],
    "sd2": NETWORKS["sd2"],
    "sdxl": ("vae", "text_encoder"),
}


def test_spin_jax_builds_the_same_networks(tiny):
    """The inferred configs build the same spin_jax modules as the folder's configs, and the
    state dicts convert to the same Flax params (what ``load_pretrained`` would do)."""
    import json

    import jax

    from spin_jax.models import convert
    from spin_jax.models.clip import text_encoder_from_config, text_encoder_param_shapes
    from spin_jax.models.unet import unet_from_config, unet_param_shapes
    from spin_jax.models.vae import vae_from_config, vae_param_shapes

    builders = {
        "unet": (unet_from_config, unet_param_shapes),
        "vae": (vae_from_config, vae_param_shapes),
        "text_encoder": (text_encoder_from_config, text_encoder_param_shapes),
    }
    variant, folder, _, sds, path = tiny
    sf = read_single_file(
        path, prediction_type=PREDICTION[variant], overrides=TINY_OVERRIDES[variant]
    )
    for name in SPIN_JAX_NETWORKS[variant]:
        build, shapes_of = builders[name]
        with open(os.path.join(folder, name, "config.json")) as f:
            ref_model = build(json.load(f), attention_impl="xla")
        model = build(sf.configs[name], attention_impl="xla", source=f"{path} ({name})")
        assert model == ref_model, name
        shapes = shapes_of(model)
        got = convert.torch_to_flax(sf.state_dicts[name], shapes, source=path)
        ref = convert.torch_to_flax(_with_text_model(name, sds[name]), shapes)
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), got, ref)


def test_arrays_are_views_of_the_file(tiny):
    variant, _, _, _, path = tiny
    sf = read_single_file(
        path, prediction_type=PREDICTION[variant], overrides=TINY_OVERRIDES[variant]
    )
    for name, sd in sf.state_dicts.items():
        for k, v in sd.items():  # read-only memory-map views, split and transposed in place
            assert not v.flags.writeable and not v.flags.owndata, (name, k)


def test_half_precision_file_keeps_its_dtype(sd1_file, tmp_path):
    _, sds = sd1_file
    half = {n: {k: v.astype(np.float16) for k, v in sd.items()} for n, sd in sds.items()}
    path = write_single_file(half, "sd1", str(tmp_path / "fp16.safetensors"))
    sf = read_single_file(path, overrides=TINY_OVERRIDES["sd1"])
    for name, sd in half.items():
        for k, v in _with_text_model(name, sd).items():
            got = sf.state_dicts[name][k]
            assert got.dtype == np.float16
            np.testing.assert_array_equal(got, v)


def test_incomplete_network_is_named(sd1_file, tmp_path):
    src, _ = sd1_file

    def drop(t):
        del t["first_stage_model.decoder.conv_in.weight"]

    path = _rewrite(src, str(tmp_path / "partial.safetensors"), drop)
    with pytest.raises(ValueError, match=r"the vae lacks the tensor 'decoder\.conv_in\.weight'"):
        read_single_file(path, overrides=TINY_OVERRIDES["sd1"])


def test_missing_network_names_its_prefix(tiny):
    from spin_jax.models.single_file import convert_from_original

    variant, _, _, _, path = tiny
    tensors = load_file(path)
    without = lambda p: {k: v for k, v in tensors.items() if not k.startswith(p)}  # noqa: E731
    with pytest.raises(ValueError, match=r"x\.safetensors: no unet .*'model\.diffusion_model\.'"):
        convert_from_original(without("model.diffusion_model."), where="x.safetensors")
    if variant == "sdxl":
        with pytest.raises(ValueError, match=r"no text_encoder_2 .*'conditioner\.embedders\.1\.model\.'"):  # fmt: skip
            convert_from_original(without("conditioner.embedders.1."))
    else:
        with pytest.raises(ValueError, match=r"no text encoder found"):
            convert_from_original(without("cond_stage_model."))


def test_load_pretrained_reads_a_single_file_as_its_folder(tiny):
    """load_pretrained(file, components=folder): the same params and outputs as the folder."""
    import jax

    from spin_jax.models import load_pretrained

    variant, folder, _, _, path = tiny
    from_folder = load_pretrained(folder)
    from_file = load_pretrained(path, components=folder)
    assert from_file.family is from_folder.family
    a, b = (
        jax.tree.leaves_with_path(from_file.params),
        jax.tree.leaves_with_path(from_folder.params),
    )
    assert [k for k, _ in a] == [k for k, _ in b]
    for (k, x), (_, y) in zip(a, b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(k))
    ids = from_file.tokenize(["a red cat"])
    ctx_a, pooled_a = from_file.encode_prompt(from_file.params, ids)
    ctx_b, pooled_b = from_folder.encode_prompt(from_folder.params, ids)
    np.testing.assert_array_equal(np.asarray(ctx_a), np.asarray(ctx_b))
    assert (pooled_a is None) == (pooled_b is None) == (variant != "sdxl")
    with pytest.raises(FileNotFoundError, match="components="):
        load_pretrained(path)
    if variant == "sdxl":
        other = os.path.join(os.path.dirname(folder), "sd1_components")
        make_tiny_sd(other, "sd1")
        with pytest.raises(ValueError, match="StableDiffusionPipeline folder"):
            load_pretrained(path, components=other)
