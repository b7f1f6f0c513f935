"""AutoencoderKL: parity with diffusers (PyTorch) on tiny random configs, config checks."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spin_jax.models import convert, presets
from spin_jax.models.vae import vae_from_config, vae_param_shapes

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

TINY = dict(
    block_out_channels=(16, 32),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=16,
)
# No quant convs, no mid-block attention, three levels, two resnets per level.
BARE = dict(
    block_out_channels=(8, 16, 16),
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    layers_per_block=2,
    latent_channels=3,
    norm_num_groups=4,
    sample_size=16,
    use_quant_conv=False,
    use_post_quant_conv=False,
    mid_block_add_attention=False,
)


def _torch_vae(config, seed=0):
    torch.manual_seed(seed)
    model = diffusers.AutoencoderKL(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _state(tmodel):
    return {k: v.numpy() for k, v in tmodel.state_dict().items()}


def _rel_err(out, ref_nchw):
    ref = ref_nchw.transpose(0, 2, 3, 1)
    return float(np.abs(np.asarray(out) - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("config", [TINY, BARE], ids=["tiny", "bare"])
def test_encode_decode_parity(config):
    tmodel = _torch_vae(config)
    model = vae_from_config(dict(tmodel.config))
    params = convert.torch_to_flax(_state(tmodel), vae_param_shapes(model))
    assert ("quant_conv" in params) == config.get("use_quant_conv", True)
    g = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 16, 12, generator=g) * 2 - 1
    latents = torch.randn(2, config["latent_channels"], 8, 6, generator=g)
    if len(config["block_out_channels"]) == 3:
        latents = latents[:, :, :4, :3]
    with torch.no_grad():
        dist = tmodel.encode(images).latent_dist
        decoded = tmodel.decode(latents).sample.numpy()

    variables = {"params": params}
    mean, logvar = jax.jit(lambda v, x: model.apply(v, x, method=model.encode))(
        variables, jnp.asarray(images.numpy().transpose(0, 2, 3, 1))
    )
    out = jax.jit(lambda v, z: model.apply(v, z, method=model.decode))(
        variables, jnp.asarray(latents.numpy().transpose(0, 2, 3, 1))
    )
    assert mean.dtype == logvar.dtype == out.dtype == jnp.float32
    assert _rel_err(mean, dist.mean.numpy()) <= 1e-4
    assert _rel_err(logvar, dist.logvar.numpy()) <= 1e-4
    assert out.shape == decoded.transpose(0, 2, 3, 1).shape
    assert _rel_err(out, decoded) <= 1e-4


def test_round_trip_and_legacy_attention_names():
    tmodel = _torch_vae(TINY)
    state = _state(tmodel)
    shapes = vae_param_shapes(vae_from_config(dict(tmodel.config)))
    params = convert.torch_to_flax(state, shapes)
    back = convert.flax_to_torch(params)
    assert set(back) == set(state)
    for k, v in state.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)

    # Checkpoints saved by old diffusers (SD 1.x's own) name the mid-block attention
    # query/key/value/proj_attn.
    legacy = {}
    for k, v in state.items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value")):
            k = re.sub(rf"\.{new}\.", f".{old}.", k)
        legacy[k.replace(".to_out.0.", ".proj_attn.")] = v
    assert any(".proj_attn." in k for k in legacy)
    again = convert.torch_to_flax(legacy, shapes)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "key,value",
    [
        ("not_a_key", 3),
        ("down_block_types", ["AttnDownEncoderBlock2D", "DownEncoderBlock2D"]),
        ("up_block_types", ["UpDecoderBlock2D"]),
        ("act_fn", "relu"),
        ("norm_num_groups", 5),
        ("use_quant_conv", "yes"),
    ],
)
def test_config_rejects(key, value):
    config = {**TINY, "_class_name": "AutoencoderKL", key: value}
    with pytest.raises(ValueError) as e:
        vae_from_config(config, source="x/vae/config.json")
    msg = str(e.value)
    assert "x/vae/config.json" in msg and key in msg and repr(value) in msg


def test_presets_and_accepted_keys():
    config = {**presets.SD15_VAE, "scaling_factor": 0.18215, "force_upcast": True,
              "latents_mean": None, "latents_std": None, "shift_factor": None}  # fmt: skip
    shapes = vae_param_shapes(vae_from_config(config))
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == 83_653_863
    assert presets.SD21_VAE["block_out_channels"] == presets.SD15_VAE["block_out_channels"]
