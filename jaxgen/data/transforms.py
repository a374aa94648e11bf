"""Per-image and per-batch transforms: decode to RGB, resize + center crop, flip, uint8 -> float."""

from __future__ import annotations

import numpy as np
import PIL.Image
import PIL.ImageOps

# PIL modes read as 16-bit intensities; scaled to 8 bits by 1/257 (65535 -> 255).
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


class ImageModeError(ValueError):
    """A non-RGB image met with `convert_to_rgb=False`."""


def to_rgb(image: PIL.Image.Image, *, convert_to_rgb: bool, name: str) -> PIL.Image.Image:
    """Returns `image` in mode RGB; anything else is an `ImageModeError` unless `convert_to_rgb`.

    Conversion: L/P/CMYK/... through PIL, alpha (RGBA, LA, PA) dropped, 16-bit grey (I;16, I) scaled by 1/257.
    """
    if image.mode == "RGB":
        return image
    if not convert_to_rgb:
        raise ImageModeError(
            f"{name}: image mode is {image.mode!r}, not 'RGB'. Set data.convert_to_rgb=True to convert "
            "grayscale / alpha / palette / 16-bit images to RGB, or convert the files yourself."
        )
    if image.mode in _SIXTEEN_BIT_MODES:
        grey = np.clip(np.asarray(image, dtype=np.float64) / 257.0, 0, 255).round().astype(np.uint8)
        image = PIL.Image.fromarray(grey)
    return image.convert("RGB")


def resize_center_crop(image: PIL.Image.Image, size: int) -> PIL.Image.Image:
    """Resizes (bicubic, antialiased) so the shorter side is `size` pixels, then center-crops to [size, size]."""
    w, h = image.size
    if (w, h) == (size, size):
        return image
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((new_w, new_h), PIL.Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def load_image_file(path: str, *, image_size: int, convert_to_rgb: bool) -> np.ndarray:
    """Decodes an image file to uint8 [image_size, image_size, 3]; raises on unreadable files or wrong modes."""
    with PIL.Image.open(path) as image:
        if image.format == "JPEG":
            # Decode JPEGs at the smallest DCT scale that still covers image_size: much faster for big photos.
            image.draft(image.mode, (image_size, image_size))
        image = PIL.ImageOps.exif_transpose(image)
        image = to_rgb(image, convert_to_rgb=convert_to_rgb, name=path)
        return np.asarray(resize_center_crop(image, image_size), dtype=np.uint8)


def array_to_rgb(image: np.ndarray, *, image_size: int, convert_to_rgb: bool, name: str) -> np.ndarray:
    """uint8 [H, W, C] (C in {1, 3, 4}) or [H, W] -> uint8 [image_size, image_size, 3]."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (3, 4))):
        raise ValueError(f"{name}: expected a uint8 [H, W, 1|3|4] image, got {image.dtype} {image.shape}.")
    if image.ndim == 3 and image.shape[-1] == 3 and image.shape[:2] == (image_size, image_size):
        return image
    pil = to_rgb(PIL.Image.fromarray(image), convert_to_rgb=convert_to_rgb, name=name)
    return np.asarray(resize_center_crop(pil, image_size), dtype=np.uint8)


def random_flip(record: dict, rng: np.random.Generator) -> dict:
    """Flips `record["image"]` (uint8 [H, W, 3]) left-right with probability 1/2; other records pass through."""
    if "image" in record and rng.random() < 0.5:
        record = {**record, "image": record["image"][:, ::-1]}
    return record


def to_float_batch(batch: dict) -> dict:
    """`batch["image"]` uint8 [B, H, W, 3] -> float32 in [-1, 1] (0 -> -1, 255 -> 1); labels/tokens -> int32."""
    out = {k: np.asarray(v, dtype=np.int32) for k, v in batch.items() if k != "image"}
    if "image" in batch:
        out["image"] = np.asarray(batch["image"], dtype=np.float32) / np.float32(127.5) - np.float32(1.0)
    return out
