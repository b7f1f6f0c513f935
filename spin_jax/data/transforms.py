"""Image decoding, resizing, cropping and flipping for the input pipeline (NumPy + PIL).

Choices (they are part of the latent-cache key, so changing one rebuilds the cache):
- Resize: the shorter side goes to `resolution` with PIL's bicubic filter (`resize_filter`,
  also "bilinear" or "lanczos"); PIL antialiases when it downscales. Diffusion-DPO's scripts use
  bilinear; bicubic is sharper at the same cost.
- JPEG draft: a JPEG at least twice the target size is decoded at 1/2, 1/4 or 1/8 scale by
  libjpeg's DCT scaling before the bicubic resize (`draft=True`). Decoding is the main CPU cost
  of the pipeline and this cuts it several fold for 1024px images; the result differs from a
  full decode + resize by less than one grey level on average.
- Colour: palette, greyscale and CMYK images are converted to RGB; images with transparency are
  composited onto white (a transparent background reads as white in every viewer).
  High-bit-depth integer or float images ("I", "F", "I;16") are refused as unsupported.
- Images whose shorter side is below `min_size` are refused: upscaling them 2x or more would
  teach the model blur.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

# Reasons a record is skipped; the pipeline counts each and the latent cache stores the code.
SKIP_REASONS = (
    "missing_file",
    "missing_image",
    "corrupt_image",
    "unsupported_mode",
    "too_small",
    "empty_caption",
)

RESIZE_FILTERS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}

_CONVERTIBLE_MODES = ("1", "L", "P", "CMYK", "YCbCr", "LAB", "HSV")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class ImageError(Exception):
    """An image that cannot be used; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def decode_image(
    data: bytes | None, *, resolution: int, min_size: int, draft: bool = True
) -> tuple[Image.Image, bool]:
    """Decodes encoded image bytes to an RGB PIL image.

    Returns (image, converted) where `converted` says the source was not plain RGB.
    Raises ImageError for empty, corrupt, too small or unsupported images.
    """
    if data is None or len(data) == 0:
        raise ImageError("missing_image", "no image bytes")
    try:
        with warnings.catch_warnings():
            # A DecompressionBombWarning becomes an error: such an image is not a photo.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if min(w, h) < min_size:
                raise ImageError("too_small", f"{w}x{h} is below min_size={min_size}")
            if draft and img.format == "JPEG" and min(w, h) >= 2 * resolution:
                scale = resolution / min(w, h)
                img.draft("RGB", (int(np.ceil(w * scale)), int(np.ceil(h * scale))))
            img.load()
    except ImageError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt data.
        raise ImageError("corrupt_image", f"{type(e).__name__}: {e}") from None
    mode = img.mode
    if mode == "RGB":
        return img, False
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB"), True
    if mode in _CONVERTIBLE_MODES:
        return img.convert("RGB"), True
    raise ImageError("unsupported_mode", f"PIL mode {mode!r}")


def resize_and_crop(
    img: Image.Image,
    resolution: int,
    *,
    crop: str = "center",
    rng: np.random.Generator | None = None,
    resize_filter: str = "bicubic",
) -> np.ndarray:
    """Resizes the shorter side to `resolution`, crops a square; returns uint8 [res, res, 3]."""
    if resize_filter not in RESIZE_FILTERS:
        raise ValueError(f"resize_filter={resize_filter!r}; expected one of {list(RESIZE_FILTERS)}")
    w, h = img.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), RESIZE_FILTERS[resize_filter])
    if crop == "center":
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
    elif crop == "random":
        if rng is None:
            raise ValueError("crop='random' needs an rng")
        left = int(rng.integers(0, nw - resolution + 1))
        top = int(rng.integers(0, nh - resolution + 1))
    else:
        raise ValueError(f"crop={crop!r}; expected 'center' or 'random'")
    arr = np.asarray(img)[top : top + resolution, left : left + resolution]
    return np.ascontiguousarray(arr)


def hflip(image: np.ndarray) -> np.ndarray:
    """Horizontal flip of an HWC (or NHWC) array."""
    return np.ascontiguousarray(image[..., ::-1, :])


def to_float(images: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    out = np.multiply(images, np.float32(1 / 127.5), dtype=np.float32)
    out -= np.float32(1.0)
    return out


def load_image(
    data: bytes | None,
    resolution: int,
    *,
    min_size: int,
    crop: str = "center",
    rng: np.random.Generator | None = None,
    resize_filter: str = "bicubic",
    draft: bool = True,
) -> tuple[np.ndarray, bool]:
    """Bytes -> uint8 [res, res, 3] RGB crop and whether a colour conversion happened."""
    img, converted = decode_image(data, resolution=resolution, min_size=min_size, draft=draft)
    arr = resize_and_crop(img, resolution, crop=crop, rng=rng, resize_filter=resize_filter)
    return arr, converted
