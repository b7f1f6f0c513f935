"""launch/sample.py end to end on a tiny pipeline: images, grid, latent shards, resume, errors."""

import importlib.util
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sample = _load("launch_sample", "launch/sample.py")
sample_config = _load("configs_sample", "configs/sample.py")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    pytest.importorskip("diffusers")
    from tiny_sd import make_tiny_sd

    return make_tiny_sd(str(tmp_path_factory.mktemp("sd1")), "sd1")


def make_config(model_path, prompts, out_dir):
    c = sample_config.get_config()
    c.model.path = model_path
    c.prompts = str(prompts)
    c.out_dir = str(out_dir)
    c.sample.num_steps = 3
    c.sample.batch_size = 4
    c.sample.height = c.sample.width = 16  # the tiny VAE downsamples by 2: 8x8 latents
    c.output.latents = True
    c.output.grid_size = 4
    return c


def test_sample_writes_everything_and_resumes(model_path, tmp_path, caplog):
    prompts = tmp_path / "prompts.txt"
    long_prompt = " ".join(["a red cat on the left"] * 20)  # > 77 tokens
    prompts.write_text("a cat\n\na blue dog\nphoto\n" + long_prompt + "\nthe square\n")
    out = tmp_path / "out"
    config = make_config(model_path, prompts, out)
    with caplog.at_level(logging.WARNING, logger="spin_jax"):
        summary = sample.run(config)
    assert summary == {"prompts": 5, "generated": 5, "skipped": 0, "interrupted": False}
    assert sum("truncated" in r.getMessage() for r in caplog.records) == 1
    for i in range(5):
        img = np.asarray(Image.open(out / f"{i:06d}.png"))
        assert img.shape == (16, 16, 3) and img.dtype == np.uint8
    assert np.asarray(Image.open(out / "grid.png")).shape == (32, 32, 3)  # 4 images, 2x2
    records = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["text"] for r in records] == [
        "a cat",
        "a blue dog",
        "photo",
        long_prompt,
        "the square",
    ]
    assert records[0]["file_name"] == "000000.png"
    first = np.load(out / "latents" / "000000-000004.npy")
    last = np.load(out / "latents" / "000004-000005.npy")
    assert first.shape == (4, 8, 8, 4) and last.shape == (1, 8, 8, 4)

    # Nothing left to do.
    assert sample.run(config)["generated"] == 0
    # A lost image and a lost shard are redone, identically.
    before = np.asarray(Image.open(out / "000001.png"))
    os.remove(out / "000001.png")
    os.remove(out / "latents" / "000004-000005.npy")
    summary = sample.run(config)
    assert summary == {"prompts": 5, "generated": 2, "skipped": 3, "interrupted": False}
    np.testing.assert_array_equal(np.asarray(Image.open(out / "000001.png")), before)
    np.testing.assert_allclose(np.load(out / "latents" / "000004-000005.npy"), last, atol=1e-6)


