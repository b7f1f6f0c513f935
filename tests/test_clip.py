"""spin_jax.models.clip against transformers' PyTorch CLIP on tiny random configurations."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from spin_jax.models import clip
from spin_jax.models.convert import WeightMismatchError

VOCAB = 64
BOS, EOS, PAD_BANG = VOCAB - 2, VOCAB - 1, 0


def _perturb(model, seed: int, scale: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _text_kwargs(hidden_act: str, eos_token_id: int = EOS) -> dict:
    return dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=hidden_act,
        bos_token_id=BOS,
        eos_token_id=eos_token_id,
        pad_token_id=PAD_BANG,
    )


def _vision_kwargs(hidden_act: str = "gelu") -> dict:
    return dict(
        hidden_size=24,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=3,
        image_size=16,
        patch_size=4,
        hidden_act=hidden_act,
        layer_norm_eps=1e-6,
    )


def _ids(batch: int, length: int, pad: int, seed: int = 0) -> np.ndarray:
    """BOS, random tokens, EOS, padding; rows of different lengths (one fills every slot)."""
    rng = np.random.default_rng(seed)
    ids = np.full((batch, length), pad, np.int64)
    for i in range(batch):
        n = length - 2 if i == 0 else int(rng.integers(0, length - 2))
        ids[i, 0] = BOS
        ids[i, 1 : n + 1] = rng.integers(1, VOCAB - 2, n)
        ids[i, n + 1] = EOS
    return ids


def _save(model, path) -> tuple[dict, dict]:
    model.save_pretrained(str(path), safe_serialization=True)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    return config, load_file(os.path.join(path, "model.safetensors"))


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b.detach().numpy(), np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max() / np.abs(b).max())


# Case: (activation, eos_token_id, pad id). eos_token_id=2 is the pre-2023 config value, for
# which transformers pools at the largest id.
TEXT_CASES = [("quick_gelu", EOS, EOS), ("gelu", EOS, PAD_BANG), ("gelu_new", 2, PAD_BANG)]


@pytest.mark.parametrize("act,eos,pad", TEXT_CASES)
def test_text_encoder_parity(tmp_path, act, eos, pad):
    torch.manual_seed(0)
    ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(**_text_kwargs(act, eos)))
    _perturb(ref, 1)
    ref.eval()
    config, state_dict = _save(ref, tmp_path)

    model = clip.text_encoder_from_config(config)
    template = clip.text_encoder_param_shapes(model)
    params = clip.params_from_state_dict(state_dict, template, source="model.safetensors")

    ids, short = _ids(3, 77, pad), _ids(2, 9, pad, seed=1)

    @jax.jit
    def run(p, ids, short):
        v = {"params": p}
        full = model.apply(v, ids, output_hidden_states=True)
        return full, model.apply(v, short, output_hidden_states=True, clip_skip=1)

    out, skip = run(params, ids, short)
    with torch.no_grad():
        expected = ref(torch.from_numpy(ids), output_hidden_states=True)
        expected_short = ref(torch.from_numpy(short), output_hidden_states=True)
        # diffusers' clip_skip=1: final_layer_norm(hidden_states[-2]).
        expected_skip = ref.final_layer_norm(expected_short.hidden_states[-2])
    assert _rel(out.last_hidden_state, expected.last_hidden_state) <= 1e-4
    assert _rel(out.pooler_output, expected.pooler_output) <= 1e-4
    assert len(out.hidden_states) == len(expected.hidden_states) == 3
    for a, b in zip(out.hidden_states, expected.hidden_states, strict=True):
        assert _rel(a, b) <= 1e-4
    assert skip.last_hidden_state.shape == (2, 9, 32)
    assert _rel(skip.last_hidden_state, expected_skip) <= 1e-4
    for a, b in zip(skip.hidden_states, expected_short.hidden_states[:-1], strict=True):
        assert _rel(a, b) <= 1e-4
    with pytest.raises(ValueError, match="clip_skip"):
        model.apply({"params": params}, short, clip_skip=2)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.apply({"params": params}, np.zeros((1, 78), np.int32))


def test_text_encoder_weights_round_trip_and_bfloat16(tmp_path):
    torch.manual_seed(0)
    ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(**_text_kwargs("quick_gelu")))
    _perturb(ref, 2)
    config, state_dict = _save(ref, tmp_path)
    model = clip.text_encoder_from_config(config)
    template = clip.text_encoder_param_shapes(model)
    assert list(template) == ["text_model"]
    params = clip.params_from_state_dict(state_dict, template)

    # transformers 5 layout (no prefix) back exactly; the default keeps the published prefix.
    back = clip.params_to_state_dict(params, strip_prefix=True)
    assert sorted(back) == sorted(state_dict)
    for k, v in state_dict.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)
    published = clip.params_to_state_dict(params)
    assert sorted(published) == sorted("text_model." + k for k in state_dict)
    again = clip.params_from_state_dict(published, template)
    jax.tree.map(np.testing.assert_array_equal, again, params)

    # Compute in bfloat16 with float32 params: close to float32.
    ids = _ids(2, 77, EOS)
    full = jax.jit(model.apply)({"params": params}, ids).last_hidden_state
    model_bf16 = clip.text_encoder_from_config(config, dtype=jnp.bfloat16)
    half = jax.jit(model_bf16.apply)({"params": params}, ids).last_hidden_state
    assert half.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(half, np.float32), full, atol=0.1)

    bad = dict(state_dict)
    bad["encoder.layers.0.mlp.fc1.weight"] = np.zeros((36, 32), np.float32)
    with pytest.raises(WeightMismatchError, match="fc1.weight"):
        clip.params_from_state_dict(bad, template)


def test_bad_configs_name_the_key():
    good = dict(_text_kwargs("quick_gelu"), model_type="clip_text_model")
    with pytest.raises(ValueError, match=r"text_encoder/config.json.*'hidden_act' = 'swish'"):
        clip.text_encoder_from_config(dict(good, hidden_act="swish"))
    with pytest.raises(ValueError, match=r"'model_type' = 'bert'"):
        clip.text_encoder_from_config(dict(good, model_type="bert"))
    with pytest.raises(ValueError, match=r"'hidden_size' = 30"):
        clip.text_encoder_from_config(dict(good, hidden_size=30))
    with pytest.raises(ValueError, match=r"'num_hidden_layers' = '3'"):
        clip.text_encoder_from_config(dict(good, num_hidden_layers="3"))
    with pytest.raises(ValueError, match=r"'eos_token_id' = \[1, 2\]"):
        clip.text_encoder_from_config(dict(good, eos_token_id=[1, 2]))
    with pytest.raises(ValueError, match="attention_impl"):
        clip.text_encoder_from_config(good, attention_impl="flash")
    config = {"model_type": "clip", "text_config": good, "vision_config": _vision_kwargs()}
    clip.clip_from_config(config)
    bad = dict(config, vision_config=dict(_vision_kwargs(), patch_size=5))
    with pytest.raises(ValueError, match=r"x/config.json: 'vision_config.image_size' = 16"):
        clip.clip_from_config(bad, source="x/config.json")
    bad = dict(config, vision_config=dict(_vision_kwargs(), hidden_act="relu"))
    with pytest.raises(ValueError, match=r"'vision_config.hidden_act' = 'relu'"):
        clip.clip_from_config(bad)


def test_clip_model_parity(tmp_path):
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=_text_kwargs("quick_gelu"),
        vision_config=_vision_kwargs("gelu"),
        projection_dim=20,
        logit_scale_init_value=3.1,
    )
    ref = transformers.CLIPModel(config)
    _perturb(ref, 3)
    ref.eval()
    config, state_dict = _save(ref, tmp_path)

    model = clip.clip_from_config(config)
    template = clip.param_shapes(model)
    # class_embedding and logit_scale are bare parameters, not weight/bias.
    assert template["vision_model"]["embeddings"]["class_embedding"].shape == (24,)
    assert template["logit_scale"].shape == ()
    params = clip.params_from_state_dict(state_dict, template)
    back = clip.params_to_state_dict(params)
    assert sorted(back) == sorted(state_dict)
    for k, v in state_dict.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)

    ids = _ids(3, 77, EOS)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 16, 16, 3)).astype(np.float32)  # NHWC, already normalised
    variables = {"params": params}
    text, image, out = jax.jit(
        lambda v, x, y: (
            model.apply(v, x, method="get_text_features"),
            model.apply(v, y, method="get_image_features"),
            model.apply(v, x, y),
        )
    )(variables, ids, images)
    with torch.no_grad():
        t_ids, t_images = torch.from_numpy(ids), torch.from_numpy(images.transpose(0, 3, 1, 2))
        ref_text = ref.get_text_features(input_ids=t_ids)
        ref_image = ref.get_image_features(pixel_values=t_images)
        ref_text = getattr(ref_text, "pooler_output", ref_text)
        ref_image = getattr(ref_image, "pooler_output", ref_image)
        ref_out = ref(input_ids=t_ids, pixel_values=t_images)
    assert _rel(text, ref_text) <= 1e-4
    assert _rel(image, ref_image) <= 1e-4
    assert _rel(out.text_embeds, ref_out.text_embeds) <= 1e-4
    assert _rel(out.image_embeds, ref_out.image_embeds) <= 1e-4
    assert _rel(out.logits_per_text, ref_out.logits_per_text) <= 1e-4
    assert _rel(out.logits_per_image, ref_out.logits_per_image) <= 1e-4
    assert float(params["logit_scale"]) == float(ref.logit_scale.detach())


def test_vision_model_parity(tmp_path):
    torch.manual_seed(0)
    ref = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**_vision_kwargs()))
    _perturb(ref, 4)
    ref.eval()
    config, state_dict = _save(ref, tmp_path)
    model = clip.vision_model_from_config(config)
    template = clip.param_shapes(model)
    params = clip.params_from_state_dict(state_dict, template)
    back = clip.params_to_state_dict(params, strip_prefix=True)
    assert sorted(back) == sorted(state_dict)
    for k, v in state_dict.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)

    images = np.random.default_rng(1).normal(size=(2, 16, 16, 3)).astype(np.float32)
    out = jax.jit(lambda p, x: model.apply({"params": p}, x, output_hidden_states=True))(
        params, images
    )
    with torch.no_grad():
        expected = ref(torch.from_numpy(images.transpose(0, 3, 1, 2)), output_hidden_states=True)
    assert _rel(out.last_hidden_state, expected.last_hidden_state) <= 1e-4
    assert _rel(out.pooler_output, expected.pooler_output) <= 1e-4
    assert len(out.hidden_states) == len(expected.hidden_states)
    for a, b in zip(out.hidden_states, expected.hidden_states, strict=True):
        assert _rel(a, b) <= 1e-4
    with pytest.raises(ValueError, match=r"NHWC \[batch, 16, 16, 3\]"):
        model.apply({"params": params}, images.transpose(0, 3, 1, 2))


def test_tiny_sd2_pipeline_text_path(tmp_path):
    """Tokenizer + text encoder of a diffusers SD 2.x folder (tokenizer.json, '!' padding, gelu),
    as ``StableDiffusionPipeline.encode_prompt`` computes the prompt embeddings."""
    from tiny_sd import make_tiny_sd

    from spin_jax.models.tokenizer import load_tokenizer

    path = make_tiny_sd(str(tmp_path / "sd2"), "sd2", tokenizer_layout="json")
    with open(os.path.join(path, "text_encoder", "config.json")) as f:
        config = json.load(f)
    model = clip.text_encoder_from_config(config)
    state_dict = load_file(os.path.join(path, "text_encoder", "model.safetensors"))
    params = clip.params_from_state_dict(state_dict, clip.text_encoder_param_shapes(model))
    tok = load_tokenizer(os.path.join(path, "tokenizer"), config["max_position_embeddings"])
    prompts = ["a red cat on the left", "", "photo of a blue square " * 20]
    ids = tok(prompts)
    assert tok.pad_id == 0

    ref_tok = transformers.CLIPTokenizer.from_pretrained(os.path.join(path, "tokenizer"))
    ref_ids = ref_tok(prompts, padding="max_length", truncation=True, max_length=77)["input_ids"]
    np.testing.assert_array_equal(ids, np.asarray(ref_ids))
    ref = transformers.CLIPTextModel.from_pretrained(os.path.join(path, "text_encoder"))
    out = jax.jit(model.apply)({"params": params}, ids)
    with torch.no_grad():
        expected = ref(torch.from_numpy(ids.astype(np.int64)))
    assert _rel(out.last_hidden_state, expected.last_hidden_state) <= 1e-4
    assert _rel(out.pooler_output, expected.pooler_output) <= 1e-4
