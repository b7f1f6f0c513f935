"""spin_jax.models.layers.GroupNorm against torch.nn.GroupNorm."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from spin_jax.models.layers import GroupNorm


@pytest.mark.parametrize("shape,groups", [((2, 5, 6, 32), 8), ((3, 7, 64), 32), ((2, 4, 4, 6), 3)])
def test_matches_torch(shape, groups):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 3 + 1.5).astype(np.float32)
    scale = rng.standard_normal(shape[-1]).astype(np.float32)
    bias = rng.standard_normal(shape[-1]).astype(np.float32)
    module = GroupNorm(num_groups=groups, epsilon=1e-6)
    params = jax.eval_shape(module.init, jax.random.key(0), x)["params"]
    assert {k: v.shape for k, v in params.items()} == {"scale": shape[-1:], "bias": shape[-1:]}
    out = module.apply({"params": {"scale": scale, "bias": bias}}, x)
    ref = torch.nn.GroupNorm(groups, shape[-1], eps=1e-6)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(scale))
        ref.bias.copy_(torch.from_numpy(bias))
        xt = torch.from_numpy(np.moveaxis(x, -1, 1).copy())  # channels first
        expected = np.moveaxis(ref(xt).numpy(), 1, -1)
    np.testing.assert_allclose(np.asarray(out), expected, atol=2e-5)


def test_bfloat16_output_and_float32_statistics():
    x = np.random.default_rng(1).standard_normal((2, 4, 4, 16)).astype(np.float32) * 50 + 200
    module = GroupNorm(num_groups=4, dtype=jnp.bfloat16)
    params = module.init(jax.random.key(0), x)
    out = module.apply(params, jnp.asarray(x, jnp.bfloat16))
    assert out.dtype == jnp.bfloat16
    ref = torch.nn.functional.group_norm(
        torch.from_numpy(
            np.moveaxis(np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32), -1, 1).copy()
        ),
        4,
    )
    np.testing.assert_allclose(
        np.asarray(out, np.float32), np.moveaxis(ref.numpy(), 1, -1), atol=3e-2
    )


def test_channels_not_divisible():
    with pytest.raises(ValueError, match="10 channels are not divisible by 4 groups"):
        GroupNorm(num_groups=4).init(jax.random.key(0), jnp.zeros((1, 2, 2, 10)))
