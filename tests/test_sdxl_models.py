"""SDXL networks against diffusers / transformers (PyTorch) on tiny random configurations.

UNet with ``addition_embed_type="text_time"`` (and LCM's ``time_cond_proj_dim``), the guidance
embedding, ``CLIPTextModelWithProjection`` (``text_encoder_2``), config readers and presets.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spin_jax.models import clip, convert, presets
from spin_jax.models.unet import (
    check_added_cond_dims,
    guidance_scale_embedding,
    unet_dummy_inputs,
    unet_from_config,
    unet_param_shapes,
)
from spin_jax.models.vae import vae_from_config

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

POOLED, TIME_DIM = 20, 8
# SDXL's layout, shrunk: a plain first block, transformer_layers_per_block per block (the mid
# block takes the last entry, the up blocks the reverse), linear projections, per-block heads.
SDXL_TINY = dict(
    sample_size=8,
    block_out_channels=(16, 32),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2),
    attention_head_dim=(2, 4),
    use_linear_projection=True,
    cross_attention_dim=24,
    norm_num_groups=8,
    addition_embed_type="text_time",
    addition_time_embed_dim=TIME_DIM,
    projection_class_embeddings_input_dim=POOLED + 6 * TIME_DIM,
)
# LCM-SDXL-style: a guidance embedding, plus per-layer transformer counts with an explicit
# reverse list, and the other sinusoid convention (which add_time_proj must follow too).
LCM_TINY = dict(
    SDXL_TINY,
    layers_per_block=2,
    transformer_layers_per_block=(1, (1, 2)),
    reverse_transformer_layers_per_block=((2, 1, 1), 1),
    flip_sin_to_cos=False,
    freq_shift=1,
    time_cond_proj_dim=12,
)
TEXT_TIME_KEYS = (
    "addition_embed_type",
    "addition_time_embed_dim",
    "projection_class_embeddings_input_dim",
)


def _perturb(model, seed: int, scale: float = 0.05) -> None:
    """Noise on every parameter (as tests/tiny_sd.py) so zero-initialised layers show."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _torch_unet(config, seed):
    torch.manual_seed(seed)
    model = diffusers.UNet2DConditionModel(**config).eval()
    _perturb(model, seed)
    return model


def _build(config, seed):
    tmodel = _torch_unet(config, seed)
    model = unet_from_config(dict(tmodel.config))
    state = {k: v.numpy() for k, v in tmodel.state_dict().items()}
    params = convert.torch_to_flax(state, unet_param_shapes(model), source="test")
    return tmodel, model, params


@pytest.fixture(scope="module")
def sdxl():
    return _build(SDXL_TINY, 0)


@pytest.fixture(scope="module")
def lcm():
    return _build(LCM_TINY, 1)


def _inputs(batch, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, h, w, generator=g)
    ctx = torch.randn(batch, 5, 24, generator=g)
    pooled = torch.randn(batch, POOLED, generator=g)
    # (orig_h, orig_w, crop_top, crop_left, target_h, target_w), as the SDXL pipeline builds them.
    time_ids = torch.tensor([[1024.0, 768.0, 0.0, 32.0, 1024.0, 1024.0]] * batch)
    time_ids[1:] = torch.tensor([64.0, 96.0, 7.0, 3.0, 64.0, 64.0])
    return x, ctx, {"text_embeds": pooled, "time_ids": time_ids}


def _jax_cond(cond):
    return {k: jnp.asarray(v.numpy()) for k, v in cond.items()}


def _nhwc(x):
    return jnp.asarray(x.numpy().transpose(0, 2, 3, 1))


def _rel_err(out, ref_nchw):
    ref = ref_nchw.transpose(0, 2, 3, 1)
    return float(np.abs(np.asarray(out, np.float32) - ref).max() / np.abs(ref).max())


def test_sdxl_unet_parity(sdxl):
    tmodel, model, params = sdxl
    assert "add_embedding" in params and "cond_proj" not in params["time_embedding"]
    x, ctx, cond = _inputs(2, 8, 12, seed=2)
    t = torch.tensor([3, 901])
    with torch.no_grad():
        ref = tmodel(x, t, ctx, added_cond_kwargs=cond).sample.numpy()
    out = jax.jit(model.apply)(
        {"params": params},
        _nhwc(x),
        jnp.asarray(t.numpy(), jnp.int32),
        jnp.asarray(ctx.numpy()),
        _jax_cond(cond),
    )
    assert out.shape == (2, 8, 12, 4)
    assert _rel_err(out, ref) <= 1e-4
    # The micro-conditioning matters: other time ids give another output.
    other = dict(_jax_cond(cond), time_ids=jnp.zeros((2, 6)))
    out2 = jax.jit(model.apply)(
        {"params": params}, _nhwc(x), jnp.asarray(t.numpy()), jnp.asarray(ctx.numpy()), other
    )
    assert float(jnp.abs(out2 - out).max()) > 1e-3


