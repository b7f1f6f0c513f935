r"""The CPU demo: self-play fine-tuning of the tiny toy base model on the clean shapes data.

  python launch/train.py --config=configs/spin.py:demo --workdir=runs/demo

``demo_config`` turns any trainer config (spin, sft, dpo, kto) into the demo: the tiny base model
shipped in ``assets/toy_base`` (built by ``spin_jax.toy.pretrain`` on the noisy distribution),
the clean shapes distribution as the preferred data, 32 px, float32, and step counts that run
in minutes on a laptop CPU. It also makes sure the data exist: the clean imagefolder (and, for
DPO / KTO, a Pick-a-Pic-format parquet of judge-labelled pairs) is written on first use into
the cache folder (``$SPIN_JAX_CACHE``, default ``~/.cache/spin_jax``), in seconds. When the
shipped base is missing (an installed package without the repository's assets) it is built
into the cache once (about 25 minutes on two CPU cores).

``config.toy_eval.enabled`` asks for the judge's verdict at the end: ``demo_report(workdir)``
samples every one-object caption with the base model and with each iteration's UNet (same
noise for all), scores them with ``spin_jax.toy.judge`` and writes ``toy_eval.json``,
``toy_eval.md`` (the fidelity table) and ``toy_eval/<model>.png`` grids into the workdir.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from spin_jax.toy import shapes

CACHE_ENV = "SPIN_JAX_CACHE"
RESOLUTION = 32
DATA_SEED = 0
NUM_CLEAN = 240  # 4 of each of the 60 one-object scenes on average
NUM_PAIRS = 240


# ----------------------------------------------------------------------------------------------
# Where things are.


def cache_root() -> str:
    """``$SPIN_JAX_CACHE`` or ``~/.cache/spin_jax``."""
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "spin_jax")


def shipped_base_path() -> str:
    """``assets/toy_base`` of the repository this module lives in."""
    return str(Path(__file__).resolve().parents[2] / "assets" / "toy_base")


def ensure_fewstep() -> str:
    """The 4-step toy model (``assets/toy_fewstep``, distilled from the toy base by
    ``python -m spin_jax.toy.distill``), else one distilled once into the cache."""
    shipped = str(Path(__file__).resolve().parents[2] / "assets" / "toy_fewstep")
    if _is_model_dir(shipped):
        return shipped
    cached = os.path.join(cache_root(), "toy_fewstep")
    if not _is_model_dir(cached):
        from spin_jax.toy import distill

        print(f"toy demo: {shipped} is missing; distilling it into {cached} (once; about 20 "
              "minutes on two CPU cores)", flush=True)  # fmt: skip
        distill.build_fewstep(cached + ".tmp", base_dir=ensure_base())
        _publish(cached + ".tmp", cached)
    return cached


def _is_model_dir(path: str) -> bool:
    return all(
        os.path.exists(os.path.join(path, p))
        for p in ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler")
    )


def ensure_base() -> str:
    """The toy base model directory: the shipped one, else one built once into the cache."""
    shipped = shipped_base_path()
    if _is_model_dir(shipped):
        return shipped
    cached = os.path.join(cache_root(), "toy_base")
    if not _is_model_dir(cached):
        from spin_jax.toy import pretrain

        print(f"toy demo: {shipped} is missing; building the toy base model into {cached} "
              "(once; about 25 minutes on two CPU cores)", flush=True)  # fmt: skip
        pretrain.build_base(cached, work_dir=cached + ".work")
        shutil.rmtree(cached + ".work", ignore_errors=True)
    return cached


def _publish(tmp: str, final: str) -> None:
    """Moves a finished folder into place; another process that got there first wins."""
    try:
        os.replace(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def _lines(path: str) -> int:
    if not os.path.isfile(path):
        return -1
    with open(path) as f:
        return sum(1 for line in f if line.strip())


def ensure_clean_dataset(n: int = NUM_CLEAN, seed: int = DATA_SEED) -> str:
    """The clean (preferred) shapes imagefolder of ``n`` images, written on first use."""
    path = os.path.join(cache_root(), "toy", f"clean_{RESOLUTION}px_n{n}_seed{seed}")
    if _lines(os.path.join(path, "metadata.jsonl")) == n:
        return path
    tmp = f"{path}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shapes.write_imagefolder(tmp, "clean", n, seed=seed, size=RESOLUTION)
    shutil.rmtree(path, ignore_errors=True)
    _publish(tmp, path)
    return path


def ensure_pairs_dataset(n: int = NUM_PAIRS, seed: int = DATA_SEED) -> str:
    """A Pick-a-Pic-format parquet folder of ``n`` judge-labelled pairs, written on first use.

    Pair i: the caption of clean sample i; the preferred image is that sample, the other one
    the same scene drawn with one attribute changed (what the judge marks unfaithful). The
    preferred image sits in ``jpg_0`` or ``jpg_1`` at random. For DPO (pairs) and KTO
    (desirable / undesirable images).
    """
    path = os.path.join(cache_root(), "toy", f"pairs_{RESOLUTION}px_n{n}_seed{seed}")
    done = os.path.join(path, "train-00000-of-00001.parquet")
    if os.path.isfile(done):
        return path
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng([seed, 7])
    rows: dict[str, list] = {k: [] for k in ("caption", "jpg_0", "jpg_1", "label_0", "label_1")}
    for i in range(n):
        s = shapes.make_sample("clean", seed, i, RESOLUTION)
        wrong = shapes.render(_corrupt(rng, s["objects"]), RESOLUTION, "clean")
        good, bad = _png(s["image"], Image), _png(wrong, Image)
        first = bool(rng.random() < 0.5)
        rows["caption"].append(s["text"])
        rows["jpg_0"].append(good if first else bad)
        rows["jpg_1"].append(bad if first else good)
        rows["label_0"].append(1.0 if first else 0.0)
        rows["label_1"].append(0.0 if first else 1.0)
    tmp = f"{path}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    pq.write_table(pa.table(rows), os.path.join(tmp, os.path.basename(done)), row_group_size=64)
    shutil.rmtree(path, ignore_errors=True)
    _publish(tmp, path)
    return path


def _corrupt(rng: np.random.Generator, objects: list[dict[str, str]]) -> list[dict[str, str]]:
    out = [dict(o) for o in objects]
    i = int(rng.integers(len(out)))
    field = ("color", "shape", "position")[int(rng.integers(3))]
    others = [v for v in shapes.ATTRIBUTES[field] if v != out[i][field]]
    out[i][field] = others[int(rng.integers(len(others)))]
    return out


def _png(image: np.ndarray, pil: Any) -> bytes:
    buf = io.BytesIO()
    pil.fromarray(image, "RGB").save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# The preset.


def demo_config(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The demo preset of a trainer config: toy base, clean toy data, CPU-sized steps.

    Writes the demo dataset into the cache on first use (seconds) and, only when the shipped
    base model is missing, builds it (see ``ensure_base``).
    """
    from spin_jax.train import objectives

    c = ml_collections.ConfigDict(c.to_dict())  # a copy; the caller's stays as it was
    row = objectives.get(c.objective)
    c.seed = 0
    c.model.path = ensure_base()
    c.model.dtype = "float32"
    c.model.attention_impl = None
    c.model.remat = False

    c.data.resolution = RESOLUTION
    c.data.random_flip = False  # a flip turns "on the left" into a wrong caption
    c.data.caption_dropout = 0.0
    c.data.encode_batch_size = 256
    c.data.cache_dir = ""
    if row.view in ("pairs", "kto"):
        c.data.source = "pickapic"
        c.data.split = "train"
        c.data.path = ensure_pairs_dataset()
        c.data.kto_desirable_ratio = 0.0
    else:
        c.data.source = "imagefolder"
        c.data.path = ensure_clean_dataset()
    # SPIN generates one sample per example per iteration. KTO's view has two records per pair
    # (the preferred image, then the other), so 192 records are the same 96 pairs DPO reads.
    c.data.max_examples = 192 if row.view == "kto" else 96

    # Methods that roll out samples run 3 rounds (SPIN's 3 iterations); the baselines one.
    c.iterations = 3 if row.rollout != "none" else 1
    c.train.steps = 40
    c.train.batch_size = 16
    c.train.accum_steps = 1
    c.train.optimizer = "adamw"
    # Measured: lr 1e-4 / beta 1000 drove the SPIN loss to 0 within an iteration and the
    # samples lost their colors and shapes (judge fidelity 0.19 -> 0.01, on an earlier base);
    # 1e-5 / 5000 keeps them and moves the samples toward the clean distribution.
    c.train.learning_rate = 1e-5
    c.train.lr_schedule = "constant"
    c.train.warmup_steps = 5
    c.train.weight_decay = 0.0
    c.train.grad_clip_norm = 1.0
    c.train.beta = 5000.0
    c.train.betas = (5000.0,) * c.iterations if row.rollout != "none" else ()

    c.sample.sampler = "dpm_solver_pp"
    c.sample.num_steps = 15
    # The base's judge fidelity on the 60 one-object captions is 0.26 / 0.52 / 0.65 / 0.79 at
    # CFG 1 / 1.5 / 2 / 3: 2 leaves room to improve and draws clean-looking shapes.
    c.sample.guidance_scale = 2.0
    c.sample.batch_size = 96
    c.sample.pixel_roundtrip = False

    if row.timesteps == "distilled" or row.rollout == "online_pairs":  # PSO: few-step models
        _fewstep_demo(c, online=row.rollout == "online_pairs")

    c.checkpoint.every_steps = c.train.steps
    c.checkpoint.max_to_keep = 1
    c.log.every_steps = 10
    c.log.grid_prompts = shapes.GRID_PROMPTS
    c.log.grid_seed = 1234
    c.mesh.data = -1
    c.mesh.fsdp = 1

    c.toy_eval = ml_collections.ConfigDict()
    c.toy_eval.enabled = True  # launch/train.py calls demo_report(workdir, config) at the end
    c.toy_eval.images_per_prompt = 2
    c.toy_eval.seed = 4321
    return c