def test_read_prompts(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"text": "a"}\n{"prompt": "b"}\n\n{"caption": "c", "x": 1}\n')
    assert sample.read_prompts(str(p)) == ["a", "b", "c"]
    p.write_text('{"text": "a"}\n{"name": "b"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: needs a string field"):
        sample.read_prompts(str(p))
    p.write_text('{"text": "a"}\n{oops\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: not valid JSON"):
        sample.read_prompts(str(p))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="has no prompts"):
        sample.read_prompts(str(empty))
    with pytest.raises(FileNotFoundError):
        sample.read_prompts(str(tmp_path / "missing.txt"))


def test_cli_reports_bad_input_cleanly(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cmd = [
        sys.executable,
        os.path.join(ROOT, "launch", "sample.py"),
        f"--config={os.path.join(ROOT, 'configs', 'sample.py')}",
        f"--config.prompts={empty}",
        f"--config.out_dir={tmp_path / 'out'}",
        "--config.sample.num_steps=3",
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1
    assert "has no prompts" in result.stderr and "Traceback" not in result.stderr


def test_rerun_with_other_settings_is_refused_not_mislabelled(model_path, tmp_path):
    """Issue 14: another prompts file, seed and step count into the same out_dir used to skip
    every image as done and rewrite metadata.jsonl with the new prompts (mislabelling)."""
    first = tmp_path / "first.txt"
    first.write_text("a red circle\nthe cat on the left\n")
    out = tmp_path / "out"
    config = make_config(model_path, first, out)
    config.output.latents = False
    assert sample.run(config)["generated"] == 2
    metadata = (out / "metadata.jsonl").read_text()
    image = np.asarray(Image.open(out / "000001.png"))

    second = tmp_path / "second.txt"
    second.write_text("a blue square\nphoto of a dog\n")
    other = make_config(model_path, second, out)
    other.output.latents = False
    other.seed = 1
    other.sample.num_steps = 2
    with pytest.raises(ValueError, match="other settings") as e:
        sample.run(other)
    message = str(e.value)
    for field in ("prompts.sha256", "seed", "sample.num_steps"):
        assert field in message
    assert "--overwrite" in message and "another folder" in message
    assert (out / "metadata.jsonl").read_text() == metadata  # still labels the old images
    np.testing.assert_array_equal(np.asarray(Image.open(out / "000001.png")), image)

    # --overwrite deletes the old outputs first, then makes the new ones.
    (out / "notes.txt").write_text("not ours")
    assert sample.run(other, overwrite=True)["generated"] == 2
    records = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["text"] for r in records] == ["a blue square", "photo of a dog"]
    assert not np.array_equal(np.asarray(Image.open(out / "000001.png")), image)
    assert (out / "notes.txt").read_text() == "not ours"
    assert sample.run(other)["generated"] == 0  # the same settings resume


def test_16_bit_weights_are_a_setting_of_their_own(model_path, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    out = tmp_path / "out"
    config = make_config(model_path, prompts, out)
    config.output.latents = False
    config.model.param_dtype = "bfloat16"
    assert sample.run(config)["generated"] == 1
    settings = json.loads((out / "settings.json").read_text())
    assert settings["model"]["param_dtype"] == "bfloat16"
    config.model.param_dtype = "float32"  # other weights, other images: not reused
    with pytest.raises(ValueError, match="model.param_dtype"):
        sample.run(config)
    config.model.param_dtype = "int8"
    with pytest.raises(ValueError, match="config.model.param_dtype='int8'"):
        sample.run(config)


def test_folder_of_an_older_version_is_refused(model_path, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    out = tmp_path / "out"
    out.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(out / "000000.png")
    with pytest.raises(ValueError, match="no settings.json"):
        sample.run(make_config(model_path, prompts, out))


def test_bad_sampler_refused_before_loading(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    c = make_config(str(tmp_path / "no_model"), prompts, tmp_path / "out")
    c.sample.sampler = "eulr"
    with pytest.raises(ValueError, match="config.sample.sampler='eulr' is not one of"):
        sample.run(c)


def _cli(*args, timeout=120):
    cmd = [
        sys.executable,
        os.path.join(ROOT, "launch", "sample.py"),
        f"--config={os.path.join(ROOT, 'configs', 'sample.py')}",
        *args,
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def test_cli_override_typo_is_one_line(tmp_path):
    result = _cli("--config.smaple.num_steps=3")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: --config.smaple.num_steps: no field 'smaple' in config; did you mean 'sample'?"
    )
    result = _cli("--config.sample.num_stpes=3")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: --config.sample.num_stpes: no field 'num_stpes' in config.sample; "
        "did you mean 'num_steps'?"
    )
    result = _cli("--config.sample.num_steps=many")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "--config.sample.num_steps=many" in result.stderr and "Traceback" not in result.stderr


def test_cli_locked_folder(tmp_path):
    from spin_jax import runlock

    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    model = tmp_path / "model"
    model.mkdir()
    out = tmp_path / "out"
    with runlock.acquire(str(out)):
        result = _cli(
            f"--config.prompts={prompts}", f"--config.out_dir={out}", f"--config.model.path={model}"
        )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"pid {os.getpid()}" in result.stderr and "is in use by another run" in result.stderr


def test_sdxl_turbo_preset_and_single_file_models(tmp_path):
    """configs/sample.py:turbo / :dmd2 on a tiny SDXL folder (the folder's scheduler picks the
    sampler for "auto"), and a single-file checkpoint with its components folder."""
    pytest.importorskip("diffusers")
    import json

    import jax
    from tiny_sd import make_tiny_sd, make_tiny_sdxl

    from spin_jax.diffusion import generate
    from spin_jax.models import load_pretrained
    from spin_jax.models.single_file import write_single_file

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue dog\n")
    turbo = make_tiny_sdxl(str(tmp_path / "turbo"), "turbo")
    for preset, want in (("turbo", None), ("dmd2", [999, 749, 499, 249])):
        c = sample_config.get_config(preset)
        c.model.path, c.prompts, c.out_dir = turbo, str(prompts), str(tmp_path / preset)
        c.sample.height = c.sample.width = 16
        c.sample.batch_size = 2
        assert sample.run(c)["generated"] == 2
        with open(tmp_path / preset / "settings.json") as f:
            settings = json.load(f)
        assert settings["sample"]["timesteps"] == (want or [])
    sd = load_pretrained(turbo)
    ids = sd.tokenize(["a red cat", "a blue dog"])
    images = generate(sd, sd.params, ids, jax.random.key(0), num_steps=4, guidance_scale=0.0,
                      height=16, width=16, sampler="euler_ancestral")  # fmt: skip
    ours = np.round((np.clip(np.asarray(images), -1, 1) + 1) * 127.5).astype(np.uint8)
    np.testing.assert_array_equal(
        np.asarray(Image.open(tmp_path / "turbo" / "000001.png")), ours[1]
    )

    folder = make_tiny_sd(str(tmp_path / "sd1"), "sd1")
    sd1 = load_pretrained(folder)
    from spin_jax.models import convert

    tensors = {n: convert.flax_to_torch(jax.device_get(sd1.params[n]))
               for n in ("unet", "vae", "text_encoder")}  # fmt: skip
    file = write_single_file(tensors, "sd1", str(tmp_path / "sd1.safetensors"))
    c = make_config(file, prompts, tmp_path / "from_file")
    c.model.components = folder
    a = sample.run(c)
    c2 = make_config(folder, prompts, tmp_path / "from_folder")
    b = sample.run(c2)
    assert a["generated"] == b["generated"] == 2
    for i in range(2):
        x = np.asarray(Image.open(tmp_path / "from_file" / f"{i:06d}.png"))
        y = np.asarray(Image.open(tmp_path / "from_folder" / f"{i:06d}.png"))
        np.testing.assert_array_equal(x, y)