def test_lcm_unet_parity_with_guidance_embedding(lcm):
    tmodel, model, params = lcm
    assert params["time_embedding"]["cond_proj"]["kernel"].shape == (12, 16)
    assert "transformer_blocks_1" in params["down_blocks_1"]["attentions_1"]
    assert "transformer_blocks_1" in params["up_blocks_0"]["attentions_0"]
    assert "transformer_blocks_1" not in params["up_blocks_0"]["attentions_1"]
    x, ctx, cond = _inputs(2, 8, 8, seed=3)
    w = torch.tensor([8.0 - 1, 1.5 - 1])  # the pipelines' w = guidance_scale - 1
    lcm_pipe = diffusers.LatentConsistencyModelPipeline
    w_emb = lcm_pipe.get_guidance_scale_embedding(None, w, embedding_dim=12)
    t = torch.tensor([999, 259])
    with torch.no_grad():
        ref = tmodel(x, t, ctx, added_cond_kwargs=cond, timestep_cond=w_emb).sample.numpy()
        ref_none = tmodel(x, t, ctx, added_cond_kwargs=cond).sample.numpy()
    ours = guidance_scale_embedding(jnp.asarray(w.numpy()), 12)
    apply = jax.jit(model.apply)
    args = ({"params": params}, _nhwc(x), jnp.asarray(t.numpy()), jnp.asarray(ctx.numpy()))
    out = apply(*args, _jax_cond(cond), ours)
    assert _rel_err(out, ref) <= 1e-4
    # Without timestep_cond diffusers skips cond_proj; so does this UNet.
    assert _rel_err(apply(*args, _jax_cond(cond)), ref_none) <= 1e-4
    assert _rel_err(out, ref_none) > 1e-3


def test_lcm_bfloat16_and_remat(lcm):
    # Compute dtype and remat reach the added embedding and cond_proj too.
    _, model, params = lcm
    x, ctx, cond = _inputs(2, 8, 8, seed=5)
    args = (_nhwc(x), jnp.array([999, 499]), jnp.asarray(ctx.numpy()), _jax_cond(cond))
    w_emb = guidance_scale_embedding(jnp.array([3.0, 0.0]), 12)
    out32 = jax.jit(model.apply)({"params": params}, *args, w_emb)
    config = dict(LCM_TINY, _class_name="UNet2DConditionModel")
    bf16 = unet_from_config(config, dtype=jnp.bfloat16)
    out16 = jax.jit(bf16.apply)({"params": params}, *args, w_emb)
    assert out16.dtype == jnp.float32
    err = float(jnp.abs(out16 - out32).max() / jnp.abs(out32).max())
    assert err < 5e-2, err
    remat = unet_from_config(config, remat=True)
    out_r = jax.jit(remat.apply)({"params": params}, *args, w_emb)
    np.testing.assert_allclose(np.asarray(out_r), np.asarray(out32), rtol=0, atol=1e-5)


def test_guidance_scale_embedding_matches_diffusers():
    sdxl_pipe = diffusers.StableDiffusionXLPipeline
    lcm_pipe = diffusers.LatentConsistencyModelPipeline
    w = np.array([0.0, 0.5, 3.5, 7.5 - 1, 14.0], np.float32)
    for dim in (256, 33, 4):
        ref = lcm_pipe.get_guidance_scale_embedding(None, torch.from_numpy(w), embedding_dim=dim)
        ref2 = sdxl_pipe.get_guidance_scale_embedding(None, torch.from_numpy(w), embedding_dim=dim)
        np.testing.assert_array_equal(ref.numpy(), ref2.numpy())
        out = np.asarray(guidance_scale_embedding(jnp.asarray(w), dim))
        assert out.shape == (5, dim) and out.dtype == np.float32
        # The arguments reach w * 1000 rad; float32 frequencies one ulp (6e-8) apart move them
        # by up to w * 1000 * 6e-8, the tolerance scales with that (and is tight for small w).
        bound = 1e-6 + 2.5e-7 * 1000 * w[:, None]
        assert np.all(np.abs(out - ref.numpy()) <= bound), np.abs(out - ref.numpy()).max()
    with pytest.raises(ValueError, match="1-D"):
        guidance_scale_embedding(jnp.zeros((2, 1)), 8)
    with pytest.raises(ValueError, match="dim"):
        guidance_scale_embedding(jnp.zeros(2), 3)