def _fewstep_demo(c: ml_collections.ConfigDict, online: bool) -> None:
    """PSO in the toy world: the 4-step toy student (its LCM sampler, no guidance) with LoRA.
    Offline: the demo's judge-labelled pairs at the student's distilled timesteps. Online: the
    toy judge as the reward model (``judge.reward_fn``: right attributes, then the distance of
    the image to the clean render of its caption)."""
    c.model.path = ensure_fewstep()
    c.model.lora.rank = 8
    c.model.lora.alpha = 8.0
    c.pso.num_steps = 4
    c.sample.sampler = "auto"  # the folder's LCMScheduler
    c.sample.num_steps = 4
    c.sample.guidance_scale = 0.0
    c.sample.batch_size = 96
    c.train.warmup_steps = 0
    c.train.betas = ()
    if not online:
        # The demo's DPO settings, with LoRA's larger learning rate.
        c.train.learning_rate = 1e-4
        return
    c.pso.reward = "toy_judge"
    c.pso.pairs_per_round = 48
    c.iterations = 6
    c.train.batch_size = 16
    c.train.steps = 48 * 3 // 16  # one epoch over a round's stochastic transitions
    # Log-probabilities are means over latent elements, so per-transition log-ratios are
    # ~1e-4 here: beta 5 (the paper's, for SDXL) left the loss at log 2 for 6 rounds (lr 1e-4);
    # 1000 with lr 1e-3 trains (loss 0.62 by round 6); 2000 with lr 2e-3 overshot (loss 1.04).
    c.train.learning_rate = 1e-3
    c.train.beta = 1000.0
    c.checkpoint.every_rounds = 1  # the judge's table reads every round's end
    c.log.every_steps = 3


