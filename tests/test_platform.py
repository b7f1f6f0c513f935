"""The attention implementation and compute dtype chosen by the machine (spin_jax.platform)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spin_jax import platform

BF16, F16, F32 = jnp.bfloat16, jnp.float16, jnp.float32

CPU = dict(platform="cpu", device_kind="cpu", compute_capability=None)
TPU = dict(platform="tpu", device_kind="TPU v5 lite", compute_capability=None)
ROCM = dict(
    platform="gpu",
    device_kind="AMD Instinct MI300X",
    compute_capability="gfx942",
    platform_version="rocm 60300",
)
A100 = dict(
    platform="gpu",
    device_kind="NVIDIA A100-SXM4-80GB",
    compute_capability="8.0",
    platform_version="cuda 12080",
)
H100 = dict(
    platform="gpu",
    device_kind="NVIDIA H100 80GB HBM3",
    compute_capability="9.0",
    platform_version="cuda 12080",
)
V100 = dict(platform="gpu", device_kind="Tesla V100-SXM2-16GB", compute_capability="7.0")


def choose(machine, head_dim, dtype=BF16, impl="auto"):
    return platform.choose_attention(impl, dtype=dtype, head_dim=head_dim, **machine)


@pytest.mark.parametrize("machine", [CPU, TPU, ROCM], ids=["cpu", "tpu", "rocm"])
@pytest.mark.parametrize("head_dim", [40, 64, 80, 160])
def test_auto_is_xla_off_nvidia(machine, head_dim):
    impl, reason = choose(machine, head_dim)
    assert impl == "xla"
    assert "NVIDIA" in reason


def test_auto_on_a100():
    for head_dim in (40, 64, 80):
        assert choose(A100, head_dim) == ("cudnn", f"head dim {head_dim}, bfloat16")
        assert choose(A100, head_dim, F16)[0] == "cudnn"
    impl, reason = choose(A100, 160)  # SD 1.5's deepest blocks: over 128 before Hopper
    assert impl == "xla" and "160" in reason and "128" in reason
    assert choose(A100, 36)[0] == "xla"  # not a multiple of 8


def test_auto_on_h100():
    assert choose(H100, 160)[0] == "cudnn"
    assert choose(H100, 256)[0] == "cudnn"
    impl, reason = choose(H100, 256 + 8)
    assert impl == "xla" and "256" in reason
    assert choose(H100, 512)[0] == "xla"  # the VAE's single head


def test_float32_on_nvidia_is_xla():
    for machine in (A100, H100):
        impl, reason = choose(machine, 64, F32)
        assert impl == "xla" and "float32" in reason


def test_old_nvidia_gpu_is_xla():
    impl, reason = choose(V100, 64)
    assert impl == "xla" and "8.0" in reason


def test_nvidia_detected_from_the_device_name_without_a_version():
    a100 = {k: v for k, v in A100.items() if k != "platform_version"}
    assert choose(a100, 64)[0] == "cudnn"
    assert not platform.is_nvidia_gpu("gpu", "AMD Instinct MI250X")
    assert not platform.is_nvidia_gpu("gpu", "NVIDIA-looking", "rocm 60000")
    assert not platform.is_nvidia_gpu("cpu", "NVIDIA Grace")


def test_cudnn_is_never_chosen_off_nvidia():
    others = [CPU, TPU, ROCM, dict(platform="gpu", device_kind="Intel Data Center GPU Max")]
    grid = itertools.product(others, [8, 40, 64, 80, 128, 160, 256], [BF16, F16, F32])
    for machine, head_dim, dtype in grid:
        assert choose(machine, head_dim, dtype)[0] == "xla"
        assert choose(machine, head_dim, dtype, impl=None)[0] == "xla"
        with pytest.raises(ValueError, match="model.attention_impl"):
            choose(machine, head_dim, dtype, impl="cudnn")


def test_explicit_implementations():
    for impl in (None, "", "xla"):
        assert choose(H100, 64, impl=impl) == ("xla", "requested")
    assert choose(H100, 64, impl="cudnn")[0] == "cudnn"
    assert choose(H100, 512, impl="cudnn")[0] == "xla"  # per-layer fallback on shape
    with pytest.raises(ValueError, match="model.attention_impl.*float32"):
        choose(H100, 64, F32, impl="cudnn")
    with pytest.raises(ValueError, match="model.attention_impl='flash'"):
        choose(H100, 64, impl="flash")


def test_auto_keeps_masked_attention_on_xla():
    assert platform.choose_attention("auto", dtype=BF16, head_dim=64, masked=True, **H100)[0] == (
        "xla"
    )


def test_default_compute_dtype():
    assert platform.default_compute_dtype("cpu") == "float32"
    assert platform.default_compute_dtype("gpu") == "bfloat16"
    assert platform.default_compute_dtype("tpu") == "bfloat16"
    assert platform.default_compute_dtype() == "float32"  # the tests run on CPUs


def test_describe_machine():
    m = platform.describe_machine()
    assert m.platform == jax.devices()[0].platform == "cpu"
    assert not m.is_nvidia
    assert str(m).startswith("cpu")


def test_summary_line():
    log = [
        platform.AttentionChoice("auto", "cudnn", "head dim 40, bfloat16", 40, "bfloat16"),
        platform.AttentionChoice("auto", "cudnn", "head dim 160, bfloat16", 160, "bfloat16"),
        platform.AttentionChoice("auto", "xla", "head dim 512 is not ...", 512, "bfloat16"),
    ]
    machine = platform.Machine(**H100)
    line = platform.summarize_attention(log, machine)
    assert line.startswith("attention: auto -> cudnn for 2 layers (head dims 40, 160), xla for 1")
    assert "H100" in line
    line = platform.summarize_attention(log[2:], platform.Machine(**CPU))
    assert line.startswith("attention: auto -> xla for 1 layer (") and line.endswith("(cpu)")


# Through the models ---------------------------------------------------------------------------


def test_load_pretrained_auto_equals_xla_on_cpu(tiny_base):
    from spin_jax.models import load_pretrained
    from spin_jax.models.pipeline import attention_report

    auto = load_pretrained(tiny_base, jnp.float32, attention_impl="auto")
    xla = load_pretrained(tiny_base, jnp.float32, attention_impl="xla")
    report = attention_report(auto)
    assert report.startswith("attention: auto -> xla for ") and report.endswith("(cpu)")
    assert auto.attention_summary == report
    n_layers = sum(len(v) for v in auto.attention_choices.values())
    assert n_layers > 0 and f"for {n_layers} layers" in report
    assert xla.attention_summary.startswith("attention: xla -> xla for ")

    ids = auto.tokenize(["a photo of a cat", ""])
    rng = np.random.default_rng(0)
    size = 8
    x = jnp.asarray(rng.standard_normal((2, size, size, auto.latent_channels)), jnp.float32)
    t = jnp.asarray([10, 500], jnp.int32)
    outs = []
    for sd in (auto, xla):
        ctx = jax.jit(sd.encode_text)(sd.params["text_encoder"], ids)
        eps = jax.jit(sd.unet_apply)(sd.params["unet"], x, t, ctx)
        img = jax.jit(sd.vae_decode)(sd.params["vae"], x)
        outs.append([np.asarray(ctx), np.asarray(eps), np.asarray(img)])
    for a, b in zip(*outs, strict=True):
        np.testing.assert_array_equal(a, b)


def test_explicit_cudnn_on_cpu_is_a_clear_error(tiny_base):
    from spin_jax.models import load_pretrained
    from spin_jax.models.attention import attention

    with pytest.raises(ValueError, match=r"model\.attention_impl='cudnn' cannot run here.*cpu"):
        load_pretrained(tiny_base, jnp.bfloat16, attention_impl="cudnn")
    with pytest.raises(ValueError, match="model.attention_impl"):
        load_pretrained(tiny_base, jnp.float32, attention_impl="flash")
    q = jnp.zeros((1, 4, 2, 8), jnp.bfloat16)
    with pytest.raises(ValueError, match="NVIDIA GPU"):  # at trace time, before any compile
        jax.eval_shape(lambda q: attention(q, q, q, implementation="cudnn"), q)
