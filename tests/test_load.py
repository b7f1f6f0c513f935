"""Loading weights at disk speed: memory-mapped safetensors, NumPy layouts, one device transfer."""

import functools
import json
import mmap
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from spin_jax.models import convert, load_pretrained, weights
from spin_jax.models.weights import map_safetensors, read_tensors

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import bench_load  # noqa: E402


@pytest.fixture(scope="module")
def small_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("load")
    out = {}
    for dtype in ("float32", "bfloat16"):
        out[dtype] = str(root / dtype)
        bench_load.build(out[dtype], "small", dtype, seed=3)
    return out


def test_map_safetensors_reads_every_dtype_without_copying(tmp_path):
    path = str(tmp_path / "t.safetensors")
    rng = np.random.default_rng(0)
    tensors = {
        "f32": rng.standard_normal((3, 4)).astype(np.float32),
        "f16": rng.standard_normal((2, 5)).astype(np.float16),
        "bf16": rng.standard_normal((4,)).astype(ml_dtypes.bfloat16),
        "ids": np.arange(7, dtype=np.int64)[None],
        "empty": np.zeros((0, 3), np.float32),
    }
    save_file(tensors, path)
    got = map_safetensors(path)
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape
        np.testing.assert_array_equal(got[k], v)
        assert not got[k].flags.writeable  # views of the file, not copies
    as_f32 = read_tensors([path])
    assert as_f32["bf16"].dtype == np.float32 and as_f32["ids"].dtype == np.int64
    np.testing.assert_array_equal(as_f32["bf16"], tensors["bf16"].astype(np.float32))


def test_truncated_safetensors_names_the_file(tmp_path):
    path = str(tmp_path / "t.safetensors")
    save_file({"w": np.ones((64, 64), np.float32)}, path)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    with pytest.raises(ValueError, match=r"t\.safetensors.*'w'.*truncated"):
        map_safetensors(path)
    with open(path, "wb") as f:
        f.write(b"not a safetensors file at all")
    with pytest.raises(ValueError, match=r"cannot read safetensors file .*t\.safetensors"):
        map_safetensors(path)


def _template(**shapes):
    tree = {}
    for path, shape in shapes.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = jax.ShapeDtypeStruct(shape, jnp.float32)
    return tree


def test_prepared_layout_guesses_are_checked_against_the_template():
    rng = np.random.default_rng(0)
    state = {
        "conv.weight": rng.standard_normal((8, 4, 3, 3)).astype(np.float32),  # conv: guessed right
        "proj.weight": rng.standard_normal((6, 4, 1, 1)).astype(np.float32),  # 1x1 conv as linear
        "lin.weight": rng.standard_normal((5, 4)).astype(ml_dtypes.bfloat16),  # linear: right
        "table.weight": rng.standard_normal((7, 4)).astype(np.float32),  # an Embed: guessed wrong
        "tok_embedding.weight": rng.standard_normal((9, 4)).astype(np.float32),
        "norm.weight": rng.standard_normal((4,)).astype(np.float32),
        "pos.position_ids": np.arange(4)[None],
    }
    template = _template(
        **{
            "conv/kernel": (3, 3, 4, 8),
            "proj/kernel": (4, 6),
            "lin/kernel": (4, 5),
            "table/embedding": (7, 4),
            "tok_embedding/embedding": (9, 4),
            "norm/scale": (4,),
        }
    )
    plain = convert.torch_to_flax(state, template)
    prepared = convert.prepare(state)
    assert prepared["table.weight"][0] == "linear"  # the wrong guess this test is about
    fast = convert.torch_to_flax(state, template, prepared=prepared)
    assert jax.tree.structure(plain) == jax.tree.structure(fast)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(fast), strict=True):
        assert a.dtype == b.dtype == np.float32 and a.flags.c_contiguous and b.flags.c_contiguous
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(fast["table"]["embedding"], state["table.weight"])
    np.testing.assert_array_equal(fast["proj"]["kernel"], state["proj.weight"][:, :, 0, 0].T)
    np.testing.assert_array_equal(
        fast["conv"]["kernel"], state["conv.weight"].transpose(2, 3, 1, 0)
    )
    with pytest.raises(convert.WeightMismatchError, match="missing tensors.*norm.weight"):
        state_missing = {k: v for k, v in state.items() if k != "norm.weight"}
        convert.torch_to_flax(state_missing, template, prepared=prepared)