PRESETS = {"demo": demo_config}


def with_preset(c: ml_collections.ConfigDict, arg: str | None, config_file: str):
    """``c`` turned into preset ``arg`` (``configs/<name>.py:<arg>``); ``c`` itself for none."""
    if not arg:
        return c
    if arg not in PRESETS:
        name = os.path.join("configs", os.path.basename(config_file))
        raise ValueError(f"{name}: unknown preset {arg!r} (known: {', '.join(sorted(PRESETS))})")
    return PRESETS[arg](c)


# ----------------------------------------------------------------------------------------------
# The judge's table.


def eval_prompts() -> list[str]:
    """Every one-object caption (60)."""
    return shapes.all_captions(1)


def sample_images(
    sd: Any,
    unet_params: Any,
    prompts: list[str],
    seed: int,
    *,
    num_steps: int,
    guidance_scale: float,
    images_per_prompt: int = 1,
    sampler: str = "dpm_solver_pp",
    resolution: int = RESOLUTION,
    batch_size: int = 128,
) -> tuple[np.ndarray, list[str]]:
    """Images float32 NHWC in [-1, 1] and their prompts, ``images_per_prompt`` per prompt.

    Image ``j * len(prompts) + i`` (prompt i, copy j) starts from noise that depends only on
    ``seed`` and that index, so different models are compared on the same noise.
    """
    from spin_jax.diffusion import generate

    all_prompts = [p for _ in range(images_per_prompt) for p in prompts]
    params = dict(sd.params, unet=unet_params)
    key = jax.random.key(seed)
    out = []
    for start in range(0, len(all_prompts), batch_size):
        chunk = all_prompts[start : start + batch_size]
        images = generate(sd, params, sd.tokenize(chunk), key, num_steps=num_steps,
                          guidance_scale=guidance_scale, height=resolution, width=resolution, decode=True,
                          sampler=None if sampler == "auto" else sampler,
                          example_ids=np.arange(start, start + len(chunk)))  # fmt: skip
        out.append(np.asarray(images, np.float32))
    return np.concatenate(out), all_prompts


