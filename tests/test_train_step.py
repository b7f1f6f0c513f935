"""The jitted train step: sharding invariance, accumulation, reference untouched, learning, errors."""

import dataclasses
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spin_jax import parallel
from spin_jax.train import objectives, optim, step
from spin_jax.train.state import TrainState, state_sharding

H = W = 8
C = 4
VOCAB, LEN, DIM = 32, 5, 8


class TinyNet(nn.Module):
    """Two convs; the timestep and the pooled text context shift the hidden features."""

    features: int = 16

    @nn.compact
    def __call__(self, x, t, ctx):
        half = 4
        freqs = jnp.exp(-math.log(1000.0) * jnp.arange(half) / half)
        emb = t.astype(jnp.float32)[:, None] * freqs[None]
        emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=-1)
        cond = nn.Dense(self.features)(emb) + nn.Dense(self.features)(ctx.mean(axis=1))
        h = nn.Conv(self.features, (3, 3))(x)
        h = nn.silu(h + cond[:, None, None, :])
        return nn.Conv(C, (3, 3))(h)


NET = TinyNet()


def unet_apply(params, x_t, t, ctx):
    return NET.apply({"params": params}, x_t, t, ctx)


def encode_text(text_params, input_ids):
    return text_params["embedding"][input_ids]


@dataclasses.dataclass(frozen=True)
class Schedule:
    alphas_cumprod: jax.Array
    prediction_type: str = "epsilon"
    num_train_timesteps: int = 1000


def sd_schedule(prediction_type="epsilon"):
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    return Schedule(jnp.asarray(np.cumprod(1 - betas), jnp.float32), prediction_type)


def init_params(seed=0):
    """Random params from NumPy (no threefry compiles for the init: keeps the tests fast)."""
    x = jnp.zeros((1, H, W, C))
    shapes = jax.eval_shape(
        NET.init, jax.random.key(0), x, jnp.zeros((1,), jnp.int32), jnp.zeros((1, LEN, DIM))
    )["params"]
    rng = np.random.default_rng(seed)

    def leaf(s):
        fan_in = math.prod(s.shape[:-1]) if len(s.shape) > 1 else 10
        return jnp.asarray(rng.normal(size=s.shape) / math.sqrt(fan_in), jnp.float32)

    return jax.tree.map(leaf, shapes)


TEXT_PARAMS = {
    "embedding": jnp.asarray(np.random.default_rng(0).normal(size=(VOCAB, DIM)), jnp.float32)
}


def make_batch(objective, b, seed=0):
    rng = np.random.default_rng(seed)
    lat = lambda: rng.normal(size=(b, H, W, C)).astype(np.float32)  # noqa: E731
    batch = {"input_ids": rng.integers(0, VOCAB, size=(b, LEN)).astype(np.int32)}
    fields = objectives.OBJECTIVES[objective].batch_fields
    for f in fields:
        batch[f] = (np.arange(b) % 2).astype(np.int32) if f == "label" else lat()
    return batch


OPT = {"optimizer": "adamw", "learning_rate": 3e-3, "weight_decay": 1e-2, "grad_clip_norm": 1.0}
TX, LR_FN = optim.make_optimizer(OPT)  # one tx object: jitted steps are reused across tests
BETA = 50.0
MESH1 = parallel.make_mesh(devices=jax.devices()[:1])
MESH8 = parallel.make_mesh()
_STEPS = {}


def get_step(objective, mesh, accum_steps=1, share_noise=True, pin_state=None):
    """A jitted, state-donating step, compiled once per configuration for the whole module."""
    key = (objective, mesh, accum_steps, share_noise, pin_state is not None)
    if key not in _STEPS:
        fn = step.make_train_step(
            objective,
            unet_apply=unet_apply,
            encode_text=encode_text,
            schedule=sd_schedule(),
            beta=None if objective == "sft" else BETA,
            share_noise=share_noise,
            accum_steps=accum_steps,
            learning_rate_fn=LR_FN,
            mesh=mesh,
        )
        pinned = None if pin_state is None else state_sharding(pin_state)
        _STEPS[key] = step.jit_train_step(fn, pinned)
    return _STEPS[key]


