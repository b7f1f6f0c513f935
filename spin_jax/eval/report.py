"""Statistics and report files of an evaluation: means, medians, win rates, bootstrap intervals.

- Win rate of model A against the base model B on one metric: the fraction of prompts where A's
  image scores higher than B's image of the same prompt and seed; a tie counts one half
  **(choice)**. Averaged over metrics: per prompt, the mean of the per-metric win indicators,
  then the mean over prompts (equal to the mean of the per-metric win rates).
- Intervals: percentile bootstrap over prompts. Every statistic of a report draws the same
  resamples (``seed``), so intervals are reproducible and paired across models and metrics.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

_CHUNK = 256  # resamples drawn at a time (bounds memory at _CHUNK x prompts indices)


def win_indicator(scores: np.ndarray, base: np.ndarray) -> np.ndarray:
    """Per prompt: 1 if ``scores`` beats ``base``, 0.5 on a tie, 0 otherwise."""
    scores, base = np.asarray(scores, np.float64), np.asarray(base, np.float64)
    if scores.shape != base.shape or scores.ndim != 1:
        raise ValueError(
            f"win rate needs two score vectors of the same length, got "
            f"{scores.shape} and {base.shape}"
        )
    return np.where(scores > base, 1.0, np.where(scores == base, 0.5, 0.0))


def win_rate(scores: np.ndarray, base: np.ndarray) -> float:
    return float(win_indicator(scores, base).mean())


def bootstrap_ci(
    values: np.ndarray,
    *,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (1-D, one value per prompt)."""
    values = np.asarray(values, np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"bootstrap needs a non-empty 1-D array, got shape {values.shape}")
    if resamples < 1:
        raise ValueError(f"bootstrap resamples must be >= 1, got {resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"bootstrap confidence must be in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    n = values.size
    means = np.empty(resamples, np.float64)
    for start in range(0, resamples, _CHUNK):
        stop = min(start + _CHUNK, resamples)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = values[idx].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def summarize(
    scores: Mapping[str, Mapping[str, np.ndarray]],
    models: Sequence[str],
    metrics: Sequence[str],
    *,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """``scores[model][metric]`` (one value per prompt, same prompts for all) -> a summary dict:
    ``rows`` (one per model and metric: mean, its interval, median, win rate against
    ``models[0]`` and its interval) and ``average`` (per model: win rate averaged over metrics
    with its interval). The base model's own win rates are None."""
    if not models:
        raise ValueError("summarize: no models")
    ci = dict(resamples=resamples, confidence=confidence, seed=seed)
    n = None
    for m in models:
        for k in metrics:
            if m not in scores or k not in scores[m]:
                raise ValueError(f"summarize: no {k} scores for model {m}")
            size = np.asarray(scores[m][k]).shape
            if len(size) != 1 or (n is not None and size[0] != n):
                raise ValueError(
                    f"summarize: {m}/{k} has {size} scores, expected [{n}] "
                    "(every model and metric scores the same prompts)"
                )
            n = size[0]
    base = models[0]
    rows, average = [], []
    for m in models:
        wins = []
        for k in metrics:
            x = np.asarray(scores[m][k], np.float64)
            row = {
                "model": m,
                "metric": k,
                "n": int(x.size),
                "mean": float(x.mean()),
                "mean_ci": bootstrap_ci(x, **ci),
                "median": float(np.median(x)),
                "win_rate": None,
                "win_ci": None,
            }
            if m != base:
                w = win_indicator(x, np.asarray(scores[base][k], np.float64))
                wins.append(w)
                row["win_rate"], row["win_ci"] = float(w.mean()), bootstrap_ci(w, **ci)
            rows.append(row)
        if m != base and wins:
            w = np.mean(wins, axis=0)
            average.append(
                {"model": m, "win_rate": float(w.mean()), "win_ci": bootstrap_ci(w, **ci)}
            )
    return {
        "base": base,
        "models": list(models),
        "metrics": list(metrics),
        "n": n or 0,
        "rows": rows,
        "average": average,
        **ci,
    }


def group_means(
    scores: Mapping[str, Mapping[str, np.ndarray]],
    groups: Sequence[str],
    models: Sequence[str],
    metrics: Sequence[str],
) -> dict[str, dict[str, dict[str, float]]]:
    """``[group][model][metric]`` -> mean over the prompts of that group (HPSv2 styles, ...)."""
    groups_arr = np.asarray(groups)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for g in dict.fromkeys(groups):
        sel = groups_arr == g
        out[g] = {
            m: {k: float(np.asarray(scores[m][k])[sel].mean()) for k in metrics} for m in models
        }
    return out


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def _fmt_ci(ci: tuple[float, float] | None) -> str:
    return "" if ci is None else f" [{ci[0]:.4f}, {ci[1]:.4f}]"


def markdown(
    summary: Mapping[str, Any],
    *,
    title: str = "Evaluation report",
    header: Sequence[str] = (),
    display: Mapping[str, str] | None = None,
    skipped: Mapping[str, str] | None = None,
    groups: Mapping[str, Mapping[str, Mapping[str, float]]] | None = None,
    grids: Sequence[tuple[str, Sequence[str]]] = (),
) -> str:
    """The report as Markdown: scores table, win-rate table, skipped metrics, per-group means,
    and the side-by-side grids (``(png path relative to the report, prompts)``)."""
    display = dict(display or {})
    name = lambda k: display.get(k, k)  # noqa: E731
    models, metrics, base = summary["models"], summary["metrics"], summary["base"]
    pct = round(summary["confidence"] * 100)
    lines = [f"# {title}", ""]
    lines += [f"{h}  " for h in header]
    lines += [
        f"Base model: **{base}**. Intervals: {pct}% percentile bootstrap over the "
        f"{summary['n']} prompts ({summary['resamples']} resamples, seed {summary['seed']}).",
        "",
    ]
    if skipped:
        lines += ["Skipped metrics:", ""]
        lines += [f"- {name(k)}: {reason}" for k, reason in skipped.items()]
        lines.append("")
    if not metrics:
        lines += ["No metric could be computed.", ""]
    by = {(r["model"], r["metric"]): r for r in summary["rows"]}
    if metrics:
        lines += [f"## Scores: mean [{pct}% CI] / median", ""]
        lines += ["| model | " + " | ".join(name(k) for k in metrics) + " |"]
        lines += ["|---" * (len(metrics) + 1) + "|"]
        for m in models:
            cells = [
                f"{_fmt(by[m, k]['mean'])}{_fmt_ci(by[m, k]['mean_ci'])} / "
                f"{_fmt(by[m, k]['median'])}"
                for k in metrics
            ]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    if metrics and len(models) > 1:
        avg = {a["model"]: a for a in summary["average"]}
        lines += [f"## Win rate against {base} [{pct}% CI] (ties count one half)", ""]
        lines += ["| model | " + " | ".join(name(k) for k in metrics) + " | average |"]
        lines += ["|---" * (len(metrics) + 2) + "|"]
        for m in models[1:]:
            cells = [f"{_fmt(by[m, k]['win_rate'])}{_fmt_ci(by[m, k]['win_ci'])}" for k in metrics]
            cells.append(f"{_fmt(avg[m]['win_rate'])}{_fmt_ci(avg[m]['win_ci'])}")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    if groups and len(groups) > 1 and metrics:
        lines += ["## Mean per group", ""]
        lines += ["| group | model | " + " | ".join(name(k) for k in metrics) + " |"]
        lines += ["|---" * (len(metrics) + 2) + "|"]
        for g, per_model in groups.items():
            for m in models:
                cells = [_fmt(per_model[m][k]) for k in metrics]
                lines.append(f"| {g} | {m} | " + " | ".join(cells) + " |")
        lines.append("")
    if grids:
        lines += ["## Side by side", "", "Columns: " + ", ".join(models) + ".", ""]
        for path, prompts in grids:
            lines += [f"![grid]({path})", ""]
            lines += [f"{i + 1}. {p}" for i, p in enumerate(prompts)]
            lines.append("")
    return "\n".join(lines)


def write_csv(summary: Mapping[str, Any], path: str) -> None:
    """One row per model and metric (plus ``average`` win-rate rows)."""
    fields = [
        "model",
        "metric",
        "n",
        "mean",
        "mean_low",
        "mean_high",
        "median",
        "win_rate",
        "win_low",
        "win_high",
    ]
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(fields)
        for r in summary["rows"]:
            mlo, mhi = r["mean_ci"]
            wlo, whi = r["win_ci"] or (None, None)
            w.writerow(
                [
                    r["model"],
                    r["metric"],
                    r["n"],
                    r["mean"],
                    mlo,
                    mhi,
                    r["median"],
                    _blank(r["win_rate"]),
                    _blank(wlo),
                    _blank(whi),
                ]
            )
        for a in summary["average"]:
            w.writerow(
                [
                    a["model"],
                    "average",
                    summary["n"],
                    "",
                    "",
                    "",
                    "",
                    a["win_rate"],
                    a["win_ci"][0],
                    a["win_ci"][1],
                ]
            )
    os.replace(tmp, path)


def _blank(x: float | None) -> Any:
    return "" if x is None else x


def write_scores_csv(
    prompts: Sequence[str],
    groups: Sequence[str],
    scores: Mapping[str, Mapping[str, np.ndarray]],
    models: Sequence[str],
    metrics: Sequence[str],
    path: str,
) -> None:
    """Per-prompt scores: index, group, prompt, then one column per model and metric."""
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "group", "prompt"] + [f"{m}/{k}" for m in models for k in metrics])
        for i, (p, g) in enumerate(zip(prompts, groups, strict=True)):
            w.writerow([i, g, p] + [float(scores[m][k][i]) for m in models for k in metrics])
    os.replace(tmp, path)


def save_comparison_grid(
    rows: Sequence[Sequence[np.ndarray]], path: str, *, size: int | None = None, gap: int = 4
) -> None:
    """uint8 images, ``rows[prompt][model]``, tiled with white gaps. Every image is resized to
    the first image's size, or to height ``size`` (aspect kept) when given."""
    from PIL import Image

    if not rows or not rows[0]:
        raise ValueError("save_comparison_grid: no images")
    h, w = np.asarray(rows[0][0]).shape[:2]
    if size:
        h, w = size, max(1, round(w * size / h))
    cols = len(rows[0])
    grid = np.full((len(rows) * (h + gap) - gap, cols * (w + gap) - gap, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        if len(row) != cols:
            raise ValueError(f"save_comparison_grid: row {r} has {len(row)} images, not {cols}")
        for c, image in enumerate(row):
            image = np.asarray(image)[:, :, :3]
            if image.shape[:2] != (h, w):
                image = np.asarray(Image.fromarray(image).resize((w, h), Image.BICUBIC))
            grid[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = image
    tmp = path + ".tmp.png"
    Image.fromarray(grid).save(tmp)
    os.replace(tmp, path)
