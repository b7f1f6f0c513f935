"""An evaluation run as the papers do it (``launch/evaluate.py``).

For every model: one image per prompt, the noise of prompt ``i`` drawn from
``fold_in(key(seed), i)`` so every model starts prompt ``i`` from the same noise (paired
comparison); every configured scorer scores every image; the report compares each model with
the first (base) model. Models (``config.models``, comma-separated, the first is the base):

  name=/path/to/diffusers_dir        a diffusers Stable Diffusion directory
  name=runs/spin@2                   iteration 2 of a trainer workdir (UNet from its last
                                     checkpoint; VAE, text encoder and tokenizer from the
                                     workdir's ``model.path``, or ``config.base_model``)
  name=images:/path/to/folder        images made elsewhere: one per prompt, in name order
                                     (numeric order when every name is a number)
  name=/path/to/dir+lora=FILE        either model kind above with a LoRA file (diffusers,
                                     peft or kohya format, or a folder holding
                                     pytorch_lora_weights.safetensors) merged into its UNet

A missing ``name=`` takes the folder's base name. Workdir layout:

  prompts.json                     the prompt set (a restart with another set is refused)
  settings.json                    what the images depend on: seed, sampler, steps, guidance,
                                   size, dtype, and per model its path, iteration and a
                                   fingerprint of its files (a restart with other values is
                                   refused; new models may be added)
  .lock                            one evaluation writes a workdir at a time
  images/<model>/<index:05d>.png   generated images (existing ones are kept)
  scores/<model>/<metric>.json     per-prompt scores, reused while the images are unchanged
  report.md  report.csv  report.json  scores.csv  grids/grid_<k>.png

A killed run restarts with the same command and redoes only what is missing; ``overwrite``
deletes the earlier outputs first. SIGTERM / SIGINT stop the run after the image batch (or the
scoring batch) in flight: finished images and score files are kept and ``run`` returns
``{"interrupted": True, "images_done": N, "images_total": M}``. Scorers whose weights are not
configured or not found are skipped; the report says which and why.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spin_jax import interrupt, runlock
from spin_jax.eval import prompts as prompts_lib
from spin_jax.eval import report as report_lib
from spin_jax.eval import scorers as scorers_lib
from spin_jax.eval.preprocess import to_uint8
from spin_jax.files import write_json

log = logging.getLogger("spin_jax")

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    kind: str  # "diffusers" | "run" | "images"
    path: str
    iteration: int = 0
    lora: str = ""  # a LoRA file merged into the UNet


def parse_models(spec: str) -> list[ModelSpec]:
    """``config.models`` -> specs (module doc). Names must be unique and file-name safe."""
    entries = [e.strip() for e in (spec or "").split(",") if e.strip()]
    if not entries:
        raise ValueError("config.models is empty: give 'name=path,...' (the first is the base)")
    out = []
    for entry in entries:
        name, sep, target = entry.partition("=")
        if not sep:
            name, target = "", entry
        name, target = name.strip(), target.strip()
        target, _, lora_file = target.partition("+lora=")
        if not target:
            raise ValueError(f"config.models: entry {entry!r} names no model")
        if _ and not lora_file:
            raise ValueError(f"config.models: entry {entry!r}: '+lora=' names no file")
        if target.startswith("images:"):
            kind, path, iteration = "images", target[len("images:") :], 0
        elif m := re.fullmatch(r"(.+)@(\d+)", target):
            kind, path, iteration = "run", m.group(1), int(m.group(2))
            if iteration < 1:
                raise ValueError(f"config.models: {entry!r}: iterations start at 1")
        else:
            kind, path, iteration = "diffusers", target, 0
        name = name or os.path.basename(os.path.normpath(path))
        if not _NAME.match(name):
            raise ValueError(
                f"config.models: model name {name!r} must be letters, digits, "
                "'.', '_', '+' or '-' (it names a folder)"
            )
        if lora_file and kind == "images":
            raise ValueError(f"config.models: entry {entry!r}: images take no LoRA")
        out.append(ModelSpec(name, kind, path, iteration, lora_file))
    names = [m.name for m in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"config.models: duplicate model names {dup}; name them 'name=path'")
    return out


def _progress(total: int, desc: str, unit: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False)


def check_prompts(workdir: str, prompts: Sequence[prompts_lib.Prompt]) -> None:
    """Records the prompt set; refuses a workdir whose images belong to another set."""
    path = os.path.join(workdir, "prompts.json")
    current = [{"text": p.text, "group": p.group} for p in prompts]
    if os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
        if saved != current:
            raise ValueError(
                f"{workdir} holds an evaluation of another prompt set ({len(saved)} prompts, now "
                f"{len(current)}); use another workdir, or rerun with --overwrite (deletes the "
                "old outputs first)"
            )
        return
    write_json(path, current)


# ---------------------------------------------------------------------------------------------
# Images.


def image_paths(workdir: str, spec: ModelSpec, n: int) -> list[str]:
    """The ``n`` image files of a model, in prompt order (they may not exist yet)."""
    if spec.kind == "images":
        if not os.path.isdir(spec.path):
            raise FileNotFoundError(f"model {spec.name}: image folder {spec.path} not found")
        files = [f for f in os.listdir(spec.path) if f.lower().endswith(IMAGE_EXTS)]
        stems = [os.path.splitext(f)[0] for f in files]
        if all(stem.isdigit() for stem in stems):  # 2.png before 10.png
            files = [f for _, f in sorted(zip(map(int, stems), files, strict=True))]
        else:
            files = sorted(files)
        if len(files) != n:
            raise ValueError(
                f"model {spec.name}: {spec.path} holds {len(files)} images for "
                f"{n} prompts (one image per prompt, in name order)"
            )
        return [os.path.join(spec.path, f) for f in files]
    folder = os.path.join(workdir, "images", spec.name)
    expected = [f"{i:05d}.png" for i in range(n)]
    if os.path.isdir(folder):
        found = {f for f in os.listdir(folder) if f.endswith(".png") and ".tmp" not in f}
        extra = sorted(found - set(expected))
        if extra:
            raise ValueError(
                f"model {spec.name}: {folder} holds {len(extra)} images that match "
                f"no prompt ({', '.join(extra[:3])}, ...) for {n} prompts; "
                "remove them or use another workdir"
            )
    return [os.path.join(folder, f) for f in expected]


def read_image(path: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as e:  # a truncated or foreign file
        raise ValueError(f"cannot read image {path}: {e}") from None


def _save_png(image: np.ndarray, path: str) -> None:
    from PIL import Image

    tmp = path + ".tmp.png"
    Image.fromarray(image).save(tmp)
    os.replace(tmp, path)


def _base_model_path(spec: ModelSpec, config: Any) -> str:
    if config.base_model:
        return config.base_model
    cfg_path = os.path.join(spec.path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(
            f"model {spec.name}: {cfg_path} not found (is {spec.path} a "
            "trainer workdir?); or set config.base_model"
        )
    with open(cfg_path) as f:
        base = (json.load(f).get("model") or {}).get("path") or ""
    if not base:
        raise ValueError(f"model {spec.name}: {cfg_path} has no model.path; set config.base_model")
    return base


def compute_dtype(config: Any) -> str:
    """``model.dtype`` with "auto" resolved for this machine (bfloat16 on GPUs and TPUs, float32
    on CPUs): what the images depend on, recorded in settings.json."""
    from spin_jax import platform

    dtype = config.model.dtype
    if dtype not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"config.model.dtype={dtype!r} is not one of auto, float32, bfloat16")
    return platform.default_compute_dtype() if dtype == "auto" else dtype


def load_model(spec: ModelSpec, config: Any, cache: dict | None = None) -> tuple[Any, dict]:
    """(StableDiffusion, params) of a diffusers directory or a trainer iteration.

    ``cache`` keeps the last loaded directory: iterations of one run share its VAE, text
    encoder and compiled sampler (``generate`` caches per model object), so they load and
    compile once.
    """
    from spin_jax.models import load_pretrained

    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[compute_dtype(config)]
    path = spec.path if spec.kind == "diffusers" else _base_model_path(spec, config)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model {spec.name}: model directory {path} not found")
    key = os.path.abspath(path)
    if cache is not None and cache.get("path") == key:
        sd = cache["sd"]
    else:
        if cache is not None:
            cache.clear()  # free the previous model first
            gc.collect()
        sd = load_pretrained(
            path,
            dtype,
            attention_impl=config.model.attention_impl,
            allow_pickle=config.model.allow_pickle,
        )
        if cache is not None:
            cache.update(path=key, sd=sd)
    params = sd.params
    if spec.kind == "run":
        from spin_jax.train.checkpoints import load_iteration_params

        unet = load_iteration_params(spec.path, spec.iteration, like=params["unet"])
        params = {**params, "unet": unet}
    if spec.lora:
        from spin_jax.models import lora

        adapter, scale = lora.from_file(spec.lora, params["unet"])
        params = {**params, "unet": lora.merge_jit(params["unet"], adapter, scale)}
    return sd, params


def generate_images(
    spec: ModelSpec,
    prompts: Sequence[str],
    paths: Sequence[str],
    config: Any,
    cache: dict | None = None,
    stop: Callable[[], bool] | None = None,
) -> int:
    """Generates the images of ``paths`` that do not exist yet; returns how many.

    ``stop()`` is asked before each batch: True ends the loop (finished images stay).
    """
    missing = [i for i, p in enumerate(paths) if not os.path.isfile(p)]
    if not missing:
        return 0
    from spin_jax.diffusion import generate

    os.makedirs(os.path.dirname(paths[0]), exist_ok=True)
    sd, params = load_model(spec, config, cache)
    s = config.sample
    key = jax.random.key(config.seed)
    bar = _progress(len(missing), f"generate {spec.name}", "img")
    made = 0
    for start in range(0, len(missing), s.batch_size):
        if stop is not None and stop():
            break
        batch = missing[start : start + s.batch_size]
        ids = sd.tokenize([prompts[i] for i in batch])
        images = generate(
            sd,
            params,
            ids,
            key,
            num_steps=s.num_steps,
            guidance_scale=s.guidance_scale,
            height=s.height,
            width=s.width,
            sampler=s.sampler,
            example_ids=np.asarray(batch, np.int32),
        )
        for i, image in zip(batch, to_uint8(jax.device_get(images)), strict=True):
            _save_png(image, paths[i])
        made += len(batch)
        bar.update(len(batch))
    bar.close()
    del sd, params
    gc.collect()
    return made


# ---------------------------------------------------------------------------------------------
# Scores.


def images_digest(paths: Sequence[str]) -> str:
    """Changes when any image file is replaced (name, size, modification time)."""
    h = hashlib.sha1()
    for p in paths:
        st = os.stat(p)
        h.update(f"{os.path.basename(p)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _score_file(workdir: str, model: str, metric: str) -> str:
    return os.path.join(workdir, "scores", model, f"{metric}.json")


def load_scores(path: str, n: int, digest: str, source: str) -> np.ndarray | None:
    """Saved scores if they belong to these images and this scorer, else None."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            saved = json.load(f)
    except json.JSONDecodeError:
        return None  # a torn write: recompute
    if (
        saved.get("images") != digest
        or saved.get("scorer") != source
        or len(saved.get("scores", [])) != n
    ):
        return None
    return np.asarray(saved["scores"], np.float64)