def run_steps(
    objective,
    mesh,
    batch,
    n_steps=2,
    accum_steps=1,
    ref_shift=0.01,
    fsdp_min_size=None,
    share_noise=True,
    params=None,
    ref=None,
    key0=100,
):
    """n_steps jitted steps from fixed params; returns (state, metrics list, ref params)."""
    params = init_params(0) if params is None else params
    # The reference differs a little from the policy so the pairwise losses have gradients.
    ref = jax.tree.map(lambda p: p + ref_shift, params) if ref is None else ref
    state = TrainState.create(params, TX, mesh=mesh)
    if fsdp_min_size is not None:
        shardings = parallel.fsdp_param_sharding(mesh, state, min_size=fsdp_min_size)
        state = jax.device_put(state, shardings)
    rep = parallel.replicated(mesh)
    ref, text = jax.device_put(ref, rep), jax.device_put(TEXT_PARAMS, rep)
    fn = get_step(
        objective,
        mesh,
        accum_steps,
        share_noise,
        pin_state=state if fsdp_min_size is not None else None,
    )
    gbatch = parallel.global_batch_from_local(batch, mesh)
    metrics = []
    for i in range(n_steps):
        state, m = fn(state, ref, text, gbatch, jax.random.key(key0 + i))
        metrics.append(jax.device_get(m))
    return state, metrics, ref


def assert_close_tree(a, b, atol, rtol=0.0):
    chex.assert_trees_all_close(jax.device_get(a), jax.device_get(b), atol=atol, rtol=rtol)


@pytest.mark.parametrize("objective", ["spin", "kto"])
def test_eight_devices_equal_one(objective):
    # SPIN stands for the pairwise family (DPO/SePPO share its code path); KTO for the
    # global-batch statistic z0.
    batch = make_batch(objective, 16)
    s1, m1, _ = run_steps(objective, MESH1, batch)
    s8, m8, _ = run_steps(objective, MESH8, batch)
    assert int(s8.step) == 2 and all(m["is_finite"] for m in m8)
    assert s8.params["Conv_0"]["kernel"].sharding.is_fully_replicated
    # Same update up to float summation order. Adam divides by sqrt(v), which amplifies
    # rounding on tiny gradients, so the tolerance is stated against the per-step change
    # (lr = 3e-3 per step, 2 steps): 1e-5 is 0.2% of it.
    assert_close_tree(s8.params, s1.params, atol=1e-5)
    for a, b in zip(m1, m8, strict=True):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
        np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-4)


def test_fsdp_sharded_state_equals_replicated():
    batch = make_batch("spin", 16)
    s_dp, m_dp, _ = run_steps("spin", MESH8, batch)
    mesh = parallel.make_mesh(data=4, fsdp=2)
    s_f, m_f, _ = run_steps("spin", mesh, batch, fsdp_min_size=64)
    kernel = s_f.params["Conv_0"]["kernel"]  # (3, 3, 4, 16): split on its last axis
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, None, None, "fsdp")
    assert s_f.opt_state[1][0].mu["Conv_0"]["kernel"].sharding.spec == kernel.sharding.spec
    assert_close_tree(s_f.params, s_dp.params, atol=1e-5)
    np.testing.assert_allclose(m_f[-1]["loss"], m_dp[-1]["loss"], rtol=1e-5)


@pytest.mark.parametrize("objective", ["spin", "kto"])
def test_accumulation_equals_big_batch(objective):
    # 2 micro-batches of 8 (each spread over the 8 devices) == one batch of 16. For KTO this
    # needs z0 from the whole batch, not from each micro-batch.
    batch = make_batch(objective, 16, seed=1)
    big, m_big, _ = run_steps(objective, MESH8, batch, n_steps=1, ref_shift=0.05)
    acc, m_acc, _ = run_steps(objective, MESH8, batch, n_steps=1, accum_steps=2, ref_shift=0.05)
    if objective == "kto":
        assert m_big[0]["z0"] > 0  # the reference point is active in this batch
        np.testing.assert_allclose(m_acc[0]["z0"], m_big[0]["z0"], rtol=1e-5)
    np.testing.assert_allclose(m_acc[0]["loss"], m_big[0]["loss"], rtol=1e-5)
    np.testing.assert_allclose(m_acc[0]["grad_norm"], m_big[0]["grad_norm"], rtol=1e-4)
    np.testing.assert_allclose(m_acc[0]["implicit_acc"], m_big[0]["implicit_acc"])
    assert_close_tree(acc.params, big.params, atol=1e-5)


