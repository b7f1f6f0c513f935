"""Image preprocessing of the four scorers, as their reference code does it.

Every reference scores a PIL image: resize with PIL's bicubic filter (torchvision's ``Resize``
and transformers' ``CLIPImageProcessor`` both call ``PIL.Image.resize`` on 8-bit images, so the
result is rounded to 8 bits), then crop or pad, then ``ToTensor`` (/255) and the OpenAI CLIP
mean/std. :func:`preprocess` does the same on the host with PIL and NumPy, so it matches the
references bit for bit. The modes:

- ``"crop"``: torchvision ``Resize(size)`` (shortest side to ``size``, long side
  ``int(size * long / short)``) then ``CenterCrop(size)`` (offset ``round((h - size) / 2)``).
  ImageReward, the aesthetic predictor (OpenAI ``clip``'s transform).
- ``"crop_floor"``: transformers' ``CLIPImageProcessor``: the same resize, crop offset
  ``(h - size) // 2``. PickScore. Differs from ``"crop"`` by one pixel of offset when the
  difference is odd and rounds up (``round(1.5) = 2`` vs ``3 // 2 = 1``); never on square images.
- ``"pad"``: open_clip's ``ResizeMaxSize`` (HPSv2's validation transform): longest side to
  ``size`` (other side ``round(dim * scale)``), then pad to a square with black pixels
  (value 0 before normalisation), ``pad // 2`` before. The reference skips the padding when
  the longest side is already ``size`` (a non-square tensor the model cannot take); here it
  always pads. On square images ``"pad"`` and ``"crop"`` are the same plain resize.

:func:`preprocess_jax` does the same on the accelerator with ``jax.image.resize`` (bicubic,
Keys a = -0.5, antialiased when shrinking, like PIL's filter). With ``quantize=True`` it also
resizes width then height through 8-bit rounding, as PIL does; it is then within one 8-bit level
of PIL everywhere (PIL's fixed-point weights), and equal on all but about 0.05% of the values
(measured on 512 -> 224, pixel noise). Without quantisation the mean difference is about 0.14
of a level (5e-4 of the [0, 1] range) with up to 3 levels on pixel noise, where PIL's 8-bit
intermediate clips bicubic overshoot. One level is 1/255 = 3.9e-3 before normalisation.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MODES = ("crop", "crop_floor", "pad")


def to_uint8(images: np.ndarray | jax.Array) -> np.ndarray:
    """Images in [-1, 1] -> uint8, rounded as diffusers' ``numpy_to_pil`` does."""
    x = np.asarray(images, np.float32)
    return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _check_image(image: np.ndarray, where: str) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4) or image.dtype != np.uint8:
        raise ValueError(
            f"{where}: expected a uint8 HWC image with 1, 3 or 4 channels, got "
            f"{image.dtype} {image.shape}"
        )
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return image[:, :, :3]  # PIL's convert("RGB") drops alpha the same way


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    from PIL import Image

    if image.shape[:2] == (height, width):
        return image
    pil = Image.fromarray(image).resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(pil)


def resize_crop(image: np.ndarray, size: int, rounding: str = "round") -> np.ndarray:
    """Shortest side to ``size`` (PIL bicubic), then a centred ``size`` x ``size`` crop."""
    image = _check_image(image, "resize_crop")
    h, w = image.shape[:2]
    if h <= w:
        nh, nw = size, int(size * w / h)
    else:
        nh, nw = int(size * h / w), size
    image = _resize(image, nh, nw)
    if rounding == "round":
        top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    elif rounding == "floor":
        top, left = (nh - size) // 2, (nw - size) // 2
    else:
        raise ValueError(f"rounding={rounding!r} must be 'round' or 'floor'")
    return image[top : top + size, left : left + size]


def resize_pad(image: np.ndarray, size: int, fill: int = 0) -> np.ndarray:
    """Longest side to ``size`` (PIL bicubic), then padded to a square with ``fill``."""
    image = _check_image(image, "resize_pad")
    h, w = image.shape[:2]
    scale = size / float(max(h, w))
    nh, nw = round(h * scale), round(w * scale)
    image = _resize(image, nh, nw)
    out = np.full((size, size, 3), fill, np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top : top + nh, left : left + nw] = image
    return out


def normalize(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC -> float32, /255, minus the CLIP mean, over the CLIP std."""
    x = np.asarray(images, np.float32) / 255.0
    return (x - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)


def preprocess(images: np.ndarray | Sequence[np.ndarray], size: int, mode: str) -> np.ndarray:
    """uint8 images (NHWC array or a list of HWC arrays of any sizes) -> float32
    ``[N, size, size, 3]`` normalised with the CLIP mean/std. ``mode``: see the module doc."""
    if mode not in MODES:
        raise ValueError(f"preprocess mode {mode!r} not in {MODES}")
    out = []
    for image in images:
        if mode == "pad":
            out.append(resize_pad(image, size))
        else:
            out.append(resize_crop(image, size, "round" if mode == "crop" else "floor"))
    if not out:
        return np.zeros((0, size, size, 3), np.float32)
    return normalize(np.stack(out))


def preprocess_jax(
    images: jax.Array, size: int, mode: str = "crop", *, quantize: bool = True
) -> jax.Array:
    """On-device version of :func:`preprocess` for a batch NHWC in [-1, 1] (e.g. straight from
    the sampler). ``quantize`` rounds to 8-bit levels as saving a PNG and PIL's 8-bit two-pass
    resize do. Within one 8-bit level of PIL (module doc)."""
    if mode not in MODES:
        raise ValueError(f"preprocess mode {mode!r} not in {MODES}")
    x = (jnp.clip(images.astype(jnp.float32), -1.0, 1.0) + 1.0) * 127.5
    if quantize:
        x = jnp.round(x)
    b, h, w, c = x.shape
    if mode == "pad":
        scale = size / float(max(h, w))
        nh, nw = round(h * scale), round(w * scale)
    elif h <= w:
        nh, nw = size, int(size * w / h)
    else:
        nh, nw = int(size * h / w), size
    if quantize:
        # PIL resamples width then height through an 8-bit intermediate image.
        for shape in ((b, h, nw, c), (b, nh, nw, c)):
            if shape != x.shape:
                x = jax.image.resize(x, shape, method="bicubic", antialias=True)
                x = jnp.clip(jnp.round(x), 0.0, 255.0)
    elif (nh, nw) != (h, w):
        x = jax.image.resize(x, (b, nh, nw, c), method="bicubic", antialias=True)
    if mode == "pad":
        top, left = (size - nh) // 2, (size - nw) // 2
        x = jnp.pad(x, ((0, 0), (top, size - nh - top), (left, size - nw - left), (0, 0)))
    else:
        if mode == "crop":
            top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
        else:
            top, left = (nh - size) // 2, (nw - size) // 2
        x = x[:, top : top + size, left : left + size]
    mean = jnp.asarray(CLIP_MEAN, jnp.float32)
    std = jnp.asarray(CLIP_STD, jnp.float32)
    return (x / 255.0 - mean) / std