def score(images: np.ndarray, prompts: list[str]) -> dict[str, float]:
    """The judge's fidelity and per-attribute accuracy, and the Frechet distance of the images
    to the clean renders of their prompts."""
    from spin_jax.toy import distance, judge

    verdict = judge.judge(images, prompts)
    reference = np.stack(
        [shapes.render(shapes.parse_caption(p), images.shape[1], "clean") for p in prompts]
    )
    return {
        "fidelity": verdict["fidelity"],
        **{k: float(v) for k, v in verdict["accuracy"].items()},
        "distance": float(distance.distance(images, reference)),
        "images": len(prompts),
    }


def toy_eval(
    sd: Any,
    params_by_model: dict[str, Any],
    prompts: list[str] | None = None,
    seed: int = 4321,
    *,
    num_steps: int = 15,
    guidance_scale: float = 3.0,
    images_per_prompt: int = 2,
    sampler: str = "dpm_solver_pp",
    resolution: int = RESOLUTION,
    grid_dir: str | None = None,
) -> dict[str, dict[str, float]]:
    """Judge scores per model: ``{name: {"fidelity", "color", "shape", "position", "count",
    "distance", "images"}}`` for UNet params ``params_by_model`` (e.g. {"base": ...,
    "iteration 1": ...}). ``grid_dir``: also writes each model's first images as a PNG grid."""
    prompts = eval_prompts() if prompts is None else list(prompts)
    results = {}
    for name, unet_params in params_by_model.items():
        images, all_prompts = sample_images(
            sd, unet_params, prompts, seed, num_steps=num_steps, guidance_scale=guidance_scale,
            images_per_prompt=images_per_prompt, sampler=sampler, resolution=resolution,
        )  # fmt: skip
        results[name] = score(images, all_prompts)
        if grid_dir:
            from spin_jax.train.metrics import save_grid

            os.makedirs(grid_dir, exist_ok=True)
            save_grid(images[: len(prompts)], os.path.join(grid_dir, f"{_slug(name)}.png"),
                      cols=15 if len(prompts) == 60 else None)  # fmt: skip
    return results


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name)


def format_table(results: dict[str, dict[str, float]]) -> str:
    """A Markdown table of ``toy_eval`` results, one row per model."""
    cols = ("fidelity", "color", "shape", "position", "count", "distance")
    lines = [
        "| model | " + " | ".join(cols) + " | images |",
        "|---|" + "---:|" * (len(cols) + 1),
    ]
    for name, r in results.items():
        cells = [f"{r[c]:.3f}" if c != "distance" else f"{r[c]:.2f}" for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['images']} |")
    return "\n".join(lines)


def demo_report(
    workdir: str, config: ml_collections.ConfigDict | None = None
) -> dict[str, dict[str, float]]:
    """Scores the base model and every finished iteration of the run in ``workdir``.

    ``config``: the run's config (default: ``workdir/config.json``). Writes ``toy_eval.json``,
    ``toy_eval.md`` and ``toy_eval/<model>.png`` into ``workdir``, prints the table and
    returns the results.
    """
    from spin_jax.models import load_pretrained
    from spin_jax.train import checkpoints

    if config is None:
        path = os.path.join(workdir, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"demo_report: {path} not found; is {workdir} a run folder?")
        with open(path) as f:
            config = ml_collections.ConfigDict(json.load(f))
    t0 = time.time()
    te = config.get("toy_eval") or ml_collections.ConfigDict()
    sd = load_pretrained(config.model.path)
    models = {"base": sd.params["unet"]}
    for k in range(1, int(config.iterations) + 1):
        if not os.path.isfile(os.path.join(workdir, f"iteration_{k}", "summary.json")):
            break
        name = f"{config.objective} iteration {k}" if config.iterations > 1 else config.objective
        models[name] = checkpoints.load_iteration_params(workdir, k, sd.params["unet"])
    results = toy_eval(
        sd,
        models,
        eval_prompts(),
        int(te.get("seed", 4321)),
        num_steps=int(config.sample.num_steps),
        guidance_scale=float(config.sample.guidance_scale),
        images_per_prompt=int(te.get("images_per_prompt", 2)),
        sampler=str(config.sample.sampler),
        resolution=int(config.data.resolution),
        grid_dir=os.path.join(workdir, "toy_eval"),
    )
    table = format_table(results)
    with open(os.path.join(workdir, "toy_eval.json"), "w") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    with open(os.path.join(workdir, "toy_eval.md"), "w") as f:
        f.write(f"Judge scores on the {len(eval_prompts())} one-object captions "
                f"(sampler {config.sample.sampler}, {config.sample.num_steps} steps, "
                f"CFG {config.sample.guidance_scale}):\n\n{table}\n")  # fmt: skip
    print(f"toy judge ({time.time() - t0:.0f}s): fidelity = all attributes right\n{table}",
          flush=True)  # fmt: skip
    return results