def test_accumulation_is_unrolled_on_cpu_and_rolled_elsewhere():
    # XLA:CPU runs the backward pass several times slower inside a while loop (the demo's step
    # went from 0.5 s to 3 s with 2 micro-batches), so the CPU gets the loop unrolled.
    from spin_jax import platform

    assert platform.scan_unroll(4, "cpu") == 4
    assert platform.scan_unroll(4, "gpu") == platform.scan_unroll(4, "tpu") == 1
    batch = make_batch("spin", 16, seed=1)
    params = init_params(0)
    state = TrainState.create(params, TX)
    ref = jax.tree.map(lambda p: p + 0.05, params)

    def hlo(unroll):
        fn = step.make_train_step(
            "spin", unet_apply=unet_apply, schedule=sd_schedule(), encode_text=encode_text,
            beta=BETA, accum_steps=2, unroll=unroll,
        )  # fmt: skip
        lowered = jax.jit(fn).lower(state, ref, TEXT_PARAMS, batch, jax.random.key(0))
        return lowered.as_text(), fn

    default, fn_default = hlo(None)
    rolled, fn_rolled = hlo(1)
    # (the random draws keep their own small loops: count, do not look for none)
    assert rolled.count("stablehlo.while") == default.count("stablehlo.while") + 1
    args = (ref, TEXT_PARAMS, batch, jax.random.key(3))
    s_a, m_a = jax.jit(fn_default)(state, *args)
    s_b, m_b = jax.jit(fn_rolled)(state, *args)
    np.testing.assert_allclose(m_a["loss"], m_b["loss"], rtol=1e-6)
    assert_close_tree(s_a.params, s_b.params, atol=1e-6)


def test_reference_params_untouched_and_not_donated():
    batch = make_batch("spin", 16)
    params = init_params(0)
    ref_before = jax.device_get(jax.tree.map(lambda p: p + 0.01, params))
    state, _, ref = run_steps("spin", MESH8, batch, n_steps=3, params=params)
    assert_close_tree(ref, ref_before, atol=0)  # still readable (not donated), bit-identical
    moved = jax.tree.map(
        lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), state.params, params
    )
    assert min(jax.tree.leaves(moved)) > 0  # every policy leaf moved


def test_noise_and_timestep_draws():
    variants = {"spin": ("spin", True), "unshared": ("spin", False), "dpo": ("dpo", False),
                "kto": ("kto", True)}  # fmt: skip
    batches = {name: make_batch(obj, 64) for name, (obj, _) in variants.items()}

    @jax.jit
    def draw_all(batches, key):  # one compile for all variants
        return {
            name: step.draw_inputs(obj, batches[name], key, 1000, share_noise=share)
            for name, (obj, share) in variants.items()
        }

    out = jax.device_get(draw_all(batches, jax.random.key(0)))
    spin = out["spin"]
    assert spin["t"].dtype == np.int32 and spin["t"].shape == (64,)
    assert 0 <= spin["t"].min() and spin["t"].max() < 1000 and len(set(spin["t"])) > 30
    assert spin["noise_a"].shape == (64, H, W, C)
    np.testing.assert_array_equal(spin["noise_a"], spin["noise_b"])  # share_noise default
    assert abs(spin["noise_a"].mean()) < 0.05 and abs(spin["noise_a"].std() - 1) < 0.05
    assert not np.allclose(out["unshared"]["noise_a"], out["unshared"]["noise_b"])
    np.testing.assert_array_equal(out["dpo"]["noise_a"], out["dpo"]["noise_b"])  # DPO always
    assert "noise_b" not in out["kto"]
    # Same t and noise within a pair show in the step: real == syn gives equal policy errors.
    batch = make_batch("spin", 16)
    batch["x0_l"] = batch["x0_w"]
    _, m, _ = run_steps("spin", MESH8, batch, n_steps=1)
    assert m[0]["err_policy_real"] == m[0]["err_policy_syn"]


def test_sft_steps_lower_the_loss():
    batch = make_batch("sft", 16, seed=3)
    # One fixed key: the same noisy inputs every step, so the loss must fall.
    _, metrics, _ = run_steps("sft", MESH8, batch, n_steps=15, params=init_params(1), key0=0)
    _, m_again, _ = run_steps("sft", MESH8, batch, n_steps=1, params=init_params(1), key0=0)
    assert metrics[0]["loss"] == m_again[0]["loss"]
    losses_ = [float(m["loss"]) for m in metrics]
    assert losses_[-1] < 0.7 * losses_[0], losses_


