"""The "shapes" toy text-to-image dataset: colored shapes at named positions, with captions.

Every image shows one (or two) shapes, each described by three attributes, and its caption is
built from them by a fixed grammar, so captions parse back exactly:

    caption := object (" and " object)?
    object  := "a " COLOR " " SHAPE " " PLACE
    COLOR   := red | green | blue | yellow
    SHAPE   := circle | square | triangle
    PLACE   := on the left | on the right | at the top | at the bottom | in the center

Two distributions mirror the paper's setting:

- ``noisy`` ("pretraining", like web data): textured low-saturation backgrounds with gray
  clutter, jittered sizes, positions and colors, mild blur and pixel noise, and a fraction of
  captions (``NOISY_WRONG_CAPTION_FRACTION``) wrong in exactly one attribute.
- ``clean`` ("preferred", like Pick-a-Pic winners): plain background, canonical size, position
  and color, every caption right.

Shapes are drawn axis-aligned and fully saturated while backgrounds and clutter stay grayish, so
the analytic judge (``spin_jax.toy.judge``) can read the attributes back. Sample ``i`` of a
dataset depends only on ``(seed, i)`` (its own ``numpy`` generator), so datasets of different
sizes share their prefixes and any sample can be regenerated alone.

Command line: ``python -m spin_jax.toy.shapes --out DIR --distribution clean --n 512 --seed 0``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES = ("circle", "square", "triangle")
# Saturated colors with hues about 0 / 129 / 227 / 53 degrees: apart in hue, far from gray.
COLORS = {
    "red": (225, 35, 35),
    "green": (35, 175, 55),
    "blue": (40, 80, 230),
    "yellow": (235, 210, 30),
}
POSITIONS = ("left", "right", "top", "bottom", "center")
POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
# Center of each position's shape bounding box, as a fraction of the image side (x, y).
POSITION_CENTERS = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "center": (0.5, 0.5),
}
# Two-object scenes put their objects at opposite places (never overlapping), in this order.
POSITION_PAIRS = (("left", "right"), ("top", "bottom"))
ATTRIBUTES = {"color": tuple(COLORS), "shape": SHAPES, "position": POSITIONS}
DISTRIBUTIONS = ("clean", "noisy")

CANONICAL_SHAPE_SIZE = 0.375  # bounding-box side / image side (12 px at 32 px)
CLEAN_BACKGROUND = (236, 236, 236)
NOISY_WRONG_CAPTION_FRACTION = 0.2
NOISY_SIZE_RANGE = (0.30, 0.44)
NOISY_POSITION_JITTER = 0.05  # fraction of the image side, uniform in [-j, j] per axis
NOISY_HUE_JITTER = 8.0  # degrees
_SUPERSAMPLE = 4
# One caption per color, shape and position, for the image grids of the pretraining and demo runs.
GRID_PROMPTS = (
    "a red circle on the left",
    "a green square at the top",
    "a blue triangle on the right",
    "a yellow circle at the bottom",
    "a red triangle in the center",
    "a blue square on the left",
    "a green triangle at the bottom",
    "a yellow square on the right",
    "a blue circle at the top",
    "a green circle in the center",
    "a red square at the bottom",
    "a yellow triangle on the left",
)

_OBJECT_RE = "a ({c}) ({s}) ({p})".format(
    c="|".join(COLORS),
    s="|".join(SHAPES),
    p="|".join(POSITION_PHRASES.values()),
)
_CAPTION_RE = re.compile(rf"{_OBJECT_RE}(?: and {_OBJECT_RE})?")
_PHRASE_TO_POSITION = {v: k for k, v in POSITION_PHRASES.items()}


# ----------------------------------------------------------------------------- captions


def caption(objects: list[dict[str, str]]) -> str:
    """Caption of a scene: ``[{"color", "shape", "position"}, ...]`` -> "a red circle on the left"."""
    _check_objects(objects)
    return " and ".join(
        f"a {o['color']} {o['shape']} {POSITION_PHRASES[o['position']]}" for o in objects
    )


def parse_caption(text: str) -> list[dict[str, str]]:
    """Exact inverse of ``caption`` (case and repeated spaces are ignored).

    Raises ValueError naming the text when it is not in the grammar.
    """
    norm = " ".join(str(text).lower().split())
    m = _CAPTION_RE.fullmatch(norm)
    if m is None:
        raise ValueError(
            f"caption {text!r} is not in the shapes grammar "
            "('a <color> <shape> <place>' [' and ' ...]); "
            f"colors {list(COLORS)}, shapes {list(SHAPES)}, "
            f"places {list(POSITION_PHRASES.values())}"
        )
    g = m.groups()
    objects = []
    for i in range(0, len(g), 3):
        if g[i] is None:
            break
        objects.append(
            {"color": g[i], "shape": g[i + 1], "position": _PHRASE_TO_POSITION[g[i + 2]]}
        )
    return objects


def vocabulary() -> list[str]:
    """Every word that can appear in a caption, sorted."""
    words = {"a", "and"} | set(COLORS) | set(SHAPES)
    for phrase in POSITION_PHRASES.values():
        words.update(phrase.split())
    return sorted(words)


def all_combinations(num_objects: int = 1) -> list[list[dict[str, str]]]:
    """Every scene the generator can draw (as object lists), in a fixed order.

    One object: 4 colors x 3 shapes x 5 positions = 60 scenes. Two objects: objects at a
    position pair (left/right or top/bottom, in that caption order), any colors and shapes.
    """
    singles = [
        {"color": c, "shape": s}
        for c, s in itertools.product(ATTRIBUTES["color"], ATTRIBUTES["shape"])
    ]
    if num_objects == 1:
        return [[{**cs, "position": p}] for cs in singles for p in POSITIONS]
    if num_objects == 2:
        return [
            [{**a, "position": pa}, {**b, "position": pb}]
            for pa, pb in POSITION_PAIRS
            for a in singles
            for b in singles
        ]
    raise ValueError(f"num_objects must be 1 or 2, got {num_objects!r}")


def all_captions(num_objects: int = 1) -> list[str]:
    """Captions of ``all_combinations(num_objects)``, same order."""
    return [caption(objs) for objs in all_combinations(num_objects)]


def _check_objects(objects: list[dict[str, str]]) -> None:
    if not 1 <= len(objects) <= 2:
        raise ValueError(f"a scene has 1 or 2 objects, got {len(objects)}: {objects!r}")
    for o in objects:
        for field, values in ATTRIBUTES.items():
            if o.get(field) not in values:
                raise ValueError(
                    f"object {o!r}: field {field!r} must be one of {list(values)}, "
                    f"got {o.get(field)!r}"
                )


# ----------------------------------------------------------------------------- rendering


def _hsv_jitter(rgb: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """Shifts hue by up to NOISY_HUE_JITTER degrees and scales saturation/value a little."""
    x = np.asarray(rgb, np.float64) / 255.0
    mx, mn = x.max(), x.min()
    v, c = mx, mx - mn
    h = hue_degrees(x[None])[0]
    h = (h + rng.uniform(-NOISY_HUE_JITTER, NOISY_HUE_JITTER)) % 360.0
    v = v * rng.uniform(0.8, 1.0)
    c = c / mx * v * rng.uniform(0.8, 1.0)  # keep saturation within 80-100% of the canonical
    # HSV -> RGB with chroma c and value v.
    hp = h / 60.0
    xx = c * (1 - abs(hp % 2 - 1))
    table = [(c, xx, 0), (xx, c, 0), (0, c, xx), (0, xx, c), (xx, 0, c), (c, 0, xx)]
    r1 = np.asarray(table[int(hp) % 6])
    return (r1 + (v - c)) * 255.0


def hue_degrees(rgb: np.ndarray) -> np.ndarray:
    """Hue in degrees [0, 360) of RGB values in [0, 1] (last axis; 0 where chroma is 0)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx, mn = rgb.max(-1), rgb.min(-1)
    c = np.maximum(mx - mn, 1e-12)
    h = np.where(mx == r, ((g - b) / c) % 6, np.where(mx == g, (b - r) / c + 2, (r - g) / c + 4))
    return (h * 60.0) % 360.0


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Value noise in [-1, 1]: a random ``cells`` x ``cells`` grid, bicubic-upsampled."""
    grid = rng.uniform(0, 255, (cells, cells)).astype(np.uint8)
    up = Image.fromarray(grid, "L").resize((size, size), Image.BICUBIC)
    return np.asarray(up, np.float64) / 127.5 - 1.0


def _noisy_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Textured low-saturation background with gray clutter, float RGB in [0, 255]."""
    base = rng.uniform(70, 200)
    tint = rng.uniform(-12, 12, 3)
    bg = np.full((size, size, 3), base) + tint
    bg += rng.uniform(15, 35) * _smooth_noise(rng, size, int(rng.integers(3, 7)))[..., None]
    # Gray clutter: a few strokes and blobs, drawn in gray levels only (no chroma).
    ss = size * _SUPERSAMPLE
    clutter = Image.new("L", (ss, ss), 0)
    alpha = Image.new("L", (ss, ss), 0)
    d, da = ImageDraw.Draw(clutter), ImageDraw.Draw(alpha)
    for _ in range(int(rng.integers(2, 7))):
        level = int(rng.integers(0, 256))
        strength = int(rng.integers(60, 160))
        if rng.random() < 0.5:
            xy = [tuple(rng.uniform(0, ss, 2)), tuple(rng.uniform(0, ss, 2))]
            w = int(rng.integers(1, 3)) * _SUPERSAMPLE
            d.line(xy, fill=level, width=w)
            da.line(xy, fill=strength, width=w)
        else:
            cx, cy = rng.uniform(0, ss, 2)
            r = rng.uniform(0.03, 0.08) * ss
            box = [cx - r, cy - r, cx + r, cy + r]
            d.ellipse(box, fill=level)
            da.ellipse(box, fill=strength)
    clutter_a = np.asarray(alpha.resize((size, size), Image.BOX), np.float64)[..., None] / 255.0
    clutter_v = np.asarray(clutter.resize((size, size), Image.BOX), np.float64)[..., None]
    bg = bg * (1 - clutter_a) + clutter_v * clutter_a
    return np.clip(bg, 0, 255)


