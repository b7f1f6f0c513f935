r"""Toy benchmark: SPIN-Diffusion and SePPO against SFT, Diffusion-DPO and Diffusion-KTO in the
toy world.

  python bench/toy_benchmark.py --out runs/toy_benchmark --seeds 0 1 2 3 4

Every arm starts from the shipped toy base (``assets/toy_base``) with the demo's settings
(``configs/<objective>.py:demo``: 32 px, AdamW lr 1e-5 constant after 5 warmup steps, batch 16,
beta 5000, DPM-Solver++ 15 steps at CFG 2) and sees the same data: the first 96 images of the
clean shapes set. SFT trains on them; SPIN pairs each with its opponent's sample of the same
caption; DPO and KTO read the same 96 images as the preferred side of judge-labelled pairs (the
other image is the same scene drawn with one attribute changed, which the judge marks wrong;
KTO sees both images of each pair as separate examples). SePPO pairs each with a sample of its
round's reference (drawn from the earlier round ends by the arm's rule: ``seppo`` uniform,
``seppo_base``, ``seppo_latest``). SPIN and SePPO run ``--iterations`` rounds of ``--steps``
optimizer steps; every other arm runs ``iterations * steps`` steps in one go and is read at each
multiple of ``--steps``, so each row is compared at equal optimizer steps. ``spin_sft`` is SPIN
with ``loss.sft_weight = 1`` (an SFT term on the real images).

For every pairwise arm each row also reports ``pref_err_gap``: the mean over the row's steps of
the policy's error on the preferred (real / winner) images minus the reference's. Positive means
the policy fits the preferred images worse than its reference: both likelihoods fell, the known
failure of DPO-style losses.

Each seed changes the training randomness (batch order, timesteps, noise, SPIN's generations)
and the evaluation noise; models of one seed are evaluated on the same noise. The judge
(``spin_jax.toy.judge``) scores ``--images-per-prompt`` samples of each of the 60 one-object
captions: fidelity (all attributes right), per-attribute accuracy, and the Frechet distance of
the samples to clean renders of their captions (``spin_jax.toy.distance``).

Resumable: finished runs and evaluations are kept in ``--out`` and skipped. Writes
``results.json`` (per-seed values and summaries), ``results.md`` (the table) and prints one JSON
line per evaluated model and the table at the end.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import sys
import time
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Arm -> (config file, overrides, label). Arms with rollouts train in rounds.
ARMS = {
    "spin": ("spin", {}, "SPIN-Diffusion"),
    "sft": ("sft", {}, "SFT"),
    "dpo": ("dpo", {}, "Diffusion-DPO"),
    "kto": ("kto", {}, "Diffusion-KTO"),
    "seppo": ("seppo", {"seppo.reference": "uniform"}, "SePPO"),
    "seppo_base": ("seppo", {"seppo.reference": "base"}, "SePPO (reference: base)"),
    "seppo_latest": ("seppo", {"seppo.reference": "latest"}, "SePPO (reference: latest)"),
    "spin_sft": ("spin", {"loss.sft_weight": 1.0}, "SPIN-Diffusion + SFT term"),
    # PSO arms start from the 4-step toy model (configs/pso.py's demo presets): run them
    # without the other arms (the base row is then the 4-step model).
    "pso": ("pso:demo_offline", {}, "PSO (offline, judge-labelled pairs)"),
    "pso_online": ("pso:demo", {}, "PSO (online, toy judge reward)"),
}
OBJECTIVES = ("spin", "sft", "dpo", "kto")  # the default arms
ROUNDS = ("spin", "seppo", "seppo_base", "seppo_latest", "spin_sft", "pso_online")  # per round
METRICS = ("fidelity", "color", "shape", "position", "count", "distance")
GAP = "pref_err_gap"
LABELS = {arm: label for arm, (_, _, label) in ARMS.items()}


def load_config(objective: str, arg: str = "demo") -> Any:
    """``configs/<objective>.py``'s ``get_config(arg)``."""
    path = os.path.join(ROOT, "configs", f"{objective}.py")
    spec = importlib.util.spec_from_file_location(f"config_{objective}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["train.beta=2000", "sample.sampler=ddim"]`` -> ``{"train.beta": 2000, ...}``."""
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. train.beta=2000")
        try:
            out[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            out[key] = text
    return out


def arm_config(
    objective: str, seed: int, steps: int, iterations: int, overrides: dict[str, Any] | None = None
) -> Any:
    """The demo config of ``objective`` with the benchmark's seed, step budget and overrides
    (``{"train.beta": 2000}``: every arm, before the step budget is applied)."""
    file, arm_overrides, _ = ARMS[objective]
    file, _, preset = file.partition(":")
    c = load_config(file, preset or "demo")
    for key, value in {**arm_overrides, **(overrides or {})}.items():
        node, *parents = c, *key.split(".")[:-1]
        for part in parents:
            if part not in node:
                raise KeyError(f"--set {key}: config has no field {part!r}")
            node = node[part]
        leaf = key.split(".")[-1]
        if leaf not in node:
            raise KeyError(f"--set {key}: config has no field {leaf!r}")
        node[leaf] = value
    c.seed = seed
    c.toy_eval.enabled = False  # the benchmark evaluates every arm itself, on shared noise
    c.checkpoint.every_steps = steps
    c.log.every_steps = min(10, steps)
    if objective in ROUNDS:
        c.iterations = iterations
        c.train.steps = steps
        c.train.betas = (float(c.train.beta),) * iterations
        c.checkpoint.max_to_keep = 1
    else:
        c.iterations = 1
        c.train.steps = steps * iterations
        c.checkpoint.max_to_keep = iterations  # read at every multiple of ``steps``
    return c


def model_key(objective: str, total_steps: int) -> str:
    return "base" if objective == "base" else f"{objective}@{total_steps}"


def checkpoints(objective: str, steps: int, iterations: int) -> list[tuple[str, int, int, int]]:
    """``(key, total optimizer steps, iteration, checkpoint step)`` of every model of an arm."""
    if objective in ROUNDS:
        return [
            (model_key(objective, k * steps), k * steps, k, steps) for k in range(1, iterations + 1)
        ]
    return [
        (model_key(objective, k * steps), k * steps, 1, k * steps) for k in range(1, iterations + 1)
    ]


def summarize(per_seed: dict[int, dict[str, dict[str, float]]]) -> dict[str, dict[str, Any]]:
    """Per model and metric over seeds: mean, std (ddof 1; 0 for one seed), min, max, n."""
    keys = list(dict.fromkeys(k for results in per_seed.values() for k in results))
    out = {}
    for key in keys:
        rows = [results[key] for results in per_seed.values() if key in results]
        stats = {}
        for m in (*METRICS, GAP):
            if not all(m in r for r in rows):
                continue
            v = np.array([r[m] for r in rows], np.float64)
            stats[m] = {
                "mean": float(v.mean()),
                "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                "min": float(v.min()),
                "max": float(v.max()),
            }
        out[key] = {"n": len(rows), **stats}
    return out


def paired_differences(
    per_seed: dict[int, dict[str, dict[str, float]]], steps: int, iterations: int
) -> list[dict[str, Any]]:
    """SPIN iteration k minus every other model at the same optimizer steps (and the base), seed
    by seed (the models of a seed share the evaluation noise): mean and std over seeds."""
    rows = []
    for k in range(1, iterations + 1):
        spin = model_key("spin", k * steps)
        others = ["base"] + [model_key(o, k * steps) for o in ARMS if o != "spin"]
        for other in others:
            seeds = [s for s, r in per_seed.items() if spin in r and other in r]
            if not seeds:
                continue
            row = {"spin": spin, "other": other, "n": len(seeds)}
            for m in ("fidelity", "distance"):
                d = np.array([per_seed[s][spin][m] - per_seed[s][other][m] for s in seeds])
                row[m] = {
                    "mean": float(d.mean()),
                    "std": float(d.std(ddof=1)) if len(d) > 1 else 0.0,
                }
            rows.append(row)
    return rows


def format_differences(rows: list[dict[str, Any]], steps: int) -> str:
    lines = [
        "| SPIN-Diffusion | minus | seeds | fidelity difference | distance difference |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rows:
        f, d = r["fidelity"], r["distance"]
        lines.append(
            f"| {_label(r['spin'], steps)[0].removeprefix('SPIN-Diffusion ')} "
            f"| {_label(r['other'], steps)[0]} | {r['n']} | {f['mean']:+.3f} ± {f['std']:.3f} "
            f"| {d['mean']:+.2f} ± {d['std']:.2f} |"
        )
    return "\n".join(lines)


def _label(key: str, steps: int) -> tuple[str, int]:
    if key == "base":
        return "base", 0
    objective, total = key.split("@")
    total = int(total)
    if objective in ROUNDS:
        return (
            f"{LABELS[objective]} {'iteration' if objective == 'spin' else 'round'} {total // steps}",
            total,
        )
    return LABELS[objective], total


def format_markdown(summary: dict[str, dict[str, Any]], steps: int) -> str:
    """The table: one row per model, ``mean ± std`` over seeds, rows grouped by step budget."""
    order = sorted(summary, key=lambda k: (_label(k, steps)[1], k.startswith("spin"), k))
    lines = [
        "| model | optimizer steps | seeds | "
        + " | ".join(METRICS)
        + " | pref. error gap (1e-3) |",
        "|---|---:|---:|" + "---:|" * (len(METRICS) + 1),
    ]
    for key in order:
        s = summary[key]
        name, total = _label(key, steps)
        cells = []
        for m in METRICS:
            digits = 2 if m == "distance" else 3
            cells.append(f"{s[m]['mean']:.{digits}f} ± {s[m]['std']:.{digits}f}")
        g = s.get(GAP)
        cells.append(f"{1e3 * g['mean']:+.2f} ± {1e3 * g['std']:.2f}" if g else "")
        lines.append(f"| {name} | {total} | {s['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def preferred_error_gap(workdir: str, first: int, last: int) -> float | None:
    """Mean over logged steps first..last of the policy's error on the preferred images minus
    the reference's (``metrics.jsonl``); None for objectives without a pairwise reference."""
    path = os.path.join(workdir, "metrics.jsonl")
    gaps = []
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                row = json.loads(line)
                if not first <= row.get("step", -1) <= last:
                    continue
                for w in ("w", "real"):
                    if f"train/err_policy_{w}" in row:
                        gaps.append(row[f"train/err_policy_{w}"] - row[f"train/err_ref_{w}"])
    return float(np.mean(gaps)) if gaps else None


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def run_seed(args: argparse.Namespace, seed: int, sd: Any) -> dict[str, dict[str, float]]:
    """Trains every arm of ``seed`` (resuming what exists) and evaluates every model."""
    from spin_jax.files import write_json
    from spin_jax.toy import demo, judge
    from spin_jax.train import checkpoints as ckpt
    from spin_jax.train import loop

    seed_dir = os.path.join(args.out, f"seed_{seed}")
    os.makedirs(seed_dir, exist_ok=True)
    eval_path = os.path.join(seed_dir, "eval.json")
    results = _read_json(eval_path)
    timings = _read_json(os.path.join(seed_dir, "timings.json"))
    prompts = demo.eval_prompts()[: args.eval_prompts]
    c0 = arm_config(args.objectives[0], seed, args.steps, args.iterations, args.overrides)
    eval_kwargs = dict(
        num_steps=int(c0.sample.num_steps),
        guidance_scale=float(c0.sample.guidance_scale),
        images_per_prompt=args.images_per_prompt,
        sampler=str(c0.sample.sampler),
        resolution=int(c0.data.resolution),
    )
    eval_seed = args.eval_seed + seed

    def evaluate(key: str, params: Any, gap: float | None = None) -> None:
        t0 = time.time()
        r = demo.toy_eval(sd, {key: params}, prompts, eval_seed, **eval_kwargs)[key]
        r["seed"] = seed
        if gap is not None:
            r[GAP] = gap
        results[key] = r
        write_json(eval_path, results)
        print(json.dumps({"model": key, **r, "eval_seconds": round(time.time() - t0, 1)}))

    if "base" not in results:
        evaluate("base", sd.params["unet"])
    for objective in args.objectives:
        workdir = os.path.join(seed_dir, objective)
        c = arm_config(objective, seed, args.steps, args.iterations, args.overrides)
        if c.model.path != args.model_path:
            raise ValueError(f"{objective}: model {c.model.path} != {args.model_path}")
        models = checkpoints(objective, args.steps, args.iterations)
        if any(key not in results for key, *_ in models):
            t0 = time.time()
            # Online PSO's reward model in the toy world: the judge (as launch/train.py builds it).
            reward = judge.reward_fn if c.get("pso", {}).get("reward") == "toy_judge" else None
            loop.run(c, workdir, reward_fn=reward)
            timings.setdefault(objective, round(time.time() - t0, 1))
            write_json(os.path.join(seed_dir, "timings.json"), timings)
        for key, total, iteration, step in models:
            if key not in results:
                params = ckpt.load_iteration_params(workdir, iteration, sd.params["unet"], step)
                evaluate(key, params, preferred_error_gap(workdir, total - args.steps + 1, total))
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/toy_benchmark")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=list(ARMS),
                   help="arms to run (see ARMS)")  # fmt: skip
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per SPIN iteration")
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--images-per-prompt", type=int, default=4)
    p.add_argument("--eval-prompts", type=int, default=60, help="first N one-object captions")
    p.add_argument("--eval-seed", type=int, default=4321, help="seed s evaluates with this + s")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides for every arm, e.g. train.beta=2000")  # fmt: skip
    args = p.parse_args(argv)
    try:
        args.overrides = parse_overrides(args.set)
    except ValueError as e:
        p.error(str(e))
    if args.steps < 1 or args.iterations < 1 or args.images_per_prompt < 1:
        p.error("--steps, --iterations and --images-per-prompt must be >= 1")
    if not 1 <= args.eval_prompts <= 60:
        p.error(f"--eval-prompts must be in 1..60, got {args.eval_prompts}")

    import jax

    if not jax.config.jax_compilation_cache_dir:
        # Arms of later seeds compile the same programs again: keep them on disk.
        jax.config.update("jax_compilation_cache_dir", os.path.join(args.out, "jax_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    from spin_jax.files import write_json
    from spin_jax.models import load_pretrained

    os.makedirs(args.out, exist_ok=True)
    # Every arm starts from the first arm's model (the toy base; the 4-step model for PSO).
    args.model_path = arm_config(args.objectives[0], 0, args.steps, args.iterations).model.path
    sd = load_pretrained(args.model_path)
    t0 = time.time()
    per_seed = {seed: run_seed(args, seed, sd) for seed in args.seeds}
    summary = summarize(per_seed)
    table = format_markdown(summary, args.steps)
    differences = paired_differences(per_seed, args.steps, args.iterations)
    if differences:
        table += (
            "\n\nPaired by seed (same evaluation noise), SPIN-Diffusion minus each model at "
            "equal optimizer steps; higher fidelity and lower distance are better:\n\n"
            + format_differences(differences, args.steps)
        )
    settings = {k: v for k, v in vars(args).items()}
    settings["devices"] = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
    result = {
        "settings": settings,
        "per_seed": per_seed,
        "summary": summary,
        "spin_minus_others": differences,
    }
    write_json(os.path.join(args.out, "results.json"), result)
    header = (
        f"Toy benchmark: seeds {args.seeds}, {args.iterations} x {args.steps} optimizer steps, "
        f"{args.images_per_prompt} images x {args.eval_prompts} captions per model; "
        f"mean ± std over seeds\n\n"
    )
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(header + table + "\n")
    print(header + table)
    print(f"toy benchmark: {time.time() - t0:.0f} s", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