def test_spin_steps_raise_implicit_accuracy():
    rng = np.random.default_rng(4)
    b = 16
    # "Real" latents are smooth, the opponent's samples white noise: easy to tell apart.
    smooth = np.cumsum(rng.normal(size=(b, H, W, C)), axis=1).astype(np.float32) / 3
    batch = {
        "input_ids": rng.integers(0, VOCAB, size=(b, LEN)).astype(np.int32),
        "x0_w": smooth,
        "x0_l": rng.normal(size=(b, H, W, C)).astype(np.float32) * 2,
    }
    params = init_params(2)
    # Opponent = the starting policy, so the first loss is log 2; 25 steps with fresh keys.
    _, metrics, _ = run_steps("spin", MESH8, batch, n_steps=26, params=params, ref=params)
    np.testing.assert_allclose(metrics[0]["loss"], np.log(2.0), rtol=1e-6)
    last = metrics[-1]  # metrics are computed before that step's update
    assert float(last["implicit_acc"]) > 0.5, [float(m["implicit_acc"]) for m in metrics]
    d_real = last["err_policy_real"] - last["err_ref_real"]
    d_syn = last["err_policy_syn"] - last["err_ref_syn"]
    assert d_syn > d_real  # relatively worse on the opponent's samples than on real data


def test_non_finite_loss_is_reported_and_skipped():
    batch = make_batch("spin", 16)
    batch["x0_l"][3, 0, 0, 0] = np.nan
    params = init_params(0)
    before = jax.device_get(TrainState.create(params, TX))
    state, metrics, _ = run_steps("spin", MESH8, batch, n_steps=1, params=params)
    m = metrics[0]
    assert not bool(m["is_finite"]) and not np.isfinite(m["loss"])
    assert int(state.step) == 0  # update skipped: the state comes back as it went in
    assert_close_tree(state.params, before.params, atol=0)
    assert_close_tree(state.opt_state, before.opt_state, atol=0)


def test_bad_inputs():
    mesh = parallel.make_mesh()
    kw = {"unet_apply": unet_apply, "encode_text": encode_text, "schedule": sd_schedule()}
    with pytest.raises(ValueError, match=r"global batch of 12 is not divisible.*size 8"):
        parallel.global_batch_from_local(make_batch("spin", 12), mesh)
    with pytest.raises(ValueError, match="unknown objective 'ipo'"):
        step.make_train_step("ipo", beta=1.0, **kw)
    for beta in (0.0, -5.0, None):
        with pytest.raises(ValueError, match="beta"):
            step.make_train_step("spin", beta=beta, **kw)
    with pytest.raises(ValueError, match="accum_steps"):
        step.make_train_step("spin", beta=1.0, accum_steps=0, **kw)
    with pytest.raises(ValueError, match="prediction_type"):
        step.make_train_step("sft", **{**kw, "schedule": sd_schedule("flow")})
    state = TrainState.create(init_params(0), TX)
    gbatch = parallel.global_batch_from_local(make_batch("spin", 16), mesh)
    # The micro-batch (16 / 4 = 4) must still split over the 8 data-parallel devices.
    fn = step.make_train_step("spin", beta=1.0, accum_steps=4, mesh=mesh, **kw)
    with pytest.raises(ValueError, match=r"micro-batch of 4 is not divisible"):
        jax.jit(fn)(state, init_params(0), TEXT_PARAMS, gbatch, jax.random.key(0))
    fn = step.make_train_step("dpo", beta=1.0, **kw)
    sft_batch = parallel.global_batch_from_local(make_batch("sft", 16), mesh)
    with pytest.raises(ValueError, match=r"dpo batch lacks \['x0_w', 'x0_l'\]"):
        jax.jit(fn)(state, init_params(0), TEXT_PARAMS, sft_batch, jax.random.key(0))
    fn = step.make_train_step("spin", beta=1.0, **kw)
    with pytest.raises(ValueError, match="needs ref_params"):
        jax.jit(fn)(state, None, TEXT_PARAMS, gbatch, jax.random.key(0))