def _shape_coverage(shape: str, cx: float, cy: float, side: float, size: int) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of a shape with bounding box centered at (cx, cy) px."""
    ss = size * _SUPERSAMPLE
    k = _SUPERSAMPLE
    x0, y0, x1, y1 = (
        (cx - side / 2) * k,
        (cy - side / 2) * k,
        (cx + side / 2) * k,
        (cy + side / 2) * k,
    )
    mask = Image.new("L", (ss, ss), 0)
    d = ImageDraw.Draw(mask)
    if shape == "circle":
        d.ellipse([x0, y0, x1, y1], fill=255)
    elif shape == "square":
        d.rectangle([x0, y0, x1, y1], fill=255)
    elif shape == "triangle":
        d.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; shapes are {list(SHAPES)}")
    return np.asarray(mask.resize((size, size), Image.BOX), np.float64) / 255.0


def render(
    objects: list[dict[str, str]],
    size: int = 32,
    distribution: str = "clean",
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Draws a scene; returns uint8 [size, size, 3].

    ``clean`` is deterministic and ignores ``rng``. ``noisy`` draws background, jitter, blur
    and noise from ``rng`` (required); the same rng state with other attributes gives the same
    background and jitter, which is how tests make images that differ in one attribute only.
    """
    _check_objects(objects)
    _check_size(size)
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    noisy = distribution == "noisy"
    if noisy and rng is None:
        raise ValueError("render(distribution='noisy') needs an rng (np.random.Generator)")
    if noisy:
        img = _noisy_background(rng, size)
    else:
        img = np.broadcast_to(np.asarray(CLEAN_BACKGROUND, np.float64), (size, size, 3)).copy()
    placed = []  # (object, color, cx, cy, side) in pixels
    for o in objects:
        fx, fy = POSITION_CENTERS[o["position"]]
        color = np.asarray(COLORS[o["color"]], np.float64)
        side = CANONICAL_SHAPE_SIZE * size
        if noisy:
            side = rng.uniform(*NOISY_SIZE_RANGE) * size
            fx += rng.uniform(-NOISY_POSITION_JITTER, NOISY_POSITION_JITTER)
            fy += rng.uniform(-NOISY_POSITION_JITTER, NOISY_POSITION_JITTER)
            color = _hsv_jitter(COLORS[o["color"]], rng)
        placed.append([o, color, fx * size, fy * size, side])
    if len(placed) == 2:
        _separate(placed, gap=size / 16)
    for o, color, cx, cy, side in placed:
        # Keep the whole shape inside the frame (half a pixel of margin).
        lo, hi = side / 2 + 0.5, size - side / 2 - 0.5
        cx, cy = float(np.clip(cx, lo, hi)), float(np.clip(cy, lo, hi))
        a = _shape_coverage(o["shape"], cx, cy, side, size)[..., None]
        img = img * (1 - a) + color * a
    if noisy:
        radius = rng.uniform(0.0, 0.6)
        pil = Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")
        img = np.asarray(pil.filter(ImageFilter.GaussianBlur(radius)), np.float64)
        img = img + rng.normal(0.0, rng.uniform(0.0, 6.0), img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _separate(placed: list[list[Any]], gap: float) -> None:
    """Moves two objects apart along the axis joining their places until ``gap`` px apart.

    Jitter can make the objects of a pair touch; touching objects of one color would merge.
    """
    (_, _, x0, y0, s0), (_, _, x1, y1, s1) = placed
    axis = 2 if abs(x1 - x0) >= abs(y1 - y0) else 3
    lo, hi = (0, 1) if placed[0][axis] <= placed[1][axis] else (1, 0)
    short = (s0 + s1) / 2 + gap - (placed[hi][axis] - placed[lo][axis])
    if short > 0:
        placed[lo][axis] -= short / 2
        placed[hi][axis] += short / 2


def _check_size(size: int) -> None:
    if not isinstance(size, int | np.integer) or size < 16 or size % 8:
        raise ValueError(f"size must be a multiple of 8 and >= 16 (32 or 64), got {size!r}")


# ----------------------------------------------------------------------------- sampling


def _random_objects(rng: np.random.Generator, num_objects: int) -> list[dict[str, str]]:
    def pick(field: str) -> str:
        values = ATTRIBUTES[field]
        return values[int(rng.integers(len(values)))]

    if num_objects == 1:
        return [{"color": pick("color"), "shape": pick("shape"), "position": pick("position")}]
    pair = POSITION_PAIRS[int(rng.integers(len(POSITION_PAIRS)))]
    return [{"color": pick("color"), "shape": pick("shape"), "position": p} for p in pair]


def _corrupt(rng: np.random.Generator, objects: list[dict[str, str]]) -> list[dict[str, str]]:
    """Copy of the scene with one attribute of one object changed to another value."""
    out = [dict(o) for o in objects]
    i = int(rng.integers(len(out)))
    field = ("color", "shape", "position")[int(rng.integers(3))]
    others = [v for v in ATTRIBUTES[field] if v != out[i][field]]
    out[i][field] = others[int(rng.integers(len(others)))]
    return out


def make_sample(
    distribution: str, seed: int, index: int, size: int = 32, num_objects: int = 1
) -> dict[str, Any]:
    """Sample ``index`` of the dataset ``(distribution, seed)``.

    Returns ``{"image": uint8 [size, size, 3], "text": caption, "objects": the true objects,
    "caption_objects": the objects the caption names, "caption_correct": bool,
    "true_text": the caption of the true objects}``.
    """
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    if num_objects not in (1, 2):
        raise ValueError(f"num_objects must be 1 or 2, got {num_objects!r}")
    rng = np.random.default_rng([int(seed), int(index), DISTRIBUTIONS.index(distribution)])
    objects = _random_objects(rng, num_objects)
    said = objects
    if distribution == "noisy" and rng.random() < NOISY_WRONG_CAPTION_FRACTION:
        said = _corrupt(rng, objects)
    image = render(objects, size, distribution, rng)
    return {
        "image": image,
        "text": caption(said),
        "true_text": caption(objects),
        "objects": objects,
        "caption_objects": said,
        "caption_correct": said == objects,
    }


def generate(
    distribution: str, n: int, seed: int = 0, size: int = 32, num_objects: int = 1
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Samples 0..n-1: (uint8 images [n, size, size, 3], records without the image)."""
    images, records = [], []
    for i in range(int(n)):
        s = make_sample(distribution, seed, i, size, num_objects)
        images.append(s.pop("image"))
        records.append(s)
    if not images:
        return np.zeros((0, size, size, 3), np.uint8), []
    return np.stack(images), records


def write_imagefolder(
    out_dir: str,
    distribution: str,
    n: int,
    seed: int = 0,
    size: int = 32,
    num_objects: int = 1,
) -> str:
    """Writes ``n`` PNGs and ``metadata.jsonl`` (Hugging Face imagefolder layout); returns its path.

    Each line: ``file_name``, ``text`` (the caption, possibly wrong for ``noisy``),
    ``true_text``, ``caption_correct``, ``objects`` (true attributes, list of dicts),
    ``color``/``shape``/``position`` (the first object's true attributes, i.e. the only
    object's in one-object scenes), ``distribution``, ``seed``, ``index``, ``size``.
    """
    os.makedirs(out_dir, exist_ok=True)
    width = max(5, len(str(max(int(n) - 1, 0))))
    meta_path = os.path.join(out_dir, "metadata.jsonl")
    with open(meta_path, "w") as f:
        for i in range(int(n)):
            s = make_sample(distribution, seed, i, size, num_objects)
            name = f"{i:0{width}d}.png"
            Image.fromarray(s["image"], "RGB").save(os.path.join(out_dir, name))
            first = s["objects"][0]
            line = {
                "file_name": name,
                "text": s["text"],
                "true_text": s["true_text"],
                "caption_correct": s["caption_correct"],
                "objects": s["objects"],
                "color": first["color"],
                "shape": first["shape"],
                "position": first["position"],
                "distribution": distribution,
                "seed": int(seed),
                "index": i,
                "size": int(size),
            }
            f.write(json.dumps(line) + "\n")
    return meta_path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Write the shapes toy dataset as an imagefolder.")
    p.add_argument("--out", required=True, help="output folder (PNGs + metadata.jsonl)")
    p.add_argument("--distribution", choices=DISTRIBUTIONS, default="clean")
    p.add_argument("--n", type=int, default=512, help="number of images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=32, help="image side in pixels (32 or 64)")
    p.add_argument("--num-objects", type=int, choices=(1, 2), default=1)
    a = p.parse_args(argv)
    if a.n < 0:
        p.error(f"--n must be >= 0, got {a.n}")
    try:
        _check_size(a.size)
    except ValueError as e:
        p.error(str(e))
    path = write_imagefolder(a.out, a.distribution, a.n, a.seed, a.size, a.num_objects)
    print(f"wrote {a.n} {a.distribution} images of {a.size}px and {path}")


if __name__ == "__main__":
    main()