def score_images(
    scorer: scorers_lib.Scorer,
    prompts: Sequence[str],
    paths: Sequence[str],
    desc: str,
    stop: Callable[[], bool] | None = None,
) -> np.ndarray | None:
    """Scores of every image; None if ``stop()`` said to stop before the last batch."""
    if len(prompts) != len(paths):
        raise ValueError(f"{desc}: {len(paths)} images for {len(prompts)} prompts")
    out = []
    bar = _progress(len(paths), desc, "img")
    for start in range(0, len(paths), scorer.batch_size):
        if stop is not None and stop():
            bar.close()
            return None
        chunk = paths[start : start + scorer.batch_size]
        images = [read_image(p) for p in chunk]
        out.append(scorer(prompts[start : start + len(chunk)], images))
        bar.update(len(chunk))
    bar.close()
    return np.concatenate(out) if out else np.zeros((0,), np.float64)


def _scorer_fields(config: Any, metric: str) -> dict:
    section = config.scorers.get(metric)
    fields = dict(section.to_dict() if hasattr(section, "to_dict") else (section or {}))
    root = config.scorers.weights_dir
    for key, value in fields.items():
        if isinstance(value, str) and value and root and not os.path.isabs(value):
            fields[key] = os.path.join(root, value)  # relative paths live under weights_dir
    return fields