def test_lr_schedules_and_optimizer_config():
    peak = 2e-5
    lin = optim.make_lr_schedule(
        {"learning_rate": peak, "lr_schedule": "linear", "warmup_steps": 200, "total_steps": 500}
    )
    for s, want in [(0, 0.0), (100, peak / 2), (200, peak), (350, peak / 2), (500, 0.0), (600, 0)]:
        np.testing.assert_allclose(lin(s), want, rtol=1e-5, atol=1e-12)
    cos = optim.make_lr_schedule(
        {
            "learning_rate": peak,
            "lr_schedule": "cosine",
            "warmup_steps": 0,
            "steps": 100,
            "end_lr_ratio": 0.1,
        }
    )
    np.testing.assert_allclose(cos(50), peak * (0.1 + 0.9 * 0.5), rtol=1e-5)
    np.testing.assert_allclose(cos(100), peak * 0.1, rtol=1e-5)
    const = optim.make_lr_schedule({"learning_rate": peak, "warmup_steps": 500})
    np.testing.assert_allclose([const(250), const(5000)], [peak / 2, peak], rtol=1e-5)
    for bad, match in [
        ({"learning_rate": 0}, "learning_rate"),
        ({"learning_rate": 1e-5, "lr_schedule": "step"}, "lr_schedule"),
        ({"learning_rate": 1e-5, "lr_schedule": "linear"}, "total_steps"),
        ({"learning_rate": 1e-5, "optimizer": "lion"}, "optimizer"),
    ]:
        with pytest.raises(ValueError, match=match):
            optim.make_optimizer(bad)
    # Clipping: a huge gradient gives an update of global norm lr (Adam's first step is lr*sign).
    params = {"w": jnp.ones((4,))}
    tx, _ = optim.make_optimizer({"optimizer": "sgd", "learning_rate": 1.0, "grad_clip_norm": 1.0})
    updates, _ = tx.update({"w": jnp.full((4,), 100.0)}, tx.init(params), params)
    np.testing.assert_allclose(jnp.linalg.norm(updates["w"]), 1.0, rtol=1e-5)
    tx, _ = optim.make_optimizer({"optimizer": "sgd", "learning_rate": 1.0, "grad_clip_norm": None})
    updates, _ = tx.update({"w": jnp.full((4,), 100.0)}, tx.init(params), params)
    np.testing.assert_allclose(jnp.linalg.norm(updates["w"]), 200.0, rtol=1e-5)
    import ml_collections

    cfg = ml_collections.ConfigDict({"learning_rate": 1e-4, "optimizer": "adam", "b2": 0.99})
    tx, lr_fn = optim.make_optimizer(cfg)
    assert float(lr_fn(0)) == pytest.approx(1e-4)


def test_parallel_helpers():
    mesh = parallel.make_mesh(data=2, fsdp=4)
    assert parallel.data_parallel_size(mesh) == 8
    np.testing.assert_array_equal(parallel.process_batch_indices(16, mesh), np.arange(16))
    with pytest.raises(ValueError, match="fsdp=3"):
        parallel.make_mesh(fsdp=3)
    shard = parallel.fsdp_param_sharding(
        mesh,
        {"big": jnp.zeros((6, 1024, 40)), "small": jnp.zeros((8,)), "odd": jnp.zeros((7, 9999))},
    )
    assert shard["big"].spec == jax.sharding.PartitionSpec(None, "fsdp", None)
    assert shard["small"].spec == jax.sharding.PartitionSpec()
    assert shard["odd"].spec == jax.sharding.PartitionSpec()
    assert parallel.init_distributed() is False  # no multi-process environment here


def test_real_unet_and_schedule():
    # The project's UNet (one level) and a schedule read from SD 1.5's scheduler config.
    unet_mod = pytest.importorskip("spin_jax.models.unet")
    diffusion = pytest.importorskip("spin_jax.diffusion")
    from spin_jax.models import presets

    config = dict(
        block_out_channels=(16,),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",),
        cross_attention_dim=DIM,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    model = unet_mod.unet_from_config(config)
    shapes = unet_mod.unet_param_shapes(model)
    schedule = diffusion.schedule_from_config(presets.SD15_SCHEDULER)

    # The whole step traced with the real UNet (a CPU compile of its backward pass would take
    # most of a minute; the compiled path is covered with TinyNet above).
    fn = step.make_train_step(
        "spin",
        encode_text=encode_text,
        schedule=schedule,
        beta=BETA,
        unet_apply=lambda p, x, t, c: model.apply({"params": p}, x, t, c),
    )
    state = jax.eval_shape(lambda p: TrainState.create(p, TX), shapes)
    batch = make_batch("spin", 8)
    new_state, m = jax.eval_shape(fn, state, shapes, TEXT_PARAMS, batch, jax.random.key(0))
    chex.assert_trees_all_equal_shapes_and_dtypes(new_state.params, shapes)
    assert m["loss"].shape == () and m["implicit_acc"].dtype == jnp.float32