def test_dummy_inputs_and_param_shapes(sdxl, lcm):
    _, model, params = sdxl
    dummy = unet_dummy_inputs(model, batch=2)
    assert len(dummy) == 4 and dummy[3]["time_ids"].shape == (2, 6)
    assert dummy[3]["text_embeds"].shape == (2, POOLED)
    _, lmodel, _ = lcm
    dummy = unet_dummy_inputs(lmodel)
    assert len(dummy) == 5 and dummy[4].shape == (1, 12)
    # An LCM UNet without text_time takes timestep_cond in the fifth slot.
    plain = {k: v for k, v in LCM_TINY.items() if k not in TEXT_TIME_KEYS}
    plain_model = unet_from_config(plain)
    dummy = unet_dummy_inputs(plain_model)
    assert dummy[3] is None and dummy[4].shape == (1, 12)
    shapes = unet_param_shapes(plain_model)
    assert "add_embedding" not in shapes and "cond_proj" in shapes["time_embedding"]


def test_bad_inputs_are_clear_errors(sdxl):
    _, model, params = sdxl
    x, ctx, cond = _inputs(2, 8, 8, seed=4)
    args = ({"params": params}, _nhwc(x), jnp.array([1, 2]), jnp.asarray(ctx.numpy()))
    good = _jax_cond(cond)
    with pytest.raises(ValueError, match="needs added_cond.*got none"):
        model.apply(*args)
    with pytest.raises(ValueError, match="needs added_cond.*time_ids"):
        model.apply(*args, {"text_embeds": good["text_embeds"]})
    with pytest.raises(ValueError, match="projection_class_embeddings_input_dim 68"):
        model.apply(*args, dict(good, time_ids=good["time_ids"][:, :5]))
    with pytest.raises(ValueError, match=r"text_embeds \[2, D_pool\]"):
        model.apply(*args, dict(good, text_embeds=good["text_embeds"][:1]))
    with pytest.raises(ValueError, match="time_cond_proj_dim=None"):
        model.apply(*args, good, jnp.zeros((2, 12)))

    sd = unet_from_config({k: v for k, v in SDXL_TINY.items() if k not in TEXT_TIME_KEYS})
    sd_params = unet_param_shapes(sd)
    with pytest.raises(ValueError, match="got added_cond.*addition_embed_type=None"):
        jax.eval_shape(sd.apply, {"params": sd_params}, *args[1:], good)


def test_check_added_cond_dims():
    check_added_cond_dims(presets.SDXL_UNET, 1280)
    check_added_cond_dims(SDXL_TINY, POOLED, source="tiny/unet/config.json")
    check_added_cond_dims(unet_from_config(SDXL_TINY), POOLED)
    with pytest.raises(ValueError) as e:
        check_added_cond_dims(presets.SDXL_UNET, 1024, source="sdxl/unet/config.json")
    msg = str(e.value)
    assert "sdxl/unet/config.json" in msg and "projection_class_embeddings_input_dim" in msg
    assert "2816" in msg and "1024 + 6 time ids x addition_time_embed_dim 256 = 2560" in msg
    # The refiner's 5 time ids (aesthetic score instead of the target size).
    check_added_cond_dims(
        {**presets.SDXL_UNET, "projection_class_embeddings_input_dim": 2560}, 1280, 5
    )
    with pytest.raises(ValueError, match="addition_embed_type"):
        check_added_cond_dims(presets.SD15_UNET, 768)


