"""Semantic accuracy on generated shapes (``sur_lightning.data.synthetic`` and the toy world).

A prompt such as "three red circles" asks for a count, a colour and a kind of shape. This
checker reads those back from an image with no learned model:

1. foreground: a pixel farther than ``foreground_threshold`` (Euclidean RGB) from the background
   colour belongs to some shape; split the foreground into connected components (4-connectivity)
   and drop those smaller than ``min_area`` pixels as specks;
2. colour: the palette colour nearest to a component's *median* RGB (``None`` when none is within
   ``tolerance``). Deciding per component rather than per pixel keeps anti-aliased or VAE-blurred
   edges, whose pixels sit between two palette colours, from splitting one shape into two;
3. shape: the ideal disc, square and apex-up triangle inscribed in the component's bounding box are
   rasterised, and the one with the highest IoU against the component wins;
4. validity: whatever the prompt, is this an image the toy world could have drawn (1-3 solid,
   shape-like, palette-coloured components on a clean background)? Noise textures, empty and crowded
   images are not; ``valid_image`` and ``check``'s "valid" say so (thresholds under ``VALID_COUNTS``).

On images drawn by ``draw_shapes`` and on their VAE reconstructions every answer is (nearly) exact;
on generated images it measures whether the model drew the right number of objects of the right
colour and shape.
"""

from __future__ import annotations

import re
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from sur_lightning.data.synthetic import BACKGROUND, COLORS, NUMBER_WORDS, SHAPES

try:  # scipy labels components in C; the BFS below is the fallback.
    from scipy import ndimage as _ndimage
except ImportError:  # pragma: no cover - depends on the environment
    _ndimage = None

DEFAULT_TOLERANCE = 100.0
DEFAULT_FOREGROUND_THRESHOLD = 60.0
DEFAULT_MIN_AREA = 4

# What a valid image is (``valid_image``): something the toy world could have drawn, whatever its
# target. Measured on 200 VAE reconstructions of world images (all valid), on 128 images of the shipped
# base (64 prompts, simple and complex; DDIM, 25 steps, guidance 4) and on blotchy noise textures:
VALID_COUNTS = range(1, 4)  # the world draws 1-3 shapes (``toyworld.world.COUNTS``)
# Best template IoU of a component. Drawn shapes score >= 0.95 and their VAE reconstructions >= 0.72;
# strokes and outlines score far less, and so do most blobs of two merged shapes (0.50 on the base's
# images; two touching side by side fill their box like a square and pass).
MIN_SHAPE_IOU = 0.6
# Share of a component's pixels within ``tolerance`` of its palette colour. Blurred or muddy shapes keep
# >= 0.66 (blurred edges sit between colour and background); a texture whose *median* happens to land
# near a palette colour does not: the median alone does not make a region one solid colour.
MIN_SOLID = 0.5
# Shapes cover <= 24 % of a world image (three 18 px shapes at 64 px), <= 34 % of the base's images; a
# colour filling the frame is a texture, not a shape on a background.
MAX_COVER = 0.5
# A background pixel (not foreground) farther than this from BACKGROUND is a visible tint or noise;
# VAE and sampling noise on the flat background stays well below it.
BACKGROUND_TOLERANCE = 30.0
# Share of the image that is dirt: specks (foreground outside every kept component) plus tinted
# background. Edge halos put <= 2.2 % there on VAE reconstructions and <= 3 % on the base's images;
# pale noise textures put 35 % or more.
MAX_DIRT = 0.05

_PALETTE_NAMES: tuple[str, ...] = tuple(COLORS)
_PALETTE = np.array([COLORS[name] for name in _PALETTE_NAMES], dtype=np.float32)  # [C, 3]
_NUMBERS = {word: n for n, word in enumerate(NUMBER_WORDS)} | {"a": 1, "an": 1}


