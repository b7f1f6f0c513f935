"""LoRA adapters: exactness at B = 0, parity with diffusers/peft (PyTorch) in both directions,
kohya files, bad input."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_sd import make_tiny_sd

from spin_jax.models import lora
from spin_jax.models.convert import WeightMismatchError

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

# Attention, feed-forward, resnet convs and (SD 1.x conv) proj_in/out: every layout.
ALL = ("attn", "ff", "conv", "proj")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_sd(str(tmp_path_factory.mktemp("model")), "sd1")


@pytest.fixture(scope="module")
def sd(model_dir):
    from spin_jax.models import load_pretrained

    return load_pretrained(model_dir)


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([10, 700])
    return x, t, ctx


def _ours(sd, unet_params, x, t, ctx):
    out = jax.jit(sd.unet_apply)(
        unet_params,
        jnp.asarray(x.numpy().transpose(0, 2, 3, 1)),
        jnp.asarray(t.numpy(), jnp.int32),
        jnp.asarray(ctx.numpy()),
    )
    return np.asarray(out)


def _theirs(unet, x, t, ctx):
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=ctx).sample.numpy().transpose(0, 2, 3, 1)


def _random_adapter(sd, rank, targets, seed=0):
    """An adapter with non-zero B (a fresh one is the base model exactly)."""
    adapter = lora.init(jax.random.key(seed), sd.params["unet"], rank, targets)
    leaves, tree = jax.tree.flatten(adapter)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(tree, leaves)


def _close(a, b, tol=1e-4):
    err = float(np.abs(a - b).max() / np.abs(b).max())
    assert err <= tol, err


def test_zero_b_is_the_base_exactly(sd):
    base = sd.params["unet"]
    adapter = lora.init(jax.random.key(0), base, 4, ALL)
    names = lora.describe(adapter)
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0" in names
    assert "down_blocks.0.attentions.0.proj_in" in names and "up_blocks.1.resnets.0.conv1" in names
    assert set(names.values()) == {4}
    for a, b in lora.layers_of(adapter).values():
        assert np.all(np.asarray(b) == 0) and np.any(np.asarray(a) != 0)
    merged = jax.jit(lora.merge, static_argnums=2)(base, adapter, 2.0)
    for x, y in zip(jax.tree.leaves(merged), jax.tree.leaves(base), strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    x, t, ctx = _inputs()
    assert np.array_equal(_ours(sd, merged, x, t, ctx), _ours(sd, base, x, t, ctx))
    # Default targets: the attention projections only; A as peft's kaiming-uniform bound.
    default = lora.init(jax.random.key(0), base, 2)
    assert {n.rsplit(".", 1)[-1] for n in lora.describe(default)} == {"to_q", "to_k", "to_v", "0"}
    a, _ = lora.layers_of(default)[("down_blocks_0", "attentions_0", "transformer_blocks_0", "attn2", "to_k")]  # fmt: skip
    assert a.shape == (32, 2) and float(jnp.abs(a).max()) <= 1 / np.sqrt(32)
    assert lora.merge(base, {}, 1.0) is base


def test_export_loads_in_diffusers_and_merged_export_agrees(sd, model_dir, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from spin_jax.models import save_pretrained

    rank, alpha = 4, 8.0  # alpha != rank: the scale travels in the file's metadata
    adapter = _random_adapter(sd, rank, ALL)
    scale = lora.scale_of(rank, alpha)
    path = lora.save_diffusers(str(tmp_path / "lora"), adapter, scale)
    assert os.path.basename(path) == "pytorch_lora_weights.safetensors"
    merged = lora.merge(sd.params["unet"], adapter, scale)
    x, t, ctx = _inputs()
    ours = _ours(sd, merged, x, t, ctx)
    base_out = _ours(sd, sd.params["unet"], x, t, ctx)
    assert np.abs(ours - base_out).max() > 1e-2  # the adapter does something

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    _close(ours, _theirs(pipe.unet, x, t, ctx))
    # The merged export: a plain diffusers UNet with the adapter folded in.
    out = save_pretrained(sd, str(tmp_path / "merged"), params=dict(sd.params, unet=merged))
    unet = UNet2DConditionModel.from_pretrained(os.path.join(out, "unet")).eval()
    _close(ours, _theirs(unet, x, t, ctx))
    # And the file reads back into the project as it was written.
    back, s = lora.from_file(str(tmp_path / "lora"), sd.params["unet"])
    assert s == scale and lora.describe(back) == lora.describe(adapter)
    for u, v in zip(jax.tree.leaves(back), jax.tree.leaves(adapter), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=0, atol=1e-7)


def _peft_unet(model_dir, rank, alpha, targets, seed=3):
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    unet = UNet2DConditionModel.from_pretrained(os.path.join(model_dir, "unet")).eval()
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets),
                                init_lora_weights="gaussian"))  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return unet


def test_peft_written_adapters_load(sd, model_dir, tmp_path):
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "ff.net.2"]
    unet = _peft_unet(model_dir, 4, 2, targets)
    x, t, ctx = _inputs()
    theirs = _theirs(unet, x, t, ctx)
    state = get_peft_model_state_dict(unet)
    # As diffusers' save_lora_weights writes a peft UNet (config with alpha in the metadata).
    StableDiffusionPipeline.save_lora_weights(
        str(tmp_path / "peft"), unet_lora_layers=state,
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
    )  # fmt: skip
    adapter, scale = lora.from_file(str(tmp_path / "peft"), sd.params["unet"])
    assert scale == 0.5
    _close(_ours(sd, lora.merge(sd.params["unet"], adapter, scale), x, t, ctx), theirs)
    # As diffusers' training scripts write it: the older ".lora.down/up" names, and no alpha
    # anywhere, which means scale 1 (to diffusers too).
    old = convert_state_dict_to_diffusers(state)
    assert any(".lora.down." in k for k in old)
    StableDiffusionPipeline.save_lora_weights(str(tmp_path / "old"), unet_lora_layers=old)
    adapter, scale = lora.from_file(str(tmp_path / "old"), sd.params["unet"])
    assert scale == 1.0
    for m in unet.modules():  # the same adapter with alpha = rank
        if hasattr(m, "scaling") and "default" in getattr(m, "scaling", {}):
            m.scaling["default"] = 1.0
    _close(_ours(sd, lora.merge(sd.params["unet"], adapter, scale), x, t, ctx),
           _theirs(unet, x, t, ctx))  # fmt: skip


def test_kohya_file_loads(sd, model_dir, tmp_path):
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    targets = ["to_q", "to_k", "to_v", "to_out.0", "conv2", "proj_out"]
    unet = _peft_unet(model_dir, 4, 6, targets, seed=5)
    x, t, ctx = _inputs()
    theirs = _theirs(unet, x, t, ctx)
    kohya = {}
    for key, value in get_peft_model_state_dict(unet).items():
        module, part = key.rsplit(".lora_", 1)
        name = "lora_unet_" + module.replace(".", "_")
        kohya[f"{name}.lora_{'down' if part.startswith('A') else 'up'}.weight"] = value
        kohya[f"{name}.alpha"] = torch.tensor(6.0)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.alpha" in kohya
    save_file(kohya, str(tmp_path / "kohya.safetensors"))
    adapter, scale = lora.from_file(str(tmp_path / "kohya.safetensors"), sd.params["unet"])
    assert scale == 1.5
    _close(_ours(sd, lora.merge(sd.params["unet"], adapter, scale), x, t, ctx), theirs)
    # Per-layer alphas are folded into B: one layer with another alpha still merges exactly.
    kohya[next(k for k in kohya if k.endswith("attn1_to_q.alpha"))] = torch.tensor(2.0)
    save_file(kohya, str(tmp_path / "kohya2.safetensors"))
    adapter2, scale2 = lora.from_file(str(tmp_path / "kohya2.safetensors"), sd.params["unet"])
    assert scale2 == 1.5
    (path,) = [p for p in lora.layers_of(adapter2) if p[-2:] == ("attn1", "to_q") and p[0] == "down_blocks_0"]  # fmt: skip
    np.testing.assert_allclose(np.asarray(lora.layers_of(adapter2)[path][1]),
                               np.asarray(lora.layers_of(adapter)[path][1]) * (0.5 / 1.5), rtol=1e-6)  # fmt: skip


def test_bad_input(sd, tmp_path):
    from safetensors.numpy import save_file

    base = sd.params["unet"]
    adapter = _random_adapter(sd, 2, ("to_q",))
    tensors, _ = lora.to_diffusers(adapter, 1.0)
    # Names of another architecture are listed, never skipped.
    bad = dict(tensors)
    bad["unet.down_blocks.3.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"] = np.zeros((2, 32), np.float32)  # fmt: skip
    bad["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"] = np.zeros((2, 32), np.float32)  # fmt: skip
    save_file(bad, str(tmp_path / "other.safetensors"))
    with pytest.raises(
        WeightMismatchError, match=r"matching no UNet layer \(2\).*down_blocks\.3.*"
    ) as e:
        lora.from_file(str(tmp_path / "other.safetensors"), base)
    assert "text_encoder.text_model" in str(e.value)
    # A shape that disagrees names the tensor.
    key = next(k for k in tensors if k.endswith("lora_B.weight"))
    save_file(
        dict(tensors, **{key: np.zeros((48, 2), np.float32)}), str(tmp_path / "shape.safetensors")
    )
    with pytest.raises(WeightMismatchError, match=rf"tensor '{key}' has shape \(48, 2\)"):
        lora.from_file(str(tmp_path / "shape.safetensors"), base)
    # A only, no B.
    save_file(
        {k: v for k, v in tensors.items() if "lora_A" in k}, str(tmp_path / "half.safetensors")
    )
    with pytest.raises(WeightMismatchError, match="without both A and B"):
        lora.from_file(str(tmp_path / "half.safetensors"), base)
    # A rank larger than a layer's width (32 here) names the layer.
    with pytest.raises(
        ValueError, match=r"rank 40 is larger than layer down_blocks\.0\..*attn1\.to_q"
    ):
        lora.init(jax.random.key(0), base, 40, ("to_q",))
    with pytest.raises(ValueError, match="LoRA target 'to_qq' matches no"):
        lora.init(jax.random.key(0), base, 2, ("to_qq",))
    (tmp_path / "w.bin").write_bytes(b"0")
    with pytest.raises(ValueError, match="only .safetensors"):
        lora.from_file(str(tmp_path / "w.bin"), base)
    with pytest.raises(FileNotFoundError):
        lora.from_file(str(tmp_path / "nowhere"), base)


def test_sample_cli_merges_a_lora_file(sd, model_dir, tmp_path):
    """launch/sample.py with model.lora gives the latents of the merged pipeline."""
    import importlib.util

    from spin_jax.models import save_pretrained

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    mods = {}
    for name, rel in (("sample", "launch/sample.py"), ("cfg", "configs/sample.py")):
        spec = importlib.util.spec_from_file_location(f"lora_test_{name}", os.path.join(root, rel))
        mods[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mods[name])
    adapter = _random_adapter(sd, 2, ("attn", "ff"))
    lora_dir = str(tmp_path / "lora")
    lora.save_diffusers(lora_dir, adapter, 0.5)
    merged_dir = save_pretrained(
        sd, str(tmp_path / "merged"),
        params=dict(sd.params, unet=lora.merge(sd.params["unet"], adapter, 0.5)),
    )  # fmt: skip
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na blue dog\n")

    def run(path, out, lora_file=""):
        c = mods["cfg"].get_config()
        c.model.path, c.prompts, c.out_dir = path, str(prompts), str(tmp_path / out)
        c.sample.num_steps, c.sample.batch_size = 2, 2
        c.sample.height = c.sample.width = 16
        c.output.images, c.output.latents = False, True
        if lora_file:
            with c.unlocked():
                c.model.lora = lora_file
        mods["sample"].run(c)
        return np.load(str(tmp_path / out / "latents" / "000000-000002.npy")), c

    with_lora, c = run(model_dir, "a", lora_dir)
    merged, _ = run(merged_dir, "b")
    _close(with_lora, merged)
    settings = json.load(open(tmp_path / "a" / "settings.json"))
    assert settings["lora"]["path"].endswith("pytorch_lora_weights.safetensors")
    # Another adapter in the same folder is other settings: refused.
    lora.save_diffusers(str(tmp_path / "lora2"), _random_adapter(sd, 2, ("attn",), seed=9), 0.5)
    c.model.lora = str(tmp_path / "lora2")
    with pytest.raises(ValueError, match="lora"):
        mods["sample"].run(c)


def _flax_tree(state):
    """A torch UNet state dict as a Flax-named params tree (kernels in Flax layouts)."""
    from spin_jax.models.convert import torch_key_to_path

    out = {}
    for key, v in state.items():
        path, leaf = torch_key_to_path(key)
        v = v.detach().numpy()
        if leaf == "weight":
            leaf = {4: "kernel", 2: "kernel"}.get(v.ndim, "scale")
            v = v.transpose(2, 3, 1, 0) if v.ndim == 4 else (v.T if v.ndim == 2 else v)
        node = out
        for p in path:
            node = node.setdefault(p, {})
        node[leaf] = np.ascontiguousarray(v)
    return out


def test_sdxl_layout_names_and_merge(tmp_path):
    """SDXL's layout (several transformer layers per block, linear projections, the text_time
    embedding's linear_1/linear_2) through a peft-written file, our merge and back to torch."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from spin_jax.models.convert import flax_to_torch

    kwargs = dict(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,
    )  # fmt: skip
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**kwargs).eval()
    base = _flax_tree(unet.state_dict())
    targets = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "add_embedding.linear_1"]
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="gaussian"))  # fmt: skip
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape))
    StableDiffusionXLPipeline.save_lora_weights(
        str(tmp_path / "xl"), unet_lora_layers=get_peft_model_state_dict(unet),
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
    )  # fmt: skip
    adapter, scale = lora.from_file(str(tmp_path / "xl"), base)
    names = lora.describe(adapter)
    assert scale == 2.0 and "add_embedding.linear_1" in names
    assert "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_out.0" in names
    assert len(names) == len(lora.targets_of(base, targets))
    merged = lora.merge(base, adapter, scale)
    plain = UNet2DConditionModel(**kwargs).eval()
    plain.load_state_dict({k: torch.from_numpy(v) for k, v in flax_to_torch(merged).items()})
    g = torch.Generator().manual_seed(2)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 7, 32, generator=g)
    cond = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.rand(2, 6, generator=g) * 64}  # fmt: skip
    t = torch.tensor([3, 900])
    with torch.no_grad():
        want = unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs=cond).sample.numpy()
        got = plain(x, t, encoder_hidden_states=ctx, added_cond_kwargs=cond).sample.numpy()
    _close(got, want)
    # Kohya names resolve against the real module names (underscores inside names included).
    tensors, _ = lora.to_diffusers(adapter, scale)
    kohya = {}
    for key, v in tensors.items():
        module, part = key.removeprefix("unet.").rsplit(".lora_", 1)
        name = "lora_unet_" + module.replace(".", "_")
        kohya[f"{name}.lora_{'down' if part.startswith('A') else 'up'}.weight"] = v
        kohya[f"{name}.alpha"] = np.float32(scale * 4)
    assert "lora_unet_add_embedding_linear_1.alpha" in kohya
    back, s = lora.from_state_dict(kohya, base)
    assert s == scale and lora.describe(back) == names


def test_mixed_ranks_round_trip_through_diffusers(sd, model_dir, tmp_path):
    """Layers of other ranks (e.g. from a kohya file) keep their scale in diffusers: written
    as peft's rank_pattern / alpha_pattern."""
    from diffusers import StableDiffusionPipeline

    a = _random_adapter(sd, 2, ("to_q", "to_k", "to_v"))
    b = _random_adapter(sd, 4, ("to_out.0",), seed=4)
    adapter = lora.from_layers({**lora.layers_of(a), **lora.layers_of(b)})
    assert set(lora.describe(adapter).values()) == {2, 4}
    lora.save_diffusers(str(tmp_path / "mixed"), adapter, 0.75)
    x, t, ctx = _inputs()
    ours = _ours(sd, lora.merge(sd.params["unet"], adapter, 0.75), x, t, ctx)
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
    pipe.load_lora_weights(str(tmp_path / "mixed"))
    _close(ours, _theirs(pipe.unet, x, t, ctx))
    back, s = lora.from_file(str(tmp_path / "mixed"), sd.params["unet"])
    assert s == 0.75 and lora.describe(back) == lora.describe(adapter)