@pytest.mark.parametrize(
    "key,value",
    [
        ("addition_embed_type", "text"),
        ("addition_embed_type", "image"),
        ("addition_time_embed_dim", None),
        ("projection_class_embeddings_input_dim", 0),
        ("projection_class_embeddings_input_dim", 8),
        ("time_cond_proj_dim", "256"),
        ("transformer_layers_per_block", [1, [1, 2]]),
        ("transformer_layers_per_block", [1, 2, 3]),
        ("transformer_layers_per_block", [1, [2]]),  # per-layer lists need the reverse list
        ("reverse_transformer_layers_per_block", [[2, 1, 1], 1]),  # up block 0 has 2 layers
        ("reverse_transformer_layers_per_block", 2),
        ("class_embed_type", "projection"),
        ("encoder_hid_dim_type", "text_proj"),
        ("upcast_attention", "yes"),
    ],
)
def test_config_rejects(key, value):
    config = {**SDXL_TINY, "_class_name": "UNet2DConditionModel", key: value}
    with pytest.raises(ValueError) as e:
        unet_from_config(config, source="sdxl/unet/config.json")
    msg = str(e.value)
    assert "sdxl/unet/config.json" in msg and key in msg and repr(value) in msg


def test_sdxl_presets_match_diffusers():
    """The published SDXL configs parse; the UNet has diffusers' parameters (meta device)."""
    for name in ("SDXL_UNET", "LCM_SDXL_UNET"):
        unet_from_config(getattr(presets, name))
    model = unet_from_config(presets.SDXL_UNET)
    assert model.upcast_attention is False  # the published file says null
    shapes = unet_param_shapes(model)
    ours = convert._flatten(shapes)
    count = sum(int(np.prod(x.shape)) for x in ours.values())
    config = {k: v for k, v in presets.SDXL_UNET.items() if not k.startswith("_")}
    with torch.device("meta"):
        ref = diffusers.UNet2DConditionModel(**config)
    state = ref.state_dict()
    assert count == sum(v.numel() for v in state.values()) == 2_567_463_684
    # Same modules and sizes: every diffusers tensor has a Flax leaf of as many elements.
    by_module = {}
    for path, leaf in ours.items():
        by_module.setdefault(path[:-1], []).append(int(np.prod(leaf.shape)))
    ref_by_module = {}
    for key, v in state.items():
        path, _ = convert.torch_key_to_path(key)
        ref_by_module.setdefault(tuple(path), []).append(v.numel())
    assert {k: sorted(v) for k, v in by_module.items()} == {
        k: sorted(v) for k, v in ref_by_module.items()
    }

    vae = vae_from_config(presets.SDXL_VAE)
    assert vae.block_out_channels == (128, 256, 512, 512)
    text = clip.text_encoder_from_config(presets.SDXL_TEXT_ENCODER)
    text2 = clip.text_encoder_from_config(presets.SDXL_TEXT_ENCODER_2)
    assert type(text) is clip.CLIPTextModel
    assert type(text2) is clip.CLIPTextModelWithProjection
    # The context is both encoders' penultimate states side by side; the pooled embedding fills
    # add_embedding's input with the six time ids.
    assert (
        text.config.hidden_size + text2.config.hidden_size
        == presets.SDXL_UNET["cross_attention_dim"]
    )
    check_added_cond_dims(presets.SDXL_UNET, text2.config.projection_dim)
    for name, model, cls in (
        ("SDXL_TEXT_ENCODER", text, transformers.CLIPTextModel),
        ("SDXL_TEXT_ENCODER_2", text2, transformers.CLIPTextModelWithProjection),
    ):
        with torch.device("meta"):
            ref = cls(transformers.CLIPTextConfig(**getattr(presets, name)))
        shapes = jax.tree.leaves(clip.text_encoder_param_shapes(model))
        ref_count = sum(p.numel() for p in ref.parameters())
        assert sum(int(np.prod(x.shape)) for x in shapes) == ref_count
    assert (
        diffusers.EulerDiscreteScheduler.from_config(presets.SDXL_SCHEDULER).config[
            "timestep_spacing"
        ]
        == "leading"
    )


def test_vae_config_sdxl_keys():
    config = {**presets.SDXL_VAE, "latents_mean": None, "latents_std": None, "shift_factor": None}
    vae_from_config(config)
    for key, value in (
        ("shift_factor", 0.1159),
        ("latents_mean", [0.1, 0.2, 0.3, 0.4]),
        ("latents_std", [1.0, 1.0, 1.0, 1.0]),
        ("scaling_factor", "0.13"),
        ("scaling_factor", 0),
        ("force_upcast", "true"),
    ):
        with pytest.raises(ValueError) as e:
            vae_from_config({**config, key: value}, source="sdxl/vae/config.json")
        msg = str(e.value)
        assert "sdxl/vae/config.json" in msg and key in msg and repr(value) in msg


# ------------------------------------------------------------------------------------------
# text_encoder_2: CLIPTextModelWithProjection