def to_rgb_array(image: Image.Image | np.ndarray | torch.Tensor) -> np.ndarray:
    """Return an image as a uint8 array [H, W, 3].

    Accepts a PIL image, a uint8 array [H, W, 3], or a float tensor [3, H, W] in [0, 1].
    """
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a tensor [3, H, W] in [0, 1], got shape {tuple(image.shape)}")
        return (image.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an array [H, W, 3], got shape {array.shape}")
    return array.astype(np.uint8)


def foreground_mask(rgb: np.ndarray, threshold: float = DEFAULT_FOREGROUND_THRESHOLD) -> np.ndarray:
    """bool [H, W]: pixels of ``rgb`` [H, W, 3] farther than ``threshold`` from the background colour."""
    distance = np.linalg.norm(rgb.astype(np.float32) - np.asarray(BACKGROUND, dtype=np.float32), axis=-1)
    return distance > threshold


def nearest_color(rgb: np.ndarray, tolerance: float = DEFAULT_TOLERANCE) -> str | None:
    """The palette colour nearest to one RGB value [3], or None when none lies within ``tolerance``."""
    distances = np.linalg.norm(_PALETTE - np.asarray(rgb, dtype=np.float32)[None], axis=-1)
    index = int(distances.argmin())
    return _PALETTE_NAMES[index] if distances[index] <= tolerance else None


def _components_bfs(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of a bool mask [H, W]: (labels [H, W] with 0 = none, count)."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    height, width = mask.shape
    count = 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        count += 1
        labels[y0, x0] = count
        queue = deque([(y0, x0)])
        while queue:
            y, x = queue.popleft()
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = count
                    queue.append((ny, nx))
    return labels, count


def connected_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of a bool mask [H, W]: (labels [H, W] with 0 = none, count)."""
    if _ndimage is not None:
        labels, count = _ndimage.label(mask)
        return labels, int(count)
    return _components_bfs(mask)


def _templates(height: int, width: int) -> dict[str, np.ndarray]:
    """Ideal masks [height, width] of each shape filling a box of that size."""
    ys = (np.arange(height) + 0.5)[:, None] / height  # pixel centres in (0, 1)
    xs = (np.arange(width) + 0.5)[None, :] / width
    disc = (ys - 0.5) ** 2 + (xs - 0.5) ** 2 <= 0.25
    triangle = np.abs(xs - 0.5) <= ys / 2  # apex at the top centre, base along the bottom edge
    return {"circle": disc, "square": np.ones((height, width), bool), "triangle": triangle}


def template_ious(component: np.ndarray) -> dict[str, float]:
    """{shape: IoU} of the component [H, W] (bool) with each shape's ideal mask in its bounding box."""
    ys, xs = np.nonzero(component)
    crop = component[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    return {
        kind: float((crop & template).sum() / (crop | template).sum())
        for kind, template in _templates(*crop.shape).items()
    }


@dataclass
class Component:
    """One connected foreground region of at least ``min_area`` pixels, as the checker reads it."""

    mask: np.ndarray  # bool [H, W]
    color: str | None  # nearest palette colour of its median RGB, None when none is within tolerance
    kind: str  # the best-fitting shape
    iou: float  # IoU of that shape's ideal mask with the region: how shape-like it is
    solid: float  # share of its pixels within tolerance of ``color`` (0 when None): one solid fill?


def find_components(
    rgb: np.ndarray,
    tolerance: float = DEFAULT_TOLERANCE,
    min_area: int = DEFAULT_MIN_AREA,
    foreground_threshold: float = DEFAULT_FOREGROUND_THRESHOLD,
) -> tuple[np.ndarray, list[Component]]:
    """(foreground bool [H, W], the components of at least ``min_area`` pixels in scan order) of ``rgb``
    [H, W, 3] uint8. Smaller components are specks: not shapes, but still in the foreground mask."""
    foreground = foreground_mask(rgb, foreground_threshold)
    labels, n = connected_components(foreground)
    found = []
    for k in range(1, n + 1):
        mask = labels == k
        if mask.sum() < min_area:
            continue
        ious = template_ious(mask)
        kind = max(SHAPES, key=lambda kind: ious[kind])
        color = nearest_color(np.median(rgb[mask], axis=0), tolerance)
        solid = 0.0
        if color is not None:
            distances = np.linalg.norm(rgb[mask].astype(np.float32) - np.asarray(COLORS[color], np.float32), axis=-1)
            solid = float((distances <= tolerance).mean())
        found.append(Component(mask, color, kind, ious[kind], solid))
    return foreground, found


def is_valid(rgb: np.ndarray, foreground: np.ndarray, found: Sequence[Component]) -> bool:
    """Whether ``rgb`` [H, W, 3] with its ``foreground`` bool [H, W] and kept components (``find_components``)
    looks like a world image: 1-3 solid palette-coloured shapes on a clean background (thresholds above)."""
    if len(found) not in VALID_COUNTS:
        return False
    if any(c.iou < MIN_SHAPE_IOU or c.color is None or c.solid < MIN_SOLID for c in found):
        return False
    kept = np.logical_or.reduce([c.mask for c in found])
    if kept.mean() > MAX_COVER:
        return False
    specks = foreground & ~kept
    distance = np.linalg.norm(rgb.astype(np.float32) - np.asarray(BACKGROUND, dtype=np.float32), axis=-1)
    tinted = ~foreground & (distance > BACKGROUND_TOLERANCE)
    return float((specks | tinted).mean()) < MAX_DIRT


def valid_image(image: Image.Image | np.ndarray | torch.Tensor, **detect_kwargs) -> bool:
    """Whether one image (PIL, uint8 [H, W, 3] or float [3, H, W] in [0, 1]) is a valid toy-world image,
    right or wrong for its prompt: noise textures, empty and crowded images are not (see ``is_valid``).
    ``detect_kwargs``: those of ``detect_shapes``."""
    rgb = to_rgb_array(image)
    return is_valid(rgb, *find_components(rgb, **detect_kwargs))


def detect_shapes(
    image: Image.Image | np.ndarray | torch.Tensor,
    tolerance: float = DEFAULT_TOLERANCE,
    min_area: int = DEFAULT_MIN_AREA,
    foreground_threshold: float = DEFAULT_FOREGROUND_THRESHOLD,
) -> list[tuple[str | None, str]]:
    """Every shape found in one image as ``(color or None, kind)``, in scan order."""
    _, found = find_components(to_rgb_array(image), tolerance, min_area, foreground_threshold)
    return [(c.color, c.kind) for c in found]


def count_shapes(image: Image.Image | np.ndarray | torch.Tensor, **detect_kwargs) -> dict[tuple[str | None, str], int]:
    """Count the shapes in one image: ``{(color, kind): count}``, only non-zero entries.

    ``image``: PIL, uint8 array [H, W, 3] or float tensor [3, H, W] in [0, 1].
    """
    return dict(Counter(detect_shapes(image, **detect_kwargs)))


def parse_prompt(prompt: str) -> tuple[int, str, str]:
    """Read ``(count, color, kind)`` from a simple prompt: "three red circles" -> (3, "red", "circle").

    The count is a number word ("zero".."six", "a"/"an") or digits; the kind may be plural.
    Raises ``ValueError`` for a prompt that is not of that form.
    """
    words = re.findall(r"[a-z0-9]+", prompt.lower())
    if len(words) != 3:
        raise ValueError(f"cannot parse {prompt!r}: expected '<count> <color> <shape>', e.g. 'three red circles'")
    count_word, color, noun = words
    count = int(count_word) if count_word.isdigit() else _NUMBERS.get(count_word)
    kind = noun[:-1] if noun.endswith("s") and noun[:-1] in SHAPES else noun
    if count is None or color not in COLORS or kind not in SHAPES:
        raise ValueError(
            f"cannot parse {prompt!r}: count must be a number word or digits, colour one of {sorted(COLORS)}, "
            f"shape one of {list(SHAPES)}"
        )
    return count, color, kind


def check(
    image: Image.Image | np.ndarray | torch.Tensor,
    prompt: str | None = None,
    target: tuple[int, str, str] | None = None,
    **detect_kwargs,
) -> dict[str, bool]:
    """Judge one image against what it should show: ``target`` = (count, color, kind), or read from a
    complex ``prompt`` such as "three red circles" (narrative prompts need their target given).

    Returns ``{"count", "color", "shape", "exact", "valid"}``: the number of detected shapes equals the
    count; at least one shape was found and every one has the target's colour; likewise its kind; the
    detection is exactly ``{(color, kind): count}``; and the image is a valid one (``valid_image``).
    """
    if target is None:
        if prompt is None:
            raise ValueError("check needs a prompt or a target (count, color, kind)")
        target = parse_prompt(prompt)
    count, color, kind = target
    rgb = to_rgb_array(image)
    foreground, components = find_components(rgb, **detect_kwargs)  # once, for the counts and validity
    found = dict(Counter((c.color, c.kind) for c in components))
    return {
        "count": sum(found.values()) == count,
        "color": bool(found) and all(c == color for c, _ in found),
        "shape": bool(found) and all(k == kind for _, k in found),
        "exact": found == ({(color, kind): count} if count else {}),
        "valid": is_valid(rgb, foreground, components),
    }


def score(
    images: Sequence[Image.Image | np.ndarray | torch.Tensor] | torch.Tensor, prompts: Sequence[str], **detect_kwargs
) -> dict[str, float]:
    """Mean accuracies over a batch: ``{count_accuracy, color_accuracy, shape_accuracy, exact}`` in [0, 1].

    ``images``: a list (PIL / arrays [H, W, 3] / tensors [3, H, W]) or a tensor [B, 3, H, W] in
    [0, 1]; ``prompts``: B simple prompts. See ``check`` for what each accuracy counts.
    """
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
    if len(prompts) == 0:
        raise ValueError("score needs at least one image")
    results = [check(image, prompt, **detect_kwargs) for image, prompt in zip(images, prompts)]
    n = len(results)
    return {
        "count_accuracy": sum(r["count"] for r in results) / n,
        "color_accuracy": sum(r["color"] for r in results) / n,
        "shape_accuracy": sum(r["shape"] for r in results) / n,
        "exact": sum(r["exact"] for r in results) / n,
    }