def metric_list(config: Any) -> list[str]:
    names = [m.strip() for m in str(config.scorers.metrics).split(",") if m.strip()]
    for m in names:
        if m not in scorers_lib.METRICS:
            raise ValueError(
                f"config.scorers.metrics: unknown metric {m!r} "
                f"(known: {', '.join(scorers_lib.METRICS)})"
            )
    return list(dict.fromkeys(names))


# ---------------------------------------------------------------------------------------------
# The run.


OUTPUTS = ("images", "scores", "grids", "prompts.json", runlock.SETTINGS_FILE, "report.md",
           "report.csv", "report.json", "scores.csv")  # fmt: skip


def remove_outputs(workdir: str) -> int:
    """Deletes what an evaluation wrote into ``workdir`` (``OUTPUTS``); returns how many."""
    removed = 0
    for name in OUTPUTS:
        path = os.path.join(workdir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
            removed += 1
        elif os.path.exists(path):
            os.remove(path)
            removed += 1
    return removed


def model_settings(spec: ModelSpec, config: Any) -> dict:
    """What the images of a generated model depend on: its files, named by a fingerprint."""
    out: dict[str, Any] = {"kind": spec.kind, "path": os.path.abspath(spec.path)}
    if spec.lora:
        out["lora"] = {"path": os.path.abspath(spec.lora)}
        if os.path.exists(spec.lora):
            out["lora"]["fingerprint"] = runlock.folder_fingerprint(spec.lora)
    if spec.kind == "diffusers":
        if os.path.isdir(spec.path):
            out["fingerprint"] = runlock.folder_fingerprint(spec.path)
    elif spec.kind == "run":
        out["iteration"] = spec.iteration
        folder = os.path.join(spec.path, f"iteration_{spec.iteration}")
        ckpt = os.path.join(folder, "checkpoints")
        if os.path.isdir(folder):
            out["fingerprint"] = runlock.folder_fingerprint(ckpt if os.path.isdir(ckpt) else folder)
        base = config.base_model or None
        if base is None:
            try:
                base = _base_model_path(spec, config)
            except (FileNotFoundError, ValueError):
                base = None
        if base and os.path.isdir(base):
            out["base"] = {
                "path": os.path.abspath(base),
                "fingerprint": runlock.folder_fingerprint(base),
            }
    return out


def settings_of(config: Any, specs: Sequence[ModelSpec]) -> dict:
    s = config.sample
    return {
        "generation": {
            "seed": int(config.seed),
            "sampler": s.sampler,
            "num_steps": int(s.num_steps),
            "guidance_scale": float(s.guidance_scale),
            "height": int(s.height),
            "width": int(s.width),
            "dtype": compute_dtype(config),
        },
        "models": {sp.name: model_settings(sp, config) for sp in specs if sp.kind != "images"},
    }


def _has_images(workdir: str) -> bool:
    folder = os.path.join(workdir, "images")
    return os.path.isdir(folder) and any(
        f.endswith(".png") for _, _, files in os.walk(folder) for f in files
    )


def run(config: Any, workdir: str, *, overwrite: bool = False) -> dict:
    """Generates, scores and reports (module doc). Returns the report summary dict, or
    ``{"interrupted": True, ...}`` when SIGTERM / SIGINT stopped it (module doc)."""
    if jax.process_count() > 1:
        raise ValueError("launch/evaluate.py runs as one process; start it on a single host")
    specs = parse_models(config.models)
    metrics = metric_list(config)
    p = config.prompts
    styles = [s.strip() for s in str(p.styles or "").split(",") if s.strip()]
    prompt_set = prompts_lib.load_prompts(p.source, p.path, styles=styles, limit=p.limit)
    with runlock.acquire(workdir, what="evaluation folder"):
        if overwrite and remove_outputs(workdir):
            log.info("--overwrite: removed the earlier outputs of %s", workdir)
        check_prompts(workdir, prompt_set)
        runlock.check_settings(
            workdir, settings_of(config, specs), what="evaluation folder",
            has_outputs=_has_images(workdir), extendable=("models",),
        )  # fmt: skip
        with interrupt.Guard() as guard:
            return _run(config, workdir, specs, metrics, prompt_set, lambda: guard.requested)


def _run(
    config: Any,
    workdir: str,
    specs: Sequence[ModelSpec],
    metrics: Sequence[str],
    prompt_set: Sequence[prompts_lib.Prompt],
    stop: Callable[[], bool],
) -> dict:
    p = config.prompts
    texts = [q.text for q in prompt_set]
    n = len(texts)
    log.info("evaluating %d models on %d prompts (%s)", len(specs), n, p.source)

    # Check every scorer before the long generation, so a typo shows at once.
    skipped: dict[str, str] = {}
    fields = {m: _scorer_fields(config, m) for m in metrics}
    for m in metrics:
        reason = scorers_lib.check_scorer(m, fields[m])
        if reason:
            skipped[m] = reason
            log.warning("skipping %s: %s", m, reason)

    paths = {s.name: image_paths(workdir, s, n) for s in specs}
    generated = [s for s in specs if s.kind != "images"]

    def interrupted() -> dict:
        done = sum(os.path.isfile(q) for s in generated for q in paths[s.name])
        return {"interrupted": True, "images_done": done, "images_total": n * len(generated)}

    cache: dict = {}
    for s in generated:
        before = sum(os.path.isfile(q) for q in paths[s.name])
        made = generate_images(s, texts, paths[s.name], config, cache, stop=stop)
        if stop():
            return interrupted()
        log.info("%s: %d images generated, %d reused", s.name, made, before)
    cache.clear()  # the scorers need the memory
    digests = {s.name: images_digest(paths[s.name]) for s in specs}

    scores: dict[str, dict[str, np.ndarray]] = {s.name: {} for s in specs}
    sc = config.scorers
    for m in metrics:
        if m in skipped:
            continue
        source = json.dumps({**fields[m], "dtype": sc.dtype}, sort_keys=True)
        todo = []
        for s in specs:
            saved = load_scores(_score_file(workdir, s.name, m), n, digests[s.name], source)
            if saved is None:
                todo.append(s)
            else:
                scores[s.name][m] = saved
        if not todo:
            continue
        try:
            scorer = scorers_lib.load_scorer(
                m,
                fields[m],
                dtype=sc.dtype,
                attention_impl=sc.attention_impl,
                batch_size=sc.batch_size,
            )
        except FileNotFoundError as e:
            skipped[m] = str(e)
            log.warning("skipping %s: %s", m, e)
            continue
        for s in todo:
            values = score_images(scorer, texts, paths[s.name], f"{m} {s.name}", stop=stop)
            if values is None:
                return interrupted()
            out = _score_file(workdir, s.name, m)
            os.makedirs(os.path.dirname(out), exist_ok=True)
            write_json(
                out,
                {
                    "metric": m,
                    "model": s.name,
                    "images": digests[s.name],
                    "scorer": source,
                    "scores": values.tolist(),
                },
            )
            scores[s.name][m] = values
        del scorer
        gc.collect()

    done = [m for m in metrics if m not in skipped]
    return write_report(config, workdir, specs, prompt_set, scores, done, skipped, paths)


def write_report(
    config: Any,
    workdir: str,
    specs: Sequence[ModelSpec],
    prompt_set: Sequence[prompts_lib.Prompt],
    scores: Mapping[str, Mapping[str, np.ndarray]],
    metrics: Sequence[str],
    skipped: Mapping[str, str],
    paths: Mapping[str, Sequence[str]],
) -> dict:
    r = config.report
    models = [s.name for s in specs]
    texts = [q.text for q in prompt_set]
    groups = [q.group for q in prompt_set]
    summary = report_lib.summarize(
        scores, models, metrics, resamples=r.resamples, confidence=r.confidence, seed=config.seed
    )
    per_group = None
    if metrics and len(set(groups)) > 1:
        per_group = report_lib.group_means(scores, groups, models, metrics)

    grids = []
    shown = min(r.grid_prompts, len(texts))
    if shown > 0:
        os.makedirs(os.path.join(workdir, "grids"), exist_ok=True)
        for k, start in enumerate(range(0, shown, r.grid_rows)):
            idx = range(start, min(start + r.grid_rows, shown))
            rows = [[read_image(paths[m][i]) for m in models] for i in idx]
            rel = os.path.join("grids", f"grid_{k:03d}.png")
            report_lib.save_comparison_grid(
                rows, os.path.join(workdir, rel), size=r.grid_image_size or None
            )
            grids.append((rel, [texts[i] for i in idx]))

    s = config.sample
    sources = ", ".join(
        f"{sp.name} = {sp.path}"
        + (f" @ iteration {sp.iteration}" if sp.kind == "run" else "")
        + (" (images)" if sp.kind == "images" else "")
        for sp in specs
    )
    header = [
        f"Prompts: {config.prompts.source} ({len(texts)}) from {config.prompts.path}",
        f"Sampling: {s.sampler}, {s.num_steps} steps, CFG {s.guidance_scale}, "
        f"{s.height}x{s.width}, seed {config.seed} (noise of prompt i: fold_in(key(seed), i))",
        f"Models: {sources}",
    ]
    text = report_lib.markdown(
        summary,
        header=header,
        display=scorers_lib.DISPLAY,
        skipped=skipped,
        groups=per_group,
        grids=grids,
    )
    with open(os.path.join(workdir, "report.md.tmp"), "w") as f:
        f.write(text)
    os.replace(os.path.join(workdir, "report.md.tmp"), os.path.join(workdir, "report.md"))
    report_lib.write_csv(summary, os.path.join(workdir, "report.csv"))
    if metrics:
        report_lib.write_scores_csv(
            texts, groups, scores, models, metrics, os.path.join(workdir, "scores.csv")
        )
    full = {
        **summary,
        "skipped": dict(skipped),
        "groups": per_group,
        "grids": [g for g, _ in grids],
    }
    write_json(os.path.join(workdir, "report.json"), full)
    return full