def test_materialize_aligns_every_leaf():
    rng = np.random.default_rng(0)
    leaves = {(str(i),): rng.standard_normal((i + 1, 3)).T for i in range(20)}
    out = convert.materialize(leaves)
    for k, v in out.items():
        assert v.ctypes.data % 64 == 0 and v.flags.c_contiguous
        np.testing.assert_array_equal(v, leaves[k].astype(np.float32))


def test_materialize_copies_large_transposed_kernels_in_every_dtype():
    # Big enough for the blocked / tiled copies, with partial blocks at the edges.
    rng = np.random.default_rng(1)
    conv = rng.standard_normal((300, 520, 3, 3), dtype=np.float32)  # OIHW -> HWIO
    linear = rng.standard_normal((700, 257), dtype=np.float32)  # [out, in] -> [in, out]
    for src_dtype in (np.float32, ml_dtypes.bfloat16):
        leaves = {
            ("conv",): conv.astype(src_dtype).transpose(2, 3, 1, 0),
            ("linear",): linear.astype(src_dtype).T,
        }
        for dtype in (np.float32, ml_dtypes.bfloat16):
            out = convert.materialize(leaves, dtype)
            for k, v in out.items():
                assert v.dtype == dtype and v.flags.c_contiguous
                np.testing.assert_array_equal(v, np.ascontiguousarray(leaves[k]).astype(dtype))


def test_large_buffers_are_aligned_writable_mappings():
    big = convert.allocate(64 << 20)  # the size from which a mapping is used
    small = convert.allocate(1000)
    for buf, n in ((big, 64 << 20), (small, 1000)):
        assert buf.nbytes == n and buf.ctypes.data % 64 == 0 and buf.flags.writeable
        buf[:] = 7
        assert buf[0] == buf[-1] == 7
    assert isinstance(big.base.obj, mmap.mmap)  # a mapping, unmapped with its last view
    # Many leaves in one arena: no leaf overlaps another.
    leaves = {(str(i),): np.full((1 << 20,), i, np.float32) for i in range(20)}
    out = convert.materialize(leaves)
    assert all((v == int(k[0])).all() for k, v in out.items())


def test_prefault_keeps_contents_and_ignores_what_it_cannot_advise(tmp_path):
    path = tmp_path / "t.safetensors"
    x = np.arange(3 << 20, dtype=np.float32)
    save_file({"x": x}, str(path))
    np.testing.assert_array_equal(map_safetensors(str(path))["x"], x)  # prefaulted by default
    np.testing.assert_array_equal(map_safetensors(str(path), populate=False)["x"], x)
    buf = np.frombuffer(bytearray(b"abc" * 5000), np.uint8)[1:]  # not a page-aligned mapping
    weights.prefault(buf)
    weights.prefault(buf[:0])
    assert bytes(buf[:2]) == b"bc"


def test_load_lowers_the_switch_interval_only_while_it_runs(small_folders, monkeypatch):
    from spin_jax.models import pipeline

    seen = []
    real = pipeline._load
    monkeypatch.setattr(
        pipeline, "_load", lambda *a: seen.append(sys.getswitchinterval()) or real(*a)
    )
    before = sys.getswitchinterval()
    load_pretrained(small_folders["float32"])
    assert seen and seen[0] <= 2e-4 < before
    assert sys.getswitchinterval() == before


def test_bfloat16_files_load_as_float32_params(small_folders):
    f32 = load_pretrained(small_folders["float32"])
    bf16 = load_pretrained(small_folders["bfloat16"])
    for net in ("unet", "vae", "text_encoder"):
        a, b = jax.tree.leaves(f32.params[net]), jax.tree.leaves(bf16.params[net])
        assert len(a) == len(b) > 0
        for x, y in zip(a, b, strict=True):
            assert isinstance(y, jax.Array) and x.dtype == y.dtype == jnp.float32
            want = np.asarray(x).astype(ml_dtypes.bfloat16).astype(np.float32)
            np.testing.assert_array_equal(np.asarray(y), want)


