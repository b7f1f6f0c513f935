"""Ground-truth judge for the shapes toy world: reads color, shape and position back from pixels.

No learned weights; every step is a fixed rule on the image (``shapes`` draws saturated shapes on
grayish backgrounds, so saturation separates objects from background and clutter):

1. Chroma ``C = max(rgb) - min(rgb)`` and hue per pixel. Chroma is blind to the brightness
   of a gray background, and a shape's edge blended with gray keeps the shape's hue with
   chroma in proportion to coverage, which makes the steps below robust to blur.
2. Candidate pixels have ``C > CANDIDATE_CHROMA``; each gets the named color of nearest hue.
   Connected components (8-neighbour) of each color's candidates are object candidates.
3. Per component: its chroma level (90th percentile) and the background's (median over the
   image) give a soft coverage map ``m = clip((C - C_bg) / (level - C_bg), 0, 1)`` around the
   component. The half-coverage mask gives the bounding box; ``sum(m)`` the area, which blur
   does not change.
4. Shape from the fill of the bounding box (square ~1.0, circle ~0.785, triangle ~0.5) and
   the vertical balance of the mass (an upright triangle's centroid sits 2/3 of the way down,
   a circle's and a square's in the middle). Position: the named place whose center is nearest
   to the bounding-box center (``shapes`` places shapes by their bounding box).
5. Components smaller than ``MIN_AREA_FRACTION`` of the image or than ``RELATIVE_AREA`` of the
   largest one are dropped (specks in imperfect generated images).

``judge(images, prompts)`` compares detections with each prompt's attributes: an image is
faithful when it holds exactly the prompt's number of objects and each matches in color, shape
and position.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
from scipy import ndimage

from spin_jax.toy import shapes

CANDIDATE_CHROMA = 0.2
MIN_AREA_FRACTION = 0.012
RELATIVE_AREA = 0.25
FIELDS = ("color", "shape", "position")

_COLOR_NAMES = tuple(shapes.COLORS)
_COLOR_HUES = shapes.hue_degrees(np.asarray(list(shapes.COLORS.values())) / 255.0)
_POS_NAMES = tuple(shapes.POSITION_CENTERS)
_POS_CENTERS = np.asarray([shapes.POSITION_CENTERS[p] for p in _POS_NAMES])
_EIGHT = np.ones((3, 3), bool)


def to_unit_rgb(images: Any) -> np.ndarray:
    """uint8 in [0, 255] or float in [-1, 1], HWC or NHWC -> float64 NHWC in [0, 1]."""
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"images must be HWC or NHWC RGB (last axis 3), got shape {x.shape}")
    if x.dtype == np.uint8:
        return x.astype(np.float64) / 255.0
    if np.issubdtype(x.dtype, np.floating) or x.dtype.name == "bfloat16":
        x = x.astype(np.float64)
        if not np.all(np.isfinite(x)):
            raise ValueError("images contain NaN or inf")
        return np.clip((x + 1.0) / 2.0, 0.0, 1.0)
    raise ValueError(f"images must be uint8 [0, 255] or float [-1, 1], got dtype {x.dtype}")


def _classify_shape(fill: float, balance: float) -> str:
    # Upright triangle: mass centroid 2/3 down the box (0.6 measured at 32 px, the apex is thin),
    # circle and square 0.5; fill 1.0 square, 0.79 circle. Margins fitted on blurred, noisy images.
    if balance > 0.545 or fill < 0.62:
        return "triangle"
    return "square" if fill > 0.88 else "circle"


def _detect_one(x: np.ndarray) -> list[dict[str, Any]]:
    h, w, _ = x.shape
    chroma = x.max(-1) - x.min(-1)
    hue = shapes.hue_degrees(x)
    bg = float(np.median(chroma))
    dh = np.abs(hue[..., None] - _COLOR_HUES)
    nearest = np.argmin(np.minimum(dh, 360.0 - dh), axis=-1)
    cand = chroma > max(CANDIDATE_CHROMA, bg + 0.1)
    found = []
    for ci, name in enumerate(_COLOR_NAMES):
        labels, n = ndimage.label(cand & (nearest == ci), structure=_EIGHT)
        for k in range(1, n + 1):
            comp = labels == k
            if comp.sum() < 2:
                continue
            core = ndimage.binary_erosion(comp, _EIGHT)
            level = float(
                np.median(chroma[core]) if core.sum() >= 3 else np.percentile(chroma[comp], 75)
            )
            if level - bg < 0.1:
                continue
            # Coverage around the component, of this hue only (or too gray to carry a hue), so
            # other objects nearby do not leak in. Unclipped above, so noise averages out.
            near = ndimage.binary_dilation(comp, _EIGHT, iterations=3)
            near &= (nearest == ci) | (chroma < CANDIDATE_CHROMA)
            m = np.where(near, np.clip((chroma - bg) / (level - bg), -1.0, 2.0), 0.0)
            area = float(m.sum())
            if area <= 0:
                continue
            # Continuous extents: per column (row) the largest coverage, lightly smoothed along
            # the other axis against noise; a fully covered column counts 1, an edge column its
            # covered fraction. Avoids the whole-pixel steps of a thresholded bounding box.
            mx = np.clip(ndimage.uniform_filter1d(m, 3, axis=0).max(0), 0.0, 1.0)
            my = np.clip(ndimage.uniform_filter1d(m, 3, axis=1).max(1), 0.0, 1.0)
            mx[mx < 0.15] = 0.0
            my[my < 0.15] = 0.0
            width, height = float(mx.sum()), float(my.sum())
            if width < 1.0 or height < 1.0:
                continue
            xs, ys = np.arange(w) + 0.5, np.arange(h) + 0.5
            cx, cy = float((xs * mx).sum() / width), float((ys * my).sum() / height)
            fill = area / (width * height)
            mass_y = float((ys[:, None] * m).sum() / area)
            balance = (mass_y - (cy - height / 2)) / height
            center = np.asarray([cx / w, cy / h])
            x0, x1 = int(np.floor(cx - width / 2)), int(np.ceil(cx + width / 2))
            y0, y1 = int(np.floor(cy - height / 2)), int(np.ceil(cy + height / 2))
            pos = _POS_NAMES[int(np.argmin(((_POS_CENTERS - center) ** 2).sum(-1)))]
            found.append(
                {
                    "color": name,
                    "shape": _classify_shape(fill, balance),
                    "position": pos,
                    "area": area / (h * w),
                    "center": (float(center[0]), float(center[1])),
                    "bbox": (int(x0), int(y0), int(x1), int(y1)),
                    "fill": fill,
                    "balance": balance,
                }
            )
    if not found:
        return []
    largest = max(d["area"] for d in found)
    keep = [d for d in found if d["area"] >= max(MIN_AREA_FRACTION, RELATIVE_AREA * largest)]
    return sorted(keep, key=lambda d: -d["area"])


def detect(images: Any) -> list[list[dict[str, Any]]]:
    """Objects found in each image, largest first.

    Each object: ``color``, ``shape``, ``position`` (names from ``shapes``), ``area`` (fraction
    of the image), ``center`` (x, y as fractions), ``bbox`` (x0, y0, x1, y1 px), ``fill`` and
    ``balance`` (the shape features).
    """
    return [_detect_one(x) for x in to_unit_rgb(images)]


def _match(
    want: list[dict[str, str]], got: list[dict[str, Any]]
) -> tuple[list[dict[str, bool]], bool]:
    """Pairs prompt objects with detections (best total agreement); per-object field hits.

    Prompt objects left without a detection miss every field.
    """
    best, best_score = [], -1
    for perm in itertools.permutations(range(len(got)), min(len(want), len(got))):
        hits = []
        for i, o in enumerate(want):
            d = got[perm[i]] if i < len(perm) else None
            hits.append({f: d is not None and d[f] == o[f] for f in FIELDS})
        score = sum(sum(h.values()) for h in hits)
        if score > best_score:
            best, best_score = hits, score
    faithful = len(got) == len(want) and all(all(h.values()) for h in best)
    return best, faithful


def judge(images: Any, prompts: list[str] | list[list[dict[str, str]]]) -> dict[str, Any]:
    """Scores images against their prompts (captions, or object lists from ``parse_caption``).

    Returns ``fidelity`` (fraction of faithful images), ``accuracy`` per field (``color``,
    ``shape``, ``position`` over prompt objects; ``count`` over images: the right number of
    objects found), ``correct`` (bool [N], faithful per image) and ``detections``.
    """
    x = to_unit_rgb(images)
    if len(prompts) != x.shape[0]:
        raise ValueError(f"got {x.shape[0]} images but {len(prompts)} prompts")
    wants = [shapes.parse_caption(p) if isinstance(p, str) else p for p in prompts]
    detections = [_detect_one(im) for im in x]
    correct, count_ok = [], []
    field_hits = {f: [] for f in FIELDS}
    for want, got in zip(wants, detections, strict=True):
        hits, faithful = _match(want, got)
        correct.append(faithful)
        count_ok.append(len(got) == len(want))
        for h in hits:
            for f in FIELDS:
                field_hits[f].append(h[f])
    n = max(len(correct), 1)
    accuracy = {f: float(np.mean(v)) if v else 0.0 for f, v in field_hits.items()}
    accuracy["count"] = float(sum(count_ok) / n)
    return {
        "fidelity": float(sum(correct) / n),
        "accuracy": accuracy,
        "correct": np.asarray(correct, bool),
        "detections": detections,
    }


# Weight of the feature distance in ``reward_fn``. Measured per-image distances d (32 px): noisy
# images to the clean renders of their true captions 5.3 on average (10-90%: 4.1-6.3), a clean
# render blurred by 1 px 0.42, a clean render 0. With 0.2 the noisy look costs about 1, and the
# +1 for a faithful image outweighs the spread (about 0.4) among noisy-looking images.
REWARD_DISTANCE_WEIGHT = 0.2


def reward_fn(
    images: Any,
    prompts: list[str] | list[list[dict[str, str]]],
    distance_weight: float = REWARD_DISTANCE_WEIGHT,
) -> np.ndarray:
    """Per-image reward for preference training (PSO's reward model in the toy world), [N] float.

    ``reward_i = correct_i - distance_weight * d_i``: ``correct_i`` is 1 when ``judge`` finds
    image i faithful to prompt i (exactly its objects, each with the right color, shape and
    position), else 0; ``d_i`` is the squared Euclidean distance between the image's
    ``distance.features`` vector and that of the clean render of the prompt (canonical size,
    place and color, plain background), i.e. a per-image "distance to clean data" on the
    features of the toy Frechet distance. The first term ranks right over wrong, the second
    ranks images of the same verdict by how clean they look. Deterministic, no learned
    weights; images uint8 or [-1, 1] floats (NHWC), side a multiple of 8.
    """
    from spin_jax.toy import distance  # distance imports this module

    x = to_unit_rgb(images)
    if len(prompts) != x.shape[0]:
        raise ValueError(f"reward_fn: got {x.shape[0]} images but {len(prompts)} prompts")
    wants = [shapes.parse_caption(p) if isinstance(p, str) else p for p in prompts]
    correct = judge(images, wants)["correct"].astype(np.float64)
    clean = np.stack([shapes.render(w, x.shape[1], "clean") for w in wants])
    d = ((distance.features(images) - distance.features(clean)) ** 2).sum(-1)
    return correct - float(distance_weight) * d
