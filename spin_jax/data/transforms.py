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
- Geometry: the resized size and the crop follow from the image's original size (before a JPEG
  draft reduction), so a drafted and a fully decoded image give the same crop box, and SDXL's
  micro-conditioning (`sdxl_time_ids`) can be computed from the original size alone.
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
    img, converted, _ = decode_image_with_size(
        data, resolution=resolution, min_size=min_size, draft=draft
    )
    return img, converted


def decode_image_with_size(
    data: bytes | None, *, resolution: int, min_size: int, draft: bool = True
) -> tuple[Image.Image, bool, tuple[int, int]]:
    """`decode_image` plus the original (height, width) of the stored image: a JPEG draft
    decodes at a reduced size, so the returned image's size may be smaller."""
    if data is None or len(data) == 0:
        raise ImageError("missing_image", "no image bytes")
    try:
        with warnings.catch_warnings():
            # A DecompressionBombWarning becomes an error: such an image is not a photo.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size  # before img.draft, which changes img.size
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
    return (*_to_rgb(img), (h, w))


def _to_rgb(img: Image.Image) -> tuple[Image.Image, bool]:
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


def resized_size(size: tuple[int, int], resolution: int) -> tuple[int, int]:
    """(height, width) after resizing an image of (height, width) `size` so that its shorter
    side is `resolution` (the longer side rounded, never below `resolution`)."""
    h, w = int(size[0]), int(size[1])
    if min(h, w) < 1:
        raise ValueError(f"image size {size}: expected a positive (height, width)")
    scale = resolution / min(h, w)
    return max(resolution, round(h * scale)), max(resolution, round(w * scale))


def center_crop_top_left(
    size: tuple[int, int], resolution: int, *, flipped: bool = False
) -> tuple[int, int]:
    """(top, left) of the square center crop in the resized image's pixel coordinates, for an
    image of original (height, width) `size`: what `resize_and_crop` cuts.

    ``flipped``: the crop of the mirrored version (`hflip` of the crop), in the mirrored resized
    image's coordinates. Cropping then mirroring equals mirroring then cropping at
    ``nw - resolution - left``: the same as ``left`` when ``nw - resolution`` is even, one more
    when it is odd (the floor of the centre moves to the other side).
    """
    nh, nw = resized_size(size, resolution)
    top, left = (nh - resolution) // 2, (nw - resolution) // 2
    return (top, nw - resolution - left) if flipped else (top, left)


def sdxl_time_ids(
    size: tuple[int, int], resolution: int, *, flipped: bool = False
) -> tuple[int, int, int, int, int, int]:
    """SDXL micro-conditioning of a center-cropped training image:
    (orig_h, orig_w, crop_top, crop_left, resolution, resolution)."""
    top, left = center_crop_top_left(size, resolution, flipped=flipped)
    return int(size[0]), int(size[1]), top, left, int(resolution), int(resolution)


def resize_and_crop(
    img: Image.Image,
    resolution: int,
    *,
    crop: str = "center",
    rng: np.random.Generator | None = None,
    resize_filter: str = "bicubic",
    original_size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Resizes the shorter side to `resolution`, crops a square; returns uint8 [res, res, 3].

    ``original_size``: (height, width) of the image before a JPEG draft reduction (default: the
    image's own size); the resized size follows from it (`resized_size`), so the crop is
    `center_crop_top_left(original_size, resolution)` whether or not the decode was drafted.
    """
    if resize_filter not in RESIZE_FILTERS:
        raise ValueError(f"resize_filter={resize_filter!r}; expected one of {list(RESIZE_FILTERS)}")
    w, h = img.size
    size = (h, w) if original_size is None else original_size
    nh, nw = resized_size(size, resolution)
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), RESIZE_FILTERS[resize_filter])
    if crop == "center":
        top, left = center_crop_top_left(size, resolution)
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
    arr, converted, _ = load_image_with_size(
        data, resolution, min_size=min_size, crop=crop, rng=rng, resize_filter=resize_filter,
        draft=draft,
    )  # fmt: skip
    return arr, converted


def load_image_with_size(
    data: bytes | None,
    resolution: int,
    *,
    min_size: int,
    crop: str = "center",
    rng: np.random.Generator | None = None,
    resize_filter: str = "bicubic",
    draft: bool = True,
) -> tuple[np.ndarray, bool, tuple[int, int]]:
    """`load_image` plus the image's original (height, width) (before any draft reduction)."""
    img, converted, size = decode_image_with_size(
        data, resolution=resolution, min_size=min_size, draft=draft
    )
    arr = resize_and_crop(
        img, resolution, crop=crop, rng=rng, resize_filter=resize_filter, original_size=size
    )
    return arr, converted, size