def test_param_dtype_keeps_16_bit_weights_for_inference(small_folders):
    from spin_jax.diffusion.generate import generate

    f32 = load_pretrained(small_folders["float32"])
    for folder in small_folders.values():
        sd = load_pretrained(folder, param_dtype="bfloat16")
        for net in ("unet", "vae", "text_encoder"):
            pairs = zip(
                jax.tree.leaves(f32.params[net]), jax.tree.leaves(sd.params[net]), strict=True
            )
            for x, y in pairs:
                assert y.dtype == jnp.bfloat16
                np.testing.assert_array_equal(
                    np.asarray(y), np.asarray(x).astype(ml_dtypes.bfloat16)
                )
    # The layers widen 16-bit weights to the compute dtype: the same images as float32 params
    # holding the same (rounded) values.
    widened = jax.tree.map(lambda x: x.astype(jnp.float32), sd.params)
    ids = sd.tokenize(["a red square", "a blue circle"])

    def images(params):
        return np.asarray(
            generate(sd, params, ids, jax.random.key(0), num_steps=3, height=32, width=32)
        )

    np.testing.assert_allclose(images(sd.params), images(widened), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="param_dtype='int8' is not one of float32, bfloat16"):
        load_pretrained(small_folders["float32"], param_dtype="int8")


def test_load_places_params_with_a_sharding(small_folders):
    from spin_jax import parallel

    mesh = parallel.make_mesh()
    sd = load_pretrained(small_folders["float32"], sharding=mesh)
    plain = load_pretrained(small_folders["float32"])
    for net in ("unet", "vae", "text_encoder"):
        pairs = zip(
            jax.tree.leaves(sd.params[net]), jax.tree.leaves(plain.params[net]), strict=True
        )
        for x, y in pairs:
            assert x.sharding.is_equivalent_to(parallel.replicated(mesh), x.ndim)
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    one = jax.sharding.SingleDeviceSharding(jax.devices()[1])
    sd = load_pretrained(small_folders["float32"], sharding={"unet": one})
    assert all(x.devices() == {jax.devices()[1]} for x in jax.tree.leaves(sd.params["unet"]))
    assert all(x.devices() == {jax.devices()[0]} for x in jax.tree.leaves(sd.params["vae"]))


def test_weight_error_from_the_loader_thread_names_the_tensor(small_folders, tmp_path):
    import shutil

    bad = str(tmp_path / "bad")
    shutil.copytree(small_folders["float32"], bad)
    st = os.path.join(bad, "vae", "diffusion_pytorch_model.safetensors")
    tensors = dict(map_safetensors(st))
    key = "decoder.conv_out.bias"
    tensors[key] = np.zeros(5, np.float32)
    save_file(tensors, st + ".new")
    del tensors
    os.replace(st + ".new", st)
    with pytest.raises(convert.WeightMismatchError, match=key):
        load_pretrained(bad)


def test_bench_load_small(tmp_path, capsys):
    # The cheap measurement through the fresh-process path; the loader's in this process.
    bench_load.main(
        ["--size", "small", "--file_dtypes", "float32", "--repeats", "1"]
        + ["--what", "read", "--folder", str(tmp_path)]
    )
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    by_what = {r["what"]: r for r in records}
    assert set(by_what) == {"build", "read"}
    assert by_what["read"]["bytes_read"] > 0 and by_what["read"]["process_seconds"] > 0
    loaded = bench_load.child("spin_jax", str(tmp_path / "small_float32"), "float32")
    assert loaded["param_dtypes"] == ["float32"] and loaded["params"] > 0
    bench_load.build(str(tmp_path / "small_bfloat16"), "small", "bfloat16")
    kept = bench_load.child("spin_jax_inference", str(tmp_path / "small_bfloat16"), "bfloat16")
    assert kept["param_dtypes"] == ["bfloat16"] and kept["params"] == loaded["params"]
    # The scorer's folder (PickScore's layout at small widths) through the same children.
    folder = str(tmp_path / "pickscore_small_bfloat16")
    info = bench_load.build(folder, "pickscore_small", "bfloat16")
    read = bench_load.child("read", folder, "bfloat16")
    loaded = bench_load.child("spin_jax", folder, "float32")
    assert read["bytes_read"] > 0 and info["tensors"] > 50
    assert loaded["param_dtypes"] == ["float32"] and loaded["params"] * 2 == read["bytes_read"]


