"""Open untrusted image bytes as RGB, repairing what can be repaired and naming what cannot.

``check_image`` reads only the header and the PNG chunk checksums (cheap enough for a scan of every
row at setup); ``load_rgb`` decodes. Both raise ``BadImage(reason)`` for a row that must be skipped
and return the repairs they applied, e.g. ``["converted CMYK to RGB", "applied EXIF orientation 6"]``.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Pillow's own decompression-bomb limit (about 89 megapixels): a larger image is skipped, not decoded.
MAX_IMAGE_PIXELS = 89_478_485
EXIF_ORIENTATION = 0x0112


class BadImage(Exception):
    """The row's image cannot be used; ``str(error)`` is the reason the data report gives."""


def open_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS, min_side: int = 8) -> Image.Image:
    """Open (header only) and refuse what no repair can save: not an image, a decompression bomb, a tiny image."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        raise BadImage(f"over the decompression-bomb limit ({error})") from error
    except UnidentifiedImageError as error:
        raise BadImage("not an image (unidentified format)") from error
    except OSError as error:
        raise BadImage(f"unreadable image header ({error})") from error
    width, height = image.size
    if width * height > max_pixels:
        raise BadImage(f"{width}x{height} is over the decompression-bomb limit of {max_pixels} pixels")
    if min(width, height) < min_side:
        raise BadImage(f"{width}x{height} is smaller than {min_side} px on a side")
    return image


def repairs_needed(image: Image.Image) -> list[str]:
    """What ``to_rgb`` will change, read from the header alone."""
    repairs = []
    try:
        # PNG keeps EXIF after the pixel data: reading it walks the whole file.
        orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    except Exception as error:
        raise BadImage(f"truncated or corrupt image data ({error})") from error
    if orientation not in (1, None):
        repairs.append(f"applied EXIF orientation {orientation}")
    if image.mode != "RGB":
        transparent = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
        how = " (alpha composited on white)" if transparent else ""
        repairs.append(f"converted {image.mode} to RGB{how}")
    return repairs


def check_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS, min_side: int = 8) -> list[str]:
    """Header and checksum check without decoding pixels; returns the repairs loading will apply."""
    repairs = repairs_needed(open_image(data, max_pixels, min_side))
    image = Image.open(io.BytesIO(data))  # verify() must come right after open
    try:
        # PNG: walks every chunk and checks its CRC, so a truncated file fails here. JPEG: a no-op.
        image.verify()
    except Exception as error:
        raise BadImage(f"truncated or corrupt image data ({error})") from error
    return repairs


def to_rgb(image: Image.Image) -> Image.Image:
    """Apply EXIF rotation, then convert any mode to 8-bit RGB without losing the picture."""
    image = ImageOps.exif_transpose(image)
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        # 16-bit (I;16, I) and float images: convert("RGB") would clip them to white; rescale to 8 bits.
        array = np.asarray(image, dtype=np.float64)
        scale = 255.0 / 65535.0 if array.max() > 255 else 1.0
        image = Image.fromarray(np.clip(array * scale + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        # Transparent pixels often hold black or garbage colour: put them on white, as a viewer shows them.
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_rgb(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS, min_side: int = 8) -> tuple[Image.Image, list[str]]:
    """Decode to RGB; returns the image and the repairs applied. Raises ``BadImage`` for truncated data too."""
    image = open_image(data, max_pixels, min_side)
    repairs = repairs_needed(image)
    try:
        image.load()
        return to_rgb(image), repairs
    except Exception as error:
        raise BadImage(f"truncated or corrupt image data ({error})") from error