VOCAB = 64
BOS, EOS, PAD_BANG = VOCAB - 2, VOCAB - 1, 0


def _ids(batch: int, length: int, seed: int = 0) -> np.ndarray:
    """BOS, random tokens, EOS, '!' padding (as tokenizer_2); one row fills every slot."""
    rng = np.random.default_rng(seed)
    ids = np.full((batch, length), PAD_BANG, np.int64)
    for i in range(batch):
        n = length - 2 if i == 0 else int(rng.integers(0, length - 2))
        ids[i, 0] = BOS
        ids[i, 1 : n + 1] = rng.integers(1, VOCAB - 2, n)
        ids[i, n + 1] = EOS
    return ids


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b.detach().numpy(), np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max() / np.abs(b).max())


# eos_token_id 2 is what SDXL's published text_encoder_2 config carries (pooling at the
# largest id); EOS is a current config.
@pytest.mark.parametrize("eos", [EOS, 2])
def test_text_encoder_with_projection_parity(tmp_path, eos):
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="gelu",  # OpenCLIP bigG's exact gelu
        projection_dim=24,
        bos_token_id=BOS,
        eos_token_id=eos,
        pad_token_id=PAD_BANG,
    )
    ref = transformers.CLIPTextModelWithProjection(config)
    _perturb(ref, 5)
    ref.eval()
    ref.save_pretrained(str(tmp_path), safe_serialization=True)
    with open(os.path.join(tmp_path, "config.json")) as f:
        saved = json.load(f)
    assert saved["architectures"] == ["CLIPTextModelWithProjection"]
    from safetensors.numpy import load_file

    state_dict = load_file(os.path.join(tmp_path, "model.safetensors"))

    model = clip.text_encoder_from_config(saved, source="text_encoder_2/config.json")
    assert isinstance(model, clip.CLIPTextModelWithProjection)
    template = clip.text_encoder_param_shapes(model)
    assert sorted(template) == ["text_model", "text_projection"]
    assert template["text_projection"]["kernel"].shape == (32, 24)
    assert clip.param_shapes(model) == template
    params = clip.params_from_state_dict(state_dict, template, source="model.safetensors")
    back = clip.params_to_state_dict(params)
    assert sorted(back) == sorted(state_dict)
    for k, v in state_dict.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)

    ids = _ids(3, 77)
    out = jax.jit(lambda p, x: model.apply({"params": p}, x, output_hidden_states=True))(
        params, ids
    )
    with torch.no_grad():
        expected = ref(torch.from_numpy(ids), output_hidden_states=True)
        pooled = ref.text_model(torch.from_numpy(ids)).pooler_output
    assert _rel(out.text_embeds, expected.text_embeds) <= 1e-4
    assert _rel(out.last_hidden_state, expected.last_hidden_state) <= 1e-4
    assert _rel(out.pooler_output, pooled) <= 1e-4
    assert len(out.hidden_states) == len(expected.hidden_states) == 4
    # SDXL's context: the penultimate layer's output, without final_layer_norm.
    assert _rel(out.hidden_states[-2], expected.hidden_states[-2]) <= 1e-4

    # with_projection=False reads the same config as the bare tower (SDXL's text_encoder).
    plain = clip.text_encoder_from_config(saved, with_projection=False)
    assert type(plain) is clip.CLIPTextModel
    out_plain = jax.jit(plain.apply)({"params": {"text_model": params["text_model"]}}, ids)
    np.testing.assert_allclose(out_plain.last_hidden_state, out.last_hidden_state, atol=1e-6)


def test_text_encoder_architectures():
    base = dict(presets.SDXL_TEXT_ENCODER_2, hidden_size=32, num_attention_heads=4)
    assert type(clip.text_encoder_from_config(base)) is clip.CLIPTextModelWithProjection
    no_arch = {k: v for k, v in base.items() if k != "architectures"}
    assert type(clip.text_encoder_from_config(no_arch)) is clip.CLIPTextModel
    forced = clip.text_encoder_from_config(no_arch, with_projection=True)
    assert type(forced) is clip.CLIPTextModelWithProjection
    with pytest.raises(ValueError, match=r"x/config.json: 'architectures' = \['BertModel'\]"):
        clip.text_encoder_from_config(
            dict(base, architectures=["BertModel"]), source="x/config.json"
        )
    with pytest.raises(ValueError, match=r"'projection_dim' = 0"):
        clip.text_encoder_from_config(dict(base, projection_dim=0))