def test_templates_are_traced_once_then_read_from_the_cache(small_folders, tmp_path, monkeypatch):
    from spin_jax.models import pipeline, templates

    monkeypatch.setenv(templates.ENV, str(tmp_path / "cache"))
    first = load_pretrained(small_folders["float32"], attention_impl="auto")
    entries = sorted(os.listdir(tmp_path / "cache" / "templates"))
    assert len(entries) == 3  # one per network
    traces = []
    for name in ("unet_param_shapes", "vae_param_shapes", "text_encoder_param_shapes"):
        real = getattr(pipeline, name)
        fake = functools.wraps(real)(lambda m, real=real: traces.append(m) or real(m))
        monkeypatch.setattr(pipeline, name, fake)
    again = load_pretrained(small_folders["float32"], attention_impl="auto")
    assert not traces  # every template came from the cache
    assert again.attention_choices == first.attention_choices
    assert sum(map(len, again.attention_choices.values())) > 0
    assert pipeline.attention_report(again) == pipeline.attention_report(first)
    for net in ("unet", "vae", "text_encoder"):
        assert jax.tree.structure(again.params[net]) == jax.tree.structure(first.params[net])
        pairs = zip(
            jax.tree.leaves(again.params[net]), jax.tree.leaves(first.params[net]), strict=True
        )
        for a, b in pairs:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Anything the trace depends on gives another entry: here the compute dtype.
    load_pretrained(small_folders["float32"], dtype=jnp.bfloat16)
    assert len(traces) == 3 and len(os.listdir(tmp_path / "cache" / "templates")) == 6


def test_a_bad_template_entry_is_traced_again(small_folders, tmp_path, monkeypatch):
    from spin_jax.models import templates

    monkeypatch.setenv(templates.ENV, str(tmp_path / "cache"))
    want = load_pretrained(small_folders["float32"])
    folder = tmp_path / "cache" / "templates"
    for entry in os.listdir(folder):
        text = (folder / entry).read_text()
        (folder / entry).write_text(text[: len(text) // 2])  # a half-written file
    got = load_pretrained(small_folders["float32"])
    for net in ("unet", "vae", "text_encoder"):
        assert jax.tree.structure(got.params[net]) == jax.tree.structure(want.params[net])
    assert all(json.loads((folder / e).read_text())["params"] for e in os.listdir(folder))


def test_template_cache_can_be_turned_off_and_skips_unstable_modules(tmp_path, monkeypatch):
    import flax.linen as nn

    from spin_jax.models import templates

    class Net(nn.Module):
        act: Any = None

        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(x)

    def shapes_of(m):
        return jax.eval_shape(m.init, jax.random.key(0), jnp.zeros((1, 2)))["params"]

    monkeypatch.setenv(templates.ENV, str(tmp_path / "c"))
    shapes, log = templates.traced(Net(), shapes_of)
    assert shapes["Dense_0"]["kernel"].shape == (2, 3) and log == []
    assert len(os.listdir(tmp_path / "c" / "templates")) == 1
    templates.traced(Net(act=jax.nn.relu), shapes_of)  # repr "relu" does not say which relu
    templates.traced(Net(act=object()), shapes_of)
    assert len(os.listdir(tmp_path / "c" / "templates")) == 1
    monkeypatch.setenv(templates.ENV, "none")
    assert templates.cache_dir() is None
    cached, _ = templates.traced(Net(), shapes_of)
    assert cached["Dense_0"]["kernel"].shape == (2, 3)
