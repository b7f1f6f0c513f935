"""UNet2DConditionModel: parity with diffusers (PyTorch) on tiny random configs, config checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spin_jax.models import convert, presets
from spin_jax.models.unet import unet_from_config, unet_param_shapes

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

SD1_TINY = dict(
    sample_size=16,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=4,
    norm_num_groups=8,
)
# SD 2.x options on an uneven layout: per-block heads, linear projections, upcast attention,
# per-block layer counts, a cross-attention block after a plain one, 2 transformer layers.
SD2_ODD = dict(
    sample_size=16,
    block_out_channels=(16, 32, 48),
    layers_per_block=(1, 2, 1),
    transformer_layers_per_block=(1, 1, 2),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=24,
    attention_head_dim=(2, 4, 3),
    use_linear_projection=True,
    upcast_attention=True,
    norm_num_groups=8,
)


def _torch_unet(config, seed=0):
    torch.manual_seed(seed)
    model = diffusers.UNet2DConditionModel(**config).eval()
    with torch.no_grad():
        # Default inits leave zeros and ones; noise everywhere so no weight goes untested.
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _flax_params(tmodel, model):
    state = {k: v.numpy() for k, v in tmodel.state_dict().items()}
    return convert.torch_to_flax(state, unet_param_shapes(model), source="test")


def _random_params(shapes, seed=0):
    # Much faster than compiling model.init on the CPU.
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        noise = rng.normal(size=s.shape).astype(np.float32)
        name = path[-1].key
        if name == "kernel":
            return jnp.asarray(noise / np.sqrt(np.prod(s.shape[:-1])))
        return jnp.asarray((name == "scale") + 0.05 * noise)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


def _inputs(batch, h, w, ctx_len, ctx_dim, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, h, w, generator=g)
    ctx = torch.randn(batch, ctx_len, ctx_dim, generator=g)
    return x, ctx


def _rel_err(out, ref_nchw):
    ref = ref_nchw.transpose(0, 2, 3, 1)
    return float(np.abs(np.asarray(out, np.float32) - ref).max() / np.abs(ref).max())


def _nhwc(x):
    return jnp.asarray(x.numpy().transpose(0, 2, 3, 1))


@pytest.fixture(scope="module")
def sd1():
    tmodel = _torch_unet(SD1_TINY)
    model = unet_from_config(dict(tmodel.config))
    return tmodel, model, _flax_params(tmodel, model)


@pytest.fixture(scope="module")
def sd2():
    tmodel = _torch_unet(SD2_ODD, seed=2)
    model = unet_from_config(dict(tmodel.config))
    return tmodel, model, _flax_params(tmodel, model)


def test_sd1_parity(sd1):
    tmodel, model, params = sd1
    x, ctx = _inputs(2, 16, 16, 7, 32)
    t = torch.tensor([3, 901])
    with torch.no_grad():
        ref = tmodel(x, t, ctx).sample.numpy()
    apply = jax.jit(model.apply)
    out = apply({"params": params}, _nhwc(x), jnp.asarray(t.numpy(), jnp.int32), jnp.asarray(ctx))
    assert out.shape == (2, 16, 16, 4)
    assert _rel_err(out, ref) <= 1e-4


def test_sd2_parity_odd_layout(sd2):
    tmodel, model, params = sd2
    # 10x14 is not divisible by 4: the up path resizes to the skip connections' sizes.
    x, ctx = _inputs(2, 10, 14, 5, 24, seed=3)
    with torch.no_grad():
        ref = tmodel(x, 417.5, ctx).sample.numpy()  # a float scalar timestep
    args = ({"params": params}, _nhwc(x), jnp.float32(417.5), jnp.asarray(ctx))
    out = jax.jit(model.apply)(*args)
    assert out.shape == (2, 10, 14, 4)
    assert _rel_err(out, ref) <= 1e-4

    # num_attention_heads (which diffusers itself refuses) names the head counts directly:
    # the same computation as attention_head_dim's per-block values.
    config = {**dict(tmodel.config), "num_attention_heads": [2, 4, 3], "attention_head_dim": 1}
    other = unet_from_config(config)
    assert str(jax.make_jaxpr(other.apply)(*args)) == str(jax.make_jaxpr(model.apply)(*args))


def test_flax_to_torch_round_trip(sd2):
    tmodel, _, params = sd2
    state = {k: v.numpy() for k, v in tmodel.state_dict().items()}
    back = convert.flax_to_torch(params)
    assert set(back) == set(state)
    for k, v in state.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)


@pytest.mark.parametrize(
    "key,value",
    [
        ("not_a_key", 1),
        ("class_embed_type", "timestep"),
        ("addition_embed_type", "text"),
        ("time_cond_proj_dim", 0),  # 256 is LCM's guidance embedding, now supported
        ("encoder_hid_dim", 32),
        ("dual_cross_attention", True),
        ("resnet_time_scale_shift", "scale_shift"),
        ("cross_attention_norm", "group_norm"),
        ("attention_type", "gated"),
        ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
        ("only_cross_attention", [False, True]),
        ("down_block_types", ["CrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"]),
        ("up_block_types", ["UpBlock2D"]),
        ("attention_head_dim", [4, 4, 4]),
        ("norm_num_groups", 7),
    ],
)
def test_config_rejects(key, value):
    config = {**SD1_TINY, "_class_name": "UNet2DConditionModel", key: value}
    with pytest.raises(ValueError) as e:
        unet_from_config(config, source="some/unet/config.json")
    msg = str(e.value)
    assert "some/unet/config.json" in msg and key in msg and repr(value) in msg


def test_presets_build_with_published_sizes():
    counts = {}
    for name in ("SD15_UNET", "SD21_UNET"):
        model = unet_from_config(getattr(presets, name))
        shapes = unet_param_shapes(model)
        counts[name] = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(shapes))
    assert counts == {"SD15_UNET": 859_520_964, "SD21_UNET": 865_910_724}
    assert presets.SD15_SCHEDULER["prediction_type"] == "epsilon"
    assert presets.SD21_SCHEDULER["prediction_type"] == "v_prediction"
    transformers = pytest.importorskip("transformers")
    for name, hidden in (("SD15_TEXT_ENCODER", 768), ("SD21_TEXT_ENCODER", 1024)):
        cfg = transformers.CLIPTextConfig(**getattr(presets, name))
        assert cfg.hidden_size == hidden and cfg.max_position_embeddings == 77


def test_remat_and_bfloat16():
    # One-level UNet with Flax's own random init: remat and dtype do not need torch.
    config = dict(
        block_out_channels=(16,),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",),
        cross_attention_dim=8,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    model = unet_from_config(config)
    rng = np.random.default_rng(0)
    args = (
        jnp.asarray(rng.normal(size=(2, 8, 8, 4)), jnp.float32),
        jnp.array([10, 600]),
        jnp.asarray(rng.normal(size=(2, 3, 8)), jnp.float32),
    )
    params = _random_params(unet_param_shapes(model))

    def value_and_grad(model):
        def f(p):
            out = model.apply({"params": p}, *args)
            return jnp.mean(out**2), out

        return jax.jit(jax.value_and_grad(f, has_aux=True))(params)

    (_, out32), g32 = value_and_grad(model)
    (_, outr), gr = value_and_grad(unet_from_config(config, remat=True))
    np.testing.assert_allclose(np.asarray(outr), np.asarray(out32), rtol=0, atol=1e-5)
    for a, b in zip(jax.tree.leaves(gr), jax.tree.leaves(g32), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)

    bf16 = unet_from_config(config, dtype=jnp.bfloat16)
    out16 = jax.jit(bf16.apply)({"params": params}, *args)
    assert out16.dtype == jnp.float32  # the input's dtype; computed in bfloat16
    assert bool(jnp.all(jnp.isfinite(out16)))
    err = float(jnp.abs(out16 - out32).max() / jnp.abs(out32).max())
    assert err < 5e-2, err
