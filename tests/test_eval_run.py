"""launch/evaluate.py end to end on the tiny pipeline with tiny scorers, and its bad inputs."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from PIL import Image
from tiny_sd import WORDS, make_tiny_sd

from spin_jax.eval import evaluate, tiny
from spin_jax.eval.weights import convert_pickle

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a red cat", "a blue dog on the left", "a photo of a square"]


def _eval_config():
    spec = importlib.util.spec_from_file_location(
        "eval_config", os.path.join(ROOT, "configs/eval.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    sd_dir = make_tiny_sd(str(root / "sd"))
    scorer_cfg = tiny.write_tiny_scorers(str(root / "scorers"), WORDS)
    prompt_file = root / "prompts.txt"
    prompt_file.write_text("\n".join(PROMPTS) + "\n")
    # A trainer workdir with one finished iteration: the base UNet, perturbed.
    import orbax.checkpoint as ocp

    from spin_jax.models import load_pretrained

    run_dir = root / "run"
    unet = load_pretrained(sd_dir).params["unet"]
    unet = jax.tree.map(lambda x: np.asarray(x) * 1.05, unet)
    with ocp.CheckpointManager(str(run_dir / "iteration_1" / "checkpoints")) as m:
        m.save(3, args=ocp.args.Composite(params=ocp.args.StandardSave(unet)))
        m.wait_until_finished()
    (run_dir / "config.json").write_text(json.dumps({"model": {"path": sd_dir}}))
    return {
        "sd": sd_dir,
        "scorers": scorer_cfg,
        "prompts": str(prompt_file),
        "run": str(run_dir),
        "root": root,
    }


def _config(setup, models: str):
    c = _eval_config()
    c.models = models
    c.prompts.source = "text"
    c.prompts.path = setup["prompts"]
    c.sample.num_steps = 2
    c.sample.height = c.sample.width = 16
    c.sample.batch_size = 2
    c.scorers.weights_dir = ""
    c.scorers.batch_size = 2
    for metric, fields in setup["scorers"].items():
        for k, v in fields.items():
            c.scorers[metric][k] = v
    c.scorers.imagereward.weights = str(setup["root"] / "missing" / "ImageReward.safetensors")
    c.report.resamples = 50
    c.report.grid_prompts = 3
    c.report.grid_rows = 2
    c.report.grid_image_size = 0
    return c


def test_evaluate_end_to_end_and_resume(setup, tmp_path):
    workdir = str(tmp_path / "eval")
    c = _config(setup, f"base={setup['sd']},tuned={setup['run']}@1")
    summary = evaluate.run(c, workdir)

    assert summary["metrics"] == ["pickscore", "hpsv2", "aesthetic"]
    assert "missing/ImageReward.safetensors not found" in summary["skipped"]["imagereward"]
    assert len(summary["rows"]) == 6 and len(summary["average"]) == 1
    for r in summary["rows"]:
        assert np.isfinite(r["mean"]) and r["mean_ci"][0] <= r["mean"] <= r["mean_ci"][1]
    report = open(os.path.join(workdir, "report.md")).read()
    assert "ImageReward: scorers.imagereward.weights" in report
    assert "## Win rate against base" in report and "| tuned |" in report
    assert sorted(os.listdir(os.path.join(workdir, "grids"))) == ["grid_000.png", "grid_001.png"]
    grid = Image.open(os.path.join(workdir, "grids", "grid_000.png"))
    assert grid.size == (2 * 16 + 4, 2 * 16 + 4)  # 2 models x 2 prompts
    for name in ("report.csv", "scores.csv", "report.json"):
        assert os.path.isfile(os.path.join(workdir, name))

    base = [os.path.join(workdir, "images", "base", f"{i:05d}.png") for i in range(3)]
    tuned = [os.path.join(workdir, "images", "tuned", f"{i:05d}.png") for i in range(3)]
    pixels = [np.asarray(Image.open(p)) for p in base]
    assert not np.array_equal(pixels[1], np.asarray(Image.open(tuned[1])))  # other weights
    score_file = os.path.join(workdir, "scores", "tuned", "pickscore.json")
    mtime = os.stat(score_file).st_mtime_ns

    # Resume: one image regenerated alone (batch of 1, not 2) comes out the same, because its
    # noise depends on (seed, prompt index) only; untouched scores are reused, not recomputed.
    os.remove(base[1])
    os.remove(os.path.join(workdir, "report.md"))
    again = evaluate.run(c, workdir)
    np.testing.assert_array_equal(np.asarray(Image.open(base[1])), pixels[1])
    assert os.stat(score_file).st_mtime_ns == mtime
    assert json.dumps(again["rows"]) == json.dumps(summary["rows"])  # same numbers
    assert os.path.isfile(os.path.join(workdir, "report.md"))

    # Another prompt set in the same workdir is refused.
    c.prompts.limit = 2
    with pytest.raises(ValueError, match="another prompt set"):
        evaluate.run(c, workdir)


def test_images_folder_count_and_missing_scorers(setup, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    c = _config(setup, f"a=images:{folder},b=images:{folder}")
    with pytest.raises(ValueError, match="holds 2 images for 3 prompts"):
        evaluate.run(c, str(tmp_path / "w1"))

    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(folder / "2.png")
    c.scorers.pickscore.model = ""
    c.scorers.hpsv2.weights = str(tmp_path / "nope.safetensors")
    c.scorers.aesthetic.head = ""
    summary = evaluate.run(c, str(tmp_path / "w2"))
    assert summary["metrics"] == [] and set(summary["skipped"]) == set(evaluate.metric_list(c))
    assert summary["skipped"]["pickscore"] == "scorers.pickscore.model is not set"
    report = open(tmp_path / "w2" / "report.md").read()
    assert "No metric could be computed." in report


def test_bad_inputs(setup, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    c = _config(setup, f"base={setup['sd']}")
    c.prompts.path = str(empty)
    with pytest.raises(ValueError, match="prompt set is empty"):
        evaluate.run(c, str(tmp_path / "w"))
    with pytest.raises(ValueError, match="duplicate model names"):
        evaluate.parse_models("x=/a,x=/b")
    with pytest.raises(ValueError, match="config.models is empty"):
        evaluate.parse_models(" , ")
    specs = evaluate.parse_models(f"{setup['sd']},r={setup['run']}@2,i=images:/x")
    assert [(s.name, s.kind, s.iteration) for s in specs] == [
        ("sd", "diffusers", 0),
        ("r", "run", 2),
        ("i", "images", 0),
    ]
    folder = tmp_path / "numbered"
    folder.mkdir()
    for name in ("10.png", "2.png", "1.png"):
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(folder / name)
    (spec,) = evaluate.parse_models(f"images:{folder}")
    got = [os.path.basename(p) for p in evaluate.image_paths("unused", spec, 3)]
    assert got == ["1.png", "2.png", "10.png"]
    c = _config(setup, "base=images:/x")
    c.scorers.metrics = "pickscore,clipscore"
    with pytest.raises(ValueError, match="unknown metric 'clipscore'"):
        evaluate.run(c, str(tmp_path / "w"))


def test_convert_pickle(tmp_path):
    path = str(tmp_path / "HPS_v2.pt")
    state = {
        "module.logit_scale": torch.tensor(4.6),
        "module.ln_final.weight": torch.ones(3),
        "module.half": torch.ones(2, dtype=torch.float16),
        "module.bf": torch.ones(2, dtype=torch.bfloat16),
    }
    torch.save({"epoch": 3, "state_dict": state}, path)
    out = str(tmp_path / "out.safetensors")
    with pytest.raises(ValueError, match="allow_pickle"):
        convert_pickle(path, out)
    info = convert_pickle(path, out, allow_pickle=True)
    assert info["tensors"] == 4
    from safetensors.numpy import load_file

    got = load_file(out)
    assert got["logit_scale"].shape == () and got["half"].dtype == np.float16
    assert got["bf"].dtype == np.float32
    cmd = [sys.executable, "launch/convert_scorer.py", f"--input={path}", f"--output={out}"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 1 and "allow_pickle" in res.stderr


def test_settings_lock_and_interrupt(setup, tmp_path, monkeypatch):
    import signal

    from spin_jax import runlock

    workdir = str(tmp_path / "eval")
    c = _config(setup, f"base={setup['sd']}")
    c.scorers.metrics = "pickscore"

    # SIGTERM after the first saved image: the batch in flight (2 images) is finished, then the
    # run stops; the rerun completes it with the same images as an uninterrupted run.
    save = evaluate._save_png
    calls = []

    def save_then_term(image, path):
        save(image, path)
        calls.append(path)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(evaluate, "_save_png", save_then_term)
    out = evaluate.run(c, workdir)
    assert out == {"interrupted": True, "images_done": 2, "images_total": 3}
    assert not os.path.exists(os.path.join(workdir, "report.md"))
    assert not os.path.exists(os.path.join(workdir, ".lock"))
    calls.append("term sent")  # from here on it only counts
    summary = evaluate.run(c, workdir)
    assert "interrupted" not in summary
    assert len(calls) == 2 + 1 + 1  # only the third image is new
    monkeypatch.setattr(evaluate, "_save_png", save)
    lone = str(tmp_path / "lone")
    evaluate.run(c, lone)
    for i in range(3):
        name = os.path.join("images", "base", f"{i:05d}.png")
        np.testing.assert_array_equal(
            np.asarray(Image.open(os.path.join(workdir, name))),
            np.asarray(Image.open(os.path.join(lone, name))),
        )

    # Other sampling settings in the same workdir are refused, naming the fields.
    c.sample.num_steps = 3
    c.seed = 5
    with pytest.raises(runlock.SettingsMismatchError) as e:
        evaluate.run(c, workdir)
    assert e.value.fields == ["generation.num_steps", "generation.seed"]
    assert "--overwrite" in str(e.value)
    # Another model behind an existing name is refused; a new name is welcome.
    c.sample.num_steps, c.seed = 2, 0
    c.models = f"base={setup['run']}@1"
    with pytest.raises(runlock.SettingsMismatchError, match="models.base.kind"):
        evaluate.run(c, workdir)
    # --overwrite starts afresh.
    summary = evaluate.run(c, workdir, overwrite=True)
    assert not np.array_equal(
        np.asarray(Image.open(os.path.join(workdir, "images", "base", "00001.png"))),
        np.asarray(Image.open(os.path.join(lone, "images", "base", "00001.png"))),
    )
    # A second evaluation of the same workdir while one runs is refused.
    lock = os.path.join(workdir, ".lock")
    with open(lock, "w") as f:
        json.dump({"host": "node-3", "pid": 99, "since": 0, "command": "evaluate"}, f)
    with pytest.raises(runlock.LockedError, match="in use by a run on another host: host node-3"):
        evaluate.run(c, workdir)


def test_model_with_a_lora_file(setup, tmp_path):
    """name=DIR+lora=FILE and name=RUN@K+lora=FILE: the adapter merged into the UNet, and its
    file part of the model's settings (another LoRA is another model)."""
    from spin_jax.eval import evaluate
    from spin_jax.models import lora

    specs = evaluate.parse_models(f"base={setup['sd']},tuned={setup['sd']}+lora={tmp_path},"
                                  f"it1={setup['run']}@1+lora={tmp_path}")  # fmt: skip
    assert [s.lora for s in specs] == ["", str(tmp_path), str(tmp_path)]
    config = _config(setup, "")
    sd, params = evaluate.load_model(specs[0], config)
    adapter = lora.init(jax.random.key(1), params["unet"], 2)
    adapter = jax.tree.map(lambda a: np.asarray(a) + 0.01, adapter)  # B != 0
    lora.save_diffusers(str(tmp_path), adapter, 1.5)
    _, tuned = evaluate.load_model(specs[1], config)
    want = lora.merge(params["unet"], adapter, 1.5)
    for a, b in zip(jax.tree.leaves(tuned["unet"]), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    _, it1 = evaluate.load_model(specs[2], config)
    assert not np.allclose(jax.tree.leaves(it1["unet"])[0], jax.tree.leaves(tuned["unet"])[0])
    settings = evaluate.model_settings(specs[1], config)
    assert settings["lora"]["fingerprint"]
    with pytest.raises(ValueError, match="names no file"):
        evaluate.parse_models(f"x={setup['sd']}+lora=")
